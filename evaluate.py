"""Evaluate a trained Skin Lesion PixelGAN: realism on a split, and training curves.

Realism (paired L1/PSNR/SSIM, FID/KID with a real-vs-real reference and on a second network, the texture
artefact scores, mask agreement, diversity) on a split:
    python evaluate.py --model_folder pixelgan_models/<TS> --data_dir data [--split test]
        -> pixelgan_outputs/<TS>/eval_epoch_<E>/{per_image.csv, summary.json}

Training curves from a run's metrics.csv, for people without TensorBoard:
    python evaluate.py --plot pixelgan_outputs/<TS>          -> pixelgan_outputs/<TS>/curves.png

Downstream usefulness (classifiers trained with and without synthetic images) is downstream.py.
"""
import argparse
import csv
import math
import os
import shlex
import sys
import time

import torch
from tqdm import tqdm

import checkpoints
import generate
import metrics
import weights
from cli import (SHARED_LIMITS, ArgumentParser, Range, UsageError, add_shared_flags, atomic_path, check_device, check_name, check_ranges, fmt,
                 run_cli, write_json)
from dataset import PairedDataset, read_labels, to_model_range


# ------------------------------------------------------------------------------------------------ realism


def render_in_chunks(generator, config, masks, labels, args, desc):
    """Deterministic renders in a few calls, only so that a long split shows progress."""
    chunk = max(args.batch_size, 1) * 8
    out = []
    for start in tqdm(range(0, len(masks), chunk), desc=desc, unit="chunk", disable=None):
        part_labels = labels[start:start + chunk] if labels is not None else None
        out.append(generate.render(generator, config, masks[start:start + chunk], labels=part_labels, device=args.device,
                                   batch_size=args.batch_size, amp=args.amp, stochastic=False, seed=args.seed))
    return torch.cat(out)


def mean_finite(values):
    """Mean over finite entries: one pixel-identical pair (PSNR = inf) must not make the mean infinite."""
    values = torch.as_tensor(values, dtype=torch.float64)
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")


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
    variations = [generate.render(generator, config, masks[:n_masks], labels=sub_labels, device=args.device,
                                  batch_size=args.batch_size, amp=args.amp, stochastic=True, seed=args.seed + 1 + k)
                  for k in tqdm(range(args.n_variations), desc="diversity", unit="render", disable=None)]
    variations = torch.stack(variations, 1)
    value, distance = metrics.diversity(to_model_range(variations, "cpu"))
    return {"status": "ok", "value": value, "distance": distance, "texture": metrics.texture_diversity(variations),
            "n_masks": n_masks, "n_variations": args.n_variations}


def mask_dice(images_uint8, masks_uint8):
    """Mean Dice between preprocess.py's OpenCV lesion segmentation of each image and its mask: whether a
    render still shows the lesion its mask draws, read beside the same number for the real photographs."""
    from preprocess import segment_lesion
    dice = []
    for image, mask in zip(images_uint8, masks_uint8):
        found = segment_lesion(image.permute(1, 2, 0).contiguous().numpy()) > 0
        truth = mask[0].numpy() > 127
        total = found.sum() + truth.sum()
        dice.append(2 * (found & truth).sum() / total if total else 1.0)
    return float(sum(dice) / len(dice))


def texture_block(fake_uint8, real_uint8, masks_uint8):
    """The artefact scores (metrics.grid_score, repeat_score, lesion_repeat_score) and mask agreement, generated beside real."""
    return {name: {"grid": metrics.grid_score(images), "repeat": metrics.repeat_score(images),
                   "lesion_repeat": metrics.lesion_repeat_score(images, masks_uint8),
                   "detail_std": metrics.detail_strength(images), "mask_dice": mask_dice(images, masks_uint8)}
            for name, images in (("generated", fake_uint8), ("real", real_uint8))}


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
    alex = summary["distribution_alex"]
    if alex["status"] == "ok":
        full = alex["generated_vs_real"]
        h, r = alex["generated_vs_real_halves"], alex["real_vs_real_reference"]
        print(f"  {'FD AlexNet (halves)':<22}{fmt(h['fid'], '.3f'):>24}{fmt(r['fid'], '.3f'):>28}")
        print(f"  {'KID AlexNet x1000':<22}{fmt(1000 * h['kid_mean'], '.2f'):>24}{fmt(1000 * r['kid_mean'], '.2f'):>28}")
    gen, real = summary["texture"]["generated"], summary["texture"]["real"]
    print(f"  {'grid (lattice peaks)':<22}{fmt(gen['grid'], '.3f'):>24}{fmt(real['grid'], '.3f'):>28}")
    print(f"  {'repeat (detail corr.)':<22}{fmt(gen['repeat'], '.4f'):>24}{fmt(real['repeat'], '.4f'):>28}")
    print(f"  {'repeat, lesion frame':<22}{fmt(gen['lesion_repeat'], '.4f'):>24}{fmt(real['lesion_repeat'], '.4f'):>28}")
    print(f"  {'detail std (grey lv.)':<22}{fmt(gen['detail_std'], '.2f'):>24}{fmt(real['detail_std'], '.2f'):>28}")
    print(f"  {'mask Dice (OpenCV)':<22}{fmt(gen['mask_dice'], '.3f'):>24}{fmt(real['mask_dice'], '.3f'):>28}")
    if div["status"] == "ok":
        label = f"diversity ({div['distance']})"
        print(f"  {label:<22}{fmt(div['value']):>24}   ({div['n_masks']} masks x {div['n_variations']} renders; 0 = ignores noise)")
        print(f"  {'texture diversity':<22}{fmt(div['texture'], '.3f'):>24}   (1 - detail correlation of renders of one mask)")
    else:
        print(f"  {'diversity':<22}  {div['status']}")
    for name, row in summary.get("per_class", {}).items():
        print(f"  class {name:<16}{'n=' + str(row['n']):>8}  L1 {fmt(row['l1'])}  PSNR {fmt(row['psnr'], '.2f')}  SSIM {fmt(row['ssim'])}")


def evaluate_realism(args):
    t0 = time.time()
    model_path = checkpoints.generator_path(args.model_path, args.model_folder)
    generator, config, ckpt = checkpoints.load_generator(model_path)
    generator.eval()
    img_size = config["img_size"]
    if args.img_size is not None and args.img_size != img_size:
        raise UsageError(f"--img_size {args.img_size} differs from the checkpoint's img_size {img_size}; "
                         "realism is measured at the size the generator was trained for")
    epoch = checkpoints.checkpoint_epoch(model_path, ckpt)
    extractor = user_inception(args)
    out_dir = args.output_dir or os.path.join("pixelgan_outputs", checkpoints.run_name(model_path), f"eval_epoch_{epoch}")
    os.makedirs(out_dir, exist_ok=True)

    conditional = config.get("n_classes", 0) > 0
    classes = list(config.get("classes") or [])
    labels = read_labels(args.data_dir)
    if not classes and labels:  # unconditional model: classes only group the per-class report
        classes = sorted(set(labels.values()))
    data = PairedDataset(os.path.join(args.data_dir, args.split), img_size, labels=labels, classes=classes,
                         num_workers=args.num_workers)
    if data.images is None:
        raise UsageError(f"{os.path.join(args.data_dir, args.split)}: has no originals/ folder; realism needs the real images")
    if conditional and bool((data.labels < 0).any()):
        missing = [n for n, l in zip(data.names, data.labels.tolist()) if l < 0][:5]
        raise UsageError(f"class-conditional model but no known class for e.g. {missing} "
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
    try:
        summary["distribution_alex"] = distribution_block(fake, data.images, args, metrics.AlexFeatures())
    except weights.PretrainedWeightsError as e:
        summary["distribution_alex"] = {"status": f"unavailable: {e}"}
    summary["texture"] = texture_block(fake, data.images, data.masks)
    summary["diversity"] = diversity_block(generator, config, data.masks, render_labels, args)
    summary["seconds"] = round(time.time() - t0, 1)
    write_json(summary, os.path.join(out_dir, "summary.json"))
    print_realism_table(summary)
    print(f"\nwrote {os.path.join(out_dir, 'per_image.csv')} and summary.json ({summary['seconds']} s)")
    return summary


# ------------------------------------------------------------------------------------------------- curves

CURVE_PANELS = [
    ("GAN losses (train)", ["loss_D", "loss_G_gan"]),
    ("L1 loss (train)", ["loss_G_l1"]),
    ("learning rate", ["lr"]),
    ("test L1 ([-1,1] units)", ["test_l1"]),
    ("test PSNR (dB)", ["test_psnr"]),
    ("test SSIM", ["test_ssim"]),
]
CURVE_COLORS = ["tab:blue", "tab:red", "tab:green", "tab:purple"]


def read_metrics_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))

    def num(v):
        try:
            return float(v) if v not in (None, "") else None
        except ValueError:
            return None

    return [{k: num(v) for k, v in row.items()} for row in rows]


def curves_figure(rows, xkey, title):
    """One panel per CURVE_PANELS entry, one line per column. Points without a finite value are left out
    and their neighbours joined: the test metrics exist only on evaluation epochs."""
    # imported here: matplotlib costs a second at start-up and only --plot needs it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = 3
    fig = Figure(figsize=(4.2 * cols, 3.1 * math.ceil(len(CURVE_PANELS) / cols) + 0.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=11)
    axes = fig.subplots(math.ceil(len(CURVE_PANELS) / cols), cols, squeeze=False).ravel()
    for ax, (panel, keys) in zip(axes, CURVE_PANELS):
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel(xkey)
        ax.grid(color="0.9")
        drawn = 0
        for key, color in zip(keys, CURVE_COLORS):
            points = sorted((r[xkey], r[key]) for r in rows
                            if r.get(xkey) is not None and r.get(key) is not None and math.isfinite(r[key]))
            if not points:
                continue
            xs, ys = zip(*points)
            ax.plot(xs, ys, color=color, linewidth=1.5, label=key, marker="o" if len(points) <= 40 else None, markersize=3)
            drawn += 1
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", color="0.5", transform=ax.transAxes)
    for ax in axes[len(CURVE_PANELS):]:
        ax.set_visible(False)
    return fig


def plot_curves(run_dir, out_path=None):
    path = os.path.join(run_dir, "metrics.csv") if os.path.isdir(run_dir) else run_dir
    if not os.path.isfile(path):
        raise UsageError(f"{path}: not found (train.py writes pixelgan_outputs/<TS>/metrics.csv)")
    rows = read_metrics_csv(path)
    if not rows:
        raise UsageError(f"{path}: has a header but no rows yet")
    epochs = [r.get("epoch") for r in rows]
    # One row per epoch is the norm; if a run logs several per epoch, step keeps the x-axis monotonic.
    by_step = len(set(epochs)) < len(epochs) and all(r.get("step") is not None for r in rows)
    fig = curves_figure(rows, "step" if by_step else "epoch", f"training curves: {os.path.abspath(path)}")
    out_path = out_path or os.path.join(os.path.dirname(path), "curves.png")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp)
    print(f"wrote {out_path} ({len(rows)} rows of {path})")
    return out_path


# --------------------------------------------------------------------------------------------------- main


LIMITS = {**SHARED_LIMITS, "n_variations": Range(0, 64), "n_diversity_masks": Range(0, 100_000)}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_folder", help="run folder of generator_epoch_<N>.pth files (the highest epoch is used)")
    p.add_argument("--model_path", help="one generator checkpoint (instead of --model_folder)")
    p.add_argument("--data_dir", default="data", help="preprocess.py output: {train,test}/{originals,masks}, labels.csv")
    p.add_argument("--split", default="test", help="split to evaluate on")
    add_shared_flags(p, img_size_from_checkpoint=True, batch_size="masks per render call")
    p.add_argument("--output_dir", default=None,
                   help="default: pixelgan_outputs/<TS>/eval_epoch_<E>; with --plot: curves.png goes here instead")
    p.add_argument("--inception_weights", default=None, help="FID Inception weights file (see metrics.load_inception)")
    p.add_argument("--n_variations", type=int, default=4, help="stochastic renders per mask for diversity")
    p.add_argument("--n_diversity_masks", type=int, default=32)
    p.add_argument("--plot", metavar="RUN_DIR", default=None, help="render RUN_DIR/metrics.csv to curves.png and exit")
    args = p.parse_args(argv)
    if args.plot is None:
        if not (args.model_folder or args.model_path):
            p.error("give --model_folder or --model_path")
        if args.model_folder and args.model_path:
            p.error("give --model_folder or --model_path, not both")
    check_ranges(args, LIMITS)
    check_name(args.split, "--split")  # a split is a folder inside --data_dir, not a path out of it
    args.device = check_device(args.device)
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    # Looked for before parsing: argparse would only say "unrecognized arguments", not where the study went.
    if any(a == "--downstream" or a.startswith("--downstream=") for a in argv):
        rest = [a for a in argv if a != "--downstream" and not a.startswith("--downstream=")]
        raise UsageError("evaluate.py --downstream is now its own script: python " + shlex.join(["downstream.py", *rest]))
    args = parse_args(argv)
    if args.plot is not None:
        return plot_curves(args.plot, os.path.join(args.output_dir, "curves.png") if args.output_dir else None)
    return evaluate_realism(args)


if __name__ == "__main__":
    sys.exit(run_cli(lambda: main(sys.argv[1:]), "interrupted: files already written are complete; run again for the rest"))
