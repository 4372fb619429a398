"""Downstream usefulness of a Skin Lesion PixelGAN: does a lesion classifier get better with its images?

A classifier is trained from scratch under each of --settings (real images only, real plus synthetic
images of the minority classes, synthetic only = CAS, ...) and always tested on the real --split;
mean +- std over --seeds seeds:
    python downstream.py --data_dir data --model_folder pixelgan_models/<TS>
        -> pixelgan_outputs/<TS>/downstream/{downstream.json, downstream.png}
    python downstream.py --data_dir data --synthetic_dir DIR       (generate.py --balance output)
        -> pixelgan_outputs/downstream_<time>/{downstream.json, downstream.png}

--task segmentation: does a lesion segmenter (a small U-Net) get better with synthetic pairs? It trains
on K real train pairs alone and with M = ratio x K synthetic pairs, new masks (generate.py --new_masks)
against re-rendered train masks (generate.py --pairs), at equal steps, tested on the real --split:
    python downstream.py --task segmentation --data_dir data --model_folder pixelgan_models/<TS>
    python downstream.py --task segmentation --data_dir data --new_pairs DIR --rerender_pairs DIR
        -> .../downstream_seg.json, downstream_seg.png
"""
import argparse
import csv
import math
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, as_completed, wait

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import tv_tensors
from torchmetrics.functional.classification import binary_auroc, multiclass_recall
from torchvision.transforms import v2
from tqdm import tqdm

import checkpoints
import generate
import models
from cli import (SHARED_DEFAULTS, SHARED_LIMITS, ArgumentParser, Range, UsageError, add_shared_flags, ascii_int, atomic_path,
                 autocast, autocast_dtype, check_device, check_memory, check_name, check_ranges, fmt, run_cli, write_json)
from dataset import (MASK_METHODS, PairedDataset, RandomRot90, new_masks, read_image, read_labels,
                     shape_ks_line, to_model_range)

# synthetic_only is CAS (Ravuri & Vinyals 2019): trained on renders alone, tested on real images
SETTINGS = ("real_only", "real_plus_synthetic", "real_plus_twin", "synthetic_only", "synthetic_then_real")
DEFAULT_SETTINGS = "real_only,real_plus_synthetic,synthetic_only"
SETTING_NAMES = {"real_only": "real only", "real_plus_synthetic": "real + synthetic", "real_plus_twin": "real + synthetic twin",
                 "synthetic_only": "synthetic only (CAS)", "synthetic_then_real": "synthetic, then real"}
SETTING_COLORS = {"real_only": "#426eb4", "real_plus_synthetic": "#e88028", "real_plus_twin": "#c84646",
                  "synthetic_only": "#50a050", "synthetic_then_real": "#9664b4"}


# --------------------------------------------------------------------------------------------- classifier


class SmallCNN(nn.Module):
    """A few-second classifier for tests and smoke runs; not a baseline to quote."""

    def __init__(self, n_classes):
        super().__init__()
        layers, c_in = [], 3
        for c_out in (16, 32, 64):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]
            c_in = c_out
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, n_classes))

    def forward(self, x):
        return self.net(x)


def make_classifier(name, n_classes):
    if name == "small":
        return SmallCNN(n_classes)
    from torchvision.models import resnet18
    return resnet18(weights=None, num_classes=n_classes)  # from scratch: no ImageNet prior to blur the comparison


def lesion_augmentation():
    """The classifier's and the segmenter's: the 8 symmetries of the square, which v2 applies alike to an image and
    its Mask, and brightness/contrast jitter, which leaves a Mask alone (lighting varies between dermoscopes)."""
    return v2.Compose([v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), RandomRot90(),
                       v2.ColorJitter(brightness=0.2, contrast=0.2)])


class ImageSet(torch.utils.data.Dataset):
    def __init__(self, images_uint8, labels, transform=None):
        self.images, self.labels, self.transform = images_uint8, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = self.images[i]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[i]


def class_weights(labels, n_classes):
    """Inverse-frequency weights (mean 1 over classes), so each class counts alike in the loss."""
    counts = torch.bincount(labels, minlength=n_classes).float()
    return counts.sum() / (n_classes * counts.clamp(min=1))


def train_classifier(images, labels, n_classes, args, seed, steps, bar=None, model=None):
    """A classifier after exactly `steps` optimizer steps on (images, labels). Batches are drawn without
    replacement and reshuffled each pass, so every setting can be given the same number of steps (equal
    compute) whatever its size. `model` continues training a given network (fine-tuning) with a fresh
    optimizer and schedule. Returns the model and its mean training loss."""
    torch.manual_seed(seed)
    device = torch.device(args.device)
    if model is None:
        model = make_classifier(args.classifier, n_classes)
    model = model.to(device, memory_format=torch.channels_last).train()
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(labels, n_classes).to(device))
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay, nesterov=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    dtype = autocast_dtype(device, args.amp)

    def batch_loss(batch):
        x, y = batch
        x, y = to_model_range(x, device, torch.channels_last), y.to(device, non_blocking=True)
        with autocast(device, dtype):
            return loss_fn(model(x).float(), y)

    dataset = ImageSet(images, labels, lesion_augmentation())
    return model, fit_steps(dataset, batch_loss, opt, args, seed, steps, device, dtype, bar)


def fit_steps(dataset, batch_loss, opt, args, seed, steps, device, dtype, bar=None):
    """Exactly `steps` optimizer steps of batch_loss over batches drawn without replacement and reshuffled
    each pass (so every setting can be given the same number of steps whatever its size), under a cosine
    schedule. Returns the mean training loss."""
    batch = min(args.batch_size, len(dataset))
    sampler = torch.utils.data.RandomSampler(range(len(dataset)), num_samples=steps * batch,
                                             generator=torch.Generator().manual_seed(seed))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 needs loss scaling
    total = torch.zeros((), device=device)  # summed on the device: no host sync per step
    for batch_ in loader:
        loss = batch_loss(batch_)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        total += loss.detach()
        if bar is not None:
            bar.update()
    return float(total) / max(steps, 1)


@torch.inference_mode()
def predict(model, images, args, head):
    """head(float outputs) of the model on images, in batches, as CPU tensors."""
    model.eval()
    device = torch.device(args.device)
    dtype = autocast_dtype(device, args.amp)
    out = []
    for start in range(0, len(images), args.batch_size):
        x = to_model_range(images[start:start + args.batch_size], device, torch.channels_last)
        with autocast(device, dtype):
            out.append(head(model(x).float()).cpu())
    return torch.cat(out)


def predict_proba(model, images, args):
    return predict(model, images, args, lambda logits: logits.softmax(1))


def ranked_by_plausibility(model, images, class_idx, args):
    """images ordered from most to least probable for their intended class under a real-trained classifier."""
    order = predict_proba(model, images, args)[:, class_idx].argsort(descending=True)
    return images[order]


# ------------------------------------------------------------------------------------------------- scores


def classification_metrics(probs, target, classes, positive):
    """Balanced accuracy, per-class recall, and positive-vs-rest ROC AUC from class probabilities.

    Classes absent from ``target`` get recall NaN and are left out of balanced accuracy (torchmetrics
    would report 0 for them); AUC is NaN when the positive class or its complement is absent.
    """
    n_classes = len(classes)
    preds = probs.argmax(1)
    recall = multiclass_recall(preds, target, num_classes=n_classes, average=None).double()
    support = torch.bincount(target, minlength=n_classes)
    recall = torch.where(support > 0, recall, torch.full_like(recall, float("nan")))
    pos = classes.index(positive)
    is_pos = (target == pos).long()
    auroc = float(binary_auroc(probs[:, pos], is_pos)) if 0 < int(is_pos.sum()) < len(is_pos) else float("nan")
    return {"balanced_accuracy": float(recall[support > 0].mean()) if bool((support > 0).any()) else float("nan"),
            "accuracy": float((preds == target).double().mean()),
            "recall": {c: float(r) for c, r in zip(classes, recall)},
            "auroc": auroc}


def mean_std(values):
    """Mean, sample std and standard error of the mean over seeds; std and sem are None for a single
    seed (there is no spread to report)."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return {"mean": float("nan"), "std": None, "sem": None, "values": values}
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return {"mean": float(np.mean(vals)), "std": std, "sem": std / math.sqrt(len(vals)) if std is not None else None,
            "values": values}


def positive_class(classes, minority):
    for c in classes:
        if c.lower() in ("melanoma", "mel"):
            return c, "the class named melanoma"
    pool = minority or classes
    return pool[0], "first minority class (no class named melanoma)" if minority else "first class (no minority class)"


# ------------------------------------------------------------------------------ real and synthetic images


def labelled_split(data_dir, split, size, labels, classes, num_workers):
    data = PairedDataset(os.path.join(data_dir, split), size, labels=labels, classes=classes, num_workers=num_workers)
    if data.images is None:
        raise UsageError(f"{os.path.join(data_dir, split)}: has no originals/ folder")
    keep = data.labels >= 0
    if not bool(keep.all()):
        print(f"{split}: {int((~keep).sum())} images without a known class are left out")
    return data, keep


def resize_images(images_uint8, size):
    if images_uint8.shape[-1] == size:
        return images_uint8
    # area when shrinking, as dataset.py does for the real images, so both sources are resampled alike
    mode = "area" if images_uint8.shape[-1] > size else "bilinear"
    x = F.interpolate(images_uint8.float(), size=(size, size), mode=mode)
    return x.round().clamp(0, 255).to(torch.uint8)


def read_synthetic_dir(folder, classes, size):
    """{class: uint8 N x 3 x S x S} from generate.py --balance output: DIR/labels.csv (path relative to DIR, label)."""
    path = os.path.join(folder, "labels.csv")
    if not os.path.isfile(path):
        raise UsageError(f"{path}: not found (expected DIR/labels.csv with image path and label columns)")
    with open(path, newline="", encoding="utf-8-sig") as f:  # generate.py writes UTF-8 (cli.write_csv)
        rows = [r for r in csv.reader(f) if r]
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if "label" in header:  # a header row; the path is whichever other column names a file
        label_col = header.index("label")
        path_col = next((header.index(c) for c in ("image", "path", "image_path", "file", "filename", "image_id") if c in header),
                        1 - label_col if len(header) == 2 else 0)
        rows = rows[1:]
    else:
        path_col, label_col = 0, 1
    found = {c: [] for c in classes}
    ignored = {}
    for row in sorted(rows, key=lambda r: r[path_col]):
        label = row[label_col].strip()
        if label not in found:
            ignored[label] = ignored.get(label, 0) + 1
            continue
        image = os.path.normpath(row[path_col])
        if os.path.isabs(image) or image == os.pardir or image.startswith(os.pardir + os.sep):
            raise UsageError(f"{path}: {row[path_col]!r} lies outside {folder}; only images inside it are read")
        try:
            found[label].append(torch.from_numpy(read_image(os.path.join(folder, row[path_col]), size)))
        except ValueError:
            raise UsageError(f"{os.path.join(folder, row[path_col])}: listed in labels.csv but cannot be read") from None
    if ignored:
        print(f"{path}: ignored images of classes not in the training labels: {ignored}")
    return {c: torch.stack(v) if v else torch.zeros((0, 3, size, size), dtype=torch.uint8) for c, v in found.items()}


def synthesize(model_path, data_dir, classes, requested, args):
    """{class: uint8 images}: `requested[class]` renders made exactly as generate.py --class/--balance
    makes them (jittered masks of that class, stochastic generator)."""
    generator, config, _ = checkpoints.load_generator(model_path)
    check_memory(sum(requested.values()) * 3 * max(config["img_size"], args.img_size) ** 2,
                 f"{sum(requested.values())} synthetic images", "lower --minority_to, --reject or --img_size")
    labels = read_labels(data_dir)
    train = PairedDataset(os.path.join(data_dir, "train"), config["img_size"], labels=labels, classes=classes,
                          num_workers=args.num_workers)
    out = {}
    for k, (name, n) in enumerate(requested.items()):
        if n <= 0:
            continue
        # through the module, so that a stand-in generate.render (tests) is the one used
        images = generate.class_images(generator, config, train, labels, name, n, args.device, args.batch_size, args.amp,
                                     seed=args.seed + k)
        out[name] = resize_images(images, args.img_size)
        print(f"generated {n} {name} images from the {name} train masks")
    return out


# ------------------------------------------------------------------------------------------------- report


def default_output_dir(model_path):
    if model_path:
        return os.path.join("pixelgan_outputs", checkpoints.run_name(model_path), "downstream")
    return os.path.join("pixelgan_outputs", "downstream_" + time.strftime("%Y%m%d-%H%M%S"))


def print_downstream_table(result):
    classes, pos = result["classes"], result["positive_class"]
    print(f"\nDownstream: {result['classifier']} from scratch at {result['img_size']}x{result['img_size']}, "
          f"{result['steps']} steps of {result['batch_size']} per setting ({result['epochs']} passes over the real "
          f"train split), seeds {result['seeds']}; tested on {result['n_test']} real {result['test_split']} images")
    print(f"  positive class for AUC: {pos} ({result['positive_class_reason']}); minority classes: {result['minority_classes']}"
          + (f"; least plausible {result['reject']:.0%} of renders rejected" if result["reject"] else ""))

    def cell(ms):
        return fmt(ms["mean"]) + (" +- " + fmt(ms["sem"]) if ms.get("sem") is not None else "")

    cols = ["balanced acc", f"AUC {pos}-vs-rest"] + [f"recall {c}" for c in classes]
    width = max(22, max(len(c) for c in cols) + 2)
    print("  mean +- standard error over seeds")
    print("  " + f"{'setting':<22}{'real':>7}{'synth':>7}" + "".join(f"{c:>{width}}" for c in cols))
    for s, r in result["settings"].items():
        cells = [cell(r["balanced_accuracy"]), cell(r["auroc"])] + [cell(r["recall"][c]) for c in classes]
        print("  " + f"{SETTING_NAMES[s]:<22}{r['n_real']:>7}{r['n_synthetic']:>7}" + "".join(f"{c:>{width}}" for c in cells))
    for s, g in result["gain_over_real_only"].items():
        d = g["balanced_accuracy"]
        verdict = "helped" if d["mean"] > 0 else "did not help" if d["mean"] < 0 else "made no difference"
        print(f"  {SETTING_NAMES[s]} vs real only (paired by seed): balanced accuracy {fmt(d['mean'], '+.4f')}"
              + (f" +- {fmt(d['sem'])}" if d["sem"] is not None else "")
              + f", {pos} recall {fmt(g['positive_recall']['mean'], '+.4f')}: {verdict}")
    if "synthetic_only" in result["settings"] and "real_only" in result["settings"]:
        cas = result["settings"]["synthetic_only"]["balanced_accuracy"]["mean"]
        real = result["settings"]["real_only"]["balanced_accuracy"]["mean"]
        print(f"  CAS / real-only balanced accuracy: {fmt(cas / real if real else float('nan'), '.3f')}")


def bar_figure(groups, title, colors):
    """Grouped bars on the 0..1 scale every score here lives on: one group per metric, one colour per
    setting, whiskers of +- std clipped to the scale (none where std is None: a single seed).
    groups: {setting: {metric: {"mean", "std"}}}. A bar that could not be computed reads n/a."""
    # imported here: matplotlib costs a second at start-up and only this chart needs it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    settings = list(groups)
    metric_names = list(next(iter(groups.values())))
    fig = Figure(figsize=(3 + max(2.2, 0.4 + 0.5 * len(settings)) * len(metric_names), 4.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(settings)
    for s, (setting, color) in enumerate(zip(settings, colors)):
        cells = [groups[setting][m] for m in metric_names]
        means = [c["mean"] if c["mean"] is not None and math.isfinite(c["mean"]) else None for c in cells]
        heights = [min(max(m, 0.0), 1.0) if m is not None else 0.0 for m in means]
        stds = [c.get("std") if m is not None and c.get("std") is not None else math.nan for c, m in zip(cells, means)]
        whiskers = [[min(sd, h) for sd, h in zip(stds, heights)], [min(sd, 1 - h) for sd, h in zip(stds, heights)]]
        x = [i - 0.4 + (s + 0.5) * width for i in range(len(metric_names))]
        bars = ax.bar(x, heights, width * 0.92, color=color, label=setting, yerr=whiskers, capsize=4,
                      error_kw={"elinewidth": 1.5, "ecolor": "black"})
        ax.bar_label(bars, labels=[f"{m:.3f}" if m is not None else "n/a" for m in means], padding=2, fontsize=8)
    ax.set_xticks(range(len(metric_names)), metric_names)
    ax.set_ylim(0, 1.08)  # room for the value labels above a bar at 1
    ax.set_yticks([i / 5 for i in range(6)])
    ax.set_ylabel("score (0 to 1)")
    ax.grid(axis="y", color="0.9")
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, fontsize=9)
    ax.set_title(title, fontsize=10)
    return fig


def write_chart(result, path):
    """downstream.png from a downstream.json result: balanced accuracy, the positive class's recall and
    its one-vs-rest AUC per setting (a stored result can be drawn again without training anything)."""
    settings, pos, seeds = list(result["settings"]), result["positive_class"], result["seeds"]
    legend = {s: f"{SETTING_NAMES[s]} ({result['settings'][s]['n_real']} real + {result['settings'][s]['n_synthetic']} synthetic)"
              for s in settings}
    chart = {legend[s]: {"balanced accuracy": result["settings"][s]["balanced_accuracy"],
                         f"{pos} recall": result["settings"][s]["recall"][pos],
                         f"{pos}-vs-rest AUC": result["settings"][s]["auroc"]} for s in settings}
    shown = (f"bars: mean over {len(seeds)} seeds, whiskers: ± sample std" if len(seeds) > 1
             else f"bars: seed {seeds[0]} alone, so no whiskers")
    fig = bar_figure(chart, f"{result['classifier']} on real {result['test_split']} images ({shown})",
                     colors=[SETTING_COLORS[s] for s in settings])
    with atomic_path(path) as tmp:
        fig.savefig(tmp)


# ---------------------------------------------------------------------------------------------- the study


def real_images(args):
    """Class names and the real train and --split images (uint8) with their class indices."""
    labels = read_labels(args.data_dir)
    if not labels:
        raise UsageError(f"{os.path.join(args.data_dir, 'labels.csv')}: no labels; downstream needs classes")
    classes = sorted(set(labels.values()))
    train, train_keep = labelled_split(args.data_dir, "train", args.img_size, labels, classes, args.num_workers)
    test, test_keep = labelled_split(args.data_dir, args.split, args.img_size, labels, classes, args.num_workers)
    return classes, train.images[train_keep], train.labels[train_keep], test.images[test_keep], test.labels[test_keep]


def synthetic_pool(args, classes, present, pool_size, model_path):
    """{class: uint8 renders}, up to pool_size[class] each, from --synthetic_dir or the generator, and their source."""
    if args.synthetic_dir:
        available = read_synthetic_dir(args.synthetic_dir, classes, args.img_size)
        pool, source = {c: available[c][:pool_size[c]] for c in present}, f"directory {args.synthetic_dir}"
        for c in present:
            if len(pool[c]) < pool_size[c]:
                print(f"warning: {c}: {pool_size[c]} synthetic images wanted, {len(available[c])} in "
                      f"{args.synthetic_dir}; using all of them")
    elif model_path:
        pool, source = synthesize(model_path, args.data_dir, classes, pool_size, args), f"generator {model_path}"
    else:
        raise UsageError("downstream needs --synthetic_dir DIR or a generator (--model_folder / --model_path)")
    return pool, source


def setting_summary(runs, n_real_per_class, n_synthetic_per_class, classes):
    """One setting's entry of downstream.json: what it trained on and its metrics' mean and std over seeds."""
    return {
        "n_real": sum(n_real_per_class.values()), "n_synthetic": sum(n_synthetic_per_class.values()),
        "n_real_per_class": n_real_per_class, "n_synthetic_per_class": n_synthetic_per_class,
        "balanced_accuracy": mean_std([r["balanced_accuracy"] for r in runs]),
        "accuracy": mean_std([r["accuracy"] for r in runs]),
        "auroc": mean_std([r["auroc"] for r in runs]),
        "recall": {c: mean_std([r["recall"][c] for r in runs]) for c in classes},
    }


def paired_gain(runs, baseline, positive):
    """Gain over the baseline's runs, paired by seed: the same seed draws the same initialisation, so
    the difference has less noise than the difference of the means."""
    return {"balanced_accuracy": mean_std([a["balanced_accuracy"] - b["balanced_accuracy"] for a, b in zip(runs, baseline)]),
            "positive_recall": mean_std([a["recall"][positive] - b["recall"][positive] for a, b in zip(runs, baseline)])}


def evaluate_downstream(args):
    t0 = time.time()
    classes, x_real, y_real, x_test, y_test = real_images(args)
    counts = torch.bincount(y_real, minlength=len(classes))
    real_per_class = {c: n for c, n in zip(classes, counts.tolist()) if n > 0}
    present = list(real_per_class)
    if len(present) < 2:
        raise UsageError(f"need at least two classes in the train split, found {present}")
    settings = args.settings
    target = args.minority_to if args.minority_to is not None else max(real_per_class.values())
    requested = {c: max(0, target - n) for c, n in real_per_class.items()}
    minority = [c for c, n in requested.items() if n > 0]
    pos, pos_reason = positive_class(present, minority)
    # every setting but real_only draws on one pool of renders per class: the minority top-up for
    # real + synthetic, a synthetic twin of the real train split (same size per class) for the others
    twin_settings = {"real_plus_twin", "synthetic_only", "synthetic_then_real"}
    wanted = {c: max(requested[c] if "real_plus_synthetic" in settings else 0,
                     real_per_class[c] if set(settings) & twin_settings else 0)
              for c in present}
    pool_size = {c: math.ceil(n / (1 - args.reject)) for c, n in wanted.items()}
    model_path = checkpoints.generator_path(args.model_path, args.model_folder) if args.model_folder or args.model_path else None
    pool, source = synthetic_pool(args, classes, present, pool_size, model_path)
    pool = {c: pool.get(c, x_real[:0]) for c in present}  # a class nothing was rendered for: no images
    lacking = [c for c in present if not len(pool[c])]
    needs_every_class = [s for s in settings if s in twin_settings]
    if needs_every_class and lacking:
        raise UsageError(f"--settings {needs_every_class[0]} needs synthetic images of every class; "
                         f"none of {', '.join(lacking)}")

    steps = args.epochs * math.ceil(len(y_real) / min(args.batch_size, len(y_real)))
    seeds = [args.seed + i for i in range(args.seeds)]
    runs = {s: [] for s in settings}
    n_syn = {s: {c: 0 for c in present} for s in settings}
    bar = tqdm(total=len(seeds) * len(settings) * steps, desc="classifiers", unit="step", disable=None, smoothing=0.05)
    training_started, done = time.time(), 0
    for seed in seeds:
        ranked = pool
        for s in settings:
            if s == "real_only":
                x, y = x_real, y_real
            else:
                take = requested if s == "real_plus_synthetic" else real_per_class
                syn = {c: ranked[c][:take[c]] for c in present}
                n_syn[s] = {c: len(v) for c, v in syn.items()}
                x_syn = torch.cat([syn[c] for c in present])
                y_syn = torch.cat([torch.full((len(syn[c]),), classes.index(c), dtype=torch.long) for c in present])
                if s in ("real_plus_synthetic", "real_plus_twin"):
                    x, y = torch.cat([x_real, x_syn]), torch.cat([y_real, y_syn])
                else:
                    x, y = x_syn, y_syn
            started = time.time()
            if s == "synthetic_then_real":  # half the steps on synthetic images, then fine-tuned on real ones
                model, _ = train_classifier(x, y, len(classes), args, seed, steps // 2, bar)
                model, loss = train_classifier(x_real, y_real, len(classes), args, seed, steps - steps // 2, bar, model)
            else:
                model, loss = train_classifier(x, y, len(classes), args, seed, steps, bar)
            if s == "real_only" and args.reject:  # this seed's real-only classifier drops the least plausible renders
                ranked = {c: ranked_by_plausibility(model, pool[c], classes.index(c), args)[:wanted[c]]
                          if len(pool[c]) else pool[c] for c in present}
            runs[s].append(classification_metrics(predict_proba(model, x_test, args), y_test, classes, pos))
            r = runs[s][-1]
            done += steps
            left = (len(seeds) * len(settings) * steps - done) / done * (time.time() - training_started)
            tqdm.write(f"seed {seed} {SETTING_NAMES[s]:<22} balanced acc {fmt(r['balanced_accuracy'])}  AUC {fmt(r['auroc'])}  "
                       f"train loss {loss:.3f}  ({time.time() - started:.0f} s; about {left / 60:.0f} min left)")
    bar.close()

    result = {
        "data_dir": args.data_dir, "test_split": args.split, "classes": classes, "classifier": args.classifier,
        "img_size": args.img_size, "epochs": args.epochs, "steps": steps, "batch_size": args.batch_size,
        "optimizer": args.optimizer, "lr": args.lr, "seeds": seeds, "reject": args.reject,
        "synthetic_source": source, "minority_to": target, "minority_classes": minority,
        "positive_class": pos, "positive_class_reason": pos_reason,
        "n_test": len(y_test), "n_test_per_class": {c: int((y_test == i).sum()) for i, c in enumerate(classes)},
        "synthetic_requested_per_class": requested,
        "settings": {s: setting_summary(runs[s], {c: 0 if s == "synthetic_only" else n for c, n in real_per_class.items()},
                                        n_syn[s], classes) for s in settings},
        "gain_over_real_only": {s: paired_gain(runs[s], runs["real_only"], pos)
                                for s in settings if s != "real_only" and "real_only" in settings},
    }
    return write_study(result, t0, args.output_dir or default_output_dir(model_path), "downstream", write_chart,
                       print_downstream_table)


def write_study(result, t0, out_dir, name, chart, table):
    """<name>.json and <name>.png of a finished study in out_dir, its table printed; the result returned."""
    result["seconds"] = round(time.time() - t0, 1)
    os.makedirs(out_dir, exist_ok=True)
    write_json(result, os.path.join(out_dir, f"{name}.json"))
    chart(result, os.path.join(out_dir, f"{name}.png"))
    table(result)
    print(f"\nwrote {os.path.join(out_dir, name + '.json')} and {name}.png ({result['seconds']} s)")
    return result


# ------------------------------------------------------------------------------------- segmentation study


class UNet(nn.Module):
    """The field's usual lesion segmenter (Ronneberger et al. 2015), small enough to train in a minute
    on a CPU: `levels` stages of two 3x3 conv-BN-ReLU at widths width, 2 width, ...; max-pooling down,
    bilinear upsampling and the skip concatenated on the way up; one logit per pixel."""

    def __init__(self, width=16, levels=4):
        super().__init__()

        def block(c_in, c_out):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True),
                                 nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True))

        widths = [width * 2 ** i for i in range(levels)]
        self.down = nn.ModuleList(block(c_in, c_out) for c_in, c_out in zip([3] + widths, widths))
        self.up = nn.ModuleList(block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(levels - 1)))
        self.out = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = block(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False), skip], 1))
        return self.out(x)


class PairSet(torch.utils.data.Dataset):
    """(image, mask) pairs flipped and rotated alike, the image's lighting jittered (lesion_augmentation)."""

    def __init__(self, images_uint8, masks_uint8):
        self.images, self.masks, self.transform = images_uint8, masks_uint8, lesion_augmentation()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image, mask = self.transform(tv_tensors.Image(self.images[i]), tv_tensors.Mask(self.masks[i]))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


def segmentation_loss(logits, target):
    """BCE + soft Dice (per image, then averaged): BCE alone underweights a small lesion's pixels."""
    p = logits.sigmoid()
    inter = (p * target).sum((1, 2, 3))
    dice = (2 * inter + 1) / (p.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + (1 - dice).mean()


def train_segmenter(images, masks, args, seed, steps, bar=None):
    """A U-Net after exactly `steps` optimizer steps on (images, masks), drawn as train_classifier draws
    its batches: every setting trains the same number of steps whatever its size."""
    torch.manual_seed(seed)
    device = torch.device(args.device)
    model = UNet(args.seg_width).to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    dtype = autocast_dtype(device, args.amp)

    def batch_loss(batch):
        x, m = batch
        x = to_model_range(x, device, torch.channels_last)
        target = m.to(device, non_blocking=True).float().div_(255).contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            logits = model(x)
        return segmentation_loss(logits.float(), target)

    return model, fit_steps(PairSet(images, masks), batch_loss, opt, args, seed, steps, device, dtype, bar)


# At 128 px and width 16 the U-Net needed more steps than the table could pay for: after 200 steps it scored no better
# with all 1,334 real pairs than with 100, so the study measured its step budget, not data. At 64 px and width 8 a step
# costs 1/9-1/12 as much (fp32, one thread), and after 1,500 steps the whole split beats 100 pairs by 3 Dice points.
SEG_STEPS = 1500
SEG_SIZE = 64
JACCARD_THRESHOLD = 0.65  # ISIC 2017 task 1: an image segmented with Jaccard below this scores 0


def segmentation_metrics(pred, target):
    """Mean Dice, Jaccard and thresholded Jaccard (ISIC 2017: J < 0.65 counts 0) over images, from
    boolean N x ... predictions and targets; an image with neither lesion predicted nor present is a
    perfect 1."""
    pred, target = pred.flatten(1), target.flatten(1)
    inter = (pred & target).sum(1).double()
    union = (pred | target).sum(1).double()
    total = pred.sum(1).double() + target.sum(1).double()
    jaccard = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    dice = torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))
    thresholded = torch.where(jaccard >= JACCARD_THRESHOLD, jaccard, torch.zeros_like(jaccard))
    return {"dice": float(dice.mean()), "jaccard": float(jaccard.mean()), "thresholded_jaccard": float(thresholded.mean())}


def predict_masks(model, images, args):
    return predict(model, images, args, lambda logits: logits > 0)


SEG_METRICS = ("dice", "jaccard", "thresholded_jaccard")
SOURCE_NAMES = {"real_only": "real only", "new": "+ new masks", "rerender": "+ re-rendered train masks"}
SOURCE_COLORS = {"new": "#e88028", "rerender": "#426eb4"}


def pair_split(folder, size, num_workers, what):
    """The PairedDataset of a folder in the data layout; refused in one line without its images."""
    data = PairedDataset(folder, size, num_workers=num_workers)
    if data.images is None:
        raise UsageError(f"{folder}: {what} has masks but no images (expected {os.path.join(folder, 'originals')}/)")
    return data


def resolve_k(text, n_train):
    """The --k list as numbers ('all' = the whole train split), ascending, each once."""
    values = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        k = n_train if part == "all" else ascii_int(part)
        if k is None or k < 1:
            raise UsageError(f"--k: {part!r} is not a positive whole number or 'all'")
        if k > n_train:
            raise UsageError(f"--k {k}: the train split has only {n_train} pairs")
        values.append(k)
    if not values:
        raise UsageError("--k: empty list")
    return sorted(set(values))


def rendered_pools(generator, config, masks, labels, k, n, args):
    """{"new": (images, masks), "rerender": (images, masks)}: n renders of new masks made from the K
    real masks, and n renders of those K masks themselves (cycled, new generator noise each time), both
    through the stochastic generator as generate.py --new_masks and --pairs make them; and the new
    masks' shape report."""
    made, made_labels, report = new_masks(masks, n, args.seed + k, labels, args.mask_method)
    cycled = torch.arange(n) % len(masks)
    again = masks[cycled]
    again_labels = [labels[i] for i in cycled.tolist()] if labels else None
    pools = {}
    for name, m, lab in (("new", made, made_labels), ("rerender", again, again_labels)):
        ids = torch.stack([generate.class_index(config, c) for c in (lab or [None] * n)])
        images = generate.render(generator, config, m, ids, device=args.device, batch_size=args.batch_size, amp=args.amp,
                                 stochastic=True, seed=args.seed + k)
        pools[name] = (resize_images(images, args.img_size), resize_masks(m, args.img_size))
    return pools, report


def resize_masks(masks_uint8, size):
    if masks_uint8.shape[-1] == size:
        return masks_uint8
    return F.interpolate(masks_uint8, size=(size, size), mode="nearest")


def evaluate_segmentation(args):
    """The segmentation study: a U-Net trained on K real pairs alone and with M = ratio x K synthetic
    pairs of each source, at equal steps, scored on the real --split; gains paired by seed."""
    t0 = time.time()
    train = pair_split(os.path.join(args.data_dir, "train"), args.img_size, args.num_workers, "the train split")
    test = pair_split(os.path.join(args.data_dir, args.split), args.img_size, args.num_workers, "the test split")
    x_test, m_test = test.images, test.masks
    ks = resolve_k(args.k, len(train))
    ratios = args.ratios
    # nested subsets (the first K of one shuffle), fixed across seeds: seeds vary initialisation and batches
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    folders = {name: pair_split(path, args.img_size, args.num_workers, f"--{name}_pairs")
               for name, path in (("new", args.new_pairs), ("rerender", args.rerender_pairs)) if path}
    model_path = checkpoints.generator_path(args.model_path, args.model_folder) if args.model_folder or args.model_path else None
    sources = list(folders) if folders else ["new", "rerender"]
    if model_path:
        generator, config, _ = checkpoints.load_generator(model_path)
        labels = read_labels(args.data_dir)
        gen_train = train if config["img_size"] == args.img_size else PairedDataset(
            os.path.join(args.data_dir, "train"), config["img_size"], num_workers=args.num_workers)
        source_text = {s: f"rendered by {model_path}" for s in sources}
    else:
        source_text = {s: f"directory {args.new_pairs if s == 'new' else args.rerender_pairs}" for s in sources}
    seeds = [args.seed + i for i in range(args.seeds)]
    settings = [(source, ratio) for source in ["real_only"] + sources for ratio in ([0] if source == "real_only" else ratios)]
    n_runs = len(ks) * len(seeds) * len(settings)
    print(f"{n_runs} segmenters ({len(ks)} K x {len(settings)} training sets x {len(seeds)} seeds) of {args.steps} steps of "
          f"{args.batch_size} at {args.img_size}x{args.img_size}; the first one measures the time per step")
    mask_stats, scores, sizes = {}, {}, {}

    def training_sets():
        """(k, source, ratio, seed, images, masks) of every segmenter, built as they are needed: a K's renders are
        made when its first segmenter is due (while --jobs workers train the previous K's), and no more than the
        running segmenters' training sets are held at once."""
        for k in ks:
            subset = order[:k]
            x_real, m_real = train.images[subset], train.masks[subset]
            if model_path:
                names = [gen_train.names[i] for i in subset.tolist()]
                pools, mask_stats[str(k)] = rendered_pools(generator, config, gen_train.masks[subset],
                                                           [labels.get(n) for n in names] if labels else None, k,
                                                           max(ratios) * k, args)
                tqdm.write(f"K={k}: {shape_ks_line(mask_stats[str(k)])}")
            for seed in seeds:
                for source, ratio in settings:
                    if source == "real_only":
                        yield k, source, ratio, seed, x_real, m_real
                        continue
                    if model_path:
                        x_syn, m_syn = (v[:ratio * k] for v in pools[source])
                    else:  # a folder is a pool: each seed draws its own M pairs from it
                        pool_x, pool_m = folders[source].images, folders[source].masks
                        pick = torch.randperm(len(pool_x), generator=torch.Generator().manual_seed(seed + k))[:ratio * k]
                        if len(pick) < ratio * k and seed == seeds[0]:
                            tqdm.write(f"warning: {ratio * k} {source} pairs wanted, {len(pool_x)} in "
                                       f"{source_text[source]}; using all")
                        x_syn, m_syn = pool_x[pick], pool_m[pick]
                    yield k, source, ratio, seed, torch.cat([x_real, x_syn]), torch.cat([m_real, m_syn])

    bar = tqdm(total=n_runs * args.steps, desc="segmenters", unit="step", disable=None, smoothing=0.05)
    started = time.time()

    def record(key, out):
        k, source, ratio, seed = key
        scores.setdefault((k, source, ratio), {})[seed] = dict(out["scores"], train_loss=out["loss"])
        sizes[k, source, ratio] = out["n_train"]
        done = sum(len(v) for v in scores.values())
        if done == 1:
            tqdm.write(f"{out['train_s'] / args.steps:.2f} s per step and {out['test_s']:.0f} s to test: about "
                       f"{n_runs * (out['train_s'] + out['test_s']) / args.jobs / 60:.0f} min for the {n_runs} segmenters")
        s = out["scores"]
        tqdm.write(f"K={k} seed {seed} {SOURCE_NAMES[source]}{f' x{ratio}' if ratio else ''}: Dice {fmt(s['dice'])}  "
                   f"Jaccard {fmt(s['jaccard'])}  thresholded {fmt(s['thresholded_jaccard'])}  train loss {out['loss']:.3f}  "
                   f"({out['train_s'] + out['test_s']:.0f} s; about "
                   f"{(n_runs - done) / done * (time.time() - started) / 60:.0f} min left)")

    run_segmenters(training_sets(), x_test, m_test, args, record, bar)
    bar.close()
    runs = {key: {"n_real": key[0], "n_synthetic": sizes[key] - key[0], "runs": [scores[key][seed] for seed in seeds]}
            for key in ((k, source, ratio) for k in ks for source, ratio in settings)}
    results = []
    for (k, source, ratio), entry in runs.items():
        base = runs[(k, "real_only", 0)]["runs"]
        row = {"k": k, "source": source, "ratio": ratio, "n_real": entry["n_real"], "n_synthetic": entry["n_synthetic"]}
        row.update({metric: mean_std([r[metric] for r in entry["runs"]]) for metric in SEG_METRICS + ("train_loss",)})
        row["gain"] = None if source == "real_only" else {
            metric: mean_std([a[metric] - b[metric] for a, b in zip(entry["runs"], base)]) for metric in SEG_METRICS}
        results.append(row)
    result = {
        "task": "segmentation", "data_dir": args.data_dir, "test_split": args.split, "img_size": args.img_size,
        "segmenter": f"U-Net, widths {args.seg_width}-{8 * args.seg_width}, {models.count_params(UNet(args.seg_width)):,} parameters",
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seeds": seeds, "k": ks, "ratios": ratios,
        "n_train": len(train), "n_test": len(x_test), "sources": source_text,
        "mask_method": args.mask_method if model_path else None, "mask_stats": mask_stats,
        "results": results, "targets": segmentation_targets(results, ks, sources),
    }
    return write_study(result, t0, args.output_dir or default_output_dir(model_path), "downstream_seg",
                       write_segmentation_chart, print_segmentation_table)


def segmenter_run(x, m, x_test, m_test, args, seed, bar=None):
    """One segmenter of the study, trained on (x, m) and scored on the test pairs; a --jobs worker runs this."""
    t0 = time.time()
    model, loss = train_segmenter(x, m, args, seed, args.steps, bar)
    t1 = time.time()
    scores = segmentation_metrics(predict_masks(model, x_test, args), m_test > 127)
    return {"scores": scores, "loss": loss, "n_train": len(x), "train_s": t1 - t0, "test_s": time.time() - t1}


def _worker_threads(n):
    torch.set_num_threads(n)


def run_segmenters(training_sets, x_test, m_test, args, record, bar):
    """record(key, segmenter_run(...)) for each (key..., images, masks) of training_sets: in this process, or in
    --jobs worker processes that share this one's threads. Every segmenter is seeded on its own, so the scores do
    not depend on the order in which they finish (only on the threads each one had, through rounding)."""
    if args.jobs == 1:
        for *key, x, m in training_sets:
            record(tuple(key), segmenter_run(x, m, x_test, m_test, args, key[-1], bar))
        return
    # spawn, not fork: a forked child of a process that has run OpenMP can hang in its first parallel region
    context = torch.multiprocessing.get_context("spawn")
    threads = max(1, torch.get_num_threads() // args.jobs)
    pool = ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_worker_threads, initargs=(threads,))
    running = {}

    def collect(future):
        record(running.pop(future), future.result())
        bar.update(args.steps)  # a worker's steps are not seen here one by one

    try:
        for *key, x, m in training_sets:
            if len(running) == args.jobs:  # hold only the running segmenters' training sets
                for future in wait(running, return_when=FIRST_COMPLETED).done:
                    collect(future)
            # A worker starts in submit; started with SIGINT ignored it keeps it so: Ctrl-C then reaches this process
            # alone, which stops the workers below, instead of each one printing a traceback mid-import.
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                running[pool.submit(segmenter_run, x, m, x_test, m_test, args, key[-1])] = tuple(key)
            finally:
                signal.signal(signal.SIGINT, previous)
        for future in as_completed(list(running)):
            collect(future)
    except BaseException:  # Ctrl-C or a failed segmenter: no worker left computing
        pool.shutdown(wait=False, cancel_futures=True)
        for child in multiprocessing.active_children():
            child.terminate()
        raise
    pool.shutdown()


def segmentation_targets(results, ks, sources):
    """The targets, read off the results: at the smallest K the best new-mask setting gains >= 3 Dice
    points; at the largest K (when more than one was run) that setting loses no more than 0.5; and at
    the smallest K new masks beat re-rendered ones at that setting's ratio."""
    rows = {(r["k"], r["source"], r["ratio"]): r for r in results}
    lead = "new" if "new" in sources else sources[0]
    at_small = [r for r in results if r["k"] == ks[0] and r["source"] == lead]
    if not at_small:
        return {}
    best = max(at_small, key=lambda r: r["gain"]["dice"]["mean"])
    targets = {"setting": f"{lead} x{best['ratio']}",
               "small_k": {"k": ks[0], "dice_gain": best["gain"]["dice"], "met": best["gain"]["dice"]["mean"] >= 0.03}}
    if len(ks) > 1:  # with one K the smallest is the largest: the same row would be read twice
        large = rows[(ks[-1], lead, best["ratio"])]
        targets["large_k"] = {"k": ks[-1], "dice_gain": large["gain"]["dice"], "met": large["gain"]["dice"]["mean"] >= -0.005}
    other = rows.get((ks[0], "rerender", best["ratio"]))
    if lead == "new" and other is not None:
        diff = best["dice"]["mean"] - other["dice"]["mean"]
        targets["new_vs_rerender"] = {"k": ks[0], "ratio": best["ratio"], "dice_difference": diff, "met": diff > 0}
    return targets


def print_segmentation_table(result):
    print(f"\nSegmentation: {result['segmenter']} from scratch at {result['img_size']}x{result['img_size']}, "
          f"{result['steps']} steps of {result['batch_size']} per training set, seeds {result['seeds']}; tested on "
          f"{result['n_test']} real {result['test_split']} pairs. Mean +- standard error over seeds; gains paired by seed, in points")

    def cell(ms, scale=1, spec=".3f"):
        return fmt(ms["mean"] * scale, spec) + (" +- " + fmt(ms["sem"] * scale, spec.lstrip("+")) if ms.get("sem") is not None else "")

    names = [SOURCE_NAMES[r["source"]] + (f" x{r['ratio']} ({r['n_synthetic']})" if r["ratio"] else "") for r in result["results"]]
    width = max(map(len, names + ["training set"])) + 2
    print("  " + f"{'K':>6}  {'training set':<{width}}{'Dice':>16}{'Jaccard':>16}{'thr. Jaccard':>16}{'Dice gain':>16}{'thr. J gain':>16}")
    for r, what in zip(result["results"], names):
        gains = [cell(r["gain"][m], 100, "+.1f") for m in ("dice", "thresholded_jaccard")] if r["gain"] else ["", ""]
        print("  " + f"{r['k']:>6}  {what:<{width}}" + "".join(f"{cell(r[m]):>16}" for m in SEG_METRICS) + "".join(f"{g:>16}" for g in gains))
    t = result["targets"]
    if t:
        line = (f"  targets ({t['setting']}): K={t['small_k']['k']} Dice gain {cell(t['small_k']['dice_gain'], 100, '+.1f')} "
                f"(>= +3: {'met' if t['small_k']['met'] else 'not met'})")
        if "large_k" in t:
            v = t["large_k"]
            line += f"; K={v['k']} {cell(v['dice_gain'], 100, '+.1f')} (>= -0.5: {'met' if v['met'] else 'not met'})"
        if "new_vs_rerender" in t:
            v = t["new_vs_rerender"]
            line += f"; new - re-rendered at K={v['k']}: {v['dice_difference'] * 100:+.1f} ({'met' if v['met'] else 'not met'})"
        print(line)


def write_segmentation_chart(result, path):
    """downstream_seg.png: Dice gain over real only (points) against M/K, one panel per K, one line per
    source, whiskers of +- standard error (none for a single seed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ks = result["k"]
    fig = Figure(figsize=(1.5 + 3.6 * len(ks), 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(ks), sharey=True, squeeze=False)[0]
    for ax, k in zip(axes, ks):
        base = next(r for r in result["results"] if r["k"] == k and r["source"] == "real_only")
        for source in result["sources"]:
            rows = [r for r in result["results"] if r["k"] == k and r["source"] == source]
            gains = [r["gain"]["dice"] for r in rows]
            # from (0, 0): real only, the baseline every gain is paired with
            ax.errorbar([0] + [r["ratio"] for r in rows], [0] + [100 * g["mean"] for g in gains],
                        yerr=[0] + [100 * g["sem"] if g["sem"] is not None else 0 for g in gains], marker="o", capsize=4,
                        color=SOURCE_COLORS[source], label=SOURCE_NAMES[source].lstrip("+ "))
        ax.axhline(0, color="0.4", lw=1, ls="--")
        ax.set_xticks([0] + result["ratios"])
        ax.set_xlabel("synthetic pairs per real pair (M/K)")
        ax.set_title(f"K = {k} real pairs (real only: Dice {base['dice']['mean']:.3f})", fontsize=10)
        ax.grid(color="0.9")
    axes[0].set_ylabel("Dice gain over real only (points)")
    axes[-1].legend(frameon=False, fontsize=9)
    shown = f"mean of {len(result['seeds'])} seeds ± standard error" if len(result["seeds"]) > 1 else f"seed {result['seeds'][0]} alone"
    fig.suptitle(f"U-Net on real {result['test_split']} pairs ({shown})", fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp)


# --------------------------------------------------------------------------------------------------- main


LIMITS = {**SHARED_LIMITS, "seeds": Range(1, 100), "epochs": Range(1, 10_000),
          "minority_to": Range(0, 1_000_000), "lr": Range(0, 10, lo_open=True), "weight_decay": Range(0, 1),
          "reject": Range(0, 1, hi_open=True), "steps": Range(1, 1_000_000), "seg_width": Range(1, 256),
          "jobs": Range(1, 256)}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("classification", "segmentation"), default="classification",
                   help="classification: the --settings study of a lesion classifier; segmentation: the K x ratio study of a U-Net")
    p.add_argument("--data_dir", default="data", help="preprocess.py output: {train,test}/{originals,masks}, labels.csv")
    p.add_argument("--split", default="test", help="real split every classifier is tested on (it trains on train)")
    p.add_argument("--model_folder", help="run folder of generator_epoch_<N>.pth files (the highest epoch renders)")
    p.add_argument("--model_path", help="one generator checkpoint (instead of --model_folder)")
    p.add_argument("--synthetic_dir", default=None,
                   help="generate.py --balance output: DIR/<class>/gen_<n>.png + DIR/labels.csv (instead of rendering)")
    p.add_argument("--settings", default=DEFAULT_SETTINGS,
                   help=f"comma list of what the classifier trains on, each tested on the real --split: {', '.join(SETTINGS)} "
                        "(real_plus_synthetic: minority classes topped up to the largest; real_plus_twin: a synthetic "
                        "twin of the train split added, every class alike; synthetic_only is CAS: the twin alone; "
                        "synthetic_then_real: half the steps on the twin, then fine-tuned on real)")
    p.add_argument("--seeds", type=int, default=3, help="classifier seeds per setting (seed, seed+1, ...)")
    p.add_argument("--epochs", type=int, default=8,
                   help="passes over the real train split; every setting trains that many steps (equal compute)")
    p.add_argument("--reject", type=float, default=0.0,
                   help="render 1/(1-R) times the synthetic images needed and keep those each seed's real-only "
                        "classifier finds most probable for their class (needs real_only in --settings)")
    p.add_argument("--classifier", choices=("resnet18", "small"), default="resnet18")
    p.add_argument("--minority_to", type=int, default=None,
                   help="top every smaller class up to this many images (default: the largest class's size)")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight_decay", type=float, default=1e-4)
    add_shared_flags(p, img_size=f"classifier input size (default {SHARED_DEFAULTS['img_size']}) or segmenter size (default "
                                  f"{SEG_SIZE}); real and synthetic images are resized to it",
                     batch_size="images per classifier step (and per render call)",
                     seed="first classifier seed; renders are seeded from it too")
    p.add_argument("--output_dir", default=None,
                   help="default: pixelgan_outputs/<TS>/downstream (a generator), pixelgan_outputs/downstream_<time> (--synthetic_dir)")
    seg = p.add_argument_group("--task segmentation")
    seg.add_argument("--k", default="100,300,all", help="real train pairs per segmenter, a comma list ('all': the whole split)")
    seg.add_argument("--ratios", default="1,2,4", help="synthetic pairs per real pair (M/K), a comma list of whole numbers")
    seg.add_argument("--new_pairs", default=None, help="generate.py --new_masks output (instead of rendering with a generator)")
    seg.add_argument("--rerender_pairs", default=None, help="generate.py --pairs output of the train masks (the control)")
    seg.add_argument("--steps", type=int, default=SEG_STEPS, help="optimizer steps of every segmenter (equal compute)")
    seg.add_argument("--seg_width", type=int, default=8, help="U-Net width of the first level (x2 per level, 4 levels)")
    seg.add_argument("--jobs", type=int, default=1,
                     help="segmenters trained side by side in worker processes, each with 1/jobs of the threads "
                          "(on a CPU: its number of cores)")
    seg.add_argument("--mask_method", choices=MASK_METHODS, default="elastic",
                     help="how new masks are made when a generator renders them (as generate.py --mask_method)")
    p.set_defaults(img_size=None)
    args = p.parse_args(argv)
    if args.img_size is None:
        args.img_size = SEG_SIZE if args.task == "segmentation" else SHARED_DEFAULTS["img_size"]
    if args.task == "segmentation":
        if not (args.model_folder or args.model_path or args.new_pairs or args.rerender_pairs):
            p.error("--task segmentation needs --model_folder or --model_path (or --new_pairs / --rerender_pairs)")
        if (args.new_pairs or args.rerender_pairs) and (args.model_folder or args.model_path):
            p.error("give the pairs folders or a generator to render them, not both")
        ratios = [ascii_int(r.strip()) for r in args.ratios.split(",") if r.strip()]
        if not ratios or any(r is None or not 1 <= r <= 100 for r in ratios):
            p.error(f"--ratios {args.ratios!r}: a comma list of whole numbers from 1 to 100")
        args.ratios = sorted(set(ratios))
    elif not (args.model_folder or args.model_path or args.synthetic_dir):
        p.error("give --model_folder or --model_path (or --synthetic_dir)")
    if args.model_folder and args.model_path:
        p.error("give --model_folder or --model_path, not both")
    check_ranges(args, LIMITS)
    chosen = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SETTINGS]
    if unknown or not chosen:
        p.error(f"--settings: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(SETTINGS)}")
    args.settings = [s for s in SETTINGS if s in chosen]  # real_only first: --reject ranks renders with it
    if args.reject and "real_only" not in args.settings:
        p.error("--reject ranks renders with the real-only classifier: keep real_only in --settings")
    check_name(args.split, "--split")  # a split is a folder inside --data_dir, not a path out of it
    args.device = check_device(args.device)
    return args


def main(argv=None):
    args = parse_args(argv)
    return evaluate_segmentation(args) if args.task == "segmentation" else evaluate_downstream(args)


if __name__ == "__main__":
    sys.exit(run_cli(lambda: main(sys.argv[1:]), "interrupted: files already written are complete; run again for the rest"))
