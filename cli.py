"""What every script shares as a command: the common flags and what they mean (--device, --amp), refusing
bad input in one line (UsageError, Range, names that become folders), and writing files atomically.

Nothing here knows about lesions, networks or checkpoints; the scripts and dataset.py build on it.
"""
import argparse
import contextlib
import csv
import errno
import itertools
import json
import math
import os
import sys
import threading
import unicodedata

import cv2
import numpy as np
import torch

LABELS_FILE = "labels.csv"  # a data split's labels, and generate.py's, beside folders named after classes
NAME_MAX_BYTES = 100  # class and run names become folder names; well under every file system's 255


# ------------------------------------------------------------------------------- refusing bad input

class UsageError(ValueError):
    """Bad input the user can fix (a flag, a file, a name): reported as one line, never a traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: the full usage of a script with 40 flags buries the actual problem."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class Range:
    """Allowed values of a numeric flag: lo <= x <= hi (bounds None = open; *_open = strict)."""

    def __init__(self, lo=None, hi=None, lo_open=False, hi_open=False):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open

    def __contains__(self, x):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or (isinstance(x, float) and not math.isfinite(x)):
            return False
        return ((self.lo is None or (x > self.lo if self.lo_open else x >= self.lo))
                and (self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)))

    def __str__(self):
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi}")
        return " and ".join(parts) or "a finite number"


def check_ranges(args, limits):
    """Refuse numeric flags outside their Range ({dest: Range}); flags absent from args or None are skipped."""
    for name, allowed in limits.items():
        value = getattr(args, name, None)
        if value is not None and value not in allowed:
            raise UsageError(f"--{name} must be {allowed}, got {value}")


def check_name(name, what="name"):
    """name in NFC form, if it is safe as one folder name and one CSV field; else UsageError. Class and
    run names become folders (<output_dir>/<class>/, pixelgan_models/<run>/) and fields of labels.csv:
    a separator, '..', an absolute path or a leading dot would write outside the folder given, or into a
    hidden one; a line break or other unprintable character would split a printed line or a CSV row
    read by hand. Letters of any script, inner spaces and punctuation such as a comma are fine (the csv
    module quotes them). NFC, because the same accented name typed on another system, or listed back by
    macOS, may come in decomposed form and must still be the same class."""
    problem = None
    if isinstance(name, str):
        name = unicodedata.normalize("NFC", name)
    if not isinstance(name, str) or not name:
        problem = "is empty"
    elif name != name.strip():
        problem = "starts or ends with white space"
    elif name.startswith("."):
        problem = "starts with '.' ('.', '..' and hidden folders are not allowed)"
    elif any(c in name for c in '/\\:*?"<>|'):
        problem = 'contains a path separator or one of : * ? " < > |'
    elif not name.isprintable():  # also line and paragraph separators (U+2028...), which splitlines() breaks at
        problem = "contains a line break, tab or other unprintable character"
    elif len(name.encode("utf-8", "surrogatepass")) > NAME_MAX_BYTES:
        problem = f"is longer than {NAME_MAX_BYTES} bytes"
    elif name.lower() == LABELS_FILE:
        problem = f"would collide with {LABELS_FILE}"
    if problem:
        raise UsageError(f"{what} {name!r} {problem}; it must work as a single folder name")
    return name


def ascii_int(text):
    """The number a file name or CSV field spells in ASCII digits, else None. str.isdigit() is not that
    test: it is true for '²', which int() refuses, and int() itself takes '٣' and surrounding spaces.
    At most 18 digits (an int64), which also keeps int() clear of its 4300-digit limit."""
    if isinstance(text, str) and text.isascii() and text.isdigit() and len(text) <= 18:
        return int(text)
    return None


def physical_memory():
    """Bytes of RAM in this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(n_bytes, what, fix):
    """Refuse work that would need more memory than the machine has, before allocating any of it."""
    total = physical_memory()
    if total and n_bytes > total:
        raise UsageError(f"{what} would need {n_bytes / 2 ** 30:.1f} GiB of memory, this machine has "
                         f"{total / 2 ** 30:.1f} GiB; {fix}")


def describe_os_error(e):
    """One line for a failed file operation, with what to do about the usual causes."""
    hint = {errno.ENOSPC: "free some disk space and run again", errno.EDQUOT: "free some disk space and run again",
            errno.EROFS: "choose a writable output folder", errno.EACCES: "check the permissions or choose another folder",
            errno.EPERM: "check the permissions or choose another folder",
            errno.ENAMETOOLONG: "use a shorter file or folder name",
            errno.EEXIST: "something is already there; choose another name", errno.ENOTDIR: "a file is in the way of a folder",
            errno.EISDIR: "a folder is in the way of a file"}.get(e.errno)
    message = e.strerror or str(e) or type(e).__name__
    if e.filename is not None:
        message = f"{e.filename}: {message}"
    return f"{message} ({hint})" if hint else message


def load_error_detail(e):
    """The informative line of a torch.load failure. torch's weights_only message opens with advice to
    retry with weights_only=False, i.e. to run the file's code: that is never what we tell a user."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Weights only load failed", "Please file an issue",
                                                             "Check the documentation", "WeightsUnpickler error"))]
    return (useful or lines or [type(e).__name__])[0][:200]


def run_cli(main, interrupted="interrupted"):
    """Run a script's main() as a command: bad input, a full or read-only disk, too little memory and
    Ctrl-C end with one line on stderr and a non-zero exit status, never a traceback. interrupted: the
    Ctrl-C message, or a function returning it (train.py says how to resume)."""
    try:
        main()
        return 0
    except KeyboardInterrupt:
        message = interrupted() if callable(interrupted) else interrupted
        print(f"\n{message}", file=sys.stderr)
        return 130
    except ValueError as e:  # UsageError, checkpoints.CheckpointError and the like: messages that name the input
        print(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
        return 1
    except (MemoryError, torch.cuda.OutOfMemoryError):
        print("error: out of memory; lower --batch_size or --img_size", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if "out of memory" in str(e) or "can't allocate memory" in str(e):
            print("error: out of memory; lower --batch_size or --img_size", file=sys.stderr)
            return 1
        raise


# --------------------------------------------------------------------------------- the shared flags

# The defaults of the flags every script has; models.DEFAULT_CONFIG takes its img_size from here. A script
# that renders through a checkpoint takes the checkpoint's own size when the flag is not given.
SHARED_DEFAULTS = dict(device="auto", amp=None, batch_size=16, num_workers=2, img_size=128, seed=0)
AMP_DTYPES = ("auto", "bf16", "fp16")
SHARED_LIMITS = {"batch_size": Range(1, 4096), "num_workers": Range(0, 256), "img_size": Range(16, 1024),
                 "seed": Range(0, 2 ** 63 - 1)}


def add_shared_flags(parser, *names, img_size_from_checkpoint=False, **help):
    """The flags every script shares, defined here once with one default each (bounds: SHARED_LIMITS):
    names, a subset of SHARED_DEFAULTS' keys (default: all), in their order there. help= texts say what a
    flag means in the script that adds it (e.g. batch_size="masks per render call")."""
    d = SHARED_DEFAULTS
    flags = dict(
        device=dict(default=d["device"], help="auto, cpu, cuda, cuda:N or mps"),
        amp=dict(nargs="?", const="auto", default=d["amp"], choices=AMP_DTYPES,
                 help="mixed precision: --amp alone uses bf16 where the hardware runs it natively, else fp16 (CUDA, "
                      "with loss scaling); --amp bf16 or --amp fp16 chooses"),
        batch_size=dict(type=int, default=d["batch_size"]),
        num_workers=dict(type=int, default=d["num_workers"], help="threads or processes decoding images"),
        img_size=dict(type=int, default=None if img_size_from_checkpoint else d["img_size"],
                      help="square image size" + ("; must match the checkpoint's, which is the default"
                                                  if img_size_from_checkpoint else "")),
        seed=dict(type=int, default=d["seed"]),
    )
    for name in names or d:
        options = flags[name]
        if name in help:
            options = {**options, "help": help[name]}
        parser.add_argument(f"--{name}", **options)


def check_device(name):
    """The device a --device flag names, refused here (not deep inside torch) when it is not present."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is available on this machine (use --device cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available on this machine (use --device cpu or auto)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name}: unsupported device type (use auto, cpu, cuda or cuda:N)")
    return name


_WARNED = set()


def warn_once(message):
    """A warning on stderr the first time only: the studies ask autocast_dtype once per model they train."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"warning: {message}", file=sys.stderr)


def autocast_dtype(device, amp):
    """The low-precision dtype for --amp (None or False: off; True or "auto", "bf16", "fp16"), or None for
    fp32. bf16 needs no loss scaling (fp32's exponent range), so it is preferred wherever the hardware runs
    it natively; fp16 is the CUDA fallback."""
    if not amp:
        return None
    requested = "auto" if amp is True else amp
    if device.type == "cuda":
        if requested == "fp16" or (requested == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16
        return torch.bfloat16
    if requested == "fp16":
        warn_once("fp16 autocast is CUDA-only here; using bf16 on the CPU")
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    warn_once("--amp ignored: this CPU has no native bf16 (AVX512-BF16/AMX); training in fp32")
    return None


def autocast(device, dtype):
    """Mixed-precision context for dtype (from autocast_dtype); a no-op for fp32 (dtype None)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


# ------------------------------------------------------------------------------------ writing files

_temp_names = itertools.count()
_temp_lock = threading.Lock()


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside `path` that replaces it only when the block completes: a kill, Ctrl-C or
    full disk never leaves a truncated file (or a truncated replacement of a good one). The temporary
    name is short (a long target name must not overflow NAME_MAX) and keeps the extension, which
    image writers read the format from."""
    folder = os.path.dirname(path)
    with _temp_lock:
        n = next(_temp_names)
    tmp = os.path.join(folder, f".tmp{os.getpid()}_{n}{os.path.splitext(path)[1]}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_csv(path, header, rows):
    """A CSV written atomically (see atomic_path), in UTF-8 whatever the locale: read_label_table reads
    UTF-8, and a class name in another script must come back as it went in."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
            f.flush()
            os.fsync(f.fileno())


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
    """obj as indented strict JSON (NaN and inf become null), written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(json_safe(obj), f, indent=2)
        f.write("\n")


def fmt(value, spec=".4f"):
    """A number for a printed table; None and NaN (a metric that could not be computed) read 'n/a'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def write_image(path, array):
    """An HxW or HxWx3 (BGR) uint8 array as an image file, atomically. Encoded in memory and written with
    Python I/O, so a full disk raises OSError(ENOSPC) instead of cv2.imwrite's bare False."""
    ok, encoded = cv2.imencode(os.path.splitext(path)[1] or ".png", array)
    if not ok:
        raise ValueError(f"{path}: cannot encode the image")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(encoded.tobytes())


def save_png(image_uint8, path):
    """A uint8 C x H x W tensor (C = 1 or 3, RGB) as a PNG, atomically."""
    array = image_uint8.detach().cpu().numpy().transpose(1, 2, 0)
    write_image(path, array[..., 0] if array.shape[2] == 1 else np.ascontiguousarray(array[..., ::-1]))


def save_image_grid(rows, path, columns=False):
    """Save uint8 N x C x H x W batches (C = 1 or 3) as a grid, one batch per row (per column if columns); atomically."""
    from torchvision.utils import make_grid
    grid = torch.stack([r.expand(-1, 3, -1, -1) if r.shape[1] == 1 else r for r in rows])  # kinds x N x 3 x H x W
    if columns:
        grid = grid.transpose(0, 1)
    save_png(make_grid(grid.flatten(0, 1), nrow=grid.shape[1], padding=2), path)
