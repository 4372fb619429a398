"""The shipped generator (pretrained/isic2017_128): loads safely, follows masks, renders the look of a
given photograph, and draws a class's looks from that class only."""
import os

import cv2
import numpy as np
import pytest
import torch

import checkpoints
import demo_data
import generate
import models
from conftest import ROOT
from dataset import PairedDataset, read_image

PRETRAINED = os.path.join(ROOT, "pretrained", "isic2017_128")


@pytest.fixture(scope="module")
def shipped():
    path = checkpoints.latest_generator_path(PRETRAINED)
    generator, config, ckpt = checkpoints.load_generator(path)  # torch.load(weights_only=True) inside
    return path, generator.eval(), config, ckpt


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    images, masks, _ = demo_data.make_demo_dataset(tmp_path_factory.mktemp("demo") / "demo", 8, seed=0)
    return images, masks


def test_shipped_checkpoint_is_compact_and_renders_demo_masks(shipped, demo, tmp_path):
    path, _, config, ckpt = shipped
    assert config["img_size"] == 128 and config["classes"] == ["melanoma", "nevus", "seborrheic_keratosis"]
    weights = [k for k in ckpt["generator"] if k.endswith(".weight")]
    assert weights and all(ckpt["generator"][k].dtype == torch.float16 for k in weights) and os.path.getsize(path) < 15e6
    out = tmp_path / "out"
    generate.main(["--model_folder", PRETRAINED, "--input_dir", str(demo[1]), "--output_dir", str(out)])
    masks = PairedDataset(str(demo[1]), 128)
    for name, mask in zip(masks.names, masks.masks):
        image = cv2.imread(str(out / f"gen_only_{name}.png"), cv2.IMREAD_GRAYSCALE)
        assert image.shape == (128, 128)
        lesion = mask[0].numpy() > 0
        assert image[lesion].mean() < image[~lesion].mean() - 10  # the lesion is where the mask says, darker


def test_style_image_moves_colours_toward_the_reference(shipped, demo, tmp_path):
    path, generator, config, ckpt = shipped
    encoder = checkpoints.load_style_encoder(ckpt, config, path)
    photo = cv2.imread(str(sorted(demo[0].iterdir())[0]))
    references = {"dark": (photo * 0.45).astype(np.uint8), "as_is": photo,
                  "pale": np.clip(photo * 0.6 + 100, 0, 255).astype(np.uint8)}
    masks = PairedDataset(str(demo[1]), 128).masks
    nevus = torch.full((len(masks),), config["classes"].index("nevus"))
    ref_colour, render_colour = {}, {}
    for name, image in references.items():
        file = str(tmp_path / f"{name}.png")
        cv2.imwrite(file, image)
        ref_colour[name] = torch.from_numpy(read_image(file, 128)).float().mean((1, 2))
        styles = generate.style_codes(encoder, config, file).expand(len(masks), -1)
        render_colour[name] = generate.render(generator, config, masks, nevus, styles=styles).float().mean((0, 2, 3))
    brightness = [render_colour[n].mean() for n in ("dark", "as_is", "pale")]
    assert brightness[0] + 15 < brightness[1] < brightness[2] - 10
    for name in references:  # each reference's render is the nearest in colour to that reference
        distances = {other: (render_colour[other] - ref_colour[name]).norm() for other in references}
        assert min(distances, key=distances.get) == name


def test_class_looks_come_from_that_class_only(shipped):
    _, generator, config, _ = shipped
    bank, bank_labels = generator.style_bank, generator.style_labels
    assert set(bank_labels.tolist()) == {0, 1, 2}  # the bank holds looks of every class, and knows which
    for c in range(3):
        torch.manual_seed(c)
        drawn = generator.sample_styles(64, "cpu", torch.full((64,), c))
        rows = (drawn[:, None, :] == bank[None]).all(-1).float().argmax(1)
        assert bank_labels[rows].eq(c).all()


def test_looks_of_large_lesions_go_to_large_masks(shipped):
    _, generator, _, _ = shipped
    areas = generator.style_areas
    assert (areas > 0).all() and (areas < 1).all() and areas.max() > 10 * areas.min()  # the checkpoint carries them
    for target in (areas.min(), areas.max()):
        torch.manual_seed(0)
        nevus = torch.full((64,), 1)
        drawn = generator.sample_styles(64, "cpu", nevus, torch.full((64,), float(target)))
        rows = (drawn[:, None, :] == generator.style_bank[None]).all(-1).float().argmax(1)
        others = areas[generator.style_labels == 1]
        # every look drawn comes from the nevi whose lesions are among the 32 nearest in size
        cutoff = (others.log() - target.log()).abs().sort().values[models.STYLE_NEIGHBOURS - 1]
        assert ((areas[rows].log() - target.log()).abs() <= cutoff + 1e-6).all()
