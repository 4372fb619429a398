"""generate.py: checkpoint choice, batched rendering, variations, class-aware output, clear errors."""
import csv
import json
import os

import cv2
import numpy as np
import pytest
import torch

import checkpoints
import generate
import models
import train
from conftest import TINY_MODEL
from dataset import PairedDataset, mask_problem, read_labels, to_model_range


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
    with pytest.raises(checkpoints.CheckpointError, match="trained at 32x32, but --img_size 128"):
        generate.main(["--model_folder", trained, "--input_dir", os.path.join(tiny_data, "test"), "--img_size", "128"])
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(100))
    with pytest.raises(checkpoints.CheckpointError, match="junk.pth: not a PixelGAN checkpoint"):
        generate.main(["--model_path", str(junk), "--input_dir", os.path.join(tiny_data, "test")])
    with pytest.raises(checkpoints.CheckpointError, match="no such model folder"):
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


@pytest.fixture
def style_model(tiny_data, run_dirs):
    return train.main(["--data_dir", tiny_data, *TINY_MODEL, *run_dirs, "--batch_size", "4", "--n_epochs", "1",
                       "--conditional", "--style_dim", "4", "--run_name", "style"])


def test_style_bank_knows_each_rows_class_and_draws_looks_of_the_rendered_class(style_model, tiny_data):
    path = os.path.join(style_model, "generator_epoch_1.pth")
    generator, config, ckpt = checkpoints.load_generator(path)
    assert checkpoints.load_style_encoder(ckpt, config, path) is not None  # saved beside the generator
    train_set = PairedDataset(os.path.join(tiny_data, "train"), 32, labels=read_labels(tiny_data), classes=config["classes"])
    bank, bank_labels = generator.style_bank, generator.style_labels
    rows = torch.arange(len(bank)) * len(train_set) // len(bank)
    assert torch.equal(bank_labels, train_set.labels[rows]) and set(bank_labels.tolist()) == {0, 1}
    # each row's lesion area is that of its training mask, cropped as the bank's image (train.py's jitter)
    jittered = PairedDataset(os.path.join(tiny_data, "train"), 32, augment=True, jitter=train.parse_args([])[0].jitter)
    assert torch.allclose(generator.style_areas, models.lesion_area(to_model_range(jittered.center_masks()[rows], "cpu")))
    generator.eval()
    masks = torch.zeros(40, 1, 32, 32)
    for c in (0, 1):
        labels = torch.full((40,), c)
        torch.manual_seed(3)
        drawn = generator.sample_styles(40, "cpu", labels, models.lesion_area(masks))
        # every code drawn is a bank row of that class (codes of the two classes differ after training)
        matches = (drawn[:, None, :] == bank[None]).all(-1)
        assert matches.any(1).all() and bank_labels[matches.any(0)].eq(c).all()
        # and forward draws the same way from the class planes it is given
        planes = models.class_planes(labels, 2, 32)
        torch.manual_seed(3)
        implicit = generator(masks, planes)
        torch.manual_seed(3)
        generator.sample_styles(40, "cpu", labels, models.lesion_area(masks))  # the same draw first, so that the noise maps draw alike too
        assert torch.equal(implicit, generator(masks, planes, drawn))


def test_style_image_renders_with_the_codes_of_the_given_photos_in_turn(style_model, tiny_data, tmp_path):
    refs = tmp_path / "refs"
    refs.mkdir()
    for name, colour in (("a_pale.png", (200, 180, 230)), ("b_dark.png", (40, 60, 90))):
        cv2.imwrite(str(refs / name), np.full((50, 60, 3), colour, np.uint8))
    path = os.path.join(style_model, "generator_epoch_1.pth")
    generator, config, ckpt = checkpoints.load_generator(path)
    codes = generate.style_codes(checkpoints.load_style_encoder(ckpt, config, path), config, str(refs))
    assert codes.shape == (2, 4) and not torch.equal(codes[0], codes[1])
    test_dir = os.path.join(tiny_data, "test")
    out = tmp_path / "styled"
    generate.main(["--model_folder", style_model, "--input_dir", test_dir, "--style_image", str(refs),
                   "--output_dir", str(out)])
    dataset = PairedDataset(test_dir, 32, labels=read_labels(tiny_data), classes=config["classes"])
    expected = generate.render(generator, config, dataset.masks, dataset.labels, styles=codes[[0, 1, 0, 1]])
    for k, name in enumerate(dataset.names):
        written = cv2.cvtColor(read_png(out / f"gen_only_{name}.png"), cv2.COLOR_BGR2RGB)
        assert np.array_equal(written, expected[k].permute(1, 2, 0).numpy())
    with pytest.raises(ValueError, match="no such file or folder"):
        generate.main(["--model_folder", style_model, "--input_dir", test_dir, "--style_image", str(tmp_path / "nope"),
                       "--output_dir", str(tmp_path / "x")])


def test_style_image_needs_a_model_with_a_style_encoder(tiny_data, run_dirs, tmp_path):
    no_style = train.main(["--data_dir", tiny_data, *TINY_MODEL, *run_dirs, "--batch_size", "4", "--n_epochs", "1",
                           "--style_dim", "0", "--run_name", "no_style"])
    ref = tmp_path / "ref.png"
    cv2.imwrite(str(ref), np.full((40, 40, 3), 128, np.uint8))
    with pytest.raises(ValueError, match="has no style encoder"):
        generate.main(["--model_folder", no_style, "--input_dir", os.path.join(tiny_data, "test"),
                       "--style_image", str(ref), "--output_dir", str(tmp_path / "x")])


def test_half_precision_export_is_smaller_and_renders_alike(style_model, tiny_data, tmp_path):
    src = os.path.join(style_model, "generator_epoch_1.pth")
    dst = str(tmp_path / "generator_epoch_1.pth")
    checkpoints.export_generator(src, dst)
    assert os.path.getsize(dst) < 0.6 * os.path.getsize(src)
    stored = torch.load(dst, weights_only=True)
    last_conv = [k for k in stored["generator"] if k.startswith("out.") and k.endswith(".weight")][-1]
    assert stored["generator"][last_conv].dtype == torch.float16 and stored["style_labels"].dtype == torch.long
    (full, config, _), (half, _, ckpt) = checkpoints.load_generator(src), checkpoints.load_generator(dst)
    assert next(half.parameters()).dtype == torch.float32 and torch.equal(half.style_labels, full.style_labels)
    assert checkpoints.load_style_encoder(ckpt, config, dst) is not None
    dataset = PairedDataset(os.path.join(tiny_data, "test"), 32, labels=read_labels(tiny_data), classes=config["classes"])
    a, b = (generate.render(g, config, dataset.masks, dataset.labels, seed=1) for g in (full, half))
    assert (a.int() - b.int()).abs().max() <= 2


def test_crafted_style_entries_are_refused_with_the_file_named(style_model, tmp_path):
    ckpt = torch.load(os.path.join(style_model, "generator_epoch_1.pth"), weights_only=True)
    bad_labels = tmp_path / "generator_epoch_1.pth"
    torch.save({**ckpt, "style_labels": torch.full_like(ckpt["style_labels"], 7)}, bad_labels)
    with pytest.raises(checkpoints.CheckpointError, match=f"{bad_labels}: style_labels"):
        checkpoints.load_generator(str(bad_labels))
    torch.save({**ckpt, "style_areas": torch.full_like(ckpt["style_areas"], 2.0)}, bad_labels)
    with pytest.raises(checkpoints.CheckpointError, match=f"{bad_labels}: style_areas"):
        checkpoints.load_generator(str(bad_labels))
    bad_encoder = tmp_path / "generator_epoch_2.pth"
    torch.save({**ckpt, "style_encoder": {"head.weight": torch.zeros(3, 3)}}, bad_encoder)
    _, config, loaded = checkpoints.load_generator(str(bad_encoder))
    with pytest.raises(checkpoints.CheckpointError, match="style encoder weights do not match"):
        checkpoints.load_style_encoder(loaded, config, str(bad_encoder))


def test_new_masks_write_pairs_that_paired_dataset_reads_back_with_labels(trained, tiny_data, tmp_path, capsys):
    out = tmp_path / "new"
    generate.main(["--model_folder", trained, "--input_dir", os.path.join(tiny_data, "train"), "--new_masks", "6",
                   "--output_dir", str(out), "--seed", "2"])
    printed = capsys.readouterr().out
    assert "6 new masks (elastic) vs 8 real: KS distance area fraction" in printed
    stems = [f"new_{k}" for k in range(6)]
    assert sorted(os.listdir(out / "masks")) == sorted(os.listdir(out / "originals")) == sorted(s + ".png" for s in stems)
    labels = read_labels(str(out))
    assert sorted(labels) == sorted(stems) and set(labels.values()) == {"melanoma", "nevus"}  # the train split's two, 1 : 1
    pairs = PairedDataset(str(out), 32, labels=labels, classes=["melanoma", "nevus"])
    assert pairs.has_images and len(pairs) == 6 and bool((pairs.labels >= 0).all())
    train_masks = PairedDataset(os.path.join(tiny_data, "train"), 32).masks
    for m in pairs.masks:
        assert set(m.unique().tolist()) == {0, 255} and mask_problem(m[0].numpy()) is None  # one lesion, inside
        assert not any(torch.equal(m, t) for t in train_masks)  # new shapes, not the training masks
    with open(out / "mask_stats.json") as f:
        stats = json.load(f)
    assert stats["method"] == "elastic" and set(stats["shape_ks"]) == {"area_fraction", "compactness", "eccentricity"}


def test_pairs_rerender_the_input_masks_in_the_data_layout(trained, tiny_data, tmp_path):
    out = tmp_path / "again"
    train_dir = os.path.join(tiny_data, "train")
    generate.main(["--model_folder", trained, "--input_dir", train_dir, "--pairs", "--num_images", "10",
                   "--output_dir", str(out)])
    source = PairedDataset(train_dir, 32, labels=read_labels(tiny_data))
    pairs = PairedDataset(str(out), 32, labels=read_labels(str(out)))
    expected = source.names + [f"{n}_r1" for n in source.names[:2]]
    assert sorted(pairs.names) == sorted(expected) and pairs.has_images
    for name, mask in zip(pairs.names, pairs.masks):
        assert torch.equal(mask, source.masks[source.names.index(name.removesuffix("_r1"))])
    again = dict(zip(pairs.names, pairs.images))
    assert not torch.equal(again[source.names[0]], again[source.names[0] + "_r1"])  # new noise for the repeat
    assert read_labels(str(out))[source.names[0] + "_r1"] == read_labels(tiny_data)[source.names[0]]
    with pytest.raises(ValueError, match="already holds 10 of these pairs"):  # no silent replacement
        generate.main(["--model_folder", trained, "--input_dir", train_dir, "--pairs", "--num_images", "10",
                       "--output_dir", str(out)])
    with pytest.raises(ValueError, match="images this run does not write"):  # nor mixing with other pairs
        generate.main(["--model_folder", trained, "--input_dir", train_dir, "--new_masks", "3", "--output_dir", str(out)])


def test_pair_modes_refuse_bad_input_in_one_line(trained, tmp_path, capsys):
    empty = tmp_path / "no_images"
    empty.mkdir()
    (empty / "notes.txt").write_text("no masks here")
    with pytest.raises(ValueError, match="no_images: no mask images found"):
        generate.main(["--model_folder", trained, "--input_dir", str(empty), "--new_masks", "3", "--output_dir",
                       str(tmp_path / "o1")])
    masks = tmp_path / "masks"
    masks.mkdir()
    cv2.imwrite(str(masks / "blank.png"), np.zeros((32, 32), np.uint8))
    cv2.imwrite(str(masks / "full.png"), np.full((32, 32), 255, np.uint8))
    with pytest.raises(ValueError, match="no mask with a lesion outline to make new masks from"):
        generate.main(["--model_folder", trained, "--input_dir", str(masks), "--new_masks", "3", "--output_dir",
                       str(tmp_path / "o2")])
    capsys.readouterr()
    m = np.zeros((32, 32), np.uint8)
    cv2.circle(m, (16, 16), 7, 255, -1)
    cv2.imwrite(str(masks / "good.png"), m)
    generate.main(["--model_folder", trained, "--input_dir", str(masks), "--new_masks", "3", "--output_dir",
                   str(tmp_path / "o3")])
    err = capsys.readouterr().err
    assert f"warning: {masks / 'blank.png'}: empty; no outline" in err and f"warning: {masks / 'full.png'}: all lesion;" in err
    assert len(os.listdir(tmp_path / "o3" / "masks")) == 3
    with pytest.raises(SystemExit):
        generate.main(["--model_folder", trained, "--input_dir", str(masks), "--new_masks", "3", "--pairs"])
