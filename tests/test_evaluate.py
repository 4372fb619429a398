"""Tests for evaluate.py on tiny 32x32 data and a tiny generator (CPU, a few seconds each).

Most tests substitute a stand-in for generate.render that follows the same contract (fast, and it records
what evaluate asked for); one test runs the real one. test_downstream.py uses the same data, checkpoints
and stand-in, from here.
"""

import csv
import json
import math
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import colors as mcolors
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import dataset  # noqa: E402
import evaluate  # noqa: E402
import generate  # noqa: E402
import models  # noqa: E402

SIZE = 32
TRAIN = {"nevus": 6, "melanoma": 3, "bkl": 2}
TEST = {"nevus": 3, "melanoma": 3, "bkl": 2}
CLASS_COLOR = {"nevus": (120, 70, 40), "melanoma": (40, 30, 60), "bkl": (160, 120, 90)}


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_data(root, size=SIZE, train=TRAIN, test=TEST, work_size=48):
    """preprocess.py layout at a working size other than the model's, so the resize path is exercised."""
    rng = np.random.default_rng(0)
    rows = []
    for split, counts in (("train", train), ("test", test)):
        for cls, n in counts.items():
            for i in range(n):
                stem = f"{split}_{cls}_{i}"
                yy, xx = np.mgrid[:work_size, :work_size]
                r = rng.uniform(0.2, 0.4) * work_size
                cy, cx = rng.uniform(0.4, 0.6, 2) * work_size
                inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
                image = np.empty((work_size, work_size, 3), np.uint8)
                image[:] = (225, 180, 160)
                image[inside] = CLASS_COLOR[cls]
                image = np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)
                write_png(root / split / "originals" / f"{stem}.png", image)
                write_png(root / split / "masks" / f"{stem}.png", (inside * 255).astype(np.uint8))
                rows.append((stem, cls, split))
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "label", "split"])
        w.writerows(rows)
    return root


def make_checkpoint(folder, epoch=3, **config_overrides):
    cfg = models.make_config(img_size=SIZE, ngf=4, ndf=4, **config_overrides)
    torch.manual_seed(0)
    # PyTorch's default init rather than pix2pix's N(0, 0.02): the latter makes an untrained tiny net render
    # an almost constant grey in which dropout noise rounds away, and diversity could not be seen.
    G = models.Generator(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"generator_epoch_{epoch}.pth"
    torch.save({"config": cfg, "generator": G.state_dict(), "epoch": epoch}, path)
    return path


def standin_render(generator, config, masks_uint8, labels=None, device="cpu", batch_size=64, amp=False, stochastic=False, seed=0,
                   styles=None):
    """What generate.render promises: uint8 renders, dropout on only when stochastic, seeded, given styles."""
    generator = generator.to(device).eval()
    for m in generator.modules():
        if isinstance(m, nn.Dropout):
            m.train(stochastic)
    torch.manual_seed(seed)
    out = []
    with torch.no_grad():
        for i in range(0, len(masks_uint8), batch_size):
            m = masks_uint8[i:i + batch_size].to(device).float() / 127.5 - 1
            planes = None
            if config.get("n_classes", 0) > 0:
                planes = models.class_planes(labels[i:i + batch_size].to(device), config["n_classes"], m.shape[-1])
            z = styles[i:i + batch_size].to(device) if styles is not None else None
            out.append(((generator(m, planes, z) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu())
    return torch.cat(out)


def record_renders(monkeypatch):
    """Substitute the stand-in render; returns the list of what the script asked it for."""
    log = []

    def render(generator, config, masks_uint8, labels=None, **kw):
        log.append({"masks": masks_uint8.clone(), "labels": None if labels is None else labels.clone(), **kw})
        return standin_render(generator, config, masks_uint8, labels, **kw)

    monkeypatch.setattr(generate, "render", render)  # generate.class_images (downstream.py) renders through it too
    return log


@pytest.fixture
def calls(monkeypatch):
    return record_renders(monkeypatch)


class TinyCNN(nn.Module):
    """Random-weight stand-in for Inception (uint8 -> N x 16 features)."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.net(x.float() / 127.5 - 1)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_nonblank_png(path, min_colors=3):
    img = Image.open(path)
    img.verify()  # raises on a truncated or corrupt file
    arr = np.asarray(Image.open(path).convert("RGB"))
    assert arr.shape[0] > 100 and arr.shape[1] > 100
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) >= min_colors
    assert (arr < 250).any(axis=2).mean() > 0.01  # some ink, not a white page
    return arr


def color_mask(arr, color, tol=3):
    return (np.abs(arr.astype(int) - np.array(color)) <= tol).all(axis=2)


# -------------------------------------------------------------------------------------------------- realism


def test_realism_writes_per_image_csv_and_summary_with_fid(tmp_path, calls, monkeypatch):
    data = make_data(tmp_path / "data")
    model = make_checkpoint(tmp_path / "models" / "RUN")
    monkeypatch.setattr(evaluate.metrics, "load_inception", lambda weights=None, device="cpu": (TinyCNN(), None))
    out = tmp_path / "out"
    summary = evaluate.main(["--model_folder", str(model.parent), "--data_dir", str(data), "--output_dir", str(out),
                             "--n_variations", "3", "--n_diversity_masks", "4", "--batch_size", "4", "--num_workers", "1"])
    n_test = sum(TEST.values())
    rows = read_csv(out / "per_image.csv")
    assert list(rows[0]) == ["name", "l1", "psnr", "ssim"]
    assert sorted(r["name"] for r in rows) == sorted(f"test_{c}_{i}" for c, n in TEST.items() for i in range(n))
    for r in rows:
        assert all(math.isfinite(float(r[k])) for k in ("l1", "psnr", "ssim"))
        assert 0 < float(r["l1"]) <= 2 and -1 <= float(r["ssim"]) <= 1
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["n_images"] == n_test and on_disk["epoch"] == 3 and on_disk["img_size"] == SIZE
    assert on_disk["paired"]["l1"] == pytest.approx(np.mean([float(r["l1"]) for r in rows]), abs=1e-5)
    dist = on_disk["distribution"]
    assert dist["status"] == "ok" and dist["half_size"] == n_test // 2
    for key in ("generated_vs_real", "generated_vs_real_halves", "real_vs_real_reference"):
        assert math.isfinite(dist[key]["fid"]) and dist[key]["fid"] >= -1e-6
    # a random generator is further from the real images than real images are from each other
    assert dist["generated_vs_real_halves"]["fid"] > dist["real_vs_real_reference"]["fid"]
    # deterministic full-split renders, then n_variations stochastic renders of the first masks, distinct seeds
    stochastic = [c for c in calls if c["stochastic"]]
    assert all(not c["stochastic"] for c in calls[: len(calls) - 3]) and len(stochastic) == 3
    assert len({c["seed"] for c in stochastic}) == 3 and all(len(c["masks"]) == 4 for c in stochastic)
    assert on_disk["diversity"]["status"] == "ok" and on_disk["diversity"]["value"] > 0  # dropout on: renders differ
    assert 0 < on_disk["diversity"]["texture"] <= 2
    assert summary["n_images"] == n_test
    # artefact scores and mask agreement for the renders and, as their reference, the real images
    for side in ("generated", "real"):
        scores = on_disk["texture"][side]
        assert scores["grid"] > 0 and -1 <= scores["repeat"] <= 1 and -1 <= scores["lesion_repeat"] <= 1 and 0 <= scores["mask_dice"] <= 1 and scores["detail_std"] >= 0
    assert on_disk["texture"]["real"]["mask_dice"] > 0.5  # dark ellipses on light skin: the OpenCV segmentation finds them
    alex = on_disk["distribution_alex"]
    assert alex["status"] == "ok" and alex["generated_vs_real_halves"]["fid"] > alex["real_vs_real_reference"]["fid"]


def test_realism_pairs_each_render_with_its_own_real_image(tmp_path, monkeypatch):
    """A render of constant grey (0 in [-1, 1]) has a known L1 against each real image: checks name <-> image pairing."""
    data = make_data(tmp_path / "data")
    model = make_checkpoint(tmp_path / "models" / "RUN", dropout=0.0)
    monkeypatch.setattr(generate, "render", lambda g, c, masks, labels=None, **kw: torch.full((len(masks), 3, SIZE, SIZE), 128, dtype=torch.uint8))
    out = tmp_path / "out"
    summary = evaluate.main(["--model_path", str(model), "--data_dir", str(data), "--output_dir", str(out),
                             "--inception_weights", str(tmp_path / "none.pth"), "--n_variations", "2", "--num_workers", "1"])
    for r in read_csv(out / "per_image.csv"):
        real = torch.from_numpy(dataset.read_image(str(data / "test" / "originals" / f"{r['name']}.png"), SIZE)).float() / 127.5 - 1
        assert float(r["l1"]) == pytest.approx(float((real - (128 / 127.5 - 1)).abs().mean()), abs=1e-5)
    assert summary["diversity"]["value"] == 0  # identical renders: no diversity


def test_realism_without_inception_says_unavailable_and_gives_no_number(tmp_path, calls, monkeypatch, capsys):
    data = make_data(tmp_path / "data")
    model = make_checkpoint(tmp_path / "pixelgan_models" / "20250101-000000", epoch=7)
    monkeypatch.chdir(tmp_path)  # default output folder is relative: pixelgan_outputs/<TS>/eval_epoch_<E>
    evaluate.main(["--model_folder", str(model.parent), "--data_dir", str(data), "--inception_weights", "nonexistent.pth",
                   "--n_variations", "2", "--n_diversity_masks", "2", "--num_workers", "1"])
    out = tmp_path / "pixelgan_outputs" / "20250101-000000" / "eval_epoch_7"
    text = (out / "summary.json").read_text()
    summary = json.loads(text)
    assert summary["distribution"]["status"].startswith("unavailable:")
    assert "not found" in summary["distribution"]["status"]
    inception = json.dumps(summary["distribution"])
    assert '"fid"' not in inception and '"kid_mean"' not in inception
    printed = capsys.readouterr().out
    assert "unavailable:" in printed and "FID (" not in printed
    assert len(read_csv(out / "per_image.csv")) == sum(TEST.values())


def test_realism_rejects_a_different_img_size(tmp_path, calls):
    data = make_data(tmp_path / "data")
    model = make_checkpoint(tmp_path / "models" / "RUN")
    with pytest.raises(cli.UsageError, match="img_size"):
        evaluate.main(["--model_path", str(model), "--data_dir", str(data), "--img_size", "64", "--output_dir", str(tmp_path / "o")])
    assert not calls


def test_realism_with_the_real_render(tmp_path):
    data = make_data(tmp_path / "data", test={"nevus": 2, "melanoma": 2})
    model = make_checkpoint(tmp_path / "models" / "RUN")
    out = tmp_path / "out"
    summary = evaluate.main(["--model_path", str(model), "--data_dir", str(data), "--output_dir", str(out), "--device", "cpu",
                             "--inception_weights", str(tmp_path / "none.pth"), "--n_variations", "2", "--n_diversity_masks", "2",
                             "--num_workers", "1"])
    assert len(read_csv(out / "per_image.csv")) == 4 and math.isfinite(summary["paired"]["ssim"])


# --------------------------------------------------------------------------------------------------- curves


def write_metrics_csv(run, epochs=10):
    """metrics.csv as train.py writes it: test metrics only on evaluation epochs (every 5th here)."""
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow("epoch,step,lr,loss_D,loss_G_gan,loss_G_l1,test_l1,test_psnr,test_ssim,seconds".split(","))
        for e in range(1, epochs + 1):
            evaluated = e % 5 == 0
            w.writerow([e, e * 100, 2e-4, 0.7 - 0.02 * e, 1.5 + 0.05 * e, 30 - e,
                        0.3 - 0.01 * e if evaluated else "", 14 + e if evaluated else "", 0.4 + 0.02 * e if evaluated else "", 12.5])
    return run / "metrics.csv"


def test_plot_curves_from_metrics_csv(tmp_path):
    run = tmp_path / "pixelgan_outputs" / "RUN"
    write_metrics_csv(run)
    out = evaluate.main(["--plot", str(run)])
    assert Path(out) == run / "curves.png"
    assert Path(out).stat().st_size > 20_000  # six panels of lines and text, not an empty canvas
    arr = assert_nonblank_png(out, min_colors=5)
    assert arr.shape[1] > arr.shape[0] > 400
    # the PNG carries the curves: marker interiors are the exact series colours
    assert color_mask(arr, [round(255 * c) for c in mcolors.to_rgb(evaluate.CURVE_COLORS[0])]).sum() > 100
    assert color_mask(arr, [round(255 * c) for c in mcolors.to_rgb(evaluate.CURVE_COLORS[1])]).sum() > 100


def test_curves_figure_draws_each_series_where_it_has_values(tmp_path):
    rows = evaluate.read_metrics_csv(write_metrics_csv(tmp_path / "RUN"))
    fig = evaluate.curves_figure(rows, "epoch", "t")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == [title for title, _ in evaluate.CURVE_PANELS]
    lines = {ax.get_title(): {line.get_label(): line for line in ax.get_lines()} for ax in axes}
    gan = lines["GAN losses (train)"]
    assert set(gan) == {"loss_D", "loss_G_gan"} and list(gan["loss_D"].get_xdata()) == list(range(1, 11))
    # test metrics exist only on evaluation epochs: those points, joined, and nothing for the others
    test_l1 = lines["test L1 ([-1,1] units)"]["test_l1"]
    assert list(test_l1.get_xdata()) == [5, 10] and list(test_l1.get_ydata()) == pytest.approx([0.25, 0.2])
    for ax in axes:  # every axis shows all of its data
        for line in ax.get_lines():
            lo, hi = ax.get_ylim()
            assert lo <= min(line.get_ydata()) and max(line.get_ydata()) <= hi
    # a run that never evaluated: the test panels say so instead of drawing empty axes
    fig = evaluate.curves_figure([{k: v for k, v in r.items() if not k.startswith("test_")} for r in rows], "epoch", "t")
    empty = [ax for ax in fig.axes if ax.get_title().startswith("test")]
    assert len(empty) == 3 and all(not ax.get_lines() and [t.get_text() for t in ax.texts] == ["no data"] for ax in empty)


def test_plot_needs_metrics_csv(tmp_path):
    with pytest.raises(cli.UsageError, match="metrics.csv"):
        evaluate.main(["--plot", str(tmp_path)])


# ------------------------------------------------------------------------------------------- moved away


def test_downstream_flag_names_the_new_command(tmp_path, capsys):
    argv = ["--downstream", "--data_dir", str(tmp_path / "my data"), "--model_folder", "pixelgan_models/RUN"]
    code = cli.run_cli(lambda: evaluate.main(argv))  # as `python evaluate.py --downstream ...` runs it
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "Traceback" not in err[0]
    assert "python downstream.py --data_dir" in err[0] and "--model_folder pixelgan_models/RUN" in err[0]
    assert shlex.split(err[0].split("python ", 1)[1]) == ["downstream.py", *argv[1:]]  # runnable as printed
    assert not (tmp_path / "my data").exists()
    with pytest.raises(SystemExit):  # and the study's own flags are gone from evaluate.py
        evaluate.main(["--model_folder", "m", "--seeds", "2"])
