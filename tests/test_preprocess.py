import csv
import io
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import dataset  # noqa: E402
import demo_data  # noqa: E402
import preprocess  # noqa: E402


# -----------------------------------------------------------------------------
# helpers

def blob(w=40, h=30, fg=(90, 50, 30), bg=(225, 180, 160), cx=None, cy=None):
    """Light skin with a dark elliptic blob; returns (rgb uint8, mask bool)."""
    yy, xx = np.mgrid[0:h, 0:w]
    cx = w / 2 if cx is None else cx
    cy = h / 2 if cy is None else cy
    m = ((xx - cx) / (w * 0.25)) ** 2 + ((yy - cy) / (h * 0.25)) ** 2 < 1
    img = np.empty((h, w, 3), np.uint8)
    img[:] = bg
    img[m] = fg
    return img, m


def write_set(src, n=10, masks_dir=None, suffix=".png", ext=".jpg"):
    src.mkdir(parents=True, exist_ok=True)
    stems = []
    for i in range(n):
        img, m = blob()
        stem = f"img_{i:03d}"
        Image.fromarray(img).save(src / f"{stem}{ext}")
        if masks_dir is not None:
            masks_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray((m * 255).astype(np.uint8)).save(masks_dir / f"{stem}{suffix}")
        stems.append(stem)
    return stems


def run(args):
    """Exit status of the command, run as its __main__ does (refusals: one error line, status 1)."""
    return cli.run_cli(lambda: preprocess.main([str(a) for a in args]))


def written(data, split):
    o = sorted(p.stem for p in (data / split / "originals").glob("*.png"))
    m = sorted(p.stem for p in (data / split / "masks").glob("*.png"))
    assert o == m, "every original needs its mask"
    return o


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def one_skip_line(err, path):
    lines = [l for l in err.splitlines() if l.startswith("skipping") and str(path) in l]
    assert len(lines) == 1, err
    return lines[0]


# -----------------------------------------------------------------------------
# split and output contract

def test_split_counts_pairing_and_format(tmp_path):
    stems = write_set(tmp_path / "src", 20)
    data = tmp_path / "data"
    assert run(["--source_dir", tmp_path / "src", "--data_dir", data, "--test_split", 0.1, "--img_size", 32]) == 0
    train, test = written(data, "train"), written(data, "test")
    assert (len(train), len(test)) == (18, 2)
    assert sorted(train + test) == stems
    for split in ("train", "test"):
        for p in (data / split / "masks").glob("*.png"):
            m = np.asarray(Image.open(p))
            o = Image.open(data / split / "originals" / p.name)
            assert o.mode == "RGB" and o.size == (32, 32)
            assert m.shape == (32, 32) and set(np.unique(m)) <= {0, 255} and m.max() == 255
    assert not (data / "labels.csv").exists()


def test_seed_reproducible_and_test_split(tmp_path):
    write_set(tmp_path / "src", 30)
    splits = []
    for name, seed, frac in (("a", 1, 0.2), ("b", 1, 0.2), ("c", 2, 0.2), ("d", 1, 0.5)):
        run(["--source_dir", tmp_path / "src", "--data_dir", tmp_path / name, "--seed", seed,
             "--test_split", frac, "--img_size", 16])
        splits.append(written(tmp_path / name, "test"))
    assert splits[0] == splits[1]
    assert splits[0] != splits[2]
    assert len(splits[0]) == 6 and len(splits[3]) == 15


def test_split_at_least_one_each_side():
    train, test = preprocess.split_ids(["a", "b"], 0.01, 0)
    assert len(train) == 1 and len(test) == 1


def test_mask_dir_name_variants(tmp_path):
    src, masks = tmp_path / "src", tmp_path / "masks"
    src.mkdir(), masks.mkdir()
    for i, suffix in enumerate([".png", "_segmentation.png", "_Segmentation.png", "_segmentation.gif"]):
        img, m = blob(cx=12 + 8 * i)  # each mask differs, so a mix-up shows
        Image.fromarray(img).save(src / f"ISIC_{i}.jpg")
        Image.fromarray((m * 255).astype(np.uint8)).save(masks / f"ISIC_{i}{suffix}")
    data = tmp_path / "data"
    run(["--source_dir", src, "--data_dir", data, "--mask_dir", masks, "--img_size", 40, "--test_split", 0.34])
    got = {}
    for split in ("train", "test"):
        for p in (data / split / "masks").glob("*.png"):
            got[p.stem] = np.asarray(Image.open(p)) > 0
    assert sorted(got) == ["ISIC_0", "ISIC_1", "ISIC_2", "ISIC_3"]
    for i in range(4):
        _, m = blob(cx=12 + 8 * i)
        expect = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((40, 40), Image.NEAREST)) > 0
        assert dice(got[f"ISIC_{i}"], expect) > 0.95


# -----------------------------------------------------------------------------
# labels

LABEL_FILES = {
    "ham": ("image_id,dx,lesion_id,dx_type,age\nISIC_1,mel,HAM_1,histo,50\nISIC_2,nv,HAM_2,follow_up,40\n",
            {"ISIC_1": ("mel", "HAM_1"), "ISIC_2": ("nv", "HAM_2")}),
    "isic2017": ("image_id,melanoma,seborrheic_keratosis\nISIC_1,1.0,0.0\nISIC_2,0.0,1.0\nISIC_3,0.0,0.0\n",
                 {"ISIC_1": ("melanoma", None), "ISIC_2": ("seborrheic_keratosis", None), "ISIC_3": ("nevus", None)}),
    "onehot": ("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC,SCC,UNK\nISIC_1,0.0,1.0,0,0,0,0,0,0,0\nISIC_2,0,0,0,0,0,1.0,0,0,0\n",
               {"ISIC_1": ("nv", None), "ISIC_2": ("df", None)}),
    "isiccli": ("isic_id,attribution,diagnosis_1,diagnosis_2,diagnosis_3,lesion_id\n"
                "ISIC_1,x,Malignant,Malignant melanocytic proliferations (Melanoma),Melanoma Invasive,IL_1\n"
                "ISIC_2,x,Benign,Benign melanocytic proliferations,,IL_2\n",
                {"ISIC_1": ("melanoma invasive", "IL_1"), "ISIC_2": ("benign melanocytic proliferations", "IL_2")}),
    "plain": ("image_id,label\nISIC_1,nevus\nISIC_2,melanoma\n", {"ISIC_1": ("nevus", None), "ISIC_2": ("melanoma", None)}),
    "diagnosis": ("image_id,diagnosis\nISIC_1,nevus\nISIC_2,seborrheic_keratosis\n",
                  {"ISIC_1": ("nevus", None), "ISIC_2": ("seborrheic_keratosis", None)}),
}


@pytest.mark.parametrize("kind", sorted(LABEL_FILES))
def test_read_labels_formats(tmp_path, kind):
    text, expect = LABEL_FILES[kind]
    p = tmp_path / f"{kind}.csv"
    p.write_text(text)
    assert dataset.read_label_table(p) == expect


def test_read_labels_unknown_header(tmp_path):
    p = tmp_path / "weird.csv"
    p.write_text("foo,bar\n1,2\n")
    with pytest.raises(ValueError) as e:
        dataset.read_label_table(p)
    assert "weird.csv" in str(e.value) and "\n" not in str(e.value)


def test_stratified_split_keeps_every_class(tmp_path):
    stems = write_set(tmp_path / "src", 40)
    classes = ["nevus"] * 28 + ["melanoma"] * 8 + ["seborrheic_keratosis"] * 4
    (tmp_path / "labels.csv").write_text("image_id,label\n" + "".join(f"{s},{c}\n" for s, c in zip(stems, classes)))
    data = tmp_path / "data"
    run(["--source_dir", tmp_path / "src", "--data_dir", data, "--labels", tmp_path / "labels.csv",
         "--test_split", 0.25, "--img_size", 16])
    rows = list(csv.DictReader(open(data / "labels.csv")))
    assert list(rows[0]) == ["image_id", "label", "split"] and len(rows) == 40
    per = {(r["label"], r["split"]) for r in rows}
    for c in set(classes):
        assert (c, "train") in per and (c, "test") in per
    n_test = {c: sum(r["label"] == c and r["split"] == "test" for r in rows) for c in set(classes)}
    assert n_test == {"nevus": 7, "melanoma": 2, "seborrheic_keratosis": 1}
    assert {r["image_id"] for r in rows if r["split"] == "test"} == set(written(data, "test"))


def test_lesion_grouping(tmp_path):
    stems = write_set(tmp_path / "src", 30)
    lines = ["image_id,dx,lesion_id"] + [f"{s},{'mel' if i % 3 == 0 else 'nv'},L{i // 3}" for i, s in enumerate(stems)]
    (tmp_path / "meta.csv").write_text("\n".join(lines) + "\n")
    data = tmp_path / "data"
    run(["--source_dir", tmp_path / "src", "--data_dir", data, "--labels", tmp_path / "meta.csv",
         "--test_split", 0.3, "--img_size", 16])
    lesion = {s: f"L{i // 3}" for i, s in enumerate(stems)}
    tr = {lesion[s] for s in written(data, "train")}
    te = {lesion[s] for s in written(data, "test")}
    assert tr and te and not (tr & te)


def test_train_ids(tmp_path):
    stems = write_set(tmp_path / "src", 10)
    (tmp_path / "train.txt").write_text("\n".join(stems[:7]) + "\n")
    data = tmp_path / "data"
    run(["--source_dir", tmp_path / "src", "--data_dir", data, "--train_ids", tmp_path / "train.txt", "--img_size", 16])
    assert written(data, "train") == stems[:7] and written(data, "test") == stems[7:]


def test_train_and_test_ids_skip_the_rest(tmp_path, capsys):
    stems = write_set(tmp_path / "src", 10)
    (tmp_path / "train.txt").write_text("\n".join(stems[:4]) + "\n")
    (tmp_path / "test.txt").write_text("\n".join(stems[4:6]) + "\n")
    data = tmp_path / "data"
    run(["--source_dir", tmp_path / "src", "--data_dir", data, "--train_ids", tmp_path / "train.txt",
         "--test_ids", tmp_path / "test.txt", "--img_size", 16])
    assert written(data, "train") == stems[:4] and written(data, "test") == stems[4:6]
    assert "in neither id list 4" in capsys.readouterr().out


def test_refuses_existing_split_without_overwrite(tmp_path):
    write_set(tmp_path / "src", 6)
    data = tmp_path / "data"
    args = ["--source_dir", tmp_path / "src", "--data_dir", data, "--img_size", 16]
    run(args)
    (data / "train" / "originals" / "stale.png").write_bytes(b"x")
    assert run(args) == 1
    assert (data / "train" / "originals" / "stale.png").exists()
    run(args + ["--overwrite"])
    assert not (data / "train" / "originals" / "stale.png").exists()
    assert len(written(data, "train")) + len(written(data, "test")) == 6


# -----------------------------------------------------------------------------
# bad inputs: one line naming the file, the good files still written

def _huge_png_header(path, w=20000, h=10000):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))


def _jpeg_bytes(img):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


BAD = {
    "zero_byte": (".jpg", lambda p: p.write_bytes(b""), "empty file"),
    "truncated_jpeg": (".jpg", lambda p: p.write_bytes(_jpeg_bytes(blob(200, 150)[0])[:600]), "truncated or corrupt"),
    "text_as_jpg": (".jpg", lambda p: p.write_text("hello, not a picture\n"), "not an image"),
    "huge": (".png", _huge_png_header, "decompression-bomb"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_image_files(tmp_path, capsys, kind):
    ext, make, reason = BAD[kind]
    good = write_set(tmp_path / "src", 4)
    bad = tmp_path / "src" / f"bad{ext}"
    make(bad)
    data = tmp_path / "data"
    assert run(["--source_dir", tmp_path / "src", "--data_dir", data, "--img_size", 16, "--num_workers", 2]) == 0
    line = one_skip_line(capsys.readouterr().err, bad)
    assert reason in line
    assert sorted(written(data, "train") + written(data, "test")) == good


def test_other_file_types_are_skipped_with_a_note(tmp_path, capsys):
    good = write_set(tmp_path / "src", 3)
    (tmp_path / "src" / "notes.txt").write_text("x")
    run(["--source_dir", tmp_path / "src", "--data_dir", tmp_path / "data", "--img_size", 16])
    one_skip_line(capsys.readouterr().err, tmp_path / "src" / "notes.txt")
    assert sorted(written(tmp_path / "data", "train") + written(tmp_path / "data", "test")) == good


def _image_modes(tmp_path):
    img, _ = blob()
    rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
    rgba[:3, :3, 3] = 0  # transparent corner -> white
    g16 = np.where(blob()[1], 10000, 50000).astype(np.uint16)
    return {
        "rgba": (Image.fromarray(rgba, "RGBA"), ".png"),
        "gray16": (Image.fromarray(g16), ".png"),
        "gray": (Image.fromarray(img).convert("L"), ".png"),
        "palette": (Image.fromarray(img).convert("P"), ".png"),
        "cmyk": (Image.fromarray(img).convert("CMYK"), ".jpg"),
    }


@pytest.mark.parametrize("mode", ["rgba", "gray16", "gray", "palette", "cmyk"])
def test_image_modes_convert_to_rgb(tmp_path, mode):
    im, ext = _image_modes(tmp_path)[mode]
    p = tmp_path / f"x{ext}"
    im.save(p)
    rgb = preprocess.load_image_rgb(p)
    assert rgb.dtype == np.uint8 and rgb.shape == (30, 40, 3)
    bg = rgb[15, 2].astype(int)
    fg = rgb[15, 20].astype(int)
    assert fg.mean() < bg.mean() - 60  # lesion stays dark, skin light
    if mode == "gray16":
        assert abs(bg[0] - 50000 / 257) <= 1 and abs(fg[0] - 10000 / 257) <= 1  # scaled, not clipped
    if mode == "rgba":
        assert tuple(rgb[0, 0]) == (255, 255, 255)
    if mode == "cmyk":
        assert abs(bg - np.array([225, 180, 160])).max() < 25
    # and the pipeline takes it next to a normal file
    src = tmp_path / "src"
    write_set(src, 2)
    im.save(src / f"mode{ext}")
    data = tmp_path / "data"
    run(["--source_dir", src, "--data_dir", data, "--img_size", 16, "--test_split", 0.4])
    assert "mode" in written(data, "train") + written(data, "test")


def test_exif_rotation_for_image_and_mask(tmp_path):
    # raw pixels: blob in the top-left; EXIF orientation 6 means "turn 90 degrees clockwise to view"
    img, m = blob(40, 30, cx=10, cy=7)
    exif = Image.Exif()
    exif[0x0112] = 6
    src, masks = tmp_path / "src", tmp_path / "masks"
    src.mkdir(), masks.mkdir()
    Image.fromarray(img).save(src / "rot.jpg", exif=exif)
    Image.fromarray((m * 255).astype(np.uint8)).save(masks / "rot.png", exif=exif)
    write_set(src, 2, masks)
    rgb = preprocess.load_image_rgb(src / "rot.jpg")
    assert rgb.shape == (40, 30, 3)
    assert rgb[:20, 15:].mean() < rgb[:20, :15].mean() - 30  # upright: blob now top-right
    data = tmp_path / "data"
    run(["--source_dir", src, "--data_dir", data, "--mask_dir", masks, "--img_size", 40, "--test_split", 0.4])
    split = "train" if "rot" in written(data, "train") else "test"
    o = np.asarray(Image.open(data / split / "originals" / "rot.png")).mean(axis=2)
    mk = np.asarray(Image.open(data / split / "masks" / "rot.png")) > 0
    assert mk[:20, 20:].mean() > 0.2 and mk[:, :20].sum() == 0 and mk[20:].sum() == 0
    assert o[mk].mean() < o[~mk].mean() - 60  # mask lies on the dark blob


def test_decompression_bomb_limit_is_set():
    assert Image.MAX_IMAGE_PIXELS == preprocess.MAX_PIXELS <= 200_000_000


MASK_PROBLEMS = {
    "missing": (lambda p: None, "no mask"),
    "other_size": (lambda p: Image.fromarray(np.full((30, 30), 255, np.uint8)).save(p), "30x30"),
    "empty": (lambda p: Image.fromarray(np.zeros((30, 40), np.uint8)).save(p), "empty"),
}


@pytest.mark.parametrize("kind", sorted(MASK_PROBLEMS))
def test_mask_problems_skip(tmp_path, capsys, kind):
    src, masks = tmp_path / "src", tmp_path / "masks"
    good = write_set(src, 4, masks)
    img, _ = blob()
    Image.fromarray(img).save(src / "odd.jpg")
    make, reason = MASK_PROBLEMS[kind]
    make(masks / "odd.png")
    data = tmp_path / "data"
    run(["--source_dir", src, "--data_dir", data, "--mask_dir", masks, "--img_size", 16])
    line = one_skip_line(capsys.readouterr().err, src / "odd.jpg")
    assert reason in line
    assert sorted(written(data, "train") + written(data, "test")) == good


def test_mask_same_aspect_other_size_is_resized_with_warning(tmp_path, capsys):
    src, masks = tmp_path / "src", tmp_path / "masks"
    write_set(src, 3, masks)
    img, m = blob()
    Image.fromarray(img).save(src / "big.jpg")
    Image.fromarray((m * 255).astype(np.uint8)).resize((80, 60), Image.NEAREST).save(masks / "big.png")
    data = tmp_path / "data"
    run(["--source_dir", src, "--data_dir", data, "--mask_dir", masks, "--img_size", 16, "--test_split", 0.3])
    err = capsys.readouterr().err
    assert any(l.startswith("warning") and "big.png" in l and "resized" in l for l in err.splitlines())
    assert "big" in written(data, "train") + written(data, "test")


def test_non_binary_mask_binarised_with_warning(tmp_path, capsys):
    src, masks = tmp_path / "src", tmp_path / "masks"
    write_set(src, 3, masks)
    img, m = blob()
    Image.fromarray(img).save(src / "jpgmask.jpg")
    Image.fromarray((m * 255).astype(np.uint8)).save(masks / "jpgmask.jpg", quality=60)
    data = tmp_path / "data"
    run(["--source_dir", src, "--data_dir", data, "--mask_dir", masks, "--img_size", 40, "--test_split", 0.3])
    err = capsys.readouterr().err
    warn = [l for l in err.splitlines() if "jpgmask.jpg" in l]
    assert len(warn) == 1 and "binarised at 127" in warn[0]
    split = "train" if "jpgmask" in written(data, "train") else "test"
    out = np.asarray(Image.open(data / split / "masks" / "jpgmask.png"))
    assert set(np.unique(out)) == {0, 255}


def test_missing_or_empty_source_dir(tmp_path, capsys):
    assert run(["--source_dir", tmp_path / "nope", "--data_dir", tmp_path / "data"]) == 1
    assert "nope" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run(["--source_dir", tmp_path / "empty", "--data_dir", tmp_path / "data2"]) == 1
    assert f"no {'/'.join(dataset.IMAGE_EXTENSIONS)} images" in capsys.readouterr().err


def test_unwritable_output(tmp_path, capsys):
    write_set(tmp_path / "src", 2)
    (tmp_path / "afile").write_text("x")  # a file where a folder should be: unwritable even for root
    assert run(["--source_dir", tmp_path / "src", "--data_dir", tmp_path / "afile" / "data"]) == 1
    assert "cannot write to output folder" in capsys.readouterr().err


def test_nothing_usable_exits_nonzero(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"")
    (src / "b.png").write_text("nope")
    assert run(["--source_dir", src, "--data_dir", tmp_path / "data"]) == 1
    assert "nothing usable" in capsys.readouterr().err
    assert not (tmp_path / "data" / "train").exists()


# -----------------------------------------------------------------------------
# segmentation and demo

def test_segment_lesion_finds_blob_and_ignores_dark_corners():
    img, m = blob(160, 120, fg=(110, 70, 50), bg=(220, 175, 155))
    rng = np.random.default_rng(0)
    img = np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:120, 0:160]
    corners = np.hypot(xx - 80, yy - 60) > 88  # dermoscope vignette
    img[corners] = 10
    out = preprocess.segment_lesion(img, "lesion")
    assert out.shape == (120, 160) and set(np.unique(out)) <= {0, 255}
    assert dice(out > 0, m) > 0.9
    assert not (out > 0)[corners].any()


@pytest.mark.parametrize("method", ["otsu", "canny"])
def test_other_methods_find_blob(method):
    img, m = blob(160, 120)
    assert dice(preprocess.segment_lesion(img, method) > 0, m) > 0.8


def test_demo_dataset(tmp_path):
    data = tmp_path / "data"
    assert run(["--data_dir", data, "--demo", 12, "--seed", 3, "--img_size", 64]) == 0
    train, test = written(data, "train"), written(data, "test")
    assert len(train) + len(test) == 12 and test
    for split, stems in (("train", train), ("test", test)):
        for s in stems:
            assert (np.asarray(Image.open(data / split / "masks" / f"{s}.png")) > 0).mean() > 0.02
    rows = list(csv.DictReader(open(data / "labels.csv")))
    assert len(rows) == 12 and {r["label"] for r in rows} <= {"melanoma", "nevus", "seborrheic_keratosis"}
    # deterministic in the seed
    a = (data / "demo_source" / "images" / "demo_0000.jpg").read_bytes()
    demo_data.make_demo_dataset(tmp_path / "again", 12, 3)
    assert (tmp_path / "again" / "images" / "demo_0000.jpg").read_bytes() == a


# -----------------------------------------------------------------------------
# --resize: how a non-square photo becomes square

def lesion_extent(mask):
    """(height, width) of the lesion's bounding box."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def circle_photo(w=120, h=60, cx=None, r=20):
    """A round lesion on a wide photo; the skin gets a left-to-right gradient so crops can be located."""
    yy, xx = np.mgrid[0:h, 0:w]
    cx = w / 2 if cx is None else cx
    m = (xx - cx) ** 2 + (yy - h / 2) ** 2 < r ** 2
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = (xx * 255 // (w - 1)).astype(np.uint8)
    img[..., 1] = 170
    img[m] = (60, 30, 20)
    return img, m


@pytest.mark.parametrize("mode", ["squash", "crop", "pad"])
def test_resize_modes_keep_or_squash_the_lesion_shape(tmp_path, mode):
    src, masks = tmp_path / "src", tmp_path / "gt"
    src.mkdir(), masks.mkdir()
    img, m = circle_photo(cx=90)  # off centre: a centred crop would cut it
    for stem in ("a", "b"):  # a split needs two images
        Image.fromarray(img).save(src / f"{stem}.png")
        Image.fromarray((m * 255).astype(np.uint8)).save(masks / f"{stem}.png")
    data = tmp_path / "data"
    run(["--source_dir", src, "--mask_dir", masks, "--data_dir", data, "--img_size", 64, "--test_split", 0.5,
         "--resize", mode])
    split = "train" if (data / "train" / "masks" / "a.png").exists() else "test"
    out = np.array(Image.open(data / split / "masks" / "a.png")) > 127
    # pad mirrors 30 rows above and below the 60 photo rows (16 of 64 after the resize), lesion and all
    h, w = lesion_extent(out[16:48] if mode == "pad" else out)
    if mode == "squash":  # 120x60 -> 64x64: the circle becomes twice as tall as wide
        assert h / w == pytest.approx(2, rel=0.15)
    else:  # a circle stays a circle
        assert h / w == pytest.approx(1, rel=0.1)
    if mode == "crop":  # the whole lesion is inside the 60x60 crop, and scaled by 64/60
        assert out.sum() == pytest.approx(m.sum() * (64 / 60) ** 2, rel=0.1)
    if mode == "pad":  # all 120 columns kept: the lesion spans 40/120 of the width
        assert w == pytest.approx(64 * 40 / 120, abs=2)
        rgb = np.array(Image.open(data / split / "originals" / "a.png"))
        assert dice(rgb[..., 1] < 100, out) > 0.9  # the mirrored band: image and mask still agree
        assert (rgb[~out, 1] > 150).mean() > 0.95  # skin everywhere else (bar the resized edge): no black bars


def test_resize_crop_keeps_the_most_lesion_and_says_what_it_cut(tmp_path):
    img, m = circle_photo(w=200, h=40, cx=100, r=18)
    m[:, 20:180] |= np.abs(np.mgrid[0:40, 0:200][0][:, 20:180] - 20) < 3  # a lesion wider than any square crop
    rgb, mask, lost = preprocess.to_square(img, (m * 255).astype(np.uint8), "crop")
    assert rgb.shape[:2] == mask.shape == (40, 40)
    assert lost == int(m.sum() - (mask > 127).sum()) > 0
    assert (mask > 127).sum() >= max((m[:, s:s + 40]).sum() for s in range(161))  # the window holding the most lesion
