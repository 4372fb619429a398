"""Hostile and careless input (issue 14): nothing lost, nothing written where it does not belong, no tracebacks.

Each test builds its bad input on the fly in a temp folder and asserts what the protection promises,
so it fails if that protection breaks. Scripts run in-process through cli.run_cli (what their
__main__ does); two tests start real processes for the entry points themselves (Ctrl-C, a bad file).
"""
import argparse
import csv
import errno
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch

import checkpoints
import dataset
import downstream
import evaluate
import generate
import metrics
import preprocess
import train
from cli import UsageError, atomic_path, run_cli
from conftest import ROOT, TINY_MODEL, write_dataset


def cli(capsys, module, *argv, interrupted="interrupted"):
    """Run a script as its __main__ does: (exit status, stderr)."""
    capsys.readouterr()
    try:
        code = run_cli(lambda: module.main([str(a) for a in argv]), interrupted)
    except SystemExit as e:  # argparse exits by itself
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def refused(code, err, *words):
    """A refusal: non-zero status, one line on stderr, naming what it is about."""
    lines = [line for line in err.strip().splitlines() if not line.startswith(("warning:", "note:", "skipping"))]
    assert code not in (0, None), err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def tree(root):
    """{relative path: bytes} of every file under root."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def raw_images(folder, n, size=(48, 40)):
    """n dermoscopy-like JPEGs (dark blob on skin) and their 0/255 masks in folder/{images,masks}."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    os.makedirs(os.path.join(folder, "masks"), exist_ok=True)
    w, h = size
    for i in range(n):
        mask = np.zeros((h, w), np.uint8)
        cv2.ellipse(mask, (w // 2 + i % 5, h // 2), (w // 5, h // 5), 0, 0, 360, 255, -1)
        image = np.full((h, w, 3), (160, 180, 220), np.uint8)
        image[mask > 0] = (40, 60, 90)
        cv2.imwrite(os.path.join(folder, "images", f"img_{i:02d}.jpg"), image)
        cv2.imwrite(os.path.join(folder, "masks", f"img_{i:02d}.png"), mask)
    return os.path.join(folder, "images"), os.path.join(folder, "masks")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run shared by the tests that need a model: (data dir, model dir, root)."""
    root = tmp_path_factory.mktemp("run")
    data = write_dataset(str(root / "data"), n_train=6, n_test=3)
    model_dir = train.main(["--data_dir", data, *TINY_MODEL, "--models_dir", str(root / "models"),
                            "--outputs_dir", str(root / "outputs"), "--batch_size", "3", "--n_epochs", "1",
                            "--run_name", "r"])
    return data, model_dir, root


# ------------------------------------------------------------------------------------ 1. code execution

class Payload:
    """Unpickling this runs os.makedirs(marker): what a crafted weights file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, still what such files are
def test_weights_files_never_run_code(run, tmp_path, capsys):
    data, model_dir, _ = run
    marker = str(tmp_path / "pwned")
    evil = tmp_path / "inception.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "x": Payload(marker)}, evil)
    model, reason = metrics.load_inception(evil)
    assert model is None and "refused" in reason and not os.path.exists(marker)
    code, err = cli(capsys, evaluate, "--model_folder", model_dir, "--data_dir", data, "--inception_weights", evil,
                    "--output_dir", tmp_path / "eval", "--n_variations", "0", "--num_workers", "1")
    refused(code, err, "--inception_weights", str(evil), "refused")
    assert not os.path.exists(marker) and not (tmp_path / "eval").exists()  # refused before any work
    # TorchScript carries code: only the one known file (by sha1) is accepted
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    model, reason = metrics.load_inception(scripted)
    assert model is None and "TorchScript" in reason
    # checkpoints: the same payload in a generator checkpoint
    ckpt = tmp_path / "generator_epoch_9.pth"
    torch.save({"config": {}, "generator": Payload(marker)}, ckpt)
    with pytest.raises(checkpoints.CheckpointError):
        checkpoints.load_generator(str(ckpt))
    assert not os.path.exists(marker)


# ------------------------------------------------------------------------- 2. writes outside the folder

BAD_CLASSES = ["../../x", "/abs/path", "..", ".", "a/b", "labels.csv"]


@pytest.mark.parametrize("name", BAD_CLASSES)
def test_class_names_cannot_escape_the_output_folder(run, tmp_path, capsys, name):
    data, model_dir, _ = run
    labels = tmp_path / "labels.csv"
    stems = [n[:-4] for n in sorted(os.listdir(os.path.join(data, "train", "masks")))]
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "label", "split"])
        w.writerows([(stem, name if i % 2 else "nevus", "train") for i, stem in enumerate(stems)])
    out = tmp_path / "deep" / "out"
    for extra in (["--balance"], ["--class", "nevus"]):
        code, err = cli(capsys, generate, "--model_folder", model_dir, "--input_dir", os.path.join(data, "train"),
                        "--labels", labels, "--output_dir", out, *extra)
        refused(code, err, str(labels), repr(name))
    code, err = cli(capsys, generate, "--model_folder", model_dir, "--input_dir", os.path.join(data, "train"),
                    "--class", name, "--output_dir", out)
    refused(code, err, "--class", repr(name))
    # preprocess reads the same file as --labels and refuses it too, before writing a split
    src, masks = raw_images(str(tmp_path / "raw"), 4)
    with open(tmp_path / "raw_labels.csv", "w") as f:
        f.write("image_id,label\n" + "".join(f"img_{i:02d},{name if i else 'nevus'}\n" for i in range(4)))
    before = tree(tmp_path)
    code, err = cli(capsys, preprocess, "--source_dir", src, "--mask_dir", masks, "--labels", tmp_path / "raw_labels.csv",
                    "--data_dir", tmp_path / "pdata", "--img_size", 16)
    refused(code, err, "raw_labels.csv", "line 3", repr(name))
    assert tree(tmp_path) == before  # nothing written by any of the four refusals
    assert not (tmp_path / "deep").exists() and not (tmp_path / "pdata").exists()


# ------------------------------------------------------------------------------------ 3. data destroyed

def split_files(data):
    return {k: v for k, v in tree(data).items() if k.split(os.sep)[0] in ("train", "test", "labels.csv")}


def test_user_data_is_never_destroyed(tmp_path, capsys, monkeypatch):
    src, masks = raw_images(str(tmp_path / "raw"), 8)
    data = tmp_path / "data"
    assert cli(capsys, preprocess, "--source_dir", src, "--mask_dir", masks, "--data_dir", data, "--img_size", 16)[0] == 0
    old_split = split_files(data)
    assert old_split and any(k.startswith("test") for k in old_split)

    # --demo into a folder holding the user's images: refused, nothing touched
    before = tree(tmp_path / "raw")
    code, err = cli(capsys, preprocess, "--demo", 5, "--source_dir", tmp_path / "raw", "--data_dir", tmp_path / "d2")
    refused(code, err, str(tmp_path / "raw"), "--demo")
    assert tree(tmp_path / "raw") == before

    # --overwrite with input that turns out unusable: the old split stays
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"not a jpeg")
    code, err = cli(capsys, preprocess, "--source_dir", bad, "--data_dir", data, "--overwrite")
    refused(code, err, "nothing usable")
    assert split_files(data) == old_split

    # --overwrite whose source lies inside what it replaces: refused before reading or deleting anything
    code, err = cli(capsys, preprocess, "--source_dir", data / "train" / "originals", "--data_dir", data, "--overwrite")
    refused(code, err, "--source_dir", "inside")
    assert split_files(data) == old_split

    # a full disk half-way: non-zero exit, the old split whole, no partial new one, no staging left behind
    calls = []
    real_write = preprocess.write_image

    def full_disk(path, array):
        calls.append(path)
        if len(calls) > 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real_write(path, array)

    monkeypatch.setattr(preprocess, "write_image", full_disk)
    code, err = cli(capsys, preprocess, "--source_dir", src, "--mask_dir", masks, "--data_dir", data, "--overwrite",
                    "--img_size", 24, "--num_workers", 2)
    refused(code, err, "No space left on device", f"nothing in {data} was changed")
    assert split_files(data) == old_split
    assert sorted(os.listdir(data)) == ["test", "train"]  # no staging folder or temporary file left


# ------------------------------------------------------------------------------------- 4. runs mixed up

def test_run_folders_are_claimed_atomically(tmp_path, capsys, monkeypatch):
    models_dir, outputs_dir = str(tmp_path / "models"), str(tmp_path / "outputs")
    monkeypatch.setattr(train.time, "strftime", lambda fmt: "20240101_120000")  # two starts in the same second
    first = train.claim_run_folders(models_dir, outputs_dir)
    second = train.claim_run_folders(models_dir, outputs_dir)
    assert first[0] == "20240101_120000" and second[0] == "20240101_120000_2"
    assert os.path.isdir(second[1]) and os.path.isdir(second[2])
    (tmp_path / "models" / "keep").mkdir()
    (tmp_path / "models" / "keep" / "generator_epoch_99.pth").write_bytes(b"old run")
    code, err = cli(capsys, train, "--data_dir", tmp_path / "nodata", "--models_dir", models_dir, "--outputs_dir",
                    outputs_dir, "--run_name", "keep")
    refused(code, err, "keep", "--resume")
    with pytest.raises(UsageError, match="--resume"):  # the atomic claim itself, if two runs race past the check
        train.claim_run_folders(models_dir, outputs_dir, "keep")
    assert (tmp_path / "models" / "keep" / "generator_epoch_99.pth").read_bytes() == b"old run"
    code, err = cli(capsys, train, "--run_name", "../escape", "--models_dir", models_dir)
    refused(code, err, "--run_name")
    assert not (tmp_path / "escape").exists()


# ----------------------------------------------------- 5. a checkpoint's saved arguments steer nothing

def test_crafted_checkpoint_steers_no_output_and_allocates_nothing(run, tmp_path, capsys):
    data, model_dir, _ = run
    state = torch.load(os.path.join(model_dir, "last.pth"), weights_only=True)
    evil = tmp_path / "evil"
    state["args"].update(outputs_dir=str(evil), models_dir=str(evil), run_name="x", data_dir=data)
    crafted = tmp_path / "models" / "crafted"
    crafted.mkdir(parents=True)
    torch.save(state, crafted / "last.pth")
    code, err = cli(capsys, train, "--resume", crafted, "--n_epochs", state["epoch"] + 1, "--outputs_dir",
                    tmp_path / "outputs", "--lr", "0.1", "--batch_size", "2")
    assert code == 0, err
    assert not evil.exists()
    assert (tmp_path / "outputs" / "crafted" / "metrics.csv").exists()
    assert (crafted / f"generator_epoch_{state['epoch'] + 1}.pth").exists()
    note = [line for line in err.splitlines() if "ignoring" in line]
    assert note and "--lr" in note[0] and "--batch_size" in note[0] and "--n_epochs" not in note[0]

    # a config asking for absurd widths is refused before anything is built (no time, no memory)
    for key, value in (("ngf", 10 ** 6), ("img_size", 2 ** 20), ("noise_dim", "8"), ("n_classes", 5)):
        bad = dict(state, config={**state["config"], key: value})
        torch.save(bad, crafted / "last.pth")
        started = time.perf_counter()
        code, err = cli(capsys, train, "--resume", crafted, "--outputs_dir", tmp_path / "outputs")
        refused(code, err, str(crafted / "last.pth"))
        assert time.perf_counter() - started < 5
        torch.save({"kind": "generator", "config": bad["config"], "generator": state["generator"]}, tmp_path / "g.pth")
        with pytest.raises(checkpoints.CheckpointError, match="g.pth"):
            checkpoints.load_generator(str(tmp_path / "g.pth"))
    # widths within bounds but weights of other shapes: refused by comparing shapes, still before building
    bad = {"kind": "generator", "config": {**state["config"], "ngf": 64}, "generator": state["generator"]}
    torch.save(bad, tmp_path / "g.pth")
    with pytest.raises(checkpoints.CheckpointError, match="do not match"):
        checkpoints.load_generator(str(tmp_path / "g.pth"))


# -------------------------------------------------------------------------------- 6. flags read wrongly

def test_labels_flag_and_zero_one_masks(run, tmp_path, capsys):
    data, model_dir, _ = run
    # --labels FILE is FILE, not the labels.csv beside it
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    stems = [n[:-4] for n in sorted(os.listdir(os.path.join(data, "train", "masks")))]
    (elsewhere / "labels.csv").write_text("image_id,label\n" + "".join(f"{s},decoy\n" for s in stems))
    (elsewhere / "mine.csv").write_text("image_id,label\n" + "".join(f"{s},chosen\n" for s in stems))
    out = tmp_path / "out"
    code, err = cli(capsys, generate, "--model_folder", model_dir, "--input_dir", os.path.join(data, "train"),
                    "--labels", elsewhere / "mine.csv", "--class", "chosen", "--num_images", 2, "--output_dir", out)
    assert code == 0, err
    assert sorted(os.listdir(out / "chosen")) == ["gen_0.png", "gen_1.png"] and not (out / "decoy").exists()
    code, err = cli(capsys, generate, "--model_folder", model_dir, "--input_dir", os.path.join(data, "train"),
                    "--labels", elsewhere / "missing.csv", "--class", "chosen", "--output_dir", out)
    refused(code, err, "missing.csv")

    # a 0/1 mask is a lesion mask in generate.py as in preprocess.py
    flat = tmp_path / "flat"
    flat.mkdir()
    m = np.zeros((40, 40), np.uint8)
    m[10:30, 12:28] = 1
    cv2.imwrite(str(flat / "zero_one.png"), m)
    read = dataset.read_mask(str(flat / "zero_one.png"), 40)[0]
    assert np.array_equal(read, m * 255)
    assert np.array_equal(preprocess.load_mask(flat / "zero_one.png")[0], read)
    code, err = cli(capsys, generate, "--model_folder", model_dir, "--input_dir", flat, "--output_dir", tmp_path / "g")
    assert code == 0 and "empty" not in err, err
    panel = cv2.imread(str(tmp_path / "g" / "generated_zero_one.png"), cv2.IMREAD_GRAYSCALE)
    assert panel[2:34, 2:34].max() == 255 and (panel[2:34, 2:34] == 255).mean() > 0.2  # the mask panel (first column)


# --------------------------------------------------------------------------- range checks at parse time

RANGES = [
    (train, "--batch_size", 0), (train, "--batch_size", 10 ** 9), (train, "--n_epochs", 0), (train, "--eval_freq", 0),
    (train, "--save_freq", -1), (train, "--lr", "nan"), (train, "--img_size", 65536), (train, "--num_workers", -1),
    (train, "--ema", 1.5), (train, "--width", 10 ** 6), (train, "--seed", -1), (train, "--d_scales", 0),
    (generate, "--num_images", 0), (generate, "--num_images", 10 ** 12), (generate, "--batch_size", 0),
    (generate, "--new_masks", 0), (downstream, "--steps", 0), (downstream, "--seg_width", 0),
    (evaluate, "--batch_size", -1), (evaluate, "--n_variations", 100000),
    (downstream, "--seeds", 0), (downstream, "--epochs", 0), (downstream, "--reject", 1.0), (train, "--style_dim", -1),
    (preprocess, "--test_split", 0), (preprocess, "--img_size", 10 ** 6), (preprocess, "--demo", -1),
    (preprocess, "--num_workers", -1),
]


@pytest.mark.parametrize("module,flag,value", RANGES, ids=[f"{m.__name__}{f}={v}" for m, f, v in RANGES])
def test_numeric_flags_are_range_checked(tmp_path, capsys, monkeypatch, module, flag, value):
    monkeypatch.chdir(tmp_path)
    needed = {generate: ["--model_folder", "m"], evaluate: ["--model_folder", "m"], downstream: ["--model_folder", "m"],
              train: [], preprocess: ["--data_dir", "d"]}
    code, err = cli(capsys, module, *needed[module], flag, value)
    refused(code, err, flag)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------- one-line refusals, not tracebacks

def test_refusals_are_one_line(run, tmp_path, capsys):
    data, model_dir, _ = run
    occupied = tmp_path / "occupied"
    occupied.write_text("a file where the output folder should be")
    code, err = cli(capsys, generate, "--model_folder", model_dir, "--input_dir", os.path.join(data, "test"),
                    "--output_dir", occupied)
    refused(code, err, "occupied")
    code, err = cli(capsys, preprocess, "--source_dir", tmp_path, "--data_dir", occupied / "data")
    refused(code, err, "occupied")
    if not torch.cuda.is_available():
        code, err = cli(capsys, train, "--device", "cuda", "--data_dir", data)
        refused(code, err, "--device cuda", "GPU")
    # a mask whose name makes the output name too long: refused before anything is rendered
    flat = tmp_path / "flat"
    flat.mkdir()
    cv2.imwrite(str(flat / ("m" * 248 + ".png")), np.full((32, 32), 255, np.uint8))
    code, err = cli(capsys, generate, "--model_folder", model_dir, "--input_dir", flat, "--output_dir", tmp_path / "g")
    refused(code, err, "longer than 255 bytes")
    # an earlier run's outputs are not replaced silently
    os.remove(flat / ("m" * 248 + ".png"))
    cv2.imwrite(str(flat / "a.png"), np.full((32, 32), 255, np.uint8))
    assert cli(capsys, generate, "--model_folder", model_dir, "--input_dir", flat, "--output_dir", tmp_path / "g")[0] == 0
    before = tree(tmp_path / "g")
    code, err = cli(capsys, generate, "--model_folder", model_dir, "--input_dir", flat, "--output_dir", tmp_path / "g",
                    "--seed", 5)
    refused(code, err, "already exists", "--overwrite")
    assert tree(tmp_path / "g") == before


def test_entry_points_print_one_line_and_ctrl_c_says_how_to_resume(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    data = write_dataset(str(tmp_path / "data"), n_train=12, n_test=2)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data_dir", data, *TINY_MODEL, "--batch_size", "2",
           "--n_epochs", "1000", "--save_freq", "1", "--eval_freq", "1000", "--models_dir", str(tmp_path / "models"),
           "--outputs_dir", str(tmp_path / "outputs"), "--run_name", "c"]
    # A shell starts background jobs with SIGINT ignored and children inherit that: give train.py the
    # default handling that a terminal's Ctrl-C meets, whoever launched the tests.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (tmp_path / "models" / "c" / "last.pth").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert f"resume with: python train.py --resume {tmp_path / 'models' / 'c'}" in err
    assert not [n for n in os.listdir(tmp_path / "models" / "c") if "tmp" in n]
    # a bad file through the real entry point: one line, non-zero, no traceback
    (tmp_path / "x.pth").write_bytes(b"\x80\x04garbage")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--model_path", str(tmp_path / "x.pth")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    refused(done.returncode, done.stderr, "x.pth")


# ------------------------------------------------------------------ suspicious but usable input warns

def test_suspicious_input_gets_a_warning_naming_it(tmp_path, capsys):
    src, masks = raw_images(str(tmp_path / "raw"), 6)
    wide = np.full((20, 200, 3), 200, np.uint8)
    wide[5:15, 80:120] = 50
    cv2.imwrite(os.path.join(src, "wide.jpg"), wide)
    cv2.imwrite(os.path.join(masks, "wide.png"), np.where(wide[..., 0] < 100, 255, 0).astype(np.uint8))
    cv2.imwrite(os.path.join(src, "whole.jpg"), np.full((40, 48, 3), 60, np.uint8))
    cv2.imwrite(os.path.join(masks, "whole.png"), np.full((40, 48), 255, np.uint8))
    labels = tmp_path / "onehot.csv"
    rows = [f"img_{i:02d},{int(i % 2 == 0)},{int(i % 2 == 1)},0\n" for i in range(6)]
    labels.write_text("image,MEL,NV,BCC\n" + "".join(rows) + "wide,0,1,0\nwide,1,0,0\nwhole,0,1,0\nghost,0,0,0\n")
    code, err = cli(capsys, preprocess, "--source_dir", src, "--mask_dir", masks, "--labels", labels,
                    "--data_dir", tmp_path / "data", "--img_size", 16)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert any("wide" in w and "aspect" in w for w in warnings), err
    assert any("whole" in w and "covers the whole image" in w for w in warnings), err
    assert any("wide" in w and "another label" in w for w in warnings), err
    assert any("ghost" in w and "no class" in w for w in warnings), err  # a one-hot row with nothing marked


# ------------------------------------------------------------------------ interrupted writes, partial files

def test_interrupted_writes_leave_no_partial_files(tmp_path):
    target = tmp_path / "labels.csv"
    target.write_text("the good old file\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(str(target)) as tmp, open(tmp, "w") as f:
            f.write("half of the new")
            raise KeyboardInterrupt
    assert target.read_text() == "the good old file\n" and os.listdir(tmp_path) == ["labels.csv"]

    class Boom:
        def __reduce__(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        checkpoints.save_atomic({"x": Boom()}, str(tmp_path / "last.pth"))
    assert os.listdir(tmp_path) == ["labels.csv"]


# ------------------------------------------------------------------------------- nothing outside, end to end

def test_full_pipeline_writes_only_into_the_folders_it_is_given(tmp_path, monkeypatch, capsys):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    # FID's Inception would be converted into the user cache: stood in for, the rest runs for real
    monkeypatch.setattr(evaluate.metrics, "load_inception", lambda *a, **k: (None, "unavailable: not in this test"))
    src, masks = raw_images(str(tmp_path / "raw"), 10)
    with open(tmp_path / "raw" / "labels.csv", "w") as f:
        f.write("image_id,label\n" + "".join(f"img_{i:02d},{'melanoma' if i % 3 == 0 else 'nevus'}\n" for i in range(10)))
    before = tree(tmp_path)
    steps = [
        (preprocess, ["--source_dir", src, "--mask_dir", masks, "--labels", tmp_path / "raw" / "labels.csv",
                      "--data_dir", tmp_path / "data", "--img_size", 32, "--test_split", 0.3]),
        (train, ["--data_dir", tmp_path / "data", *TINY_MODEL, "--batch_size", 4, "--n_epochs", 1,
                 "--models_dir", tmp_path / "models", "--outputs_dir", tmp_path / "outputs"]),
    ]
    for module, argv in steps:
        code, err = cli(capsys, module, *argv)
        assert code == 0, err
    model_dir = tmp_path / "models" / os.listdir(tmp_path / "models")[0]
    for module, argv in [
        (generate, ["--model_folder", model_dir, "--input_dir", tmp_path / "data" / "test", "--num_images", 5,
                    "--output_dir", tmp_path / "gen"]),
        (generate, ["--model_folder", model_dir, "--input_dir", tmp_path / "data" / "train", "--balance",
                    "--output_dir", tmp_path / "bal"]),
        (evaluate, ["--model_folder", model_dir, "--data_dir", tmp_path / "data", "--output_dir", tmp_path / "eval",
                    "--n_variations", 2, "--num_workers", 1]),
    ]:
        code, err = cli(capsys, module, *argv)
        assert code == 0, err
    after = tree(tmp_path)
    assert all(after[k] == v for k, v in before.items())  # nothing changed in the input
    new = {k.split(os.sep)[0] for k in set(after) - set(before)}
    assert new == {"data", "models", "outputs", "gen", "bal", "eval"}, new
    assert os.listdir(cwd) == []
    assert not [k for k in after if os.path.basename(k).startswith((".tmp", ".staging", ".old"))]


# ---------------------------------------------------------------------- a source too small to split

def test_a_source_too_small_to_split_is_refused_naming_the_minimum(tmp_path, capsys):
    src, masks = raw_images(str(tmp_path / "raw"), 3)
    one = tmp_path / "one"
    (one / "images").mkdir(parents=True)
    (one / "masks").mkdir()
    os.replace(os.path.join(src, "img_00.jpg"), one / "images" / "img_00.jpg")
    os.replace(os.path.join(masks, "img_00.png"), one / "masks" / "img_00.png")
    code, err = cli(capsys, preprocess, "--source_dir", one / "images", "--mask_dir", one / "masks", "--data_dir",
                    tmp_path / "data", "--img_size", 16, "--test_split", 0.1)
    refused(code, err, str(one / "images"), "at least 2")
    assert not (tmp_path / "data").exists()
    # one side empty for other reasons: every image of one lesion, an id list that takes them all
    lesion = tmp_path / "lesion.csv"
    lesion.write_text("image_id,dx,lesion_id\nimg_01,mel,HAM_1\nimg_02,nv,HAM_1\n")
    code, err = cli(capsys, preprocess, "--source_dir", src, "--mask_dir", masks, "--labels", lesion, "--data_dir",
                    tmp_path / "data", "--img_size", 16)
    refused(code, err, "one lesion", "at least 2 lesions")
    (tmp_path / "all.txt").write_text("img_01\nimg_02\n")
    code, err = cli(capsys, preprocess, "--source_dir", src, "--mask_dir", masks, "--train_ids", tmp_path / "all.txt",
                    "--data_dir", tmp_path / "data", "--img_size", 16)
    refused(code, err, "test split")
    assert not (tmp_path / "data").exists()
    # the minimum itself makes a split that train.py trains on
    code, err = cli(capsys, preprocess, "--source_dir", src, "--mask_dir", masks, "--data_dir", tmp_path / "data",
                    "--img_size", 32, "--test_split", 0.1)
    assert code == 0, err
    code, err = cli(capsys, train, "--data_dir", tmp_path / "data", *TINY_MODEL, "--n_epochs", 1, "--models_dir",
                    tmp_path / "models", "--outputs_dir", tmp_path / "outputs", "--run_name", "two")
    assert code == 0, err


# ---------------------------------------------------- numbers in file names and CSV fields: ASCII digits

def test_numbers_in_names_are_ascii_digits_only(run, tmp_path, capsys):
    data, model_dir, _ = run
    # '²' passes str.isdigit() but not int(); '٣' passes int() but is no epoch this script wrote
    folder = tmp_path / "model"
    folder.mkdir()
    with open(os.path.join(model_dir, "generator_epoch_1.pth"), "rb") as f:
        (folder / "generator_epoch_1.pth").write_bytes(f.read())
    for name in ("generator_epoch_².pth", "generator_epoch_٣.pth", "generator_epoch_1².pth"):
        (folder / name).write_bytes(b"not a checkpoint")
    assert checkpoints.epoch_checkpoints(str(folder)) == {1: str(folder / "generator_epoch_1.pth")}
    assert checkpoints.checkpoint_epoch("generator_epoch_².pth", {}) == "unknown"
    # gen_<n>.png numbering of a class folder that holds such a file
    labels = tmp_path / "labels.csv"
    stems = [n[:-4] for n in sorted(os.listdir(os.path.join(data, "train", "masks")))]
    labels.write_text("image_id,label\n" + "".join(f"{s},nevus\n" for s in stems))
    (tmp_path / "out" / "nevus").mkdir(parents=True)
    (tmp_path / "out" / "nevus" / "gen_².png").write_bytes(b"someone's file")
    code, err = cli(capsys, generate, "--model_folder", folder, "--input_dir", os.path.join(data, "train"), "--labels",
                    labels, "--class", "nevus", "--num_images", 2, "--output_dir", tmp_path / "out")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "out" / "nevus")) == ["gen_0.png", "gen_1.png", "gen_².png"]
    # metrics.csv rows of a resumed run, and a metadata column's level number
    out_dir = tmp_path / "outputs"
    out_dir.mkdir()
    (out_dir / "metrics.csv").write_text("epoch,step\n1,10\n²,20\n٣,30\n2,40\n")
    train.open_run_outputs(argparse.Namespace(no_tensorboard=True), {}, str(tmp_path / "m"), str(out_dir), 2, 10)
    assert (out_dir / "metrics.csv").read_text().splitlines()[1:] == ["1,10,,,,,,,,"]
    meta = tmp_path / "metadata.csv"
    meta.write_text("isic_id,diagnosis_1,diagnosis_²\nISIC_1,benign,nevus\n")
    assert dataset.read_label_table(meta) == {"ISIC_1": ("benign", None)}
    # a stale work folder of preprocess with such a 'pid'
    src, masks = raw_images(str(tmp_path / "raw"), 4)
    (tmp_path / "pdata" / ".staging-²").mkdir(parents=True)
    code, err = cli(capsys, preprocess, "--source_dir", src, "--mask_dir", masks, "--data_dir", tmp_path / "pdata",
                    "--img_size", 16)
    assert code == 0, err


# --------------------------------------------------------------------- what a class name may be

def test_class_names_any_script_and_commas_round_trip_control_characters_refused(tmp_path, capsys):
    src, masks = raw_images(str(tmp_path / "raw"), 6)
    decomposed = "cafe\u0301"  # as macOS may spell it; 'café' typed on the command line is the same class
    names = ["a,b", decomposed, "日本"]
    with open(tmp_path / "raw" / "labels.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("image_id", "label")] + [(f"img_{i:02d}", names[i % 3]) for i in range(6)])
    data = tmp_path / "data"
    code, err = cli(capsys, preprocess, "--source_dir", src, "--mask_dir", masks, "--labels", tmp_path / "raw" / "labels.csv",
                    "--data_dir", data, "--img_size", 32, "--test_split", 0.5)
    assert code == 0, err
    assert sorted(set(dataset.read_labels(str(data)).values())) == ["a,b", "café", "日本"]
    code, err = cli(capsys, train, "--data_dir", data, *TINY_MODEL, "--n_epochs", 1, "--conditional",
                    "--models_dir", tmp_path / "models", "--outputs_dir", tmp_path / "outputs", "--run_name", "c")
    assert code == 0, err
    out = tmp_path / "out"
    for name in ("a,b", "café"):
        code, err = cli(capsys, generate, "--model_folder", tmp_path / "models" / "c", "--input_dir", data / "train",
                        "--class", name, "--num_images", 1, "--output_dir", out)
        assert code == 0, err
    with open(out / "labels.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows == [["image", "label"], ["a,b/gen_0.png", "a,b"], ["café/gen_0.png", "café"]]
    assert sorted(os.listdir(out)) == ["a,b", "café", "labels.csv"]

    # a line break of any kind, a tab: refused the same way by preprocess, train and generate
    for bad in ("a\nb", "a\u2028b", "a\tb", "a\x85b"):
        table = tmp_path / "bad.csv"
        with open(table, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("image_id", "label", "split"), ("img_00", "nevus", "train"), ("img_01", bad, "train")])
        code, err = cli(capsys, preprocess, "--source_dir", src, "--mask_dir", masks, "--labels", table,
                        "--data_dir", tmp_path / "bad_data", "--img_size", 16)
        refused(code, err, str(table), "line 3", repr(bad), "unprintable")
        os.replace(table, data / "labels.csv")
        code, err = cli(capsys, train, "--data_dir", data, *TINY_MODEL, "--conditional", "--models_dir", tmp_path / "models")
        refused(code, err, str(data / "labels.csv"), repr(bad))
        code, err = cli(capsys, generate, "--model_folder", tmp_path / "models" / "c", "--input_dir", data / "train",
                        "--balance", "--output_dir", tmp_path / "bal")
        refused(code, err, str(data / "labels.csv"), repr(bad))
        code, err = cli(capsys, generate, "--model_folder", tmp_path / "models" / "c", "--input_dir", data / "train",
                        "--class", bad, "--output_dir", tmp_path / "bal")
        refused(code, err, "--class", repr(bad))
    assert not (tmp_path / "bad_data").exists() and not (tmp_path / "bal").exists()
    # a comma left unquoted would shift the fields and label the image wrongly: refused, naming the line
    (tmp_path / "unquoted.csv").write_text("image_id,label\nimg_00,nevus\nimg_01,a,b\n")
    code, err = cli(capsys, preprocess, "--source_dir", src, "--mask_dir", masks, "--labels", tmp_path / "unquoted.csv",
                    "--data_dir", tmp_path / "bad_data", "--img_size", 16)
    refused(code, err, "unquoted.csv", "line 3", "quoted")


# ------------------------------------------------------------------- two mask files with one stem

def test_two_masks_with_one_stem_name_the_one_dropped(run, tmp_path, capsys):
    data, model_dir, _ = run
    flat = tmp_path / "flat"
    flat.mkdir()
    small, large = np.zeros((32, 32), np.uint8), np.zeros((32, 32), np.uint8)
    small[12:20, 12:20], large[4:28, 4:28] = 255, 255
    cv2.imwrite(str(flat / "a.jpg"), small)
    cv2.imwrite(str(flat / "a.png"), large)
    cv2.imwrite(str(flat / "b.png"), large)
    code, err = cli(capsys, generate, "--model_folder", model_dir, "--input_dir", flat, "--output_dir", tmp_path / "g")
    assert code == 0, err
    assert f"skipping {flat / 'a.png'}: same stem as {flat / 'a.jpg'}" in err.splitlines(), err
    assert sorted(n for n in os.listdir(tmp_path / "g") if n.startswith("gen_only")) == ["gen_only_a.png", "gen_only_b.png"]
    # the masks/ of a split folder, as train.py and evaluate.py read it
    split = tmp_path / "split"
    (split / "masks").mkdir(parents=True)
    (split / "originals").mkdir()
    for name in ("a.jpg", "a.png"):
        cv2.imwrite(str(split / "masks" / name), large)
    cv2.imwrite(str(split / "originals" / "a.png"), np.zeros((32, 32, 3), np.uint8))
    capsys.readouterr()
    assert [stem for stem, _, _ in dataset.find_pairs(str(split))] == ["a"]
    assert str(split / "masks" / "a.png") in capsys.readouterr().err
    # preprocess --mask_dir: the same rule, with the exact <id>.* preferred to <id>_segmentation.*
    src, masks = raw_images(str(tmp_path / "raw"), 4)
    cv2.imwrite(os.path.join(masks, "img_00.jpg"), cv2.imread(os.path.join(masks, "img_00.png")))
    cv2.imwrite(os.path.join(masks, "img_01_segmentation.png"), cv2.imread(os.path.join(masks, "img_01.png")))
    code, err = cli(capsys, preprocess, "--source_dir", src, "--mask_dir", masks, "--data_dir", tmp_path / "pdata",
                    "--img_size", 16)
    assert code == 0, err
    dropped = [line for line in err.splitlines() if line.startswith("skipping")]
    assert len(dropped) == 2, err
    assert os.path.join(masks, "img_00.png") in dropped[0] and os.path.join(masks, "img_01_segmentation.png") in dropped[1]
