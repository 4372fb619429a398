"""Evaluate a trained Skin Lesion PixelGAN: realism, downstream usefulness, training curves.

Realism (paired L1/PSNR/SSIM, FID/KID with a real-vs-real reference, diversity) on a split:
    python evaluate.py --model_folder pixelgan_models/<TS> --data_dir data [--split test]
        -> pixelgan_outputs/<TS>/eval_epoch_<E>/{per_image.csv, summary.json}

Downstream usefulness: a classifier trained from scratch on real images, and on real images plus
synthetic images of the minority classes, both tested on the real test split (mean +- std over seeds):
    python evaluate.py --downstream --data_dir data --synthetic_dir DIR          (generate.py --balance output)
    python evaluate.py --downstream --data_dir data --model_folder pixelgan_models/<TS>
        -> <output_dir>/{downstream.json, downstream.png}

Training curves from a run's metrics.csv, for people without TensorBoard:
    python evaluate.py --plot pixelgan_outputs/<TS>          -> pixelgan_outputs/<TS>/curves.png
"""
import argparse
import csv
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchmetrics.functional.classification import binary_auroc, multiclass_recall
from torchvision.transforms import v2
from tqdm import tqdm

import metrics
import models
from dataset import (ArgumentParser, PairedDataset, RandomRot90, Range, UsageError, atomic_path, check_device, check_memory,
                     check_name, check_ranges, read_image, read_labels, run_cli, to_model_range)

# synthetic_only is CAS (Ravuri & Vinyals 2019): trained on renders alone, tested on real images
SETTINGS = ("real_only", "real_plus_synthetic", "real_plus_twin", "synthetic_only", "synthetic_then_real")
DEFAULT_SETTINGS = "real_only,real_plus_synthetic,synthetic_only"
SETTING_NAMES = {"real_only": "real only", "real_plus_synthetic": "real + synthetic", "real_plus_twin": "real + synthetic twin",
                 "synthetic_only": "synthetic only (CAS)", "synthetic_then_real": "synthetic, then real"}
SETTING_COLORS = {"real_only": (66, 110, 180), "real_plus_synthetic": (232, 128, 40), "real_plus_twin": (200, 70, 70),
                  "synthetic_only": (80, 160, 80), "synthetic_then_real": (150, 100, 180)}


def checkpoint_epoch(path, ckpt):
    if isinstance(ckpt.get("epoch"), int):
        return ckpt["epoch"]
    stem = os.path.splitext(os.path.basename(path))[0]
    tail = stem.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else "unknown"


def run_name(model_path):
    # Models and outputs share the run's timestamp folder name: pixelgan_models/<TS> <-> pixelgan_outputs/<TS>.
    return os.path.basename(os.path.normpath(os.path.dirname(os.path.abspath(model_path))))


def render_in_chunks(generator, config, masks, labels, args, desc):
    """Deterministic renders in a few calls, only so that a long split shows progress."""
    chunk = max(args.batch_size, 1) * 8
    out = []
    for start in tqdm(range(0, len(masks), chunk), desc=desc, unit="chunk", disable=None):
        part_labels = labels[start:start + chunk] if labels is not None else None
        out.append(models.render(generator, config, masks[start:start + chunk], labels=part_labels, device=args.device,
                          batch_size=args.batch_size, amp=args.amp, stochastic=False, seed=args.seed))
    return torch.cat(out)


def fmt(value, spec=".4f"):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def mean_finite(values):
    """Mean over finite entries: one pixel-identical pair (PSNR = inf) must not make the mean infinite."""
    values = torch.as_tensor(values, dtype=torch.float64)
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")


def json_safe(obj):
    # json.dump would write NaN/Infinity, which strict JSON readers reject.
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(obj, path):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(json_safe(obj), f, indent=2)
        f.write("\n")


# ------------------------------------------------------------------------------------------------ realism


def user_inception(args):
    """The Inception network of --inception_weights, loaded before any slow work; a file that exists but is
    refused (not a plain state dict of the right tensors) ends the run, since the user asked for it.
    None when the flag is not given or names no file (FID/KID then say unavailable, as without weights)."""
    if not args.inception_weights or not os.path.isfile(args.inception_weights):
        return None
    extractor, reason = metrics.load_inception(args.inception_weights, device=args.device)
    if extractor is None:
        raise UsageError(f"--inception_weights {reason.removeprefix('unavailable: ')}; pass torch-fidelity's "
                         f"state-dict file ({metrics.TORCH_FIDELITY_WEIGHTS}) or leave the flag out")
    return extractor


def distribution_block(fake_uint8, real_uint8, args, extractor=None):
    """FID/KID of generated vs real, and the like-for-like reference on disjoint halves, or the reason why not."""
    if extractor is None:
        extractor, reason = metrics.load_inception(args.inception_weights, device=args.device)
    if extractor is None:
        return {"status": reason}
    try:
        return {"status": "ok", **metrics.distribution_metrics(fake_uint8, real_uint8, extractor, seed=args.seed,
                                                               device=args.device, batch_size=args.batch_size)}
    except ValueError as e:  # too few images for FID/KID
        return {"status": f"unavailable: {e}"}


def diversity_block(generator, config, masks, labels, args):
    n_masks = min(args.n_diversity_masks, len(masks))
    if args.n_variations < 2 or n_masks < 1:
        return {"status": "skipped (needs --n_variations >= 2 and at least one mask)"}
    sub_labels = labels[:n_masks] if labels is not None else None
    variations = [models.render(generator, config, masks[:n_masks], labels=sub_labels, device=args.device,
                         batch_size=args.batch_size, amp=args.amp, stochastic=True, seed=args.seed + 1 + k)
                  for k in tqdm(range(args.n_variations), desc="diversity", unit="render", disable=None)]
    value, distance = metrics.diversity(to_model_range(torch.stack(variations, 1), "cpu"))
    return {"status": "ok", "value": value, "distance": distance, "n_masks": n_masks, "n_variations": args.n_variations}


def print_realism_table(summary):
    paired, dist, div = summary["paired"], summary["distribution"], summary["diversity"]
    print(f"\nRealism: {summary['model_path']} (epoch {summary['epoch']}), {summary['split']} split, "
          f"{summary['n_images']} images at {summary['img_size']}x{summary['img_size']}")
    print(f"  {'metric':<22}{'generated vs real':>24}{'real vs real (reference)':>28}")
    print(f"  {'L1 ([-1,1] units)':<22}{fmt(paired['l1']):>24}")
    print(f"  {'PSNR (dB)':<22}{fmt(paired['psnr'], '.2f'):>24}")
    print(f"  {'SSIM':<22}{fmt(paired['ssim']):>24}")
    if dist["status"] != "ok":
        print(f"  {'FID / KID':<22}  {dist['status']}")
    else:
        h, r, full = dist["generated_vs_real_halves"], dist["real_vs_real_reference"], dist["generated_vs_real"]
        n = dist["half_size"]
        print(f"  {f'FID ({n} vs {n})':<22}{fmt(h['fid'], '.2f'):>24}{fmt(r['fid'], '.2f'):>28}")
        print(f"  {'KID x1000':<22}{fmt(1000 * h['kid_mean'], '.2f') + ' +- ' + fmt(1000 * h['kid_std'], '.2f'):>24}"
              f"{fmt(1000 * r['kid_mean'], '.2f') + ' +- ' + fmt(1000 * r['kid_std'], '.2f'):>28}")
        m = dist["n_generated"]
        print(f"  {f'FID ({m} vs {m})':<22}{fmt(full['fid'], '.2f'):>24}")
        print(f"  {'KID x1000':<22}{fmt(1000 * full['kid_mean'], '.2f') + ' +- ' + fmt(1000 * full['kid_std'], '.2f'):>24}")
    if div["status"] == "ok":
        label = f"diversity ({div['distance']})"
        print(f"  {label:<22}{fmt(div['value']):>24}   ({div['n_masks']} masks x {div['n_variations']} renders; 0 = ignores noise)")
    else:
        print(f"  {'diversity':<22}  {div['status']}")
    for name, row in summary.get("per_class", {}).items():
        print(f"  class {name:<16}{'n=' + str(row['n']):>8}  L1 {fmt(row['l1'])}  PSNR {fmt(row['psnr'], '.2f')}  SSIM {fmt(row['ssim'])}")


def evaluate_realism(args):
    t0 = time.time()
    model_path = models.generator_path(args.model_path, args.model_folder)
    generator, config, ckpt = models.load_generator(model_path)
    generator.eval()
    img_size = config["img_size"]
    if args.img_size is not None and args.img_size != img_size:
        raise SystemExit(f"--img_size {args.img_size} differs from the checkpoint's img_size {img_size}; "
                         "realism is measured at the size the generator was trained for")
    epoch = checkpoint_epoch(model_path, ckpt)
    extractor = user_inception(args)
    out_dir = args.output_dir or os.path.join("pixelgan_outputs", run_name(model_path), f"eval_epoch_{epoch}")
    os.makedirs(out_dir, exist_ok=True)

    conditional = config.get("n_classes", 0) > 0
    classes = list(config.get("classes") or [])
    labels = read_labels(args.data_dir)
    if not classes and labels:  # unconditional model: classes only group the per-class report
        classes = sorted(set(labels.values()))
    data = PairedDataset(os.path.join(args.data_dir, args.split), img_size, labels=labels, classes=classes,
                         num_workers=args.num_workers)
    if data.images is None:
        raise SystemExit(f"{os.path.join(args.data_dir, args.split)}: has no originals/ folder; realism needs the real images")
    if conditional and bool((data.labels < 0).any()):
        missing = [n for n, l in zip(data.names, data.labels.tolist()) if l < 0][:5]
        raise SystemExit(f"class-conditional model but no known class for e.g. {missing} "
                         f"(labels.csv classes must be among {classes})")
    render_labels = data.labels if conditional else None

    fake = render_in_chunks(generator, config, data.masks, render_labels, args, desc="render")
    per_image = {k: [] for k in ("l1", "psnr", "ssim")}
    for start in range(0, len(fake), args.batch_size):  # SSIM's windows make a full-split call memory-hungry
        m = metrics.paired_metrics(to_model_range(fake[start:start + args.batch_size], "cpu"),
                                   to_model_range(data.images[start:start + args.batch_size], "cpu"))
        for k in per_image:
            per_image[k].append(m[k].double())
    per_image = {k: torch.cat(v) for k, v in per_image.items()}
    with atomic_path(os.path.join(out_dir, "per_image.csv")) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "l1", "psnr", "ssim"])
        for i, name in enumerate(data.names):
            writer.writerow([name] + [f"{float(per_image[k][i]):.6f}" for k in ("l1", "psnr", "ssim")])

    summary = {
        "model_path": model_path, "epoch": epoch, "data_dir": args.data_dir, "split": args.split,
        "n_images": len(data.names), "img_size": img_size, "seed": args.seed,
        "paired": {k: mean_finite(v) for k, v in per_image.items()},
        "paired_note": ("means over images (PSNR over finite values: a pixel-identical pair is inf); "
                        "L1 in [-1,1] units, PSNR/SSIM on [0,1] images (data_range=1)"),
    }
    if classes and bool((data.labels >= 0).any()):
        summary["per_class"] = {c: {"n": int((data.labels == i).sum()), **{k: mean_finite(v[data.labels == i]) for k, v in per_image.items()}}
                                for i, c in enumerate(classes) if bool((data.labels == i).any())}
    summary["distribution"] = distribution_block(fake, data.images, args, extractor)
    summary["diversity"] = diversity_block(generator, config, data.masks, render_labels, args)
    summary["seconds"] = round(time.time() - t0, 1)
    write_json(summary, os.path.join(out_dir, "summary.json"))
    print_realism_table(summary)
    print(f"\nwrote {os.path.join(out_dir, 'per_image.csv')} and summary.json ({summary['seconds']} s)")
    return summary


# --------------------------------------------------------------------------------------------- downstream


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


def classifier_augmentation():
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
    batch = min(args.batch_size, len(images))
    sampler = torch.utils.data.RandomSampler(range(len(images)), num_samples=steps * batch,
                                             generator=torch.Generator().manual_seed(seed))
    loader = torch.utils.data.DataLoader(ImageSet(images, labels, classifier_augmentation()), batch_size=batch,
                                         sampler=sampler, drop_last=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    dtype = models.autocast_dtype(device, args.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 needs loss scaling
    total = torch.zeros((), device=device)  # summed on the device: no host sync per step
    for x, y in loader:
        x, y = to_model_range(x, device, torch.channels_last), y.to(device, non_blocking=True)
        with models.autocast(device, dtype):
            loss = loss_fn(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        total += loss.detach()
        if bar is not None:
            bar.update()
    return model, float(total) / max(steps, 1)


@torch.inference_mode()
def predict_proba(model, images, args):
    model.eval()
    device = torch.device(args.device)
    dtype = models.autocast_dtype(device, args.amp)
    out = []
    for start in range(0, len(images), args.batch_size):
        x = to_model_range(images[start:start + args.batch_size], device, torch.channels_last)
        with models.autocast(device, dtype):
            out.append(model(x).float().softmax(1).cpu())
    return torch.cat(out)


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


def labelled_split(data_dir, split, size, labels, classes, num_workers):
    data = PairedDataset(os.path.join(data_dir, split), size, labels=labels, classes=classes, num_workers=num_workers)
    if data.images is None:
        raise SystemExit(f"{os.path.join(data_dir, split)}: has no originals/ folder")
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
        raise SystemExit(f"{path}: not found (expected DIR/labels.csv with image path and label columns)")
    with open(path, newline="") as f:
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
            raise SystemExit(f"{os.path.join(folder, row[path_col])}: listed in labels.csv but cannot be read") from None
    if ignored:
        print(f"{path}: ignored images of classes not in the training labels: {ignored}")
    return {c: torch.stack(v) if v else torch.zeros((0, 3, size, size), dtype=torch.uint8) for c, v in found.items()}


def synthesize(model_path, data_dir, classes, requested, args):
    """{class: uint8 images}: `requested[class]` renders made exactly as generate.py --class/--balance
    makes them (jittered masks of that class, stochastic generator)."""
    generator, config, _ = models.load_generator(model_path)
    check_memory(sum(requested.values()) * 3 * max(config["img_size"], args.img_size) ** 2,
                 f"{sum(requested.values())} synthetic images", "lower --minority_to, --reject or --img_size")
    labels = read_labels(data_dir)
    train = PairedDataset(os.path.join(data_dir, "train"), config["img_size"], labels=labels, classes=classes,
                          num_workers=args.num_workers)
    out = {}
    for k, (name, n) in enumerate(requested.items()):
        if n <= 0:
            continue
        try:
            images = models.class_images(generator, config, train, labels, name, n, args.device, args.batch_size, args.amp,
                                  seed=args.seed + k)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        out[name] = resize_images(images, args.img_size)
        print(f"generated {n} {name} images from the {name} train masks")
    return out


def positive_class(classes, minority):
    for c in classes:
        if c.lower() in ("melanoma", "mel"):
            return c, "the class named melanoma"
    pool = minority or classes
    return pool[0], "first minority class (no class named melanoma)" if minority else "first class (no minority class)"


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


def ranked_by_plausibility(model, images, class_idx, args):
    """images ordered from most to least probable for their intended class under a real-trained classifier."""
    order = predict_proba(model, images, args)[:, class_idx].argsort(descending=True)
    return images[order]


def evaluate_downstream(args):
    t0 = time.time()
    if args.img_size is None:
        args.img_size = 128
    labels = read_labels(args.data_dir)
    if not labels:
        raise SystemExit(f"{os.path.join(args.data_dir, 'labels.csv')}: no labels; downstream needs classes")
    classes = sorted(set(labels.values()))
    train, train_keep = labelled_split(args.data_dir, "train", args.img_size, labels, classes, args.num_workers)
    test, test_keep = labelled_split(args.data_dir, args.split, args.img_size, labels, classes, args.num_workers)
    x_real, y_real = train.images[train_keep], train.labels[train_keep]
    x_test, y_test = test.images[test_keep], test.labels[test_keep]
    counts = torch.bincount(y_real, minlength=len(classes))
    present = [c for c, n in zip(classes, counts.tolist()) if n > 0]
    if len(present) < 2:
        raise SystemExit(f"need at least two classes in the train split, found {present}")
    settings = args.settings
    target = args.minority_to if args.minority_to is not None else int(counts.max())
    requested = {c: max(0, target - int(n)) for c, n in zip(classes, counts.tolist()) if n > 0}
    minority = [c for c, n in requested.items() if n > 0]
    pos, pos_reason = positive_class(present, minority)
    # every setting but real_only draws on one pool of renders per class: the minority top-up for
    # real + synthetic, a synthetic twin of the real train split (same size per class) for the others
    twin_settings = {"real_plus_twin", "synthetic_only", "synthetic_then_real"}
    wanted = {c: max(requested[c] if "real_plus_synthetic" in settings else 0,
                     int(counts[classes.index(c)]) if set(settings) & twin_settings else 0)
              for c in present}
    pool_size = {c: math.ceil(n / (1 - args.reject)) for c, n in wanted.items()}

    model_path = models.generator_path(args.model_path, args.model_folder) if args.model_folder or args.model_path else None
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
        raise SystemExit("--downstream needs --synthetic_dir DIR or a generator (--model_folder / --model_path)")
    pool = {c: pool.get(c, x_real[:0]) for c in present}  # a class nothing was rendered for: no images
    lacking = [c for c in present if not len(pool[c])]
    needs_every_class = [s for s in settings if s in twin_settings]
    if needs_every_class and lacking:
        raise SystemExit(f"--settings {needs_every_class[0]} needs synthetic images of every class; "
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
                take = {c: requested[c] if s == "real_plus_synthetic" else int(counts[classes.index(c)]) for c in present}
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
        "synthetic_requested_per_class": {c: requested[c] for c in present},
        "settings": {}, "gain_over_real_only": {},
    }
    for s in settings:
        result["settings"][s] = {
            "n_real": 0 if s == "synthetic_only" else len(y_real), "n_synthetic": sum(n_syn[s].values()),
            "n_real_per_class": {c: 0 if s == "synthetic_only" else int(counts[classes.index(c)]) for c in present},
            "n_synthetic_per_class": n_syn[s],
            "balanced_accuracy": mean_std([r["balanced_accuracy"] for r in runs[s]]),
            "accuracy": mean_std([r["accuracy"] for r in runs[s]]),
            "auroc": mean_std([r["auroc"] for r in runs[s]]),
            "recall": {c: mean_std([r["recall"][c] for r in runs[s]]) for c in classes},
        }
        if s != "real_only" and "real_only" in settings:
            # paired by seed: the same seed draws the same initialisation, so the difference has less noise
            result["gain_over_real_only"][s] = {
                "balanced_accuracy": mean_std([a["balanced_accuracy"] - b["balanced_accuracy"]
                                               for a, b in zip(runs[s], runs["real_only"])]),
                "positive_recall": mean_std([a["recall"][pos] - b["recall"][pos] for a, b in zip(runs[s], runs["real_only"])]),
            }
    result["seconds"] = round(time.time() - t0, 1)

    out_dir = args.output_dir or default_downstream_dir(model_path)
    os.makedirs(out_dir, exist_ok=True)
    write_json(result, os.path.join(out_dir, "downstream.json"))
    legend = {s: f"{SETTING_NAMES[s]} ({result['settings'][s]['n_real']} real + {result['settings'][s]['n_synthetic']} synthetic)"
              for s in settings}
    chart = {legend[s]: {"balanced accuracy": result["settings"][s]["balanced_accuracy"],
                         f"{pos} recall": result["settings"][s]["recall"][pos],
                         f"{pos}-vs-rest AUC": result["settings"][s]["auroc"]} for s in settings}
    bar_chart(chart, os.path.join(out_dir, "downstream.png"),
              title=f"{args.classifier} on real {args.split} images, mean +- std over {len(seeds)} seed(s)",
              colors=[SETTING_COLORS[s] for s in settings])
    print_downstream_table(result)
    print(f"\nwrote {os.path.join(out_dir, 'downstream.json')} and downstream.png ({result['seconds']} s)")
    return result


def default_downstream_dir(model_path):
    if model_path:
        return os.path.join("pixelgan_outputs", run_name(model_path), "downstream")
    return os.path.join("pixelgan_outputs", "downstream_" + time.strftime("%Y%m%d-%H%M%S"))


# ----------------------------------------------------------------------------------------------- drawing


def font(size):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def nice_ticks(lo, hi, n=5):
    """About n round tick values (1, 2, 2.5, 5 x 10^k steps) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        lo, hi = lo - (abs(lo) * 0.1 or 1), hi + (abs(hi) * 0.1 or 1)
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks, v = [], first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 12))
        v += step
    if ticks[-1] < hi:
        ticks.append(round(v, 12))
    return ticks


def tick_label(v):
    return f"{v:.4g}" if v != 0 else "0"


def line_panel(draw, box, series, title, xlabel, colors):
    """Axes, ticks, grid, one polyline per series and a legend inside box = (x0, y0, x1, y1).

    series: {name: [(x, y), ...]}; points with a non-finite y are skipped (epochs without evaluation)."""
    f_small, f_title = font(12), font(14)
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 62, x1 - 24, y0 + 46, y1 - 40
    draw.text(((x0 + x1) / 2, y0 + 6), title, fill="black", font=f_title, anchor="mt")
    pts = {k: [(x, y) for x, y in v if y is not None and math.isfinite(y)] for k, v in series.items()}
    allp = [p for v in pts.values() for p in v]
    draw.rectangle([left, top, right, bottom], outline=(90, 90, 90))
    if not allp:
        draw.text(((left + right) / 2, (top + bottom) / 2), "no data", fill=(120, 120, 120), font=f_small, anchor="mm")
        return
    xt = nice_ticks(min(p[0] for p in allp), max(p[0] for p in allp))
    yt = nice_ticks(min(p[1] for p in allp), max(p[1] for p in allp))
    xlo, xhi, ylo, yhi = xt[0], xt[-1], yt[0], yt[-1]

    def to_px(x, y):
        return (left + (x - xlo) / (xhi - xlo) * (right - left), bottom - (y - ylo) / (yhi - ylo) * (bottom - top))

    for v in yt:
        _, py = to_px(xlo, v)
        draw.line([left, py, right, py], fill=(228, 228, 228))
        draw.line([left - 4, py, left, py], fill=(90, 90, 90))
        draw.text((left - 6, py), tick_label(v), fill="black", font=f_small, anchor="rm")
    for v in xt:
        px, _ = to_px(v, ylo)
        draw.line([px, bottom, px, bottom + 4], fill=(90, 90, 90))
        draw.text((px, bottom + 6), tick_label(v), fill="black", font=f_small, anchor="mt")
    draw.text(((left + right) / 2, y1 - 6), xlabel, fill="black", font=f_small, anchor="mb")
    for (name, p), color in zip(pts.items(), colors):
        xy = [to_px(x, y) for x, y in sorted(p)]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for px, py in xy if len(xy) <= 40 else []:  # markers only while they stay readable
            draw.ellipse([px - 2.5, py - 2.5, px + 2.5, py + 2.5], fill=color)
    # legend in its own strip under the title, so it never hides a curve
    names = [(name, color) for (name, p), color in zip(pts.items(), colors) if p]
    widths = [draw.textlength(name, font=f_small) + 30 for name, _ in names]
    lx = (left + right - sum(widths)) / 2
    for (name, color), w in zip(names, widths):
        draw.line([lx, y0 + 33, lx + 16, y0 + 33], fill=color, width=3)
        draw.text((lx + 20, y0 + 33), name, fill="black", font=f_small, anchor="lm")
        lx += w


def bar_chart(groups, path, title, colors):
    """Grouped bars with +-std error bars on a 0..1 axis. groups: {setting: {metric: {"mean", "std"}}}."""
    settings = list(groups)
    metric_names = list(next(iter(groups.values())))
    f_small, f_title = font(13), font(15)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend_w = max(probe.textlength(name, font=f_small) for name in settings) + 60
    width, height = int(100 + 200 * len(metric_names) + legend_w), 460
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 70, width - legend_w, 50, height - 60
    draw.text((width / 2, 14), title, fill="black", font=f_title, anchor="mt")
    for v in [i / 10 for i in range(11)]:
        py = bottom - v * (bottom - top)
        draw.line([left, py, right, py], fill=(225, 225, 225) if v > 0 else (90, 90, 90))
        if abs(v * 5 - round(v * 5)) < 1e-9:  # a label every 0.2, a grid line every 0.1
            draw.text((left - 8, py), f"{v:.1f}", fill="black", font=f_small, anchor="rm")
    draw.line([left, top, left, bottom], fill=(90, 90, 90))
    slot = (right - left) / len(metric_names)
    bar_w = slot * 0.7 / len(settings)
    for m, metric in enumerate(metric_names):
        cx = left + slot * (m + 0.5)
        draw.text((cx, bottom + 10), metric, fill="black", font=f_small, anchor="mt")
        for s, setting in enumerate(settings):
            ms = groups[setting][metric]
            bx = cx - slot * 0.35 + s * bar_w
            mean = ms["mean"]
            if mean is None or not math.isfinite(mean):
                draw.text((bx + bar_w / 2, bottom - 4), "n/a", fill=(120, 120, 120), font=f_small, anchor="mb")
                continue
            py = bottom - max(0.0, min(1.0, mean)) * (bottom - top)
            draw.rectangle([bx + 2, py, bx + bar_w - 2, bottom - 1], fill=colors[s])
            label_y = py
            if ms.get("std") is not None:
                lo = bottom - max(0.0, min(1.0, mean - ms["std"])) * (bottom - top)
                hi = bottom - max(0.0, min(1.0, mean + ms["std"])) * (bottom - top)
                mx = bx + bar_w / 2
                draw.line([mx, lo, mx, hi], fill="black", width=2)
                draw.line([mx - 6, lo, mx + 6, lo], fill="black", width=2)
                draw.line([mx - 6, hi, mx + 6, hi], fill="black", width=2)
                label_y = hi
            draw.text((bx + bar_w / 2, label_y - 3), f"{mean:.3f}", fill="black", font=f_small, anchor="mb")
    ly = top
    for s, setting in enumerate(settings):
        draw.rectangle([right + 20, ly, right + 36, ly + 14], fill=colors[s])
        draw.text((right + 42, ly + 7), setting, fill="black", font=f_small, anchor="lm")
        ly += 22
    with atomic_path(path) as tmp:
        img.save(tmp)
    return path


# ------------------------------------------------------------------------------------------------- curves

CURVE_PANELS = [
    ("GAN losses (train)", ["loss_D", "loss_G_gan"]),
    ("L1 loss (train)", ["loss_G_l1"]),
    ("learning rate", ["lr"]),
    ("test L1 ([-1,1] units)", ["test_l1"]),
    ("test PSNR (dB)", ["test_psnr"]),
    ("test SSIM", ["test_ssim"]),
]
CURVE_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def read_metrics_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))

    def num(v):
        try:
            return float(v) if v not in (None, "") else None
        except ValueError:
            return None

    return [{k: num(v) for k, v in row.items()} for row in rows]


def plot_curves(run_dir, out_path=None):
    path = os.path.join(run_dir, "metrics.csv") if os.path.isdir(run_dir) else run_dir
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: not found (train.py writes pixelgan_outputs/<TS>/metrics.csv)")
    rows = read_metrics_csv(path)
    if not rows:
        raise SystemExit(f"{path}: has a header but no rows yet")
    epochs = [r.get("epoch") for r in rows]
    # One row per epoch is the norm; if a run logs several per epoch, step keeps the x-axis monotonic.
    by_step = len(set(epochs)) < len(epochs) and all(r.get("step") is not None for r in rows)
    xkey, xlabel = ("step", "step") if by_step else ("epoch", "epoch")
    cols, rows_n = 3, math.ceil(len(CURVE_PANELS) / 3)
    pw, ph = 420, 300
    img = Image.new("RGB", (cols * pw, rows_n * ph + 34), "white")
    draw = ImageDraw.Draw(img)
    draw.text((cols * pw / 2, 8), f"training curves: {os.path.abspath(path)}", fill="black", font=font(15), anchor="mt")
    for i, (title, keys) in enumerate(CURVE_PANELS):
        box = ((i % cols) * pw, 34 + (i // cols) * ph, (i % cols + 1) * pw, 34 + (i // cols + 1) * ph)
        series = {k: [(r[xkey], r.get(k)) for r in rows if r.get(xkey) is not None] for k in keys}
        line_panel(draw, box, series, title, xlabel, CURVE_COLORS)
    out_path = out_path or os.path.join(os.path.dirname(path), "curves.png")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with atomic_path(out_path) as tmp:
        img.save(tmp)
    print(f"wrote {out_path} ({len(rows)} rows of {path})")
    return out_path


# --------------------------------------------------------------------------------------------------- main


LIMITS = {"img_size": Range(16, 1024), "batch_size": Range(1, 4096), "seed": Range(0, 2 ** 63 - 1),
          "num_workers": Range(0, 256), "n_variations": Range(0, 64), "n_diversity_masks": Range(0, 100_000),
          "seeds": Range(1, 100), "epochs": Range(1, 10_000), "minority_to": Range(0, 1_000_000),
          "lr": Range(0, 10, lo_open=True), "weight_decay": Range(0, 1), "reject": Range(0, 1, hi_open=True)}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_folder", help="run folder of generator_epoch_<N>.pth files (the highest epoch is used)")
    p.add_argument("--model_path", help="one generator checkpoint (instead of --model_folder)")
    p.add_argument("--data_dir", default="data", help="preprocess.py output: {train,test}/{originals,masks}, labels.csv")
    p.add_argument("--split", default="test", help="split to evaluate on (the classifier's test split in --downstream)")
    p.add_argument("--img_size", type=int, default=None,
                   help="realism: must match the checkpoint (default: the checkpoint's); downstream: classifier input size (default 128)")
    p.add_argument("--batch_size", type=int, default=None, help="default: 64 renders (realism), 32 images per classifier step (downstream)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", action="store_true", help="mixed precision as in train.py: bf16 where supported, else fp16 with loss scaling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=4, help="threads decoding images")
    p.add_argument("--output_dir", default=None,
                   help="default: pixelgan_outputs/<TS>/eval_epoch_<E> (realism), pixelgan_outputs/<TS>/downstream (downstream)")
    # realism
    p.add_argument("--inception_weights", default=None, help="FID Inception weights file (see metrics.load_inception)")
    p.add_argument("--n_variations", type=int, default=4, help="stochastic renders per mask for diversity")
    p.add_argument("--n_diversity_masks", type=int, default=32)
    # downstream
    p.add_argument("--downstream", action="store_true", help="train classifiers real-only vs real+synthetic")
    p.add_argument("--synthetic_dir", default=None, help="generate.py --balance output: DIR/<class>/gen_<n>.png + DIR/labels.csv")
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
    # curves
    p.add_argument("--plot", metavar="RUN_DIR", default=None, help="render RUN_DIR/metrics.csv to curves.png and exit")
    args = p.parse_args(argv)
    if args.plot is None:
        needs_model = not args.downstream or not args.synthetic_dir
        if needs_model and not (args.model_folder or args.model_path):
            p.error("give --model_folder or --model_path" + ("" if not args.downstream else " (or --synthetic_dir)"))
        if args.model_folder and args.model_path:
            p.error("give --model_folder or --model_path, not both")
    if args.batch_size is None:
        args.batch_size = 32 if args.downstream else 64
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
    try:
        if args.plot is not None:
            return plot_curves(args.plot, os.path.join(args.output_dir, "curves.png") if args.output_dir else None)
        if args.downstream:
            return evaluate_downstream(args)
        return evaluate_realism(args)
    except models.CheckpointError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    sys.exit(run_cli(lambda: main(sys.argv[1:]), "interrupted: files already written are complete; run again for the rest"))
