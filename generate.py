"""Render synthetic dermoscopy images from lesion masks with a trained PixelGAN generator.

    python generate.py --model_folder pixelgan_models/<TIMESTAMP> --input_dir data/test --num_images 100
    python generate.py --model_path pixelgan_models/<TIMESTAMP>/generator_epoch_135.pth --input_dir data/test
    python generate.py --model_folder pixelgan_models/<TIMESTAMP> --input_dir data/train --class melanoma --num_images 500
    python generate.py --model_folder pixelgan_models/<TIMESTAMP> --input_dir data/train --balance
    python generate.py --model_folder pretrained/isic2017_128 --input_dir <masks> --style_image <lesion photo or folder>
    python generate.py --model_folder pixelgan_models/<TIMESTAMP> --input_dir data/train --new_masks 1200 --output_dir new_pairs
    python generate.py --model_folder pixelgan_models/<TIMESTAMP> --input_dir data/train --pairs --num_images 1200 --output_dir rerendered

Plain mode writes gen_only_<name>.png and generated_<name>.png (mask / generated / real) per mask;
past the number of masks it renders new variations. --class and --balance write
<output_dir>/<class>/gen_<n>.png and <output_dir>/labels.csv for classifier pipelines.
A model with a style code (train.py --style_dim 8) gives each image the look of a
training image of the same class whose lesion is about as large as the mask's, or with --style_image
the look of the given photograph(s).
--new_masks and --pairs write (mask, image) pairs in the data layout, <output_dir>/masks/<name>.png,
<output_dir>/originals/<name>.png and <output_dir>/labels.csv, which a segmenter (downstream.py
--task segmentation) or train.py reads as a split: masks nobody drew, or the masks of --input_dir.
"""
import argparse
import csv
import os
import sys

import numpy as np
import torch

import checkpoints
from cli import (LABELS_FILE, SHARED_LIMITS, ArgumentParser, Range, UsageError, add_shared_flags, ascii_int, autocast, autocast_dtype,
                 check_device, check_name, check_ranges, run_cli, save_image_grid, save_png, write_csv, write_json)
from dataset import (MASK_METHODS, PairedDataset, find_pairs, jitter_masks, list_images, new_masks, read_image, read_labels,
                     shape_ks_line, to_model_range, to_uint8)
from models import class_planes

LIMITS = {**SHARED_LIMITS, "num_images": Range(1, 1_000_000), "new_masks": Range(1, 1_000_000)}
CLASS_CHUNK = 512  # class images rendered (and held in memory) at a time
NAME_MAX = 255  # bytes in one file name on common file systems


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model_folder", help="a run folder; its highest generator_epoch_<N>.pth is used")
    source.add_argument("--model_path", help="one generator checkpoint")
    p.add_argument("--input_dir", default=None, help="a split folder (masks/ + originals/) or a folder of masks "
                                                      "(default data/test, or data/train with --balance)")
    p.add_argument("--num_images", type=int, default=None, help="how many images (default: one per mask)")
    p.add_argument("--output_dir", default="pixelgan_outputs/generated")
    add_shared_flags(p, img_size_from_checkpoint=True, batch_size="masks per render call",
                     seed="makes variations, mask jitter and class sampling repeatable")
    p.add_argument("--class", dest="class_name", default=None, help="render images of this class (see labels.csv)")
    p.add_argument("--balance", action="store_true", help="top up every class of --input_dir to the largest one")
    p.add_argument("--labels", default=None,
                   help="labels file, image_id,label[,split] (default: labels.csv beside --input_dir, from preprocess.py)")
    p.add_argument("--overwrite", action="store_true", help="replace files of an earlier run in --output_dir (else refused)")
    p.add_argument("--style_image", default=None,
                   help="a lesion photograph, or a folder of them taken in turn: render with its look (skin tone, "
                        "illumination, pigment); needs a model with a style code")
    p.add_argument("--new_masks", type=int, default=None, metavar="N",
                   help="render N new lesion masks, made from the masks of --input_dir (see --mask_method; classes "
                        "kept), as pairs in the data layout: <output_dir>/{masks,originals}/new_<n>.png + labels.csv")
    p.add_argument("--mask_method", choices=MASK_METHODS, default="elastic",
                   help="how --new_masks makes a mask: elastic (a training mask under a smooth random warp, rotation, "
                        "scale, stretch and placement) or fourier (an outline from a Fourier shape model of the masks)")
    p.add_argument("--pairs", action="store_true",
                   help="render the masks of --input_dir as pairs in the data layout (--num_images past their number "
                        "renders them again with new generator noise, <name>_r<k>)")
    args = p.parse_args(argv)
    check_ranges(args, LIMITS)
    if args.new_masks and args.pairs:
        p.error("--new_masks and --pairs are two sources of pair masks; give one")
    if (args.new_masks or args.pairs) and (args.class_name or args.balance):
        p.error("--new_masks and --pairs take each mask's class from labels.csv; they do not combine with --class or --balance")
    if args.new_masks and args.num_images:
        p.error("--new_masks N is the number of pairs; leave out --num_images")
    if args.class_name is not None:
        args.class_name = check_name(args.class_name, "--class")
    args.device = check_device(args.device)
    return args


# ---------------------------------------------------------------------------------- rendering masks

@torch.inference_mode()
def render(generator, config, masks_uint8, labels=None, device="cpu", batch_size=64, amp=False, stochastic=False, seed=0,
           styles=None):
    """Generator outputs (uint8 N x 3 x S x S) for uint8 masks at the model's size. stochastic keeps
    dropout active (pix2pix's noise source) too; a model with noise maps or input noise draws new noise in
    either mode.
    A model with a style code takes styles (N x style_dim) if given, else draws one per image in either
    mode: a stored training style of the image's class. Every draw is seeded by seed."""
    device = torch.device(device)
    # channels_last: the layout oneDNN and cuDNN convolutions run fastest in
    generator = generator.to(device, memory_format=torch.channels_last).eval()
    if stochastic:
        for m in generator.modules():
            if isinstance(m, torch.nn.Dropout):
                m.train()
    dtype = autocast_dtype(device, amp)
    torch.manual_seed(seed)
    outputs = []
    for start in range(0, masks_uint8.shape[0], batch_size):
        masks = to_model_range(masks_uint8[start:start + batch_size], device, torch.channels_last)
        planes = None
        if config["n_classes"]:
            planes = class_planes(labels[start:start + batch_size].to(device), config["n_classes"], masks.shape[-1])
        z = styles[start:start + batch_size].to(device) if styles is not None else None
        with autocast(device, dtype):
            outputs.append(to_uint8(generator(masks, planes, z)))
    return torch.cat(outputs)


def class_index(config, name):
    return torch.tensor(config["classes"].index(name)) if config["n_classes"] and name in config["classes"] else torch.tensor(0)


def class_images(generator, config, dataset, labels, class_name, count, device="cpu", batch_size=64, amp=False, seed=0,
                 styles=None):
    """count images of one class (uint8) from jittered masks of that class through the stochastic
    generator, cycling through the shuffled masks so each is used about equally often. A conditional
    model may draw on every mask when the class has none. Distinct by construction: each image gets its
    own mask jitter and dropout draw (and style draw, unless styles are given)."""
    pool = [i for i, n in enumerate(dataset.names) if labels.get(n) == class_name]
    if config["n_classes"] and class_name not in config["classes"]:
        raise ValueError(f"class {class_name!r} unknown to the model (it knows {', '.join(config['classes'])})")
    if not pool:
        if not config["n_classes"]:
            raise ValueError(f"{dataset.folder}: no masks labelled {class_name!r} (and the model is unconditional)")
        pool = list(range(len(dataset)))
    order = torch.tensor(pool)[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))]
    picks = order.repeat(count // len(pool) + 1)[:count]
    masks = jitter_masks(dataset.masks[picks], seed)
    class_labels = class_index(config, class_name).repeat(count)
    return render(generator, config, masks, class_labels, device=device, batch_size=batch_size, amp=amp,
                  stochastic=True, seed=seed, styles=styles)


# ----------------------------------------------------------------------------------- the command


@torch.inference_mode()
def style_codes(encoder, config, path):
    """The style codes (means) of a lesion photograph, or of every image in a folder, in name order."""
    if os.path.isdir(path):
        paths = list(list_images(path).values())
        if not paths:
            raise UsageError(f"--style_image {path}: no images in this folder")
    elif os.path.isfile(path):
        paths = [path]
    else:
        raise UsageError(f"--style_image {path}: no such file or folder")
    images = torch.from_numpy(np.stack([read_image(p, config["img_size"]) for p in paths]))
    return torch.cat([encoder(to_model_range(images[i:i + 64], "cpu"))[0] for i in range(0, len(images), 64)])


def load_model(args):
    """(generator, config, style codes of --style_image or None)"""
    path = checkpoints.generator_path(args.model_path, args.model_folder)
    generator, config, ckpt = checkpoints.load_generator(path)
    if args.img_size is not None and args.img_size != config["img_size"]:
        raise checkpoints.CheckpointError(f"{path}: trained at {config['img_size']}x{config['img_size']}, "
                                          f"but --img_size {args.img_size} was given")
    print(f"loaded {path} (epoch {ckpt.get('epoch', '?')}, {config['img_size']}x{config['img_size']}, "
          f"{'classes ' + ', '.join(config['classes']) if config['n_classes'] else 'unconditional'})")
    styles = None
    if args.style_image is not None:
        encoder = checkpoints.load_style_encoder(ckpt, config, path)
        if encoder is None:
            raise UsageError(f"--style_image: {path} has no style encoder (train with --style_dim 8)")
        styles = style_codes(encoder, config, args.style_image)
    return generator, config, styles


def cycled(styles, start, count):
    """count style codes taken in turn from the --style_image codes, the first for image number start."""
    return None if styles is None else styles[torch.arange(start, start + count) % len(styles)]


def balance_plan(dataset, labels):
    """{class: images to add} so that every class reaches the size of the largest one."""
    counts = {}
    for name in dataset.names:
        if name in labels:
            counts[labels[name]] = counts.get(labels[name], 0) + 1
    target = max(counts.values())
    return {c: target - k for c, k in sorted(counts.items()) if target > k}


CLASS_LABELS_HEADER = ["image", "label"]


def check_class_labels(output_dir):
    """Refuse an output folder whose labels.csv this script did not write: rewriting it would lose it."""
    path = os.path.join(output_dir, LABELS_FILE)
    if os.path.lexists(path):
        try:
            with open(path, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), None)
        except (OSError, UnicodeDecodeError):
            header = None
        if header != CLASS_LABELS_HEADER:
            raise UsageError(f"{path} exists and is not one generate.py wrote (image,label); choose another --output_dir")


def write_class_labels(output_dir):
    """labels.csv listing every <class>/gen_<n>.png under output_dir (ImageFolder reads the same tree)."""
    rows = [(f"{c}/{name}", c) for c in sorted(os.listdir(output_dir)) if os.path.isdir(os.path.join(output_dir, c))
            for name in sorted(os.listdir(os.path.join(output_dir, c))) if name.startswith("gen_") and name.endswith(".png")]
    write_csv(os.path.join(output_dir, LABELS_FILE), CLASS_LABELS_HEADER, rows)
    return rows


def existing_count(folder):
    """The next free gen_<n>.png number in a class folder (files not named so do not count)."""
    if not os.path.isdir(folder):
        return 0
    numbers = (ascii_int(n[4:-4]) for n in os.listdir(folder) if n.startswith("gen_") and n.endswith(".png"))
    return 1 + max((k for k in numbers if k is not None), default=-1)


def output_names(dataset, total):
    """The file names plain mode writes, in order: every mask once, then <name>_var<k> variations."""
    names = []
    for round_index in range((total + len(dataset) - 1) // len(dataset)):
        for k in range(min(len(dataset), total - round_index * len(dataset))):
            name = dataset.names[k] if round_index == 0 else f"{dataset.names[k]}_var{round_index}"
            names += [f"gen_only_{name}.png", f"generated_{name}.png"]
    return names


PAIR_LABELS_HEADER = ["image_id", "label"]  # what preprocess.py writes and dataset.read_labels reads


def check_name_lengths(names, input_dir):
    too_long = next((n for n in names if len(n.encode("utf-8", "surrogateescape")) > NAME_MAX), None)
    if too_long:
        raise UsageError(f"{input_dir}: a mask name makes the output file name {too_long[:40]}... longer than "
                         f"{NAME_MAX} bytes; rename that mask")


def check_pair_folder(output_dir, stems, overwrite):
    """Refuse to mix this run's pairs with others: a segmenter reads every mask in masks/, and
    labels.csv lists this run's alone."""
    labels_path = os.path.join(output_dir, LABELS_FILE)
    if os.path.lexists(labels_path):
        with open(labels_path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), None)
        if header != PAIR_LABELS_HEADER:
            raise UsageError(f"{labels_path} exists and is not one generate.py wrote (image_id,label); choose another --output_dir")
    for sub in ("masks", "originals"):
        folder = os.path.join(output_dir, sub)
        if not os.path.isdir(folder):
            continue
        present = set(list_images(folder))
        if present - set(stems):
            raise UsageError(f"{folder} holds {len(present - set(stems))} images this run does not write; they would be "
                             "read as its pairs; choose another --output_dir")
        if present and not overwrite:
            raise UsageError(f"{folder} already holds {len(present)} of these pairs; choose another --output_dir, or pass --overwrite")


def write_pairs(args, generator, config, styles, dataset, labels, input_dir):
    """New masks (--new_masks) or the masks of --input_dir (--pairs), rendered and written in the data layout."""
    mask_classes = [labels.get(n) for n in dataset.names] if labels else None
    report = None
    if args.new_masks:
        mask_paths = {stem: path for stem, path, _ in find_pairs(input_dir)}  # to name a mask it cannot use
        masks, classes, report = new_masks(dataset.masks, args.new_masks, args.seed, mask_classes, args.mask_method,
                                           [mask_paths[n] for n in dataset.names])
        stems = [f"new_{k}" for k in range(args.new_masks)]
    else:
        picks = torch.arange(args.num_images or len(dataset)) % len(dataset)
        masks = dataset.masks[picks]
        classes = [mask_classes[i] for i in picks] if mask_classes else None
        stems = [dataset.names[i] if k < len(dataset) else f"{dataset.names[i]}_r{k // len(dataset)}"
                 for k, i in enumerate(picks.tolist())]
    check_name_lengths([s + ".png" for s in stems], input_dir)
    check_pair_folder(args.output_dir, stems, args.overwrite)
    if config["n_classes"] and (classes is None or None in classes):
        print(f"warning: some masks in {input_dir} have no label; rendering them as {config['classes'][0]} "
              "(--labels FILE gives each mask its class)", file=sys.stderr)
    class_ids = torch.stack([class_index(config, c) for c in (classes or [None] * len(masks))])
    for sub in ("masks", "originals"):
        os.makedirs(os.path.join(args.output_dir, sub), exist_ok=True)
    for start in range(0, len(masks), CLASS_CHUNK):
        chunk = slice(start, start + CLASS_CHUNK)
        # stochastic for both sources, so that new and re-rendered masks differ in their masks alone
        images = render(generator, config, masks[chunk], class_ids[chunk], args.device, args.batch_size, args.amp,
                        stochastic=True, seed=args.seed + start, styles=cycled(styles, start, len(masks[chunk])))
        for stem, mask, image in zip(stems[chunk], masks[chunk], images):
            save_png(mask, os.path.join(args.output_dir, "masks", stem + ".png"))
            save_png(image, os.path.join(args.output_dir, "originals", stem + ".png"))
    if classes:
        write_csv(os.path.join(args.output_dir, LABELS_FILE), PAIR_LABELS_HEADER,
                  [(stem, c) for stem, c in zip(stems, classes) if c is not None])
    if report is not None:
        write_json(report, os.path.join(args.output_dir, "mask_stats.json"))
        print(shape_ks_line(report))
    print(f"{len(masks)} pairs ({'new masks' if args.new_masks else 'masks of ' + input_dir}) -> {args.output_dir}")


def main(argv=None):
    args = parse_args(argv)
    input_dir = args.input_dir or os.path.join("data", "train" if args.balance else "test")
    output_dir = os.path.abspath(args.output_dir)
    if os.path.isdir(input_dir) and (output_dir + os.sep).startswith(os.path.abspath(input_dir) + os.sep):
        raise UsageError(f"--output_dir {args.output_dir} is inside --input_dir {input_dir}: the generated images would "
                         "be read as masks next time; choose another --output_dir")
    # --labels names the file itself; by default preprocess.py's labels.csv beside the split folder
    labels_path = args.labels or os.path.join(os.path.dirname(os.path.normpath(input_dir)), LABELS_FILE)
    if args.labels and not os.path.isfile(args.labels):
        raise UsageError(f"--labels {args.labels}: no such file")
    labels = read_labels(labels_path)
    generator, config, styles = load_model(args)
    dataset = PairedDataset(input_dir, config["img_size"], labels=labels, classes=config["classes"], num_workers=args.num_workers)

    if args.new_masks or args.pairs:
        write_pairs(args, generator, config, styles, dataset, labels, input_dir)
        return

    if args.class_name or args.balance:
        if not labels:
            raise UsageError(f"{labels_path}: no labels (preprocess.py --labels, or --labels FILE)")
        plan = balance_plan(dataset, labels) if args.balance else {args.class_name: args.num_images or len(dataset)}
        for class_name in plan:
            check_name(class_name, "class")
        os.makedirs(args.output_dir, exist_ok=True)
        check_class_labels(args.output_dir)
        for i, (class_name, count) in enumerate(plan.items()):
            folder = os.path.join(args.output_dir, class_name)
            if os.path.islink(folder):  # it would take the images somewhere outside --output_dir
                raise UsageError(f"{folder} is a symbolic link; the class folders must be real folders in --output_dir")
            first = existing_count(folder)
            os.makedirs(folder, exist_ok=True)
            # in chunks: --num_images is bounded by disk space, not by memory
            for start in range(0, count, CLASS_CHUNK):
                chunk = min(CLASS_CHUNK, count - start)
                images = class_images(generator, config, dataset, labels, class_name, chunk, args.device,
                                      args.batch_size, args.amp, seed=args.seed + 1000 * i + first + start,
                                      styles=cycled(styles, start, chunk))
                for k, image in enumerate(images):
                    save_png(image, os.path.join(folder, f"gen_{first + start + k}.png"))
            print(f"{class_name}: {count} images -> {folder}")
        rows = write_class_labels(args.output_dir)
        print(f"{len(rows)} images listed in {os.path.join(args.output_dir, LABELS_FILE)}")
        return

    # Plain mode: every mask once (deterministic), then variations until num_images is reached.
    n_masks = len(dataset)
    total = args.num_images or n_masks
    names = output_names(dataset, total)
    check_name_lengths(names, input_dir)
    existing = [n for n in names if os.path.lexists(os.path.join(args.output_dir, n))] if os.path.isdir(args.output_dir) else []
    if existing and not args.overwrite:
        raise UsageError(f"{os.path.join(args.output_dir, existing[0])} already exists ({len(existing)} files would be "
                         "replaced); choose another --output_dir, or pass --overwrite")
    os.makedirs(args.output_dir, exist_ok=True)
    if config["n_classes"] and (dataset.labels < 0).any():
        print(f"warning: some masks in {input_dir} have no label; rendering them as {config['classes'][0]} "
              "(--labels FILE gives each mask its class)", file=sys.stderr)
    mask_labels = dataset.labels.clamp(min=0)
    written = 0
    for round_index in range((total + n_masks - 1) // n_masks):
        count = min(n_masks, total - written)
        masks = dataset.masks[:count] if round_index == 0 else jitter_masks(dataset.masks[:count], args.seed + round_index)
        fakes = render(generator, config, masks, mask_labels[:count], args.device, args.batch_size, args.amp,
                       stochastic=round_index > 0, seed=args.seed + round_index, styles=cycled(styles, written, count))
        for k in range(count):
            name = dataset.names[k] if round_index == 0 else f"{dataset.names[k]}_var{round_index}"
            save_png(fakes[k], os.path.join(args.output_dir, f"gen_only_{name}.png"))
            panels = [masks[k:k + 1], fakes[k:k + 1]]
            if dataset.images is not None and round_index == 0:
                panels.append(dataset.images[k:k + 1])
            save_image_grid(panels, os.path.join(args.output_dir, f"generated_{name}.png"), columns=True)
        written += count
    print(f"{written} images from {n_masks} masks -> {args.output_dir}")


if __name__ == "__main__":
    sys.exit(run_cli(main, "interrupted: the images written so far are complete; run again with another --output_dir "
                           "(or --overwrite) for the rest"))
