"""
Prepare (mask, image) pairs for the Skin Lesion PixelGAN.

Reads dermoscopy images from --source_dir, takes or makes a binary lesion mask
for each, makes both square (--resize: squash, crop around the lesion, or mirror-pad),
resizes them to the working resolution and splits them into train/test under --data_dir:

    DATA/train/originals/<stem>.png   RGB, img_size x img_size
    DATA/train/masks/<stem>.png       single channel, values 0 and 255
    DATA/test/...                     same layout
    DATA/labels.csv                   image_id,label,split (only when labels are known)

Examples:
    python preprocess.py --source_dir ./data/input_images/ --data_dir data --test_split 0.1
    python preprocess.py --source_dir isic/images --mask_dir isic/masks --labels isic/labels.csv --data_dir data
    python preprocess.py --data_dir data --demo 200     # no data at hand: procedurally generated lesions
"""

import argparse
import csv
import math
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

from dataset import (EXTREME_ASPECT, LABELS_FILE, MAX_PIXELS, ArgumentParser, Range, UsageError, binarize_mask,
                     check_name, check_ranges, describe_os_error, run_cli, write_csv, write_image)

IMAGE_EXTS = {".jpg", ".jpeg", ".png"}
MASK_EXTS = {".png", ".jpg", ".jpeg", ".gif", ".bmp"}
MASK_SUFFIXES = ("_segmentation",)  # matched case-insensitively, so _Segmentation works too
SPLIT_ENTRIES = ("train", "test", LABELS_FILE)  # what a split in --data_dir consists of (and --overwrite replaces)
DEMO_MARKER = ".pixelgan_demo"  # in a folder --demo wrote: "<n> <seed>"; only such a folder is ever replaced
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
# labels and splitting


def read_labels(path):
    """Labels CSV -> {image_id: (label, lesion_id or None)}. The format is detected from the header:
    HAM10000 metadata, ISIC 2017 ground truth, ISIC 2018/2019 one-hot, isic-cli metadata.csv,
    or plain image_id,label / image_id,diagnosis."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: not a readable CSV file ({str(e)[:100]})") from None
    if not rows:
        raise ValueError(f"{path}: empty labels file")
    header = [h.strip() for h in rows[0]]
    low = [h.lower() for h in header]
    col = {h: i for i, h in enumerate(low)}

    def get(r, name):
        i = col.get(name)
        return r[i].strip() if i is not None and i < len(r) else ""

    diag_cols = sorted((h for h in low if h.startswith("diagnosis_") and h[10:].isdigit()), key=lambda h: int(h[10:]))
    onehot = [h for h in header if h.lower() not in ("image", "image_id")]
    if "image_id" in col and "dx" in col:  # HAM10000
        def parse(r):
            return get(r, "image_id"), get(r, "dx").lower(), get(r, "lesion_id") or None
    elif "image_id" in col and "melanoma" in col and "seborrheic_keratosis" in col:  # ISIC 2017
        def parse(r):
            mel, sk = float(get(r, "melanoma") or 0), float(get(r, "seborrheic_keratosis") or 0)
            return get(r, "image_id"), "melanoma" if mel >= 0.5 else "seborrheic_keratosis" if sk >= 0.5 else "nevus", None
    elif low[0] == "image" and {"mel", "nv"} <= set(low):  # ISIC 2018/2019 one-hot
        def parse(r):
            vals = [float(v or 0) for v in r[1:len(header)]]
            if not all(math.isfinite(v) for v in vals):
                raise ValueError("one-hot values must be finite numbers")
            marked = [name for name, v in zip(onehot, vals) if v >= 0.5]
            if len(marked) > 1:
                notes.append(f"{r[0].strip()} is marked as several classes ({', '.join(marked)}); "
                             f"using {onehot[int(np.argmax(vals))]}")
            # a row with no class marked is left unlabelled (argmax would silently call it the first column)
            return r[0].strip(), onehot[int(np.argmax(vals))].lower() if marked else "", None
    elif "isic_id" in col and (diag_cols or "diagnosis" in col):  # isic-cli metadata.csv
        def parse(r):
            # diagnosis_1 is the coarsest level (benign/malignant); the deepest filled level is the diagnosis
            names = [get(r, c) for c in diag_cols] or [get(r, "diagnosis")]
            label = next((v for v in reversed(names) if v), "")
            return get(r, "isic_id"), label.lower(), get(r, "lesion_id") or None
    elif "image_id" in col and ("label" in col or "diagnosis" in col):  # plain
        key = "label" if "label" in col else "diagnosis"

        def parse(r):
            return get(r, "image_id"), get(r, key), get(r, "lesion_id") or None
    else:
        raise ValueError(f"{path}: unrecognised labels header {','.join(header)!r} (expected HAM10000, "
                         "ISIC 2017/2018/2019 ground truth, isic-cli metadata.csv or image_id,label)")
    labels = {}
    for n, r in enumerate(rows[1:], start=2):
        if not any(v.strip() for v in r):
            continue
        notes = []
        try:
            image_id, label, lesion = parse(r)
        except ValueError as e:
            raise ValueError(f"{path}: bad row {','.join(r)!r} ({e})")
        for note in notes:
            warn(f"{path}: line {n}: {note}")
        if not image_id:
            continue
        if not label:
            warn(f"{path}: line {n}: {image_id} has no class; left unlabelled")
            continue
        try:
            check_name(label, "class")  # class names become folder names in generate.py --class/--balance
        except UsageError as e:
            raise UsageError(f"{path}: line {n}: {e}") from None
        stem = Path(image_id).stem if Path(image_id).suffix.lower() in IMAGE_EXTS else image_id
        if stem in labels and labels[stem][0] != label:
            warn(f"{path}: line {n}: {stem} is listed again with another label ({labels[stem][0]!r}, now {label!r}); "
                 f"using {label!r}")
        labels[stem] = (label, lesion)
    return labels


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def read_id_list(path):
    """One id per line; blank lines and # comments ignored; a trailing image extension is dropped."""
    ids = []
    for line in Path(path).read_text().splitlines():
        s = line.split("#")[0].strip()
        if s:
            ids.append(Path(s).stem if Path(s).suffix.lower() in IMAGE_EXTS else s)
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
# procedural demo data


def _smooth_noise(rng, h, w, cells):
    """Low-frequency noise in [0, 1]: a coarse random grid blown up with bicubic interpolation."""
    g = rng.random((cells, max(2, round(cells * w / h)))).astype(np.float32)
    n = cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)
    return (n - n.min()) / (n.max() - n.min() + 1e-6)


def _demo_one(rng, cls):
    w = int(rng.integers(300, 401))
    h = int(round(w * rng.uniform(0.72, 0.76)))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # skin: a tone from pale to brown, uneven lighting, fine texture
    red = rng.uniform(200, 240)
    green = red * rng.uniform(0.72, 0.84)
    skin = np.array([red, green, green * rng.uniform(0.82, 0.95)], np.float32)
    skin *= rng.uniform(0.8, 1.05)
    img = np.empty((h, w, 3), np.float32)
    img[:] = skin
    img *= (0.9 + 0.15 * _smooth_noise(rng, h, w, 3))[..., None]
    img += rng.normal(0, 4, (h, w, 1)).astype(np.float32)
    img += cv2.GaussianBlur(rng.normal(0, 6, (h, w)).astype(np.float32), (0, 0), 1.5)[..., None]

    # outline: radius with a few random harmonics; melanoma gets more and stronger ones
    cx, cy = w / 2 + rng.normal(0, w * 0.06), h / 2 + rng.normal(0, h * 0.06)
    r0 = min(h, w) * rng.uniform(0.18, 0.34)
    harmonics, amp = {"melanoma": (7, 0.12), "nevus": (3, 0.05), "seborrheic_keratosis": (5, 0.09)}[cls]
    theta = np.arctan2(yy - cy, (xx - cx) / rng.uniform(0.8, 1.25))
    r = np.full_like(theta, r0)
    for k in range(2, 2 + harmonics):
        r += r0 * amp * rng.normal() / np.sqrt(k - 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    dist = np.hypot(xx - cx, yy - cy)
    mask = dist < r
    soft = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 2.0 if cls != "melanoma" else 1.2)

    # pigment: colour mixes light and dark shades of the class by a smooth field
    light, dark = {"melanoma": ([150, 95, 70], [55, 30, 25]),
                   "nevus": ([165, 110, 80], [110, 65, 45]),
                   "seborrheic_keratosis": ([190, 150, 105], [140, 100, 70])}[cls]
    shade = 0.6 * _smooth_noise(rng, h, w, 6 if cls == "melanoma" else 3) + 0.4 * np.clip(1 - dist / r, 0, 1)
    if cls == "nevus":
        shade = 0.5 + 0.5 * (shade - 0.5) * 0.5  # uniform
    les = (np.array(light, np.float32) * (1 - shade[..., None]) + np.array(dark, np.float32) * shade[..., None])
    les *= rng.uniform(0.85, 1.1)
    # pigment network: a darker mesh of slightly wobbly lines
    if cls != "seborrheic_keratosis" and rng.random() < 0.7:
        f = rng.uniform(0.25, 0.4)
        wob = 6 * _smooth_noise(rng, h, w, 14)
        net = np.abs(np.sin(xx * f + wob)) * np.abs(np.sin(yy * f + 0.8 * wob + 1.0))
        fade = np.clip(1 - dist / r, 0, 1) ** 0.5 * _smooth_noise(rng, h, w, 5)
        les *= (1 - 0.22 * fade * cv2.GaussianBlur((net < 0.25).astype(np.float32), (0, 0), 0.7))[..., None]
    img = img * (1 - soft[..., None]) + les * soft[..., None]

    # dots: blue-grey and black in melanoma, pale waxy milia in seborrheic keratosis
    inside = np.argwhere(mask)
    if len(inside):
        n_dots = {"melanoma": int(rng.integers(10, 40)), "nevus": int(rng.integers(0, 6)),
                  "seborrheic_keratosis": int(rng.integers(5, 20))}[cls]
        for y, x in inside[rng.integers(0, len(inside), n_dots)]:
            if cls == "seborrheic_keratosis":
                col = (215, 200, 170)
            else:
                col = (95, 100, 125) if rng.random() < 0.5 else (25, 20, 25)
            cv2.circle(img, (int(x), int(y)), int(rng.integers(1, 4)), col, -1, cv2.LINE_AA)

    # hairs: thin dark curves laid on top of everything
    for _ in range(int(rng.integers(0, 7)) if rng.random() < 0.5 else 0):
        p0, p1, p2 = rng.uniform(0, 1, (3, 2)) * (w, h)
        t = np.linspace(0, 1, 40)[:, None]
        pts = ((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2).astype(np.int32)
        cv2.polylines(img, [pts], False, tuple(float(v) for v in rng.uniform(20, 60, 3)), 1, cv2.LINE_AA)

    # some dermoscopes leave a black circle around the field of view
    if rng.random() < 0.35:
        rad = np.hypot(w, h) / 2 * rng.uniform(0.82, 0.95)
        fall = np.clip((rad - np.hypot(xx - w / 2, yy - h / 2)) / 12, 0, 1)
        img = img * fall[..., None] + 8 * (1 - fall[..., None])
        mask &= fall > 0.5
    img = cv2.GaussianBlur(img, (0, 0), 0.6)
    return np.clip(img, 0, 255).astype(np.uint8), (mask * 255).astype(np.uint8)


def make_demo_dataset(out_dir, n, seed):
    """Write n procedural lesion images (out_dir/images/demo_XXXX.jpg), their GT masks
    (out_dir/masks/demo_XXXX_segmentation.png) and out_dir/labels.csv (image_id,label).
    Deterministic in seed. Returns (images dir, masks dir, labels path).

    out_dir must be new, empty, or a folder an earlier --demo wrote (then kept if it has the same n and
    seed, else replaced): user files in it are never deleted or mixed with demo ones."""
    out_dir = Path(out_dir)
    entries = {"images": out_dir / "images", "masks": out_dir / "masks", LABELS_FILE: out_dir / LABELS_FILE}
    marker = out_dir / DEMO_MARKER
    stamp = f"{n} {seed}\n"
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not marker.is_file():
            raise UsageError(f"{out_dir} already holds files that --demo did not write; give --demo a new or empty "
                             "--source_dir (or leave --source_dir out: DATA/demo_source)")
        if marker.read_text() == stamp and all(p.exists() for p in entries.values()):
            return entries["images"], entries["masks"], entries[LABELS_FILE]
    elif out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir} is a file, not a folder for the demo images")
    # built aside, then swapped in: an interrupted run leaves the previous demo (or nothing), never half of one
    stage = out_dir / f".tmp-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        _write_demo(stage, n, seed)
        marker.unlink(missing_ok=True)  # from here on out_dir is not a complete demo until the marker is back
        for name, path in entries.items():
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            os.replace(stage / name, path)
        marker.write_text(stamp)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return entries["images"], entries["masks"], entries[LABELS_FILE]


def _write_demo(out_dir, n, seed):
    img_dir, mask_dir = out_dir / "images", out_dir / "masks"
    for d in (img_dir, mask_dir):
        d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    # roughly the ISIC 2017 mix
    n_mel, n_sk = round(0.2 * n), round(0.15 * n)
    classes = ["melanoma"] * n_mel + ["seborrheic_keratosis"] * n_sk + ["nevus"] * (n - n_mel - n_sk)
    rng.shuffle(classes)
    rows = []
    for i, cls in enumerate(classes):
        stem = f"demo_{i:04d}"
        img, mask = _demo_one(np.random.default_rng([seed, i]), cls)
        ok, jpeg = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
        (img_dir / f"{stem}.jpg").write_bytes(jpeg.tobytes())  # Python I/O: a full disk raises, imwrite would not
        write_image(str(mask_dir / f"{stem}_segmentation.png"), mask)
        rows.append((stem, cls))
    write_csv(str(out_dir / LABELS_FILE), ("image_id", "label"), rows)


# -----------------------------------------------------------------------------
# one pair


def _mask_index(mask_dir):
    """{id: mask path}, accepting <id>.png, <id>_segmentation.png, <id>_Segmentation.png, ..."""
    index = {}
    for p in sorted(Path(mask_dir).iterdir()):
        if not p.is_file() or p.suffix.lower() not in MASK_EXTS:
            continue
        stem = p.stem
        for suf in MASK_SUFFIXES:
            if stem.lower().endswith(suf):
                stem = stem[:-len(suf)]
        # an exact <id>.png wins over <id>_segmentation.* if both exist
        if stem not in index or p.stem == stem:
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


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(1)


LIMITS = {"test_split": Range(0, 1, lo_open=True, hi_open=True), "img_size": Range(8, 4096),
          "num_workers": Range(0, 256), "demo": Range(0, 100_000), "seed": Range(0, 2 ** 63 - 1)}


def _inside(path, folder):
    """Whether path is folder itself or lies inside it (links resolved)."""
    p, f = Path(path).resolve(), Path(folder).resolve()
    return p == f or f in p.parents


def _remove_stale_work_folders(data_dir):
    # .staging-<pid> / .old-<pid> of a run that was killed (kill -9, power loss) before it could clean up
    for p in list(data_dir.glob(".staging-*")) + list(data_dir.glob(".old-*")):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass


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


def main(argv=None):
    parser = ArgumentParser(description="Prepare mask/image pairs for the Skin Lesion PixelGAN.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--source_dir", type=str, default=None, help="folder with .jpg/.jpeg/.png images (not recursive)")
    parser.add_argument("--data_dir", type=str, default="data", help="output folder (train/, test/, labels.csv)")
    parser.add_argument("--test_split", type=float, default=0.1, help="fraction of images (lesions when grouped) for test")
    parser.add_argument("--seed", type=int, default=42, help="random seed for the split and the demo set")
    parser.add_argument("--img_size", type=int, default=256, help="square working resolution")
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
    parser.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="decode threads")
    parser.add_argument("--demo", type=int, default=0, metavar="N",
                        help="generate N procedural lesion images into --source_dir (new or empty; default "
                             "DATA/demo_source) and use them")
    args = parser.parse_args(argv)
    try:
        check_ranges(args, LIMITS)
    except UsageError as e:
        die(str(e))
    data_dir = Path(args.data_dir)

    # refuse early, before any slow work: two splits mixed in one folder would leak test images into training
    existing = [e for e in SPLIT_ENTRIES if (data_dir / e).exists()]
    if existing and not args.overwrite:
        die(f"{data_dir} already holds {' and '.join(e + ('' if '.' in e else '/') for e in existing)}; pass "
            f"--overwrite to replace them (or choose another --data_dir)")
    # whatever the new split replaces must not be where its input comes from
    for flag in ("source_dir", "mask_dir", "labels", "train_ids", "test_ids"):
        value = getattr(args, flag)
        for entry in SPLIT_ENTRIES:
            if value and _inside(value, data_dir / entry):
                die(f"--{flag} {value} is inside {data_dir / entry}, which the new split replaces; "
                    f"move it out of {data_dir} first (or choose another --data_dir)")
    created = not data_dir.exists()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / f".write_test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        die(f"cannot write to output folder {data_dir}: {e.strerror or e}")
    _remove_stale_work_folders(data_dir)
    stage = data_dir / f".staging-{os.getpid()}"
    try:
        return _prepare(args, data_dir, stage)
    except OSError as e:
        die(f"{describe_os_error(e)}; nothing in {data_dir} was changed")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            try:
                data_dir.rmdir()  # only if the run left it empty (it failed before writing anything)
            except OSError:
                pass


def _prepare(args, data_dir, stage):
    if args.demo:
        src = Path(args.source_dir) if args.source_dir else data_dir / "demo_source"
        print(f"generating {args.demo} demo images in {src} ...")
        try:
            img_dir, mask_dir, labels_path = make_demo_dataset(src, args.demo, args.seed)
        except UsageError as e:
            die(str(e))
        args.source_dir = str(img_dir)
        args.mask_dir = args.mask_dir or str(mask_dir)
        args.labels = args.labels or str(labels_path)
    if args.source_dir is None:
        die("--source_dir is required (or use --demo N for a generated demo set)")
    source_dir = Path(args.source_dir)
    if not source_dir.is_dir():
        die(f"source folder {source_dir} does not exist or is not a folder")

    skipped = Counter()

    def skip(key, msg):
        skipped[key] += 1
        print(f"skipping {msg}", file=sys.stderr)

    images = {}
    for p in sorted(source_dir.iterdir()):
        if p.is_dir():
            continue
        if not p.is_file():  # a FIFO or device would block or flood the reader; a dangling link has nothing
            skip("not a regular file", f"{p}: not a regular file")
        elif p.suffix.lower() not in IMAGE_EXTS:
            skip("not .jpg/.jpeg/.png", f"{p}: not a .jpg/.jpeg/.png file")
        elif p.stem in images:
            skip("duplicate stem", f"{p}: same stem as {images[p.stem]}")
        else:
            images[p.stem] = p
    if not images:
        die(f"no .jpg/.jpeg/.png images in {source_dir}")

    masks = {}
    if args.mask_dir:
        if not Path(args.mask_dir).is_dir():
            die(f"mask folder {args.mask_dir} does not exist or is not a folder")
        index = _mask_index(args.mask_dir)
        for stem in list(images):
            if stem in index:
                masks[stem] = index[stem]
            else:
                skip("no mask", f"{images.pop(stem)}: no mask for '{stem}' in {args.mask_dir}")

    labels = None
    if args.labels:
        try:
            labels = read_labels(args.labels)
        except (OSError, ValueError) as e:
            die(describe_os_error(e) if isinstance(e, OSError) else str(e))
        for stem in list(images):
            if stem not in labels:
                skip("no label", f"{images.pop(stem)}: no label for '{stem}' in {args.labels}")

    try:
        train_ids = set(read_id_list(args.train_ids)) if args.train_ids else None
        test_ids = set(read_id_list(args.test_ids)) if args.test_ids else None
    except (OSError, UnicodeDecodeError) as e:
        die(f"cannot read the id list: {describe_os_error(e) if isinstance(e, OSError) else e}")
    if train_ids is not None and test_ids is not None:
        both = train_ids & test_ids
        if both:
            die(f"{len(both)} ids are in both --train_ids and --test_ids, e.g. {sorted(both)[0]}")
        for stem in list(images):
            if stem not in train_ids and stem not in test_ids:
                images.pop(stem)
                skipped["in neither id list"] += 1  # expected with lists; one line each would drown the log
        listed_missing = len((train_ids | test_ids) - set(images))
    else:
        listed_missing = len((train_ids or test_ids or set()) - set(images))

    # The new split is built in a staging folder inside data_dir and swapped in only when complete, so an
    # unusable input, a full disk or Ctrl-C leaves the existing split as it was.
    shutil.rmtree(stage, ignore_errors=True)
    for sub in ("originals", "masks"):
        (stage / "all" / sub).mkdir(parents=True)

    print(f"processing {len(images)} images from {source_dir} with {args.num_workers} workers "
          f"(masks: {'ground truth from ' + args.mask_dir if args.mask_dir else args.mask_method + ' segmentation'})")
    if args.num_workers > 1:
        cv2.setNumThreads(1)  # the pool already uses the cores; nested OpenCV threads only contend
    failed = threading.Event()

    def work(stem):
        if failed.is_set():  # a write already failed: the run is lost, stop spending time on it
            return stem, ("aborted", "", [])
        try:
            return stem, process_pair(images[stem], masks.get(stem), stage / "all", args.img_size, args.mask_method,
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
    for stem, (status, msg, notes) in results:
        for wmsg in notes:
            print(f"warning: {wmsg}", file=sys.stderr)
        if status in ("gt", "generated"):
            good.append(stem)
            source_count[status] += 1
        else:
            skip(status, msg)
    if not good:
        die(f"nothing usable: all {len(images)} candidate images were skipped (see messages above)")

    if train_ids is not None or test_ids is not None:
        if train_ids is not None:
            train = [s for s in good if s in train_ids]
            test = [s for s in good if s not in train_ids]
        else:
            test = [s for s in good if s in test_ids]
            train = [s for s in good if s not in test_ids]
    else:
        cls = {s: labels[s][0] for s in good} if labels else None
        groups = {s: labels[s][1] for s in good if labels[s][1]} if labels else None
        train, test = split_ids(good, args.test_split, args.seed, cls, groups)

    for split, split_stems in (("train", train), ("test", test)):
        for sub in ("originals", "masks"):
            (stage / split / sub).mkdir(parents=True, exist_ok=True)
            for s in split_stems:
                os.replace(stage / "all" / sub / f"{s}.png", stage / split / sub / f"{s}.png")
    if labels:
        write_csv(str(stage / LABELS_FILE), ("image_id", "label", "split"),
                  [(s, labels[s][0], split) for split, ss in (("train", train), ("test", test)) for s in ss])
    _swap_in(stage, data_dir)

    # summary
    print(f"\nwrote {len(train) + len(test)} pairs to {data_dir}: train {len(train)}, test {len(test)} "
          f"({args.img_size}x{args.img_size})")
    print(f"masks: {source_count['gt']} ground truth, {source_count['generated']} generated"
          + (f" ({args.mask_method})" if source_count["generated"] else ""))
    if labels:
        classes = sorted({labels[s][0] for s in good})
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
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "interrupted: the split in --data_dir is unchanged; run the command again"))
