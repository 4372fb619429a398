"""Tests for evaluate.py on tiny 32x32 data and a tiny generator (CPU, a few seconds each).

Most tests substitute a stand-in for models.render that follows the same contract (fast, and it records
what evaluate asked for); one test runs the real one.
"""

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dataset  # noqa: E402
import evaluate
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
    """What models.render promises: uint8 renders, dropout on only when stochastic, seeded, given styles."""
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


@pytest.fixture
def calls(monkeypatch):
    """Substitute the stand-in render and record what evaluate asked it for."""
    log = []

    def render(generator, config, masks_uint8, labels=None, **kw):
        log.append({"masks": masks_uint8.clone(), "labels": None if labels is None else labels.clone(), **kw})
        return standin_render(generator, config, masks_uint8, labels, **kw)

    monkeypatch.setattr(models, "render", render)  # class renders for --downstream go through it too
    return log


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
    assert summary["n_images"] == n_test


def test_realism_pairs_each_render_with_its_own_real_image(tmp_path, monkeypatch):
    """A render of constant grey (0 in [-1, 1]) has a known L1 against each real image: checks name <-> image pairing."""
    data = make_data(tmp_path / "data")
    model = make_checkpoint(tmp_path / "models" / "RUN", dropout=0.0)
    monkeypatch.setattr(models, "render", lambda g, c, masks, labels=None, **kw: torch.full((len(masks), 3, SIZE, SIZE), 128, dtype=torch.uint8))
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
    assert '"fid"' not in text and '"kid_mean"' not in text
    printed = capsys.readouterr().out
    assert "unavailable:" in printed and "FID (" not in printed
    assert len(read_csv(out / "per_image.csv")) == sum(TEST.values())


def test_realism_rejects_a_different_img_size(tmp_path, calls):
    data = make_data(tmp_path / "data")
    model = make_checkpoint(tmp_path / "models" / "RUN")
    with pytest.raises(SystemExit, match="img_size"):
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


# ----------------------------------------------------------------------------------------------- downstream


def downstream_args(data, out, *extra):
    return ["--downstream", "--data_dir", str(data), "--output_dir", str(out), "--classifier", "small", "--img_size", str(SIZE),
            "--seeds", "1", "--epochs", "2", "--batch_size", "8", "--num_workers", "1", "--device", "cpu", *extra]


def test_downstream_with_generator_balances_minority_classes(tmp_path, calls):
    data = make_data(tmp_path / "data")
    classes = sorted(TRAIN)
    model = make_checkpoint(tmp_path / "models" / "RUN", n_classes=3, classes=classes)
    out = tmp_path / "out"
    result = evaluate.main(downstream_args(data, out, "--model_folder", str(model.parent)))
    j = json.loads((out / "downstream.json").read_text())
    assert list(j["settings"]) == ["real_only", "real_plus_synthetic", "synthetic_only"]
    wanted = {"nevus": 0, "melanoma": 3, "bkl": 4}  # every class up to the largest (6)
    assert j["synthetic_requested_per_class"] == wanted
    assert j["settings"]["real_plus_synthetic"]["n_synthetic_per_class"] == wanted
    assert j["settings"]["real_plus_synthetic"]["n_synthetic"] == 7
    assert j["settings"]["real_only"]["n_synthetic"] == 0
    for s in ("real_only", "real_plus_synthetic"):
        assert j["settings"][s]["n_real"] == sum(TRAIN.values())
        assert j["settings"][s]["n_real_per_class"] == TRAIN
        ba = j["settings"][s]["balanced_accuracy"]
        assert 0 <= ba["mean"] <= 1 and len(ba["values"]) == 1 and ba["std"] is None
        assert set(j["settings"][s]["recall"]) == set(classes)
    # CAS: a synthetic twin of the real train split, class by class, and no real image
    cas = j["settings"]["synthetic_only"]
    assert cas["n_synthetic_per_class"] == TRAIN and cas["n_real"] == 0
    assert len(cas["balanced_accuracy"]["values"]) == 1
    assert set(j["gain_over_real_only"]) == {"real_plus_synthetic", "synthetic_only"}
    gain = j["gain_over_real_only"]["synthetic_only"]["balanced_accuracy"]["values"][0]
    assert gain == pytest.approx(cas["balanced_accuracy"]["values"][0] - j["settings"]["real_only"]["balanced_accuracy"]["values"][0])
    assert j["steps"] == 2 * 2  # 2 passes over 11 real images in batches of 8, for every setting alike
    assert j["positive_class"] == "melanoma" and j["n_test"] == sum(TEST.values())
    # one pool of renders per class, as large as the larger use (top-up or twin); each class's renders used
    # that class's index (and, through models.class_images, jittered masks of that class)
    pool = {c: max(wanted[c], TRAIN[c]) for c in classes}
    rendered = [c for c in calls if c["stochastic"]]
    assert sorted(len(c["masks"]) for c in rendered) == sorted(pool.values())
    for call in rendered:
        (cls_index,) = set(call["labels"].tolist())
        assert pool[classes[cls_index]] == len(call["masks"])
    assert_nonblank_png(out / "downstream.png")
    assert result["classes"] == classes


def test_downstream_with_synthetic_dir_and_minority_to(tmp_path):
    data = make_data(tmp_path / "data")
    syn = tmp_path / "syn"
    rows = []
    rng = np.random.default_rng(1)
    for cls, n in {"melanoma": 5, "bkl": 5, "nevus": 2}.items():
        for i in range(n):
            rel = f"{cls}/gen_{i}.png"
            write_png(syn / rel, rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))  # another size: resized on load
            rows.append((rel, cls))
    with open(syn / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label"])
        w.writerows(rows)
    out = tmp_path / "out"
    evaluate.main(downstream_args(data, out, "--synthetic_dir", str(syn), "--minority_to", "5"))
    j = json.loads((out / "downstream.json").read_text())
    wanted = {"nevus": 0, "melanoma": 2, "bkl": 3}  # up to 5; nevus already has 6 and gets none
    assert j["synthetic_requested_per_class"] == wanted
    assert j["settings"]["real_plus_synthetic"]["n_synthetic_per_class"] == wanted
    assert sorted(j["minority_classes"]) == ["bkl", "melanoma"]
    assert j["synthetic_source"].startswith("directory")
    # CAS takes up to each class's real count from the folder: nevus has only 2 there
    assert j["settings"]["synthetic_only"]["n_synthetic_per_class"] == {"nevus": 2, "melanoma": 3, "bkl": 2}


def test_downstream_settings_choose_what_trains_and_what_is_rendered(tmp_path, calls):
    data = make_data(tmp_path / "data")
    model = make_checkpoint(tmp_path / "models" / "RUN", n_classes=3, classes=sorted(TRAIN))
    out = tmp_path / "out"
    j = evaluate.main(downstream_args(data, out, "--model_folder", str(model.parent), "--settings",
                                      "real_plus_synthetic,real_only"))
    assert list(j["settings"]) == ["real_only", "real_plus_synthetic"]
    assert sorted(len(c["masks"]) for c in calls if c["stochastic"]) == [3, 4]  # the top-up only: no twin for CAS
    calls.clear()
    j = evaluate.main(downstream_args(data, out, "--model_folder", str(model.parent), "--settings", "real_plus_twin"))
    twin = j["settings"]["real_plus_twin"]  # every class gets as many renders as it has real images
    assert twin["n_synthetic_per_class"] == TRAIN and twin["n_real_per_class"] == TRAIN
    assert sorted(len(c["masks"]) for c in calls if c["stochastic"]) == sorted(TRAIN.values())
    assert j["gain_over_real_only"] == {}  # nothing to pair with
    with pytest.raises(SystemExit):
        evaluate.main(downstream_args(data, out, "--model_folder", str(model.parent), "--settings", "real_only,cas"))
    with pytest.raises(SystemExit):  # rejection ranks renders with the real-only classifier
        evaluate.main(downstream_args(data, out, "--model_folder", str(model.parent), "--settings", "synthetic_only",
                                      "--reject", "0.5"))


def test_downstream_reject_renders_more_and_keeps_the_wanted_count(tmp_path, calls):
    data = make_data(tmp_path / "data")
    model = make_checkpoint(tmp_path / "models" / "RUN", n_classes=3, classes=sorted(TRAIN))
    out = tmp_path / "out"
    j = evaluate.main(downstream_args(data, out, "--model_folder", str(model.parent), "--settings",
                                      "real_only,real_plus_synthetic", "--reject", "0.5"))
    assert sorted(len(c["masks"]) for c in calls if c["stochastic"]) == [6, 8]  # twice the top-up of 3 and 4
    assert j["settings"]["real_plus_synthetic"]["n_synthetic_per_class"] == {"nevus": 0, "melanoma": 3, "bkl": 4}
    assert j["reject"] == 0.5


class FixedScores(nn.Module):
    """A 'classifier' whose class-1 probability grows with the image's mean brightness."""

    def forward(self, x):
        b = x.mean((1, 2, 3))
        return torch.stack([-b, b, torch.zeros_like(b)], 1) * 10


def test_ranked_by_plausibility_orders_renders_by_their_class_probability():
    levels = torch.tensor([40, 200, 120, 10], dtype=torch.uint8)
    images = levels.view(4, 1, 1, 1).expand(4, 3, 8, 8).contiguous()
    args = argparse.Namespace(device="cpu", batch_size=3, amp=False)
    ranked = evaluate.ranked_by_plausibility(FixedScores(), images, 1, args)
    assert ranked[:, 0, 0, 0].tolist() == [200, 120, 40, 10]
    ranked = evaluate.ranked_by_plausibility(FixedScores(), images, 0, args)
    assert ranked[:, 0, 0, 0].tolist() == [10, 40, 120, 200]


class StepCounter:
    def __init__(self):
        self.n = 0

    def update(self, k=1):
        self.n += k


@pytest.mark.parametrize("n_images", [5, 40])
def test_train_classifier_takes_exactly_the_given_steps_whatever_the_set_size(n_images):
    images = torch.randint(0, 255, (n_images, 3, 16, 16), dtype=torch.uint8)
    labels = torch.arange(n_images) % 2
    args = argparse.Namespace(device="cpu", batch_size=4, amp=False, classifier="small", optimizer="adam", lr=1e-3,
                              weight_decay=0.0)
    counter = StepCounter()
    model, loss = evaluate.train_classifier(images, labels, 2, args, seed=0, steps=7, bar=counter)
    assert counter.n == 7 and math.isfinite(loss)
    before = [p.detach().clone() for p in model.parameters()]
    model2, _ = evaluate.train_classifier(images, labels, 2, args, seed=1, steps=3, bar=counter, model=model)
    assert model2 is model and counter.n == 10  # fine-tuning continues the given network
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_classification_metrics_known_answers():
    classes = ["a", "melanoma", "c"]
    target = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    perfect = torch.nn.functional.one_hot(target, 3).float()
    m = evaluate.classification_metrics(perfect, target, classes, "melanoma")
    assert m["balanced_accuracy"] == 1 and m["auroc"] == 1 and all(v == 1 for v in m["recall"].values())

    # class a: 3/4 right, melanoma: 1/2, c: 2/2 -> balanced accuracy (0.75 + 0.5 + 1) / 3, plain accuracy 6/8
    preds = torch.tensor([0, 0, 0, 2, 1, 0, 2, 2])
    probs = torch.nn.functional.one_hot(preds, 3).float() * 0.5 + 0.1
    probs[:, 1] = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.9, 0.35, 0.0, 0.05])  # melanoma scores, argmax kept for row 4
    probs[4] = torch.tensor([0.0, 0.9, 0.1])
    m = evaluate.classification_metrics(probs, target, classes, "melanoma")
    assert m["recall"] == pytest.approx({"a": 0.75, "melanoma": 0.5, "c": 1.0})
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["accuracy"] == pytest.approx(6 / 8)
    # melanoma scores 0.9, 0.35 vs negatives 0.1, 0.2, 0.3, 0.4, 0.0, 0.05: 6 + 5 of 12 pairs ranked right
    assert m["auroc"] == pytest.approx(11 / 12)

    # a class missing from the test targets is not counted as recall 0
    m = evaluate.classification_metrics(perfect[:6], target[:6], classes, "melanoma")
    assert math.isnan(m["recall"]["c"]) and m["balanced_accuracy"] == 1


def test_mean_std_over_seeds():
    ms = evaluate.mean_std([0.5, 0.7, 0.9])
    assert ms["mean"] == pytest.approx(0.7) and ms["std"] == pytest.approx(0.2)
    assert evaluate.mean_std([0.5])["std"] is None


def test_bar_chart_heights_follow_the_values(tmp_path):
    colors = [(10, 200, 10), (200, 10, 200)]
    groups = {"real only": {"m1": {"mean": 0.5, "std": None}, "m2": {"mean": 0.2, "std": 0.05}},
              "real + synthetic": {"m1": {"mean": 1.0, "std": None}, "m2": {"mean": 0.4, "std": 0.1}}}
    path = evaluate.bar_chart(groups, tmp_path / "bars.png", "t", colors)
    arr = assert_nonblank_png(path)
    heights = []
    for color in colors:
        mask = color_mask(arr, color)
        cols = np.nonzero(mask.any(axis=0))[0]
        first_bar = cols[cols < cols.min() + 200]  # bars of metric m1 come first
        heights.append(mask[:, first_bar[len(first_bar) // 2]].sum())
    assert heights[0] / heights[1] == pytest.approx(0.5, abs=0.03)


# --------------------------------------------------------------------------------------------------- curves


def test_plot_curves_from_metrics_csv(tmp_path):
    run = tmp_path / "pixelgan_outputs" / "RUN"
    run.mkdir(parents=True)
    with open(run / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow("epoch,step,lr,loss_D,loss_G_gan,loss_G_l1,test_l1,test_psnr,test_ssim,seconds".split(","))
        for e in range(1, 11):
            evaluated = e % 5 == 0
            w.writerow([e, e * 100, 2e-4, 0.7 - 0.02 * e, 1.5 + 0.05 * e, 30 - e,
                        0.3 - 0.01 * e if evaluated else "", 14 + e if evaluated else "", 0.4 + 0.02 * e if evaluated else "", 12.5])
    out = evaluate.main(["--plot", str(run)])
    assert Path(out) == run / "curves.png"
    arr = assert_nonblank_png(out, min_colors=5)
    # loss_D, loss_G_gan in the first panel; the test metrics are drawn too (one color per series in a panel)
    assert color_mask(arr, evaluate.CURVE_COLORS[0]).sum() > 200
    assert color_mask(arr, evaluate.CURVE_COLORS[1]).sum() > 200
    h = arr.shape[0]
    assert color_mask(arr[h // 2:], evaluate.CURVE_COLORS[0]).sum() > 50  # bottom row: test L1 / PSNR / SSIM


def test_plot_needs_metrics_csv(tmp_path):
    with pytest.raises(SystemExit, match="metrics.csv"):
        evaluate.main(["--plot", str(tmp_path)])


def test_nice_ticks_cover_the_range():
    ticks = evaluate.nice_ticks(0.13, 0.87)
    assert ticks[0] <= 0.13 and ticks[-1] >= 0.87 and 3 <= len(ticks) <= 8
    steps = np.diff(ticks)
    assert np.allclose(steps, steps[0])
    assert evaluate.nice_ticks(5, 5)[0] < 5 < evaluate.nice_ticks(5, 5)[-1]
