"""Pairing, the uint8 cache and paired augmentation."""
import os

import cv2
import numpy as np
import torch

from conftest import write_split
from dataset import PairedDataset, find_pairs, read_labels, to_model_range


def test_pairs_are_cached_at_img_size_with_binary_masks(tmp_path):
    write_split(str(tmp_path / "train"), 5, size=40)
    ds = PairedDataset(str(tmp_path / "train"), 32)
    assert len(ds) == 5 and ds.has_images
    assert ds.masks.shape == (5, 1, 32, 32) and ds.images.shape == (5, 3, 32, 32)
    assert ds.masks.dtype == torch.uint8 and set(ds.masks.unique().tolist()) <= {0, 255}
    mask, image, label, index = ds[3]
    assert ds.names[index] == "train_003"
    x = to_model_range(image[None], "cpu")
    assert x.min() >= -1 and x.max() <= 1


def test_flat_folder_of_masks_has_no_images(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.full((20, 20), 255, np.uint8))
    assert find_pairs(str(tmp_path)) == [("a", str(tmp_path / "a.png"), None)]
    ds = PairedDataset(str(tmp_path), 16)
    assert not ds.has_images and ds.images is None


def test_augmentation_moves_mask_and_image_identically(tmp_path):
    # An asymmetric pattern whose image is the mask in every channel: any transform applied to one
    # and not the other (or a different one) breaks the equality.
    os.makedirs(tmp_path / "s" / "masks")
    os.makedirs(tmp_path / "s" / "originals")
    mask = np.zeros((16, 16), np.uint8)
    mask[2:5, 1:12] = 255
    mask[5:14, 1:4] = 255
    cv2.imwrite(str(tmp_path / "s" / "masks" / "p.png"), mask)
    cv2.imwrite(str(tmp_path / "s" / "originals" / "p.png"), np.stack([mask] * 3, -1))
    ds = PairedDataset(str(tmp_path / "s"), 16, augment=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(64):
        m, image, _, _ = ds[0]
        assert torch.equal(image, m.expand(3, -1, -1))
        seen.add(m.numpy().tobytes())
    assert len(seen) == 8  # all eight flips/rotations of the square occur


def test_jitter_crops_mask_and_image_at_one_random_offset(tmp_path):
    os.makedirs(tmp_path / "s" / "masks")
    os.makedirs(tmp_path / "s" / "originals")
    rng = np.random.default_rng(0)
    mask = np.where(rng.random((18, 18)) > 0.5, 255, 0).astype(np.uint8)  # decoded at 16 x 1.125 = 18: no resampling
    cv2.imwrite(str(tmp_path / "s" / "masks" / "p.png"), mask)
    cv2.imwrite(str(tmp_path / "s" / "originals" / "p.png"), np.stack([mask] * 3, -1))
    ds = PairedDataset(str(tmp_path / "s"), 16, augment=True, jitter=0.125)
    assert ds.images.shape[-1] == 18 and ds.center_images().shape == (1, 3, 16, 16)
    assert torch.equal(ds.center_images()[0, 0], torch.from_numpy(mask[1:17, 1:17]))
    torch.manual_seed(0)
    seen = set()
    for _ in range(200):
        m, image, _, _ = ds[0]
        assert m.shape == (1, 16, 16) and torch.equal(image, m.expand(3, -1, -1))
        seen.add(m.numpy().tobytes())
    assert len(seen) > 40  # 9 offsets x 8 symmetries: crops at many offsets, not only the flips


def test_labels_file_is_read(tmp_path):
    (tmp_path / "labels.csv").write_text("image_id,label,split\na,melanoma,train\nb,nevus,test\n")
    assert read_labels(str(tmp_path)) == {"a": "melanoma", "b": "nevus"}
    assert read_labels(str(tmp_path / "nothing")) == {}
