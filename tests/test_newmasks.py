"""dataset.new_masks and its checks: new lesion masks that pass them, keep the class and are not copies."""
import cv2
import numpy as np
import pytest
import torch

import cli
import dataset
from dataset import MASK_MARGIN, MIN_AREA, mask_problem, mask_shape_stats, new_masks

SIZE = 48


def lesion_masks(n, seed=0):
    """n ellipses of random size, axes and angle, well inside a SIZE x SIZE frame."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 1, SIZE, SIZE), np.uint8)
    for i in range(n):
        axes = (int(rng.integers(5, 14)), int(rng.integers(5, 14)))
        cv2.ellipse(out[i, 0], (int(rng.integers(18, 30)), int(rng.integers(18, 30))), axes, float(rng.integers(0, 180)),
                    0, 360, 255, -1)
    return torch.from_numpy(out)


@pytest.mark.parametrize("method", dataset.MASK_METHODS)
def test_new_masks_pass_the_checks_keep_the_classes_and_are_not_copies(method):
    real = lesion_masks(12)
    labels = ["melanoma"] * 4 + ["nevus"] * 8
    made, made_labels, report = new_masks(real, 24, seed=3, labels=labels, method=method)
    assert made.shape == (24, 1, SIZE, SIZE) and made.dtype == torch.uint8 and set(made.unique().tolist()) == {0, 255}
    margin = round(MASK_MARGIN * SIZE)
    for m in made[:, 0].numpy():
        assert mask_problem(m, margin) is None and (m > 0).mean() >= MIN_AREA
    # no copy of a training mask: every new mask overlaps every real one by less than all of it
    a, b = made.flatten(1).bool().float(), real.flatten(1).bool().float()
    inter = a @ b.T
    iou = inter / (a.sum(1, keepdim=True) + b.sum(1) - inter)
    assert iou.max() < 0.95
    assert made_labels.count("melanoma") == 8 and made_labels.count("nevus") == 16  # the training shares, 1 : 2
    assert set(report["shape_ks"]) == {"area_fraction", "compactness", "eccentricity"}
    assert all(0 <= v["ks"] <= 1 and 0 <= v["p"] <= 1 for v in report["shape_ks"].values())
    assert report["method"] == method and report["n_source_masks"] == 12
    again, _, _ = new_masks(real, 24, seed=3, labels=labels, method=method)
    other, _, _ = new_masks(real, 24, seed=4, labels=labels, method=method)
    assert torch.equal(made, again) and not torch.equal(made, other)  # --seed repeats


def test_each_new_mask_comes_from_masks_of_its_own_class():
    big = cv2.circle(np.zeros((SIZE, SIZE), np.uint8), (24, 24), 16, 255, -1)
    small = cv2.circle(np.zeros((SIZE, SIZE), np.uint8), (24, 24), 4, 255, -1)
    masks = torch.from_numpy(np.stack([big] * 3 + [small] * 3)[:, None])
    made, made_labels, _ = new_masks(masks, 12, seed=0, labels=["big"] * 3 + ["small"] * 3)
    areas = made.flatten(1).float().mean(1) / 255
    for area, label in zip(areas.tolist(), made_labels):
        assert (area > 0.2) if label == "big" else (area < 0.1)


def test_mask_problem_known_answers():
    disc = cv2.circle(np.zeros((40, 40), np.uint8), (20, 20), 8, 255, -1)
    assert mask_problem(disc) is None
    assert mask_problem(np.zeros((40, 40), np.uint8)) == "is empty"
    assert mask_problem(np.full((40, 40), 255, np.uint8)) == "is all lesion"
    two = cv2.circle(disc.copy(), (34, 34), 3, 255, -1)
    assert mask_problem(two) == "has 2 separate parts"
    ring = cv2.circle(disc.copy(), (20, 20), 3, 0, -1)
    assert mask_problem(ring) == "has a hole"
    assert mask_problem(cv2.circle(np.zeros((40, 40), np.uint8), (5, 20), 8, 255, -1)) == "touches the frame"
    assert mask_problem(cv2.circle(np.zeros((40, 40), np.uint8), (10, 20), 8, 255, -1), margin=3) == "touches the frame"


def test_mask_shape_stats_known_answers():
    disc = cv2.circle(np.zeros((100, 100), np.uint8), (50, 50), 20, 255, -1)
    ellipse = cv2.ellipse(np.zeros((100, 100), np.uint8), (50, 50), (30, 15), 30, 0, 360, 255, -1)
    stats = mask_shape_stats(np.stack([disc, ellipse]))
    assert stats["area_fraction"][0] == pytest.approx(np.pi * 20 ** 2 / 100 ** 2, rel=0.03)
    assert stats["eccentricity"][0] < 0.1
    assert stats["eccentricity"][1] == pytest.approx(np.sqrt(1 - 0.5 ** 2), abs=0.02)
    assert 4 * np.pi <= stats["compactness"][0] < 1.15 * 4 * np.pi  # a disc, up to the pixel staircase
    assert stats["compactness"][1] > stats["compactness"][0]


def test_empty_and_all_lesion_sources_are_named_in_one_line_each(capsys):
    masks = lesion_masks(3)
    masks[1] = 0
    masks[2] = 255
    made, _, report = new_masks(masks, 4, names=["a.png", "b.png", "c.png"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: b.png: empty; no outline to make new masks from, left out",
                   "warning: c.png: all lesion; no outline to make new masks from, left out"]
    assert report["n_source_masks"] == 1 and len(made) == 4
    with pytest.raises(cli.UsageError, match="no mask with a lesion outline"):
        new_masks(masks[1:], 4, names=["b.png", "c.png"])
    with pytest.raises(cli.UsageError, match="unknown mask method 'pca'"):
        new_masks(masks, 4, method="pca")
