"""generate.py: checkpoint choice, batched rendering, variations, class-aware output, clear errors."""
import csv
import os

import cv2
import numpy as np
import pytest

import generate
import models
import train
from conftest import TINY_MODEL


@pytest.fixture
def trained(tiny_data, run_dirs):
    return train.main(["--data_dir", tiny_data, *TINY_MODEL, *run_dirs, "--batch_size", "4", "--n_epochs", "2",
                       "--save_freq", "1", "--run_name", "g"])


def read_png(path):
    return cv2.imread(str(path), cv2.IMREAD_COLOR)


def test_model_folder_uses_highest_epoch_and_writes_both_files(trained, tiny_data, tmp_path, capsys):
    out = tmp_path / "gen"
    generate.main(["--model_folder", trained, "--input_dir", os.path.join(tiny_data, "test"), "--output_dir", str(out)])
    assert "generator_epoch_2.pth" in capsys.readouterr().out
    names = sorted(os.listdir(out))
    assert len(names) == 8 and "gen_only_test_000.png" in names and "generated_test_000.png" in names
    assert read_png(out / "gen_only_test_000.png").shape == (32, 32, 3)
    assert read_png(out / "generated_test_000.png").shape[1] > 3 * 32  # mask | generated | real


def test_model_path_and_flat_mask_folder(trained, tmp_path):
    masks = tmp_path / "masks_only"
    masks.mkdir()
    for i in range(3):
        m = np.zeros((50, 50), np.uint8)
        cv2.circle(m, (25, 25), 8 + 4 * i, 255, -1)
        cv2.imwrite(str(masks / f"m{i}.png"), m)
    out = tmp_path / "gen"
    generate.main(["--model_path", os.path.join(trained, "generator_epoch_1.pth"), "--input_dir", str(masks),
                   "--output_dir", str(out), "--img_size", "32"])
    assert len([n for n in os.listdir(out) if n.startswith("gen_only_")]) == 3


def test_more_images_than_masks_gives_distinct_variations(trained, tiny_data, tmp_path):
    out = tmp_path / "gen"
    generate.main(["--model_folder", trained, "--input_dir", os.path.join(tiny_data, "test"), "--num_images", "10",
                   "--output_dir", str(out), "--seed", "3"])
    files = sorted(n for n in os.listdir(out) if n.startswith("gen_only_"))
    assert len(files) == 10
    assert len({read_png(out / n).tobytes() for n in files}) == 10
    again = tmp_path / "again"
    generate.main(["--model_folder", trained, "--input_dir", os.path.join(tiny_data, "test"), "--num_images", "10",
                   "--output_dir", str(again), "--seed", "3"])
    assert all(np.array_equal(read_png(out / n), read_png(again / n)) for n in files)  # --seed repeats


def test_conflicting_img_size_and_bad_checkpoint_are_clear_errors(trained, tiny_data, tmp_path):
    with pytest.raises(models.CheckpointError, match="trained at 32x32, but --img_size 128"):
        generate.main(["--model_folder", trained, "--input_dir", os.path.join(tiny_data, "test"), "--img_size", "128"])
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(100))
    with pytest.raises(models.CheckpointError, match="junk.pth: not a PixelGAN checkpoint"):
        generate.main(["--model_path", str(junk), "--input_dir", os.path.join(tiny_data, "test")])
    with pytest.raises(models.CheckpointError, match="no such model folder"):
        generate.main(["--model_folder", str(tmp_path / "nope")])


def test_class_mode_writes_imagefolder_layout(trained, tiny_data, tmp_path):
    out = tmp_path / "cls"
    generate.main(["--model_folder", trained, "--input_dir", os.path.join(tiny_data, "train"),
                   "--class", "melanoma", "--num_images", "9", "--output_dir", str(out)])
    files = sorted(os.listdir(out / "melanoma"))
    assert files == sorted(f"gen_{i}.png" for i in range(9))
    assert len({read_png(out / "melanoma" / f).tobytes() for f in files}) == 9  # 4 masks, 9 distinct images
    with open(out / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and {r["label"] for r in rows} == {"melanoma"}
    with pytest.raises(ValueError, match="no masks labelled 'bcc'"):
        generate.main(["--model_folder", trained, "--input_dir", os.path.join(tiny_data, "train"),
                       "--class", "bcc", "--output_dir", str(out)])


def test_balance_tops_up_every_class_to_the_largest(tiny_data, run_dirs, tmp_path):
    # 9 training images over classes a, b, c in the order a b c a b c ... -> relabel to 5 a, 3 b, 1 c
    labels_path = os.path.join(tiny_data, "labels.csv")
    with open(labels_path) as f:
        rows = list(csv.DictReader(f))
    train_rows = [r for r in rows if r["split"] == "train"]
    for r, label in zip(train_rows, ["a"] * 5 + ["b"] * 2 + ["c"] * 1):
        r["label"] = label
    with open(labels_path, "w", newline="") as f:
        w = csv.DictWriter(f, ["image_id", "label", "split"])
        w.writeheader()
        w.writerows(rows)
    model_dir = train.main(["--data_dir", tiny_data, *TINY_MODEL, *run_dirs, "--batch_size", "4", "--n_epochs", "1",
                            "--conditional", "--run_name", "cond"])
    out = tmp_path / "bal"
    generate.main(["--model_folder", model_dir, "--input_dir", os.path.join(tiny_data, "train"), "--balance",
                   "--output_dir", str(out)])
    counts = {c: len(os.listdir(out / c)) for c in os.listdir(out) if (out / c).is_dir()}
    assert counts == {"b": 3, "c": 4}
    with open(out / "labels.csv") as f:
        assert len(list(csv.DictReader(f))) == 7
