"""Paired (mask, image) data: find the pairs, decode them once into a uint8 cache, augment both alike.

A split folder is what preprocess.py writes: <split>/masks/<stem>.png and <split>/originals/<stem>.png.
generate.py also accepts a flat folder of masks (no originals). Also here: labels files of the common
formats, and lesion masks as data (checks, jitter, new masks from a shape model of the training masks).
"""
import csv
import math
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from cli import LABELS_FILE, UsageError, ascii_int, check_memory, check_name

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")  # the one list: sources, masks, splits, ids
MAX_PIXELS = 180_000_000  # decompression-bomb guard (preprocess.py uses the same); the largest ISIC images are ~30 MP
EXTREME_ASPECT = 4.0  # width/height beyond this (or below its inverse) is squashed badly by the square resize


def list_images(folder):
    """{stem: path} of the image files in a folder (extension case ignored). Hidden files (macOS '._x.png'
    forks, temporary files) and anything but regular files (a FIFO would block the reader) are left out.
    Pairs, labels and output names are keyed by stem, so of two files with one stem (a.jpg, a.png) the
    first by name is used and the other named on stderr, as preprocess.py does."""
    found = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not name.lower().endswith(IMAGE_EXTENSIONS) or name.startswith(".") or not os.path.isfile(path):
            continue
        stem = os.path.splitext(name)[0]
        if stem in found:
            print(f"skipping {path}: same stem as {found[stem]}", file=sys.stderr)
        else:
            found[stem] = path
    return found


def find_pairs(folder):
    """[(stem, mask_path, image_path or None)] for a split folder or a flat folder of masks."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder")
    mask_folder = os.path.join(folder, "masks")
    if not os.path.isdir(mask_folder):
        return [(stem, path, None) for stem, path in list_images(folder).items()]
    masks = list_images(mask_folder)
    original_folder = os.path.join(folder, "originals")
    originals = list_images(original_folder) if os.path.isdir(original_folder) else {}
    return [(stem, path, originals.get(stem)) for stem, path in masks.items()]


def strip_image_extension(name):
    """'ISIC_1.jpg' -> 'ISIC_1': ids in label files and id lists sometimes carry the image's file name,
    while pairs are matched by stem. Names without an image extension are ids already and stay as given."""
    stem, ext = os.path.splitext(os.path.basename(name))
    return stem if ext.lower() in IMAGE_EXTENSIONS else name


def read_label_table(path):
    """{stem: (class name, lesion id or None)} from a labels CSV. The format is told by its header:
    HAM10000 metadata, ISIC 2017 ground truth, ISIC 2018/2019 one-hot, isic-cli metadata.csv, or plain
    image_id,label / image_id,diagnosis (what preprocess.py writes, with a split column). Class names
    are checked (and NFC-normalised) by check_name; an id listed again with another label, or with none, is
    reported and the last label wins. Refusals are UsageErrors naming the file (and line)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            rows, starts, end = [], [], 0
            for r in reader:  # a quoted field may span lines: messages name the line a row starts on
                rows.append(r)
                starts.append(end + 1)
                end = reader.line_num
    except (UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"{path}: not a readable CSV file ({str(e)[:100]})") from None
    if not rows:
        raise UsageError(f"{path}: empty labels file")
    header = [h.strip() for h in rows[0]]
    low = [h.lower() for h in header]
    col = {h: i for i, h in enumerate(low)}

    def get(r, name):
        i = col.get(name)
        return r[i].strip() if i is not None and i < len(r) else ""

    diag_cols = sorted((h for h in low if h.startswith("diagnosis_") and ascii_int(h[10:]) is not None),
                       key=lambda h: ascii_int(h[10:]))
    onehot = [h for h in header if h.lower() not in ("image", "image_id")]
    if "image_id" in col and "dx" in col:  # HAM10000
        def parse(r):
            return get(r, "image_id"), get(r, "dx").lower(), get(r, "lesion_id") or None
    elif "image_id" in col and "melanoma" in col and "seborrheic_keratosis" in col:  # ISIC 2017
        def parse(r):
            mel, sk = float(get(r, "melanoma") or 0), float(get(r, "seborrheic_keratosis") or 0)
            return get(r, "image_id"), "melanoma" if mel >= 0.5 else "seborrheic_keratosis" if sk >= 0.5 else "nevus", None
    elif low[:1] == ["image"] and {"mel", "nv"} <= set(low):  # ISIC 2018/2019 one-hot
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
        raise UsageError(f"{path}: unrecognised labels header {','.join(header)!r} (expected HAM10000, "
                         "ISIC 2017/2018/2019 ground truth, isic-cli metadata.csv or image_id,label)")
    labels = {}
    for n, r in zip(starts[1:], rows[1:]):
        if not any(v.strip() for v in r):
            continue
        if any(v.strip() for v in r[len(header):]):
            # an unquoted comma in a class name shifts every later field: the row would be read wrongly
            raise UsageError(f"{path}: line {n} has {len(r)} fields but the header {len(header)}; a value holding "
                             'a comma must be quoted ("a,b"), as the csv module writes it')
        notes = []
        try:
            image_id, label, lesion = parse(r)
        except ValueError as e:
            raise UsageError(f"{path}: bad row {','.join(r)!r} ({e})") from None
        for note in notes:
            print(f"warning: {path}: line {n}: {note}", file=sys.stderr)
        if not image_id:
            continue
        if not label:
            print(f"warning: {path}: line {n}: {image_id} has no class; left unlabelled", file=sys.stderr)
            continue
        try:
            label = check_name(label, "class")  # class names become folder names in generate.py --class/--balance
        except UsageError as e:
            raise UsageError(f"{path}: line {n}: {e}") from None
        stem = strip_image_extension(image_id)
        if stem in labels and labels[stem][0] != label:
            print(f"warning: {path}: line {n}: {stem} is listed again with another label ({labels[stem][0]!r}, "
                  f"now {label!r}); using {label!r}", file=sys.stderr)
        labels[stem] = (label, lesion)
    return labels


def read_labels(path):
    """{stem: class name} from a split's labels.csv (see read_label_table): `path` is the file itself,
    or a folder holding it ({} when the folder has none: unlabelled data is normal)."""
    if os.path.isdir(path) or not os.path.exists(path):
        path = os.path.join(path, LABELS_FILE)
        if not os.path.isfile(path):
            return {}
    if os.path.getsize(path) == 0:  # an empty labels.csv labels nothing, like a missing one
        return {}
    return {stem: label for stem, (label, _) in read_label_table(path).items()}


def binarize_mask(mask):
    """uint8 0/255 mask from a single-channel uint8 mask, and the threshold used. A clean two-level mask
    0/k splits at k/2, so 0/1 label maps (which a fixed 127 reads as empty) keep their lesion; anything
    else (JPEG-blurred, anti-aliased) splits at 127 as always."""
    present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256)) if mask.size else np.zeros(1, int)
    if present.max() <= 1:
        threshold = 0
    elif len(present) == 2 and present[0] == 0:
        threshold = int(present[1]) // 2
    else:
        threshold = 127
    return np.where(mask > threshold, 255, 0).astype(np.uint8), threshold


def check_image_size(path):
    """(width, height) from the header alone; refuses decompression bombs before anything is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, in one line
            with Image.open(path) as im:
                w, h = im.size
    except Image.DecompressionBombError as e:
        raise UsageError(f"{path}: too large ({e})") from None
    except Exception:  # PIL does not know every format OpenCV reads; cv2 has its own pixel limit
        return None
    if w * h > MAX_PIXELS:
        raise UsageError(f"{path}: too large: {w}x{h} = {w * h / 1e6:.0f} MP exceeds the {MAX_PIXELS / 1e6:.0f} MP limit")
    return w, h


def _aspect_note(path, shape):
    h, w = shape[:2]
    if h and w and max(w / h, h / w) > EXTREME_ASPECT:
        return f"{path}: extreme aspect ratio {w}x{h}; squashed to a square"
    return None


def _decode(path, flags, notes):
    """The image at path as cv2.imread reads it with flags, its size checked first; a note on an extreme
    aspect ratio (or None) is appended to notes when given."""
    check_image_size(path)
    array = cv2.imread(path, flags)
    if array is None:
        raise ValueError(f"{path}: cannot be read as an image")
    if notes is not None:
        notes.append(_aspect_note(path, array.shape))
    return array


def read_mask(path, size, notes=None):
    mask, _ = binarize_mask(_decode(path, cv2.IMREAD_GRAYSCALE, notes))
    return cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)[None]


def read_image(path, size, notes=None):
    # INTER_AREA averages when shrinking, so fine texture does not alias into noise.
    image = cv2.resize(_decode(path, cv2.IMREAD_COLOR, notes), (size, size), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB).transpose(2, 0, 1))


class RandomRot90(v2.Transform):
    """Rotation by a random multiple of 90 degrees: exact (no resampling) and the same for every input."""

    def make_params(self, flat_inputs):
        return dict(k=int(torch.randint(4, ()).item()))

    def transform(self, inpt, params):
        if not isinstance(inpt, torch.Tensor):
            return inpt
        rotated = torch.rot90(inpt.as_subclass(torch.Tensor), params["k"], (-2, -1))
        return tv_tensors.wrap(rotated, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else rotated


def paired_augmentation(crop_size=None):
    """Flips and 90-degree rotations (the 8 symmetries of the square): lesions have no canonical
    orientation, and none of these resamples pixels. v2 applies one draw to the image and its Mask.
    With crop_size, first a random crop of that size from pairs decoded larger (pix2pix's random jitter):
    more different pairs from few photographs, and their vignette at a new distance from the edge each time."""
    crop = [v2.RandomCrop(crop_size)] if crop_size else []
    return v2.Compose([*crop, v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), RandomRot90()])


def mask_jitter(img_size):
    """New lesion shapes from real ones: any rotation, flips, a little scale and shift, and an elastic
    warp of the outline. tv_tensors.Mask makes v2 use nearest-neighbour, so masks stay binary."""
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomAffine(degrees=180, translate=(0.06, 0.06), scale=(0.85, 1.15)),
        v2.ElasticTransform(alpha=img_size * 0.4, sigma=img_size * 0.06),
    ])


def jitter_masks(masks_uint8, seed):
    """One jittered copy of each mask (uint8 N x 1 x S x S); an emptied mask falls back to its original."""
    torch.manual_seed(seed)
    jitter = mask_jitter(masks_uint8.shape[-1])
    out = torch.stack([jitter(tv_tensors.Mask(m)).as_subclass(torch.Tensor) for m in masks_uint8])
    empty = out.flatten(1).amax(1) == 0
    out[empty] = masks_uint8[empty]
    return out


class PairedDataset(torch.utils.data.Dataset):
    """All pairs of a split decoded once into uint8 tensors at img_size (N x 1 x S x S masks,
    N x 3 x S x S images), so no epoch ever decodes a JPEG or PNG again."""

    def __init__(self, folder, img_size, augment=False, labels=None, classes=(), num_workers=4, jitter=0.0):
        """jitter (with augment): pairs are decoded (1 + jitter) x img_size large and each draw is a random
        img_size crop of them; center_images() gives the img_size view of the whole split."""
        pairs = find_pairs(folder)
        if not pairs:
            raise ValueError(f"{folder}: no mask images found")
        self.folder = folder
        self.names = [stem for stem, _, _ in pairs]
        self.has_images = all(image_path is not None for _, _, image_path in pairs)
        if not self.has_images and any(image_path is not None for _, _, image_path in pairs):
            missing = next(mask_path for _, mask_path, image_path in pairs if image_path is None)
            raise ValueError(f"{missing}: mask has no matching image in {os.path.join(folder, 'originals')}")
        self.img_size = img_size
        load_size = round(img_size * (1 + jitter)) if augment else img_size
        check_memory(len(pairs) * (4 if self.has_images else 1) * load_size ** 2,
                     f"{folder}: {len(pairs)} pairs decoded at {load_size}x{load_size}", "use a smaller --img_size or fewer images")
        notes = []
        with ThreadPoolExecutor(max(1, num_workers)) as pool:  # OpenCV releases the GIL while decoding
            masks = list(pool.map(lambda p: read_mask(p[1], load_size, notes), pairs))
            images = list(pool.map(lambda p: read_image(p[2], load_size), pairs)) if self.has_images else None
        for note in sorted(n for n in notes if n):
            print(f"warning: {note}", file=sys.stderr)
        # Usable but suspicious: the generator learns nothing about lesion shape from these.
        for kind, test in (("covers the whole image", lambda m: m.min() == 255), ("is empty", lambda m: m.max() == 0)):
            odd = [name for name, m in zip(self.names, masks) if test(m)]
            if odd:
                print(f"warning: {folder}: the mask of {', '.join(odd[:5])}{' ...' if len(odd) > 5 else ''} "
                      f"({len(odd)} in all) {kind}", file=sys.stderr)
        self.masks = torch.from_numpy(np.stack(masks))
        self.images = torch.from_numpy(np.stack(images)) if images is not None else None
        labels = labels or {}
        self.classes = list(classes)
        self.labels = torch.tensor([self.classes.index(labels[n]) if labels.get(n) in self.classes else -1
                                    for n in self.names], dtype=torch.long)
        self.transform = paired_augmentation(img_size if load_size > img_size else None) if augment else None

    def center_images(self):
        """The images as img_size squares (the middle of each when decoded larger for jitter)."""
        return v2.functional.center_crop(self.images, [self.img_size, self.img_size])

    def center_masks(self):
        """The masks as center_images crops them."""
        return v2.functional.center_crop(self.masks, [self.img_size, self.img_size])

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        mask = self.masks[index]
        image = self.images[index] if self.images is not None else torch.zeros((3,) + mask.shape[1:], dtype=torch.uint8)
        if self.transform is not None:
            image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
            image, mask = image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)
        return mask, image, self.labels[index], index


def to_model_range(uint8_batch, device, memory_format=torch.contiguous_format):
    """uint8 [0, 255] -> float [-1, 1] on the device (transfer the 4x smaller uint8, convert there)."""
    x = uint8_batch.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=memory_format)


def to_uint8(batch):
    """float [-1, 1] -> uint8 [0, 255] on the CPU."""
    return ((batch.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


# ------------------------------------------------------------------------------------- new lesion masks

MASK_METHODS = ("elastic", "fourier")
MASK_MARGIN = 0.02  # share of the side a new lesion keeps clear of the frame: one touching it looks cut off
MIN_AREA = 0.005  # share of the image below which a new "lesion" is a speck, not a lesion
MASK_TRIES = 100  # draws per new mask before giving up (a few percent fail the checks in practice)
FOURIER_TERMS = 12  # harmonics kept each side: enough for lobes and notches, too few for pixel noise
# the orders a shape vector holds: 1 is the size and rotation every outline is divided by, 0 its position
FOURIER_ORDERS = np.r_[-FOURIER_TERMS:0, 2:FOURIER_TERMS + 1]
CONTOUR_POINTS = 128


def mask_problem(mask, margin=1):
    """Why a 2-D mask (nonzero = lesion) is not one whole lesion inside the frame, or None: empty, all
    lesion, several parts, a hole, or lesion within `margin` pixels of the frame."""
    m = np.asarray(mask) > 0
    if not m.any():
        return "is empty"
    if m.all():
        return "is all lesion"
    parts = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)[0] - 1
    if parts > 1:
        return f"has {parts} separate parts"
    # a hole is background that cannot reach the frame; 4-connected, the dual of 8-connected lesion
    outside = cv2.connectedComponents(np.pad(~m, 1, constant_values=True).astype(np.uint8), connectivity=4)[0] - 1
    if outside > 1:
        return "has a hole"
    b = max(1, int(margin))
    if m[:b].any() or m[-b:].any() or m[:, :b].any() or m[:, -b:].any():
        return "touches the frame"
    return None


def _one_lesion(m):
    """A deformed mask with its holes filled and specks (< 5% of the largest part) dropped; a second
    large part is kept, so the checks reject it instead of a cut silently changing the shape."""
    from scipy import ndimage
    n, parts, stats, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
    if n <= 1:
        return m.astype(bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.flatnonzero(areas >= 0.05 * areas.max()) + 1
    return ndimage.binary_fill_holes(np.isin(parts, keep))


def _place(points, size, margin, rng):
    """The 2x3 affine matrix that moves a shape (points N x 2, x y) to a random place inside the frame,
    shrunk first if it does not fit between the margins."""
    lo, hi = points.min(0), points.max(0)
    room = size - 1 - 2 * margin
    shrink = min(1.0, room / max(float((hi - lo).max()), 1e-6))
    lo, hi = lo * shrink, hi * shrink
    low, high = margin - lo, margin + room - hi
    offset = rng.uniform(low, np.maximum(low, high))  # equal when the shape was shrunk to fit (but for rounding)
    return np.array([[shrink, 0, offset[0]], [0, shrink, offset[1]]])


def _elastic_candidate(source, size, margin, rng):
    """A training mask under a smooth random displacement field, then rotated, scaled, stretched along
    a random axis and placed inside the frame. The float mask is warped with linear interpolation and
    thresholded at 1/2, so outlines stay smooth instead of taking nearest-neighbour stairs."""
    m = source.astype(np.float32)
    smooth = size * 0.1  # displacement correlated over ~10% of the side: the outline bends, never frays
    field = [cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), smooth) for _ in range(2)]
    strength = size * rng.uniform(0.01, 0.04)
    dx, dy = (f * (strength / (f.std() + 1e-8)) for f in field)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    m = cv2.remap(m, xx + dx, yy + dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    ys, xs = np.nonzero(m > 0.5)
    if not len(xs):
        return m > 0.5
    centre = np.array([xs.mean(), ys.mean()])
    angle, axis = rng.uniform(0, 2 * np.pi, 2)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    along = np.array([np.cos(axis), np.sin(axis)])
    stretch = np.eye(2) + (np.exp(rng.normal(0, 0.15)) - 1) * np.outer(along, along)
    linear = np.exp(rng.normal(0, 0.12)) * rot @ stretch
    points = (np.stack([xs, ys], 1) - centre) @ linear.T
    place = _place(points, size, margin, rng)
    # source pixel -> centred -> linear -> placed
    matrix = np.hstack([place[:, :2] @ linear, (place[:, :2] @ (-linear @ centre) + place[:, 2])[:, None]])
    warped = cv2.warpAffine(m, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)
    # a pixel-wide blur before the threshold: the warp roughens a staircase outline, real outlines are smooth
    return cv2.GaussianBlur(warped, (0, 0), size / 128) > 0.5


def _outline(mask):
    """The outer contour of a mask's largest part, CONTOUR_POINTS points evenly spaced along it, as
    complex numbers x + iy."""
    contours = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)[0]
    c = max(contours, key=cv2.contourArea)[:, 0, :].astype(np.float64)
    closed = np.vstack([c, c[:1]])
    t = np.concatenate([[0], np.cumsum(np.hypot(*np.diff(closed, axis=0).T))])
    u = np.linspace(0, t[-1], CONTOUR_POINTS, endpoint=False)
    return np.interp(u, t, closed[:, 0]) + 1j * np.interp(u, t, closed[:, 1])


def _fourier_descriptor(mask):
    """(shape vector, size) of a mask's outline: its Fourier coefficients of order -T..T divided by the
    first (which removes size and rotation), with the starting point moved to the end of the outline's
    best-fitting ellipse (which removes where the contour happened to start), so that the same shape
    drawn anywhere gives the same vector."""
    z = _outline(mask)
    spectrum = np.fft.fft(z) / len(z)
    if abs(spectrum[-1]) > abs(spectrum[1]):  # traced the other way round: reverse
        z = z[::-1]
        spectrum = np.fft.fft(z) / len(z)
    k = np.fft.fftfreq(len(z), 1 / len(z))
    shift = np.angle(spectrum[-1] / spectrum[1]) / 2
    for s in (shift, shift + np.pi):  # the ellipse has two ends; take the one that makes harmonic 2 lean right
        c = spectrum * np.exp(1j * k * s)
        c = c / c[1]
        if c[2].real >= 0:
            break
    coeffs = c[FOURIER_ORDERS]
    return np.concatenate([coeffs.real, coeffs.imag]), abs(spectrum[1])


def _fourier_candidate(model, size, margin, rng):
    """An outline drawn from a class's shape model (the mean shape vector plus a random combination of
    the centred real ones: a Gaussian with their covariance, i.e. a PCA model with every component),
    at the size of a random real lesion of the class, any rotation, anywhere inside the frame."""
    mean, centred, sizes = model
    vector = mean + centred.T @ rng.standard_normal(len(centred)) / math.sqrt(max(len(centred) - 1, 1))
    half = len(vector) // 2
    coeffs = np.zeros(CONTOUR_POINTS, complex)
    coeffs[FOURIER_ORDERS] = vector[:half] + 1j * vector[half:]
    coeffs[1] = 1
    scale = rng.choice(sizes) * np.exp(rng.normal(0, 0.1)) * np.exp(1j * rng.uniform(0, 2 * np.pi))
    z = np.fft.ifft(coeffs * scale) * CONTOUR_POINTS
    points = np.stack([z.real, z.imag], 1)
    place = _place(points - points.mean(0), size, margin, rng)
    placed = (points - points.mean(0)) @ place[:, :2].T + place[:, 2]
    canvas = np.zeros((size, size), np.uint8)
    cv2.fillPoly(canvas, [np.round(placed * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return canvas > 0


def mask_shape_stats(masks):
    """{"area_fraction", "compactness", "eccentricity"}: one value per mask (uint8 N x 1 x S x S or
    N x S x S). compactness is perimeter^2 / area (4 pi for a disc, more for a ragged outline);
    eccentricity that of the ellipse with the mask's second moments (0 round, towards 1 elongated)."""
    out = {"area_fraction": [], "compactness": [], "eccentricity": []}
    for m in np.asarray(masks).reshape(len(masks), *np.asarray(masks).shape[-2:]):
        m = (m > 0).astype(np.uint8)
        area = float(m.sum())
        contours = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)[0]
        perimeter = sum(cv2.arcLength(c, True) for c in contours)
        mo = cv2.moments(m, binaryImage=True)
        if area == 0:
            values = (0.0, math.nan, math.nan)
        else:
            a, b, c = mo["mu20"] / mo["m00"], mo["mu02"] / mo["m00"], mo["mu11"] / mo["m00"]
            root = math.sqrt(((a - b) / 2) ** 2 + c * c)
            major, minor = (a + b) / 2 + root, (a + b) / 2 - root
            values = (area / m.size, perimeter ** 2 / area, math.sqrt(max(0.0, 1 - minor / major)) if major > 0 else 0.0)
        for key, v in zip(out, values):
            out[key].append(v)
    return {k: np.array(v) for k, v in out.items()}


def mask_shape_report(real, new):
    """How close the shape statistics of new masks are to those of real ones: per statistic the
    two-sample Kolmogorov-Smirnov distance (0 = same distribution, 1 = disjoint) and p-value, and
    both medians."""
    from scipy.stats import ks_2samp
    a, b = mask_shape_stats(real), mask_shape_stats(new)
    report = {}
    for key in a:
        x, y = a[key][np.isfinite(a[key])], b[key][np.isfinite(b[key])]
        test = ks_2samp(x, y)
        report[key] = {"ks": float(test.statistic), "p": float(test.pvalue),
                       "real_median": float(np.median(x)), "new_median": float(np.median(y))}
    return report


def new_masks(masks_uint8, n, seed=0, labels=None, method="elastic", names=None):
    """n lesion masks that are not in masks_uint8 (uint8 N x 1 x S x S): each one lesion, without holes,
    clear of the frame by MASK_MARGIN and at least MIN_AREA of the image; a draw that fails is drawn
    again. elastic: a training mask deformed (smooth random displacement, rotation, scale, stretch,
    placement); fourier: an outline sampled from a shape model of the training outlines. labels (one
    per mask, or None): each new mask takes the class of the training mask(s) it comes from, and the
    classes keep their training shares. Masks that are empty or all lesion have no outline to deform;
    they are left out with a warning naming them (names, one per mask). Returns (uint8 n x 1 x S x S,
    labels of the new masks or None, report: the KS distances of mask_shape_report and the redraws)."""
    if method not in MASK_METHODS:
        raise UsageError(f"unknown mask method {method!r}; choose from {', '.join(MASK_METHODS)}")
    masks = masks_uint8.numpy()[:, 0] > 0
    size = masks.shape[-1]
    names = list(names) if names is not None else [f"mask {i}" for i in range(len(masks))]
    usable = []
    for i, m in enumerate(masks):
        if not m.any() or m.all():
            print(f"warning: {names[i]}: {'empty' if not m.any() else 'all lesion'}; no outline to make new masks from, "
                  "left out", file=sys.stderr)
        else:
            usable.append(i)
    if not usable:
        where = os.path.dirname(names[0]) or names[0] if names else "masks_uint8"
        raise UsageError(f"{where}: no mask with a lesion outline to make new masks from (each is empty or all lesion)")
    groups = {}
    for i in usable:
        groups.setdefault(labels[i] if labels is not None else None, []).append(i)
    rng = np.random.default_rng(seed)
    margin = max(1, round(MASK_MARGIN * size))
    if method == "fourier":
        shapes = {}
        for key, members in groups.items():
            vectors, sizes = zip(*(_fourier_descriptor(masks[i]) for i in members))
            vectors = np.stack(vectors)
            shapes[key] = (vectors.mean(0), vectors - vectors.mean(0), np.array(sizes))
    # cycling through the shuffled training masks keeps every class's share and uses each mask about equally
    order = np.array(usable)[rng.permutation(len(usable))]
    picks = np.resize(order, n)
    out, out_labels, redraws = np.zeros((n, 1, size, size), np.uint8), [], 0
    for j, i in enumerate(picks):
        key = labels[i] if labels is not None else None
        for attempt in range(MASK_TRIES):
            # a redraw deforms another mask of the class: one with two big parts would never pass
            source = i if attempt == 0 else rng.choice(groups[key])
            if method == "elastic":
                candidate = _elastic_candidate(masks[source], size, margin, rng)
            else:
                candidate = _fourier_candidate(shapes[key], size, margin, rng)
            candidate = _one_lesion(candidate)
            if mask_problem(candidate, margin) is None and candidate.mean() >= MIN_AREA:
                break
            redraws += 1
        else:
            raise UsageError(f"{names[i]}: no acceptable new mask in {MASK_TRIES} draws from the masks of its class")
        out[j, 0] = candidate * 255
        out_labels.append(key)
    new = torch.from_numpy(out)
    report = {"method": method, "n": n, "seed": seed, "redraws": redraws, "n_source_masks": len(usable),
              "shape_ks": mask_shape_report(masks[usable], out)}
    return new, (out_labels if labels is not None else None), report


def shape_ks_line(report):
    """One printed line of a new_masks report."""
    ks = report["shape_ks"]
    return (f"{report['n']} new masks ({report['method']}) vs {report['n_source_masks']} real: KS distance "
            + ", ".join(f"{k.replace('_', ' ')} {v['ks']:.3f}" for k, v in ks.items()) + f"; {report['redraws']} redrawn")
