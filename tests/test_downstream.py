"""Tests for downstream.py on tiny 32x32 data and a tiny generator (CPU, a few seconds each), with the
data, checkpoints and stand-in generate.render of test_evaluate.py."""

import argparse
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from matplotlib import colors as mcolors
from matplotlib.container import BarContainer
from torch import nn

import downstream
from conftest import ROOT
from test_evaluate import (SIZE, TEST, TRAIN, assert_nonblank_png, color_mask, make_checkpoint, make_data, record_renders,
                           write_png)


@pytest.fixture
def calls(monkeypatch):
    return record_renders(monkeypatch)


def record_figures(monkeypatch):
    """Keep every chart downstream.py draws, to check it beside the PNG it wrote."""
    figures = []
    draw = downstream.bar_figure

    def keep(*args, **kwargs):
        figures.append(draw(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(downstream, "bar_figure", keep)
    return figures


def bar_containers(ax):
    return [c for c in ax.containers if isinstance(c, BarContainer)]


def downstream_args(data, out, *extra):
    return ["--data_dir", str(data), "--output_dir", str(out), "--classifier", "small", "--img_size", str(SIZE),
            "--seeds", "1", "--epochs", "2", "--batch_size", "8", "--num_workers", "1", "--device", "cpu", *extra]


def test_downstream_with_generator_balances_minority_classes(tmp_path, calls, monkeypatch):
    data = make_data(tmp_path / "data")
    classes = sorted(TRAIN)
    model = make_checkpoint(tmp_path / "models" / "RUN", n_classes=3, classes=classes)
    out = tmp_path / "out"
    figures = record_figures(monkeypatch)
    result = downstream.main(downstream_args(data, out, "--model_folder", str(model.parent)))
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
    # that class's index (and, through generate.class_images, jittered masks of that class)
    pool = {c: max(wanted[c], TRAIN[c]) for c in classes}
    rendered = [c for c in calls if c["stochastic"]]
    assert sorted(len(c["masks"]) for c in rendered) == sorted(pool.values())
    for call in rendered:
        (cls_index,) = set(call["labels"].tolist())
        assert pool[classes[cls_index]] == len(call["masks"])
    assert result["classes"] == classes
    # the chart: 3 settings x 3 metrics bars, at the means written to downstream.json
    assert (out / "downstream.png").stat().st_size > 10_000
    assert_nonblank_png(out / "downstream.png")
    (fig,) = figures
    (ax,) = fig.axes
    assert len(ax.patches) == 9
    assert [t.get_text() for t in ax.get_xticklabels()] == ["balanced accuracy", "melanoma recall", "melanoma-vs-rest AUC"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["real only (11 real + 0 synthetic)", "real + synthetic (11 real + 7 synthetic)",
                      "synthetic only (CAS) (0 real + 11 synthetic)"]
    for bars, s in zip(bar_containers(ax), j["settings"]):
        heights = [b.get_height() for b in bars]
        assert heights == pytest.approx([j["settings"][s]["balanced_accuracy"]["mean"], j["settings"][s]["recall"]["melanoma"]["mean"],
                                         j["settings"][s]["auroc"]["mean"]])
    assert ax.get_title().endswith("(bars: seed 0 alone, so no whiskers)")  # one seed: no spread to draw
    assert not any(len(seg) for c in bar_containers(ax) for seg in c.errorbar.lines[2][0].get_segments())


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
    downstream.main(downstream_args(data, out, "--synthetic_dir", str(syn), "--minority_to", "5"))
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
    j = downstream.main(downstream_args(data, out, "--model_folder", str(model.parent), "--settings",
                                        "real_plus_synthetic,real_only"))
    assert list(j["settings"]) == ["real_only", "real_plus_synthetic"]
    assert sorted(len(c["masks"]) for c in calls if c["stochastic"]) == [3, 4]  # the top-up only: no twin for CAS
    calls.clear()
    j = downstream.main(downstream_args(data, out, "--model_folder", str(model.parent), "--settings", "real_plus_twin"))
    twin = j["settings"]["real_plus_twin"]  # every class gets as many renders as it has real images
    assert twin["n_synthetic_per_class"] == TRAIN and twin["n_real_per_class"] == TRAIN
    assert sorted(len(c["masks"]) for c in calls if c["stochastic"]) == sorted(TRAIN.values())
    assert j["gain_over_real_only"] == {}  # nothing to pair with
    with pytest.raises(SystemExit):
        downstream.main(downstream_args(data, out, "--model_folder", str(model.parent), "--settings", "real_only,cas"))
    with pytest.raises(SystemExit):  # rejection ranks renders with the real-only classifier
        downstream.main(downstream_args(data, out, "--model_folder", str(model.parent), "--settings", "synthetic_only",
                                        "--reject", "0.5"))


def test_downstream_reject_renders_more_and_keeps_the_wanted_count(tmp_path, calls):
    data = make_data(tmp_path / "data")
    model = make_checkpoint(tmp_path / "models" / "RUN", n_classes=3, classes=sorted(TRAIN))
    out = tmp_path / "out"
    j = downstream.main(downstream_args(data, out, "--model_folder", str(model.parent), "--settings",
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
    ranked = downstream.ranked_by_plausibility(FixedScores(), images, 1, args)
    assert ranked[:, 0, 0, 0].tolist() == [200, 120, 40, 10]
    ranked = downstream.ranked_by_plausibility(FixedScores(), images, 0, args)
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
    model, loss = downstream.train_classifier(images, labels, 2, args, seed=0, steps=7, bar=counter)
    assert counter.n == 7 and math.isfinite(loss)
    before = [p.detach().clone() for p in model.parameters()]
    model2, _ = downstream.train_classifier(images, labels, 2, args, seed=1, steps=3, bar=counter, model=model)
    assert model2 is model and counter.n == 10  # fine-tuning continues the given network
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_classification_metrics_known_answers():
    classes = ["a", "melanoma", "c"]
    target = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    perfect = torch.nn.functional.one_hot(target, 3).float()
    m = downstream.classification_metrics(perfect, target, classes, "melanoma")
    assert m["balanced_accuracy"] == 1 and m["auroc"] == 1 and all(v == 1 for v in m["recall"].values())

    # class a: 3/4 right, melanoma: 1/2, c: 2/2 -> balanced accuracy (0.75 + 0.5 + 1) / 3, plain accuracy 6/8
    preds = torch.tensor([0, 0, 0, 2, 1, 0, 2, 2])
    probs = torch.nn.functional.one_hot(preds, 3).float() * 0.5 + 0.1
    probs[:, 1] = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.9, 0.35, 0.0, 0.05])  # melanoma scores, argmax kept for row 4
    probs[4] = torch.tensor([0.0, 0.9, 0.1])
    m = downstream.classification_metrics(probs, target, classes, "melanoma")
    assert m["recall"] == pytest.approx({"a": 0.75, "melanoma": 0.5, "c": 1.0})
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["accuracy"] == pytest.approx(6 / 8)
    # melanoma scores 0.9, 0.35 vs negatives 0.1, 0.2, 0.3, 0.4, 0.0, 0.05: 6 + 5 of 12 pairs ranked right
    assert m["auroc"] == pytest.approx(11 / 12)

    # a class missing from the test targets is not counted as recall 0
    m = downstream.classification_metrics(perfect[:6], target[:6], classes, "melanoma")
    assert math.isnan(m["recall"]["c"]) and m["balanced_accuracy"] == 1


def test_mean_std_over_seeds():
    ms = downstream.mean_std([0.5, 0.7, 0.9])
    assert ms["mean"] == pytest.approx(0.7) and ms["std"] == pytest.approx(0.2)
    assert downstream.mean_std([0.5])["std"] is None


def test_bar_figure_bars_and_whiskers_follow_the_values(tmp_path):
    colors = ["#0ac80a", "#c80ac8"]
    groups = {"real only": {"m1": {"mean": 0.5, "std": None}, "m2": {"mean": 0.2, "std": 0.05}, "m3": {"mean": float("nan"), "std": None}},
              "real + synthetic": {"m1": {"mean": 1.0, "std": None}, "m2": {"mean": 0.4, "std": 0.1}, "m3": {"mean": 0.9, "std": 0.3}}}
    fig = downstream.bar_figure(groups, "t", colors)
    (ax,) = fig.axes
    assert len(ax.patches) == 6  # one bar per setting and metric, in its setting's colour
    bars = bar_containers(ax)
    assert [b.get_height() for c in bars for b in c] == pytest.approx([0.5, 0.2, 0.0, 1.0, 0.4, 0.9])
    assert [mcolors.to_hex(c[0].get_facecolor()) for c in bars] == colors
    assert [t.get_text() for t in ax.texts] == ["0.500", "0.200", "n/a", "1.000", "0.400", "0.900"]  # NaN reads n/a, not 0
    # whiskers +- std, cut at the 0..1 scale; none where there is no std
    whiskers = [[seg[:, 1].tolist() if len(seg) else None for seg in c.errorbar.lines[2][0].get_segments()] for c in bars]
    assert whiskers[0][0] is None and whiskers[0][1] == pytest.approx([0.15, 0.25]) and whiskers[0][2] is None
    assert whiskers[1][0] is None and whiskers[1][1] == pytest.approx([0.3, 0.5]) and whiskers[1][2] == pytest.approx([0.6, 1.0])
    # and the PNG shows them: the first group's bars, measured in pixels, stand in the ratio of their values
    path = tmp_path / "bars.png"
    fig.savefig(path)
    arr = assert_nonblank_png(path)
    heights = []
    for color in colors:
        mask = color_mask(arr, [int(color[i:i + 2], 16) for i in (1, 3, 5)])
        cols = np.nonzero(mask.any(axis=0))[0]
        first_bar = cols[cols < cols.min() + 30]  # bars of metric m1 come first
        heights.append(mask[:, first_bar[len(first_bar) // 2]].sum())
    assert heights[0] / heights[1] == pytest.approx(0.5, abs=0.03)


# ------------------------------------------------------------------------------------ segmentation study


def segmentation_args(data, out, *extra):
    return ["--task", "segmentation", "--data_dir", str(data), "--output_dir", str(out), "--img_size", str(SIZE),
            "--seg_width", "4", "--steps", "3", "--batch_size", "4", "--num_workers", "1", "--device", "cpu", *extra]


def write_pairs(folder, n, seed, with_images=True):
    rng = np.random.default_rng(seed)
    for i in range(n):
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[8:24, 8 + i % 8:20 + i % 8] = 255
        write_png(folder / "masks" / f"p{i}.png", mask)
        if with_images:
            write_png(folder / "originals" / f"p{i}.png", rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    return folder


def test_segmentation_study_renders_both_sources_and_pairs_the_gains(tmp_path, calls):
    data = make_data(tmp_path / "data")
    model = make_checkpoint(tmp_path / "models" / "RUN", n_classes=3, classes=sorted(TRAIN))
    out = tmp_path / "out"
    result = downstream.main(segmentation_args(data, out, "--model_folder", str(model.parent), "--k", "4,all",
                                               "--ratios", "2,1", "--seeds", "2"))
    j = json.loads((out / "downstream_seg.json").read_text())
    assert j["k"] == [4, 11] and j["ratios"] == [1, 2] and j["seeds"] == [0, 1] and j["n_test"] == sum(TEST.values())
    settings = [(r["k"], r["source"], r["ratio"]) for r in j["results"]]
    assert settings == [(k, s, r) for k in (4, 11) for s, r in [("real_only", 0), ("new", 1), ("new", 2),
                                                                  ("rerender", 1), ("rerender", 2)]]
    for r in j["results"]:
        assert r["n_real"] == r["k"] and r["n_synthetic"] == r["ratio"] * r["k"]
        assert set(r) >= {"dice", "jaccard", "thresholded_jaccard", "gain"}
        assert all(0 <= v <= 1 for m in downstream.SEG_METRICS for v in r[m]["values"]) and len(r["dice"]["values"]) == 2
        base = next(b for b in j["results"] if b["k"] == r["k"] and b["source"] == "real_only")
        if r["source"] == "real_only":
            assert r["gain"] is None
        else:  # paired by seed
            assert r["gain"]["dice"]["values"] == pytest.approx([a - b for a, b in zip(r["dice"]["values"], base["dice"]["values"])])
            assert r["gain"]["dice"]["sem"] is not None
    # per K: 4 x the largest ratio of new masks and as many re-renders of the K train masks, stochastic
    assert sorted(len(c["masks"]) for c in calls) == [8, 8, 22, 22] and all(c["stochastic"] for c in calls)
    assert set(j["mask_stats"]) == {"4", "11"} and "compactness" in j["mask_stats"]["4"]["shape_ks"]
    assert set(j["targets"]) == {"setting", "small_k", "large_k", "new_vs_rerender"}
    assert result["results"] == j["results"]
    assert_nonblank_png(out / "downstream_seg.png")


def test_segmentation_study_reads_pair_folders_and_refuses_one_without_images(tmp_path):
    data = make_data(tmp_path / "data")
    new = write_pairs(tmp_path / "new", 30, 1)
    out = tmp_path / "out"
    j = downstream.main(segmentation_args(data, out, "--new_pairs", str(new), "--k", "5", "--ratios", "1,4", "--seeds", "1"))
    assert [(r["source"], r["n_synthetic"]) for r in j["results"]] == [("real_only", 0), ("new", 5), ("new", 20)]
    assert j["sources"] == {"new": f"directory {new}"} and j["results"][1]["gain"]["dice"]["sem"] is None  # one seed
    assert set(j["targets"]) == {"setting", "small_k"}  # one K: no second reading of the same row as the largest K
    masks_only = write_pairs(tmp_path / "masks_only", 4, 2, with_images=False)
    with pytest.raises(ValueError, match=r"masks_only: --rerender_pairs has masks but no images"):
        downstream.main(segmentation_args(data, out, "--rerender_pairs", str(masks_only), "--k", "5"))
    with pytest.raises(ValueError, match="--k 50: the train split has only 11 pairs"):
        downstream.main(segmentation_args(data, out, "--new_pairs", str(new), "--k", "50"))
    with pytest.raises(SystemExit):
        downstream.main(segmentation_args(data, out, "--new_pairs", str(new), "--ratios", "0.5"))


def test_segmentation_study_jobs_train_the_same_segmenters_in_worker_processes(tmp_path):
    data = make_data(tmp_path / "data")
    new = write_pairs(tmp_path / "new", 30, 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # --jobs 2 gives each worker 1 thread: both runs then round alike
    try:
        one, two = (downstream.main(segmentation_args(data, tmp_path / f"out{jobs}", "--new_pairs", str(new), "--k", "4,all",
                                                      "--ratios", "1,2", "--seeds", "2", "--jobs", str(jobs)))
                    for jobs in (1, 2))
    finally:
        torch.set_num_threads(threads)
    assert [(r["k"], r["source"], r["ratio"]) for r in two["results"]] == [(r["k"], r["source"], r["ratio"]) for r in one["results"]]
    assert [(r["n_real"], r["n_synthetic"]) for r in two["results"]] == [(4, 0), (4, 4), (4, 8), (11, 0), (11, 11), (11, 22)]
    for a, b in zip(one["results"], two["results"]):  # every segmenter, seed by seed, whatever order they finished in
        assert a["train_loss"]["values"] == b["train_loss"]["values"] and a["dice"]["values"] == b["dice"]["values"]
    assert len({v for r in one["results"] for v in r["train_loss"]["values"]}) == 12  # 12 different segmenters


def test_segmentation_study_jobs_ctrl_c_prints_one_line_and_leaves_no_worker(tmp_path):
    data = make_data(tmp_path / "data")
    new = write_pairs(tmp_path / "new", 30, 1)
    args = segmentation_args(data, tmp_path / "out", "--new_pairs", str(new), "--k", "5", "--ratios", "1", "--seeds", "2",
                             "--jobs", "2", "--steps", "1000000")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # its own process group, signalled whole as a terminal's Ctrl-C is; SIGINT handled by default whoever ran the tests
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "downstream.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert "segmenters" in proc.stdout.readline()  # imports done: the workers start now
        children = f"/proc/{proc.pid}/task/{proc.pid}/children"
        workers, deadline = [], time.time() + 60
        if not os.path.exists(children):
            pytest.skip("no /proc/PID/task/PID/children on this kernel")
        while len(workers) < 2 and time.time() < deadline:
            workers = [pid for pid in open(children).read().split() if b"spawn_main" in open(f"/proc/{pid}/cmdline", "rb").read()]
            time.sleep(0.05)
        assert len(workers) == 2, workers
        # a worker that heard Ctrl-C while importing would print a traceback: they all ignore it (bit SIGINT - 1 of SigIgn)
        ignored = [int(next(line for line in open(f"/proc/{pid}/status") if line.startswith("SigIgn:")).split()[1], 16)
                   for pid in workers]
        assert all(mask & 1 << signal.SIGINT - 1 for mask in ignored), ignored
        time.sleep(1)
        os.killpg(proc.pid, signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
        assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
        assert err.strip().endswith("interrupted: files already written are complete; run again for the rest")
        time.sleep(1)
        alive = [pid for pid in workers if os.path.exists(f"/proc/{pid}") and "Z" not in open(f"/proc/{pid}/stat").read().split()[2]]
        assert not alive, alive
    finally:  # a failed check must not leave the study running
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_segmentation_metrics_known_answers():
    target = torch.zeros(4, 1, 10, 10, dtype=torch.bool)
    target[:, :, :5, :] = True  # 50 pixels of lesion in each image
    pred = target.clone()  # image 0: perfect
    pred[1, :, :, :] = False
    pred[1, :, :5, :7] = True  # image 1: 35 of 50 -> J 0.70, Dice 70/85
    pred[2, :, :, :] = False
    pred[2, :, :5, :6] = True  # image 2: 30 of 50 -> J 0.60, counts 0 when thresholded
    pred[3] = False
    target[3] = False  # image 3: nothing to find, nothing found -> 1
    m = downstream.segmentation_metrics(pred, target)
    assert m["jaccard"] == pytest.approx((1 + 0.7 + 0.6 + 1) / 4)
    assert m["thresholded_jaccard"] == pytest.approx((1 + 0.7 + 0 + 1) / 4)
    assert m["dice"] == pytest.approx((1 + 70 / 85 + 60 / 80 + 1) / 4)


def test_segmenter_learns_lesions_in_its_steps():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    images, masks = [], []
    for _ in range(24):
        cy, cx, r = rng.uniform(10, 22), rng.uniform(10, 22), rng.uniform(4, 9)
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        image = np.where(inside[..., None], (60, 40, 30), (220, 180, 160)) + rng.integers(-20, 20, (SIZE, SIZE, 3))
        images.append(np.clip(image, 0, 255).astype(np.uint8).transpose(2, 0, 1))
        masks.append((inside * 255).astype(np.uint8)[None])
    images, masks = torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks))
    args = argparse.Namespace(device="cpu", seg_width=4, lr=1e-2, weight_decay=0.0, batch_size=8, amp=False)
    counter = StepCounter()
    model, loss = downstream.train_segmenter(images[:16], masks[:16], args, seed=0, steps=60, bar=counter)
    assert counter.n == 60 and math.isfinite(loss)
    scores = downstream.segmentation_metrics(downstream.predict_masks(model, images[16:], args), masks[16:] > 127)
    assert scores["dice"] > 0.8


def test_image_size_default_follows_the_task():
    # the segmenter's protocol (64 px, where its step budget lets more real data help) must not leak into the classifier's
    seg = downstream.parse_args(["--task", "segmentation", "--model_folder", "m"])
    assert (seg.img_size, seg.seg_width, seg.steps) == (downstream.SEG_SIZE, 8, downstream.SEG_STEPS)
    assert downstream.parse_args(["--model_folder", "m"]).img_size == 128
    assert downstream.parse_args(["--task", "segmentation", "--model_folder", "m", "--img_size", "96"]).img_size == 96


def test_segmenter_pairs_move_together_and_only_the_image_is_relit():
    torch.manual_seed(0)
    mask = torch.zeros(1, 1, SIZE, SIZE, dtype=torch.uint8)
    mask[0, 0, 2:12, 4:20] = 255  # asymmetric: each of the 8 symmetries gives a different mask
    image = torch.full((1, 3, SIZE, SIZE), 100, dtype=torch.uint8)
    image[0, 0][mask[0, 0] > 0] = 200  # the red channel carries the lesion, so the image shows where it went
    pairs = downstream.PairSet(image, mask)
    relit, moved = 0, set()
    for _ in range(64):
        x, m = pairs[0]
        assert set(m.unique().tolist()) <= {0, 255} and int((m > 0).sum()) == int((mask > 0).sum())
        red = x[0].float()
        assert red[m[0] > 0].mean() > red[m[0] == 0].mean() + 30  # the lesion went where the mask went
        moved.add(m.numpy().tobytes())
        relit += int(x[1, 0, 0]) != 100
    assert len(moved) == 8 and relit > 32


def test_amp_fallback_warns_once_per_study(monkeypatch, capsys):
    # a study trains dozens of models and asks for the autocast dtype each time; one line says it all
    import cli
    monkeypatch.setattr(cli, "_WARNED", set())
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert [cli.autocast_dtype(torch.device("cpu"), True) for _ in range(3)] == [None] * 3
    assert capsys.readouterr().err.count("--amp ignored") == 1
