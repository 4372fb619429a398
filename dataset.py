"""Paired (mask, image) data: find the pairs, decode them once into a uint8 cache, augment both alike.

A split folder is what preprocess.py writes: <split>/masks/<stem>.png and <split>/originals/<stem>.png.
generate.py also accepts a flat folder of masks (no originals).
"""
import csv
import os
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LABELS_FILE = "labels.csv"


def list_images(folder):
    """{stem: path} of the image files in a folder (extension case ignored)."""
    return {os.path.splitext(name)[0]: os.path.join(folder, name)
            for name in sorted(os.listdir(folder)) if name.lower().endswith(IMAGE_EXTENSIONS)}


def find_pairs(folder):
    """[(stem, mask_path, image_path or None)] for a split folder or a flat folder of masks."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder")
    mask_folder = os.path.join(folder, "masks")
    if not os.path.isdir(mask_folder):
        return [(stem, path, None) for stem, path in list_images(folder).items()]
    masks = list_images(mask_folder)
    original_folder = os.path.join(folder, "originals")
    originals = list_images(original_folder) if os.path.isdir(original_folder) else {}
    return [(stem, path, originals.get(stem)) for stem, path in masks.items()]


def read_labels(data_dir):
    """{stem: class name} from the labels.csv that preprocess.py writes; {} when there is none."""
    path = os.path.join(data_dir, LABELS_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"image_id", "label"} <= set(rows[0]):
        raise ValueError(f"{path}: expected columns image_id,label (got {','.join(rows[0])})")
    return {row["image_id"]: row["label"] for row in rows if row["label"]}


def read_mask(path, size):
    mask = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError(f"{path}: cannot be read as an image")
    mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
    return np.where(mask > 127, 255, 0).astype(np.uint8)[None]


def read_image(path, size):
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: cannot be read as an image")
    # INTER_AREA averages when shrinking, so fine texture does not alias into noise.
    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB).transpose(2, 0, 1))


class RandomRot90(v2.Transform):
    """Rotation by a random multiple of 90 degrees: exact (no resampling) and the same for every input."""

    def make_params(self, flat_inputs):
        return dict(k=int(torch.randint(4, ()).item()))

    def transform(self, inpt, params):
        if not isinstance(inpt, torch.Tensor):
            return inpt
        rotated = torch.rot90(inpt.as_subclass(torch.Tensor), params["k"], (-2, -1))
        return tv_tensors.wrap(rotated, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else rotated


def paired_augmentation():
    """Flips and 90-degree rotations (the 8 symmetries of the square): lesions have no canonical
    orientation, and none of these resamples pixels. v2 applies one draw to the image and its Mask."""
    return v2.Compose([v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), RandomRot90()])


class PairedDataset(torch.utils.data.Dataset):
    """All pairs of a split decoded once into uint8 tensors at img_size (N x 1 x S x S masks,
    N x 3 x S x S images), so no epoch ever decodes a JPEG or PNG again."""

    def __init__(self, folder, img_size, augment=False, labels=None, classes=(), num_workers=4):
        pairs = find_pairs(folder)
        if not pairs:
            raise ValueError(f"{folder}: no mask images found")
        self.folder = folder
        self.names = [stem for stem, _, _ in pairs]
        self.has_images = all(image_path is not None for _, _, image_path in pairs)
        if not self.has_images and any(image_path is not None for _, _, image_path in pairs):
            missing = next(mask_path for _, mask_path, image_path in pairs if image_path is None)
            raise ValueError(f"{missing}: mask has no matching image in {os.path.join(folder, 'originals')}")
        with ThreadPoolExecutor(max(1, num_workers)) as pool:  # OpenCV releases the GIL while decoding
            masks = list(pool.map(lambda p: read_mask(p[1], img_size), pairs))
            images = list(pool.map(lambda p: read_image(p[2], img_size), pairs)) if self.has_images else None
        self.masks = torch.from_numpy(np.stack(masks))
        self.images = torch.from_numpy(np.stack(images)) if images is not None else None
        labels = labels or {}
        self.classes = list(classes)
        self.labels = torch.tensor([self.classes.index(labels[n]) if labels.get(n) in self.classes else -1
                                    for n in self.names], dtype=torch.long)
        self.transform = paired_augmentation() if augment else None

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        mask = self.masks[index]
        image = self.images[index] if self.images is not None else torch.zeros((3,) + mask.shape[1:], dtype=torch.uint8)
        if self.transform is not None:
            image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
            image, mask = image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)
        return mask, image, self.labels[index], index


def to_model_range(uint8_batch, device, memory_format=torch.contiguous_format):
    """uint8 [0, 255] -> float [-1, 1] on the device (transfer the 4x smaller uint8, convert there)."""
    x = uint8_batch.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=memory_format)


def to_uint8(batch):
    """float [-1, 1] -> uint8 [0, 255] on the CPU."""
    return ((batch.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def save_image_grid(rows, path, columns=False):
    """Save uint8 N x C x H x W batches (C = 1 or 3) as a grid, one batch per row (per column if columns)."""
    from torchvision.utils import save_image
    grid = torch.stack([r.expand(-1, 3, -1, -1) if r.shape[1] == 1 else r for r in rows])  # kinds x N x 3 x H x W
    if columns:
        grid = grid.transpose(0, 1)
    save_image(grid.flatten(0, 1).float() / 255.0, path, nrow=grid.shape[1], padding=2)
