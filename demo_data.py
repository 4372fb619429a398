"""Procedurally generated dermoscopy-like lesions, for trying the pipeline with no data at hand
(preprocess.py --demo N).

Three classes in roughly the ISIC 2017 mix (melanoma, seborrheic keratosis, nevus), each with its own
outline irregularity, pigment, dots and network, on skin with hairs and, sometimes, a dermoscope's
vignette. Every image comes with its exact ground-truth mask and label, and all of it is deterministic
in (n, seed), so a demo run can be repeated byte for byte.
"""
import os
import shutil
from pathlib import Path

import cv2
import numpy as np

from cli import LABELS_FILE, UsageError, write_csv, write_image

DEMO_MARKER = ".pixelgan_demo"  # in a folder --demo wrote: "<n> <seed>"; only such a folder is ever replaced


def _smooth_noise(rng, h, w, cells):
    """Low-frequency noise in [0, 1]: a coarse random grid blown up with bicubic interpolation."""
    g = rng.random((cells, max(2, round(cells * w / h)))).astype(np.float32)
    n = cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)
    return (n - n.min()) / (n.max() - n.min() + 1e-6)


def _demo_one(rng, cls):
    """One (RGB image, 0/255 mask) of class cls, every random choice drawn from rng."""
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
    """The demo set itself, written into out_dir (make_demo_dataset's staging folder)."""
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
