"""
Prepare (mask, image) pairs for the Skin Lesion PixelGAN.

Reads dermoscopy images from --source_dir, takes (--mask_dir) or makes a binary lesion mask
for each, makes both square (--resize: squash, crop around the lesion, or mirror-pad),
resizes them to the working resolution and splits them into train/test under --data_dir:

    DATA/train/originals/<stem>.png   RGB, img_size x img_size
    DATA/train/masks/<stem>.png       single channel, values 0 and 255
    DATA/test/...                     same layout
    DATA/labels.csv                   image_id,label,split (only when labels are known)

The split is built beside the old one and swapped in only when complete, so a failed run leaves
--data_dir as it was. Labels CSVs are read by dataset.read_label_table; --demo draws its images
from demo_data.py.

Examples:
    python preprocess.py --source_dir ./data/input_images/ --data_dir data --test_split 0.1
    python preprocess.py --source_dir isic/images --mask_dir isic/masks --labels isic/labels.csv --data_dir data
    python preprocess.py --data_dir data --demo 200     # no data at hand: procedurally generated lesions
"""

import argparse
import contextlib
import os
import random
import shutil
import sys
import threading
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cli import (LABELS_FILE, SHARED_LIMITS, ArgumentParser, Range, UsageError, add_shared_flags, ascii_int, check_ranges,
                 describe_os_error, run_cli, write_csv, write_image)
from dataset import EXTREME_ASPECT, IMAGE_EXTENSIONS, MAX_PIXELS, binarize_mask, read_label_table, strip_image_extension
from demo_data import make_demo_dataset

EXTENSION_LIST = "/".join(IMAGE_EXTENSIONS)  # for messages: the files this script reads, as they are named
MASK_SUFFIXES = ("_segmentation",)  # matched case-insensitively, so _Segmentation works too
# Ground-truth masks may also be GIFs (some segmentation tools write them); PIL reads those here, and the
# masks preprocess writes are PNGs, so the OpenCV readers downstream never see a GIF.
MASK_EXTENSIONS = (*IMAGE_EXTENSIONS, ".gif")
MIN_PAIRS = 2  # one for train, one for test: train.py refuses a split with either side empty
SPLIT_ENTRIES = ("train", "test", LABELS_FILE)  # what a split in --data_dir consists of (and --overwrite replaces)
# PIL's own guard warns at MAX_IMAGE_PIXELS and only raises at twice that; we check the
# size ourselves before decoding, and keep PIL's limit as a second line of defence
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # we report these ourselves
SEG_SIZE = 256  # segmentation runs at this long side: the lesion method was tuned there

# -----------------------------------------------------------------------------
# loading


def _to_rgb(im):
    """Any PIL mode -> 8-bit RGB array. 16-bit data is scaled down, not clipped."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        # 'I' can hold 16-bit PNGs (older Pillow) as well as real 32-bit data
        scale = 65535.0 if a.max() <= 65535 or im.mode.startswith("I;16") else float(a.max())
        a = np.clip(np.round(a * (255.0 / scale)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.stack([a] * 3, axis=-1))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # transparent pixels would come out with whatever colour hides under them: put them on white
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def _open_checked(path):
    """Open with PIL, apply EXIF orientation, and turn every failure into a one-line reason."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ValueError(f"cannot read file ({e.strerror or e})")
    if size == 0:
        raise ValueError("empty file (0 bytes)")
    try:
        im = Image.open(path)
    except UnidentifiedImageError:
        raise ValueError("not an image (unrecognised format; wrong extension or not image data?)")
    except Image.DecompressionBombError as e:
        raise ValueError(f"too large ({e})")
    except OSError as e:
        fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}.get(path.suffix.lower(), "image")
        raise ValueError(f"truncated or corrupt {fmt} ({e})")
    w, h = im.size
    if w * h > MAX_PIXELS:
        raise ValueError(f"too large: {w}x{h} = {w * h / 1e6:.0f} MP exceeds the "
                         f"{MAX_PIXELS / 1e6:.0f} MP decompression-bomb limit")
    fmt = im.format or "image"
    try:
        im.load()
        # the sensor writes pixels in one order and an EXIF tag says how to turn them upright
        im = ImageOps.exif_transpose(im)
    except Image.DecompressionBombError as e:
        raise ValueError(f"too large ({e})")
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"truncated or corrupt {fmt} ({e})")
    return im


def load_image_rgb(path):
    """Decode an image file to an RGB uint8 array (H, W, 3), upright. Raises ValueError(reason)."""
    return _to_rgb(_open_checked(path))


def load_mask(path):
    """Decode a mask to uint8 {0, 255} (H, W), upright. Returns (mask, warning or None).
    Raises ValueError(reason) when the file cannot be used."""
    im = _open_checked(path)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = _to_rgb(im)[..., 0]
    elif im.mode == "L":
        a = np.asarray(im, dtype=np.uint8)
    else:
        a = np.asarray(im.convert("L"), dtype=np.uint8)
    mask, threshold = binarize_mask(a)  # the same rule as generate.py and training, so 0/1 masks work everywhere
    warning = None
    if threshold == 127 and not np.isin(a, (0, 255)).all():
        warning = "mask is not binary (JPEG-compressed or anti-aliased?): binarised at 127"
    return mask, warning


# -----------------------------------------------------------------------------
# mask generation (no ground truth at hand)


def _fill_holes(m):
    h, w = m.shape
    flood = np.zeros((h + 2, w + 2), np.uint8)
    flood[1:-1, 1:-1] = m
    cv2.floodFill(flood, None, (0, 0), 255)  # the padding ring makes (0,0) reach all outside
    return (m > 0) | (flood[1:-1, 1:-1] == 0)


def _segment_otsu(rgb):
    gray = cv2.GaussianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), (5, 5), 0)
    _, m = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    return m > 0


def _segment_canny(rgb):
    gray = cv2.GaussianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), (5, 5), 0)
    edges = cv2.Canny(gray, 50, 150)
    edges = cv2.dilate(edges, np.ones((3, 3), np.uint8))  # close small gaps in the outline
    contours, _ = cv2.findContours(edges, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    m = np.zeros(gray.shape, np.uint8)
    if contours:
        cv2.drawContours(m, [max(contours, key=cv2.contourArea)], -1, 255, thickness=cv2.FILLED)
    return m > 0


def _segment_lesion(rgb):
    # Tuned on the 1667 ISIC 2017 images with ground truth (long side 256). Each step below
    # was kept only because it raised the mean Dice there.
    h, w = rgb.shape[:2]
    # hairs are thin dark lines that Otsu would happily call lesion: black-hat finds them, inpaint erases
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    hat = cv2.morphologyEx(gray, cv2.MORPH_BLACKHAT, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9)))
    rgb = cv2.inpaint(rgb, (hat > 15).astype(np.uint8), 3, cv2.INPAINT_TELEA)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)

    # the dermoscope's black vignette: very dark regions that reach an image corner
    valid = np.ones((h, w), bool)
    n, lab = cv2.connectedComponents((gray < 25).astype(np.uint8), connectivity=8)
    corners = {lab[0, 0], lab[0, -1], lab[-1, 0], lab[-1, -1]} - {0}
    if corners:
        vignette = cv2.dilate(np.isin(lab, list(corners)).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        if (~vignette).mean() > 0.3:  # otherwise it is more likely a huge dark lesion
            valid &= ~vignette

    # min(R,G,B) beat grey, blue, Lab, saturation and the PCA component on ISIC: pigment lowers
    # every channel while calibration stickers and red skin keep at least one channel high
    c = cv2.GaussianBlur(rgb.min(axis=2).astype(np.float32), (0, 0), 5)
    lo, hi = np.percentile(c[valid], (1, 99))
    c8 = np.clip((c - lo) / (hi - lo + 1e-6) * 255, 0, 255).astype(np.uint8)
    t, _ = cv2.threshold(c8[valid].reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    m = ((c8 <= t) & valid).astype(np.uint8)
    m = cv2.morphologyEx(cv2.morphologyEx(m, cv2.MORPH_OPEN, k), cv2.MORPH_CLOSE, k)

    # the lesion: big, near the centre, and not smeared along the image border (shadows, vignette)
    n, lab, stats, cent = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n <= 1:
        return np.zeros((h, w), bool)
    border = np.bincount(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]), minlength=n)
    d = np.hypot(cent[:, 0] - w / 2, cent[:, 1] - h / 2) / np.hypot(h, w)
    score = stats[:, cv2.CC_STAT_AREA] * np.exp(-0.5 * (d / 0.2) ** 2) / (1 + 50 * border / (2 * (h + w)))
    score[0] = -1
    best = int(score.argmax())
    m = lab == best

    # a global threshold is pulled around by stickers and uneven lighting: re-run Otsu in a window
    # around the chosen blob, where it only has to separate this lesion from its own surrounding skin
    x, y, bw, bh = stats[best, :4]
    ex, ey = bw // 2, bh // 2
    win = np.zeros((h, w), bool)
    win[max(0, y - ey):min(h, y + bh + ey), max(0, x - ex):min(w, x + bw + ex)] = True
    win &= valid
    if win.sum() > 1.5 * m.sum():
        t2, _ = cv2.threshold(c8[win].reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        m2 = ((c8 <= t2) & win).astype(np.uint8)
        m2 = cv2.morphologyEx(cv2.morphologyEx(m2, cv2.MORPH_OPEN, k), cv2.MORPH_CLOSE, k)
        n2, lab2 = cv2.connectedComponents(m2)
        overlap = np.bincount(lab2[m], minlength=n2)
        overlap[0] = 0
        if n2 > 1 and overlap.max() > 0:
            m = lab2 == overlap.argmax()
    return _fill_holes(m.astype(np.uint8))


def segment_lesion(rgb, method="lesion"):
    """Binary lesion mask (uint8 0/255, same H x W as rgb) from an RGB uint8 image.
    method: 'lesion' (default, dermoscopy-tuned), 'otsu' (grey Otsu), 'canny' (largest filled contour)."""
    funcs = {"lesion": _segment_lesion, "otsu": _segment_otsu, "canny": _segment_canny}
    if method not in funcs:
        raise ValueError(f"unknown mask method {method!r}; choose from {sorted(funcs)}")
    h, w = rgb.shape[:2]
    # work at a fixed size so blur and kernel sizes mean the same thing for every input
    s = SEG_SIZE / max(h, w)
    ws, hs = max(1, round(w * s)), max(1, round(h * s))
    work = cv2.resize(rgb, (ws, hs), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    m = funcs[method](work).astype(np.uint8) * 255
    return cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)


# -----------------------------------------------------------------------------
# id lists and splitting


def read_id_list(path):
    """One id per line; blank lines and # comments ignored; a trailing image extension is dropped."""
    ids = []
    for line in Path(path).read_text().splitlines():
        s = line.split("#")[0].strip()
        if s:
            ids.append(strip_image_extension(s))
    return ids


def split_ids(ids, test_split, seed, labels=None, groups=None):
    """Random train/test split of ids -> (train, test), both sorted.
    labels: {id: class} makes it stratified (each class split with the same fraction, and every class
    with >= 2 units lands in both splits). groups: {id: group} keeps each group (lesion) on one side;
    the fraction then counts groups, not images."""
    ids = sorted(ids)
    unit_of = {i: (groups or {}).get(i) or i for i in ids}
    members = defaultdict(list)
    for i in ids:
        members[unit_of[i]].append(i)
    by_class = defaultdict(list)
    for unit, mem in sorted(members.items()):
        # a lesion's images should share a class; if they do not, its most common one decides
        cls = Counter((labels or {}).get(i) for i in mem).most_common(1)[0][0] if labels else None
        by_class[cls].append(unit)
    rng = random.Random(seed)
    test_units = set()
    for cls in sorted(by_class, key=str):
        units = by_class[cls]
        rng.shuffle(units)
        k = round(len(units) * test_split)
        if len(units) >= 2:
            k = min(max(k, 1), len(units) - 1)
        test_units.update(units[:k])
    # a tiny set can still end one-sided after per-class rounding: move one unit across
    n_units = len(members)
    if n_units >= 2 and len(test_units) in (0, n_units):
        units = sorted(members)
        rng.shuffle(units)
        if test_units:
            test_units.discard(units[0])
        else:
            test_units.add(units[0])
    test = sorted(i for i in ids if unit_of[i] in test_units)
    train = sorted(i for i in ids if unit_of[i] not in test_units)
    return train, test


# -----------------------------------------------------------------------------
# one pair


def _mask_index(mask_dir, skipped):
    """{id: mask path}, accepting <id>.png, <id>_segmentation.png, <id>_Segmentation.png, ... Of two
    masks for one id, an exact <id>.* wins over <id>_segmentation.*, else the first by name; the other
    is named, never dropped silently."""
    index = {}
    for p in sorted(Path(mask_dir).iterdir()):
        if not p.is_file() or p.suffix.lower() not in MASK_EXTENSIONS:
            continue
        stem = p.stem
        for suf in MASK_SUFFIXES:
            if stem.lower().endswith(suf):
                stem = stem[:-len(suf)]
        if stem in index:
            exact = p.stem == stem and index[stem].stem != stem
            kept, dropped = (p, index[stem]) if exact else (index[stem], p)
            skipped.add("duplicate mask", f"{dropped}: a second mask for '{stem}'; using {kept}")
            p = kept
        index[stem] = p
    return index


def to_square(rgb, mask, mode):
    """Image and mask made square before the resize. squash: untouched (the resize stretches the short
    side, so lesions get taller or wider than they are). crop: the largest square, placed to keep as much
    of the lesion as fits and centred on it otherwise (shape kept, some skin lost). pad: the short side
    mirrored out to a square (shape and all pixels kept; no black bars, which no mask could explain to the
    generator). Returns (rgb, mask, lesion pixels cut off)."""
    h, w = mask.shape
    if mode == "squash" or h == w:
        return rgb, mask, 0
    side = min(h, w)
    if mode == "crop":
        lesion = mask > 127
        profile = lesion.sum(1 if h > w else 0)  # lesion pixels along the long axis
        where = np.flatnonzero(profile)
        long = max(h, w)
        if where.size:
            lo, hi = int(where[0]), int(where[-1]) + 1
            centre = (lo + hi) // 2 if hi - lo <= side else int(np.argmax(np.convolve(  # the window holding most lesion
                profile, np.ones(side), mode="valid"))) + side // 2
        else:
            centre = long // 2
        start = min(max(centre - side // 2, 0), long - side)
        crop = (slice(start, start + side), slice(None)) if h > w else (slice(None), slice(start, start + side))
        lost = int(lesion.sum() - lesion[crop].sum())
        return np.ascontiguousarray(rgb[crop]), np.ascontiguousarray(mask[crop]), lost
    extra = abs(h - w)
    before, after = extra // 2, extra - extra // 2
    pads = (before, after, 0, 0) if h < w else (0, 0, before, after)
    # image and mask mirrored alike: a lesion reaching that edge is mirrored in both, so they still agree
    return (cv2.copyMakeBorder(rgb, *pads, borderType=cv2.BORDER_REFLECT_101),
            cv2.copyMakeBorder(mask, *pads, borderType=cv2.BORDER_REFLECT_101), 0)


def process_pair(img_path, mask_path, out_dir, img_size, mask_method, resize="squash"):
    """Load, mask, resize and write one pair to out_dir/{originals,masks}/<stem>.png.
    Returns (status, message, notes): status is 'gt' or 'generated' on success, else a skip reason key."""
    stem = Path(img_path).stem
    notes = []
    try:
        rgb = load_image_rgb(img_path)
    except ValueError as e:
        msg = str(e)
        key = ("empty file" if msg.startswith("empty") else "too large" if msg.startswith("too large")
               else "not an image" if msg.startswith("not an image") else "corrupt image")
        return key, f"{img_path}: {msg}", notes
    h, w = rgb.shape[:2]
    if mask_path is not None:
        try:
            mask, warn = load_mask(mask_path)
        except ValueError as e:
            return "bad mask", f"{img_path}: mask {mask_path}: {e}", notes
        if warn:
            notes.append(f"{mask_path}: {warn}")
        mh, mw = mask.shape
        if (mh, mw) != (h, w):
            # a mask saved at another resolution is fine if the shape agrees; anything else is a wrong pair
            if abs(mw / mh - w / h) / (w / h) <= 0.01:
                notes.append(f"{mask_path}: mask is {mw}x{mh}, image is {w}x{h}: mask resized (same aspect)")
                mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
            else:
                return "mask size mismatch", f"{img_path}: mask {mask_path} is {mw}x{mh} but the image is {w}x{h}", notes
        source = "gt"
    else:
        mask = segment_lesion(rgb, mask_method)
        source = "generated"
    if resize == "squash" and max(w / h, h / w) > EXTREME_ASPECT:
        notes.append(f"{img_path}: extreme aspect ratio {w}x{h}; squashed to {img_size}x{img_size}")
    rgb, mask, lost = to_square(rgb, mask, resize)
    if lost:
        notes.append(f"{img_path}: --resize crop cut off {lost / (lost + int((mask > 127).sum())):.0%} of the lesion")
    img = cv2.resize(rgb, (img_size, img_size), interpolation=cv2.INTER_AREA)
    mask = np.where(cv2.resize(mask, (img_size, img_size), interpolation=cv2.INTER_NEAREST) > 127, 255, 0).astype(np.uint8)
    if not mask.any():
        what = f"mask {mask_path} is empty (all zero)" if mask_path else f"generated '{mask_method}' mask is empty"
        return "empty mask", f"{img_path}: {what}: nothing to learn from", notes
    if mask.all():
        what = f"mask {mask_path}" if mask_path else f"generated '{mask_method}' mask"
        notes.append(f"{img_path}: {what} covers the whole image (no skin around the lesion)")
    # A failed write (full disk, read-only folder) raises: a split with silently missing pairs is worse than none.
    for sub, arr in (("originals", img[..., ::-1]), ("masks", mask)):
        write_image(str(Path(out_dir) / sub / f"{stem}.png"), arr)
    return source, "", notes


# -----------------------------------------------------------------------------
# the command, step by step: main() calls these in order


# any square size here, power of two or not (train.py asks for one): pairs are stored, not modelled
LIMITS = {**SHARED_LIMITS, "test_split": Range(0, 1, lo_open=True, hi_open=True), "img_size": Range(8, 4096),
          "demo": Range(0, 100_000)}


def parse_args(argv):
    """Flags, with numeric ones refused here when out of range, before anything touches the disk."""
    parser = ArgumentParser(description="Prepare mask/image pairs for the Skin Lesion PixelGAN.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--source_dir", type=str, default=None, help=f"folder with {EXTENSION_LIST} images (not recursive)")
    parser.add_argument("--data_dir", type=str, default="data", help="output folder (train/, test/, labels.csv)")
    parser.add_argument("--test_split", type=float, default=0.1, help="fraction of images (lesions when grouped) for test")
    add_shared_flags(parser, "num_workers", "img_size", "seed", seed="random seed for the split and the demo set",
                     img_size="square working resolution", num_workers="decode threads")
    parser.add_argument("--resize", choices=["squash", "crop", "pad"], default="squash",
                        help="how a non-square image becomes square: squash (stretch, lesion shape distorted), "
                             "crop (largest square around the lesion, shape kept), pad (mirror the short side out)")
    parser.add_argument("--mask_dir", type=str, default=None, help="ground-truth masks: <id>.png or <id>_segmentation.png")
    parser.add_argument("--mask_method", choices=["lesion", "otsu", "canny"], default="lesion",
                        help="how to make masks when --mask_dir is not given")
    parser.add_argument("--labels", type=str, default=None,
                        help="labels CSV (HAM10000, ISIC 2017/2018/2019, isic-cli metadata or image_id,label)")
    parser.add_argument("--train_ids", type=str, default=None, help="file with one training id per line")
    parser.add_argument("--test_ids", type=str, default=None, help="file with one test id per line")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing split in --data_dir (only once the new one is complete)")
    parser.add_argument("--demo", type=int, default=0, metavar="N",
                        help="generate N procedural lesion images into --source_dir (new or empty; default "
                             "DATA/demo_source) and use them")
    args = parser.parse_args(argv)
    check_ranges(args, LIMITS)
    return args


def _inside(path, folder):
    """Whether path is folder itself or lies inside it (links resolved)."""
    p, f = Path(path).resolve(), Path(folder).resolve()
    return p == f or f in p.parents


def refuse_early(args, data_dir):
    """Refusals that need no input read, so they come before any slow work. Two splits mixed in one
    folder would leak test images into training; and whatever the new split replaces must not be where
    its input comes from."""
    existing = [e for e in SPLIT_ENTRIES if (data_dir / e).exists()]
    if existing and not args.overwrite:
        raise UsageError(f"{data_dir} already holds {' and '.join(e + ('' if '.' in e else '/') for e in existing)}; "
                         f"pass --overwrite to replace them (or choose another --data_dir)")
    for flag in ("source_dir", "mask_dir", "labels", "train_ids", "test_ids"):
        value = getattr(args, flag)
        for entry in SPLIT_ENTRIES:
            if value and _inside(value, data_dir / entry):
                raise UsageError(f"--{flag} {value} is inside {data_dir / entry}, which the new split replaces; "
                                 f"move it out of {data_dir} first (or choose another --data_dir)")


def open_output_folder(data_dir):
    """Make data_dir if needed and prove it writable now, not after minutes of decoding. Returns whether
    this run created it (then main removes it again if the run fails before writing anything)."""
    created = not data_dir.exists()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / f".write_test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to output folder {data_dir}: {e.strerror or e}") from None
    _remove_stale_work_folders(data_dir)
    return created


def _remove_stale_work_folders(data_dir):
    # .staging-<pid> / .old-<pid> of a run that was killed (kill -9, power loss) before it could clean up
    for p in list(data_dir.glob(".staging-*")) + list(data_dir.glob(".old-*")):
        pid = ascii_int(p.name.rsplit("-", 1)[-1])
        if pid is not None and pid != os.getpid():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass


def use_demo_source(args, data_dir):
    """--demo: write the procedural set and point the flags at it, so it takes the same path as real data.
    Flags the user gave (--mask_dir, --labels) still win."""
    src = Path(args.source_dir) if args.source_dir else data_dir / "demo_source"
    print(f"generating {args.demo} demo images in {src} ...")
    img_dir, mask_dir, labels_path = make_demo_dataset(src, args.demo, args.seed)
    args.source_dir = str(img_dir)
    args.mask_dir = args.mask_dir or str(mask_dir)
    args.labels = args.labels or str(labels_path)


class Skipped(Counter):
    """Why inputs were left out, counted for the summary. Each is named on stderr as it happens, so a
    user can find the file; a count alone would not say which one."""

    def add(self, reason, message):
        self[reason] += 1
        print(f"skipping {message}", file=sys.stderr)


def collect_images(source_dir, skipped):
    """{stem: path} of the source images. Pairs, labels and outputs are all keyed by stem, so a second
    file with the same stem is skipped rather than silently overwriting the first."""
    if source_dir is None:
        raise UsageError("--source_dir is required (or use --demo N for a generated demo set)")
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise UsageError(f"source folder {source_dir} does not exist or is not a folder")
    images = {}
    for p in sorted(source_dir.iterdir()):
        if p.is_dir():
            continue
        if not p.is_file():  # a FIFO or device would block or flood the reader; a dangling link has nothing
            skipped.add("not a regular file", f"{p}: not a regular file")
        elif p.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.add(f"not {EXTENSION_LIST}", f"{p}: not a {EXTENSION_LIST} file")
        elif p.stem in images:
            skipped.add("duplicate stem", f"{p}: same stem as {images[p.stem]}")
        else:
            images[p.stem] = p
    if not images:
        raise UsageError(f"no {EXTENSION_LIST} images in {source_dir}")
    return images


def pair_masks(images, mask_dir, skipped):
    """{stem: mask path} from --mask_dir ({} when masks are to be generated). An image without its mask
    is dropped from images: generating one for it would mix two kinds of mask in one split."""
    if not mask_dir:
        return {}
    if not Path(mask_dir).is_dir():
        raise UsageError(f"mask folder {mask_dir} does not exist or is not a folder")
    index = _mask_index(mask_dir, skipped)
    masks = {}
    for stem in list(images):
        if stem in index:
            masks[stem] = index[stem]
        else:
            skipped.add("no mask", f"{images.pop(stem)}: no mask for '{stem}' in {mask_dir}")
    return masks


def pair_labels(images, labels_path, skipped):
    """{stem: (class, lesion id or None)} from --labels, or None without it. An unlabelled image is
    dropped from images: the split is stratified by class and labels.csv must cover every pair."""
    if not labels_path:
        return None
    try:
        labels = read_label_table(labels_path)
    except OSError as e:
        raise UsageError(describe_os_error(e)) from None
    for stem in list(images):
        if stem not in labels:
            skipped.add("no label", f"{images.pop(stem)}: no label for '{stem}' in {labels_path}")
    return labels


def apply_id_lists(images, train_path, test_path, skipped):
    """(train ids or None, test ids or None, how many listed ids have no image). With both lists, an
    image in neither is dropped: the user chose the split, and guessing a side for it would change it."""
    try:
        train_ids = set(read_id_list(train_path)) if train_path else None
        test_ids = set(read_id_list(test_path)) if test_path else None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the id list: {describe_os_error(e) if isinstance(e, OSError) else e}") from None
    if train_ids is not None and test_ids is not None:
        both = train_ids & test_ids
        if both:
            raise UsageError(f"{len(both)} ids are in both --train_ids and --test_ids, e.g. {sorted(both)[0]}")
        for stem in list(images):
            if stem not in train_ids and stem not in test_ids:
                images.pop(stem)
                skipped["in neither id list"] += 1  # expected with lists; one line each would drown the log
        return train_ids, test_ids, len((train_ids | test_ids) - set(images))
    return train_ids, test_ids, len((train_ids or test_ids or set()) - set(images))


def process_pairs(images, masks, out_dir, args, skipped):
    """Decode, mask, square and resize every pair into out_dir/{originals,masks} on a thread pool
    (OpenCV and PIL release the GIL). Returns (stems written, Counter of 'gt'/'generated' masks).
    A failed write stops the other workers: a split with silently missing pairs is worse than none."""
    for sub in ("originals", "masks"):
        (out_dir / sub).mkdir(parents=True)
    print(f"processing {len(images)} images from {Path(args.source_dir)} with {args.num_workers} workers "
          f"(masks: {'ground truth from ' + args.mask_dir if args.mask_dir else args.mask_method + ' segmentation'})")
    if args.num_workers > 1:
        cv2.setNumThreads(1)  # the pool already uses the cores; nested OpenCV threads only contend
    failed = threading.Event()

    def work(stem):
        if failed.is_set():  # a write already failed: the run is lost, stop spending time on it
            return stem, ("aborted", "", [])
        try:
            return stem, process_pair(images[stem], masks.get(stem), out_dir, args.img_size, args.mask_method,
                                      args.resize)
        except BaseException:
            failed.set()
            raise

    stems = sorted(images)
    if args.num_workers > 1:
        with ThreadPoolExecutor(args.num_workers) as pool:
            results = list(pool.map(work, stems))
    else:
        results = [work(s) for s in stems]
    good, source_count = [], Counter()
    for stem, (status, msg, notes) in results:  # reported in stem order, whatever order the threads finished in
        for note in notes:
            print(f"warning: {note}", file=sys.stderr)
        if status in ("gt", "generated"):
            good.append(stem)
            source_count[status] += 1
        else:
            skipped.add(status, msg)
    if not good:
        raise UsageError(f"nothing usable: all {len(images)} candidate images were skipped (see messages above)")
    return good, source_count


def split_pairs(good, labels, train_ids, test_ids, args):
    """(train, test) stems. An id list decides where given; otherwise a seeded split, stratified by
    class and keeping each lesion's images on one side when labels say so. A split with either side
    empty is refused: train.py cannot train on it (nor evaluate without a test pair)."""
    if train_ids is not None:
        train, test = [s for s in good if s in train_ids], [s for s in good if s not in train_ids]
    elif test_ids is not None:
        train, test = [s for s in good if s not in test_ids], [s for s in good if s in test_ids]
    else:
        cls = {s: labels[s][0] for s in good} if labels else None
        groups = {s: labels[s][1] for s in good if labels[s][1]} if labels else None
        train, test = split_ids(good, args.test_split, args.seed, cls, groups)
    if train and test:
        return train, test
    empty = "test" if train else "train"
    if len(good) < MIN_PAIRS:
        raise UsageError(f"only {len(good)} usable image in {args.source_dir}: a split needs at least {MIN_PAIRS}, "
                         "one for train and one for test")
    if train_ids is not None or test_ids is not None:
        raise UsageError(f"the id lists leave the {empty} split without any of the {len(good)} usable images; "
                         "list at least one for each side")
    raise UsageError(f"all {len(good)} usable images belong to one lesion (lesion_id in {args.labels}), which must stay "
                     f"on one side; a split needs at least {MIN_PAIRS} lesions")


def write_split(stage, data_dir, train, test, labels):
    """Sort the staged pairs (stage/all) into stage/train and stage/test, add labels.csv, and only then
    swap the finished split into data_dir."""
    for split, split_stems in (("train", train), ("test", test)):
        for sub in ("originals", "masks"):
            (stage / split / sub).mkdir(parents=True, exist_ok=True)
            for s in split_stems:
                os.replace(stage / "all" / sub / f"{s}.png", stage / split / sub / f"{s}.png")
    if labels:
        write_csv(str(stage / LABELS_FILE), ("image_id", "label", "split"),
                  [(s, labels[s][0], split) for split, ss in (("train", train), ("test", test)) for s in ss])
    _swap_in(stage, data_dir)


def _swap_in(stage, data_dir):
    """Replace the split in data_dir (train/, test/, labels.csv) with the complete one in stage. Only
    renames within data_dir: the old split stays whole until the new one is ready, and comes back if a
    rename fails."""
    old = data_dir / f".old-{os.getpid()}"
    old.mkdir()
    moved, placed = [], []
    try:
        for name in SPLIT_ENTRIES:
            if (data_dir / name).exists():
                os.replace(data_dir / name, old / name)
                moved.append(name)
        for name in SPLIT_ENTRIES:
            if (stage / name).exists():
                os.replace(stage / name, data_dir / name)
                placed.append(name)
    except BaseException:
        for name in placed:
            os.replace(data_dir / name, stage / name)
        for name in moved:
            os.replace(old / name, data_dir / name)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def print_summary(data_dir, args, train, test, source_count, labels, listed_missing, skipped):
    """What was written and what was left out, so a surprising split shows before training on it."""
    print(f"\nwrote {len(train) + len(test)} pairs to {data_dir}: train {len(train)}, test {len(test)} "
          f"({args.img_size}x{args.img_size})")
    print(f"masks: {source_count['gt']} ground truth, {source_count['generated']} generated"
          + (f" ({args.mask_method})" if source_count["generated"] else ""))
    if labels:
        classes = sorted({labels[s][0] for s in train + test})
        width = max(len(c) for c in classes)
        print(f"{'class':<{width}}  train   test")
        for c in classes:
            print(f"{c:<{width}}  {sum(labels[s][0] == c for s in train):5d}  {sum(labels[s][0] == c for s in test):5d}")
        print(f"labels written to {data_dir / LABELS_FILE}")
    if listed_missing:
        print(f"note: {listed_missing} ids in the id lists have no image (or mask/label) in the source")
    if skipped:
        print(f"skipped {sum(skipped.values())} files: " + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())))
    else:
        print("skipped nothing")


def main(argv=None):
    """Returns 0; a refusal raises UsageError, which run_cli turns into one error line and status 1."""
    args = parse_args(argv)
    data_dir = Path(args.data_dir)
    refuse_early(args, data_dir)
    created = open_output_folder(data_dir)
    # The new split is built in a staging folder inside data_dir (same file system, so the final swap
    # is renames only) and swapped in when complete: an unusable input, a full disk or Ctrl-C leaves
    # the existing split as it was.
    stage = data_dir / f".staging-{os.getpid()}"
    try:
        if args.demo:
            use_demo_source(args, data_dir)
        skipped = Skipped()
        images = collect_images(args.source_dir, skipped)
        masks = pair_masks(images, args.mask_dir, skipped)
        labels = pair_labels(images, args.labels, skipped)
        train_ids, test_ids, listed_missing = apply_id_lists(images, args.train_ids, args.test_ids, skipped)
        shutil.rmtree(stage, ignore_errors=True)  # a killed run whose pid this one reuses may have left it
        good, source_count = process_pairs(images, masks, stage / "all", args, skipped)
        train, test = split_pairs(good, labels, train_ids, test_ids, args)
        write_split(stage, data_dir, train, test, labels)
    except OSError as e:
        raise UsageError(f"{describe_os_error(e)}; nothing in {data_dir} was changed") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                data_dir.rmdir()  # only if the run left it empty (it failed before writing anything)
    print_summary(data_dir, args, train, test, source_count, labels, listed_missing, skipped)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "interrupted: the split in --data_dir is unchanged; run the command again"))
