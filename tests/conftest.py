"""Tiny (mask, image) data sets made on the fly, and the project root on sys.path."""
import csv
import os
import sys

import cv2
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(min(2, torch.get_num_threads()))

# Plumbing tests train the PatchGAN alone: the projected critic's pretrained trunk would only slow them
# down; test_train.py trains the full default (both critics) on its own.
TINY_MODEL = ["--img_size", "32", "--width", "4", "--num_workers", "0", "--no_tensorboard", "--no-projected_d"]


def write_split(folder, n, size=40, seed=0, classes=("melanoma", "nevus")):
    """n lesion-like pairs (dark ellipse on light skin) in folder/{masks,originals}; returns {stem: class}."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "masks"), exist_ok=True)
    os.makedirs(os.path.join(folder, "originals"), exist_ok=True)
    labels = {}
    for i in range(n):
        stem = f"{os.path.basename(folder)}_{i:03d}"
        mask = np.zeros((size, size), np.uint8)
        centre = (int(rng.integers(size // 3, 2 * size // 3)), int(rng.integers(size // 3, 2 * size // 3)))
        axes = (int(rng.integers(size // 8, size // 4)), int(rng.integers(size // 8, size // 4)))
        cv2.ellipse(mask, centre, axes, float(rng.integers(0, 180)), 0, 360, 255, -1)
        skin = rng.integers(150, 230, 3)
        image = np.empty((size, size, 3), np.uint8)
        image[:] = skin
        image[mask > 0] = skin // 3
        image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(os.path.join(folder, "masks", stem + ".png"), mask)
        cv2.imwrite(os.path.join(folder, "originals", stem + ".png"), image)
        labels[stem] = classes[i % len(classes)]
    return labels


def write_dataset(root, n_train=8, n_test=4, size=40, classes=("melanoma", "nevus")):
    labels = write_split(os.path.join(root, "train"), n_train, size, 0, classes)
    test_labels = write_split(os.path.join(root, "test"), n_test, size, 1, classes)
    with open(os.path.join(root, "labels.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "label", "split"])
        w.writerows([(k, v, "train") for k, v in labels.items()] + [(k, v, "test") for k, v in test_labels.items()])
    return root


@pytest.fixture
def tiny_data(tmp_path):
    return write_dataset(str(tmp_path / "data"))


@pytest.fixture
def run_dirs(tmp_path):
    return ["--models_dir", str(tmp_path / "models"), "--outputs_dir", str(tmp_path / "outputs")]
