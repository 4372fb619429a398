"""The real default architecture: shapes, parameter counts, patch map, init; checkpoint helpers."""
import os

import pytest
import torch

import models


def test_default_generator_at_128_has_7_levels_and_maps_mask_to_image():
    config = models.make_config()
    G = models.build_generator(config).eval()
    assert len(G.downs) == 7 and len(G.ups) == 6  # + the output layer = 7 up levels
    masks = torch.zeros(2, 1, 128, 128)
    with torch.no_grad():
        out = G(masks)
    assert out.shape == (2, 3, 128, 128)
    assert out.abs().max() <= 1.0  # Tanh output
    # README quotes these counts; a change to the architecture must update both.
    assert models.count_params(G) == 5_301_731


def test_discriminator_scores_8x8_patches_at_128_and_16x16_at_256():
    D = models.build_discriminator(models.make_config())
    [scores] = D(torch.zeros(2, 1, 128, 128), torch.zeros(2, 3, 128, 128))
    assert scores.shape == (2, 1, 8, 8)
    assert models.count_params(D) == 693_409
    D256 = models.build_discriminator(models.make_config(img_size=256))
    assert D256(torch.zeros(1, 1, 256, 256), torch.zeros(1, 3, 256, 256))[0].shape == (1, 1, 16, 16)


def test_multiscale_discriminator_adds_coarser_patchgans():
    D = models.build_discriminator(models.make_config(d_scales=3))
    masks, images = torch.zeros(2, 1, 128, 128), torch.randn(2, 3, 128, 128)
    scores, features = D(masks, images, return_features=True)
    assert [s.shape[-1] for s in scores] == [8, 4, 2]
    assert len(features) == 3 * 4  # every LeakyReLU of every scale
    assert models.count_params(D) == 3 * 693_409
    # The full-resolution PatchGAN is the single-scale one: old checkpoints load into it unchanged.
    single = models.build_discriminator(models.make_config())
    D.net.load_state_dict(single.net.state_dict())
    assert torch.equal(D.eval()(masks, images)[0], single.eval()(masks, images)[0])
    with pytest.raises(ValueError, match="d_scales"):
        models.make_config(img_size=32, d_scales=3)


def test_depth_follows_img_size():
    G = models.build_generator(models.make_config(img_size=256, ngf=8)).eval()
    assert len(G.downs) == 8
    with torch.no_grad():
        assert G(torch.zeros(1, 1, 256, 256)).shape == (1, 3, 256, 256)


def test_generator_has_batchnorm_dropout_in_inner_decoder_levels_and_residual_blocks():
    G = models.build_generator(models.make_config())
    dropout_levels = [i for i, up in enumerate(G.ups) if any(isinstance(m, torch.nn.Dropout) for m in up.modules())]
    assert dropout_levels == [0, 1, 2]  # the three innermost
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in G.modules())
    assert sum(isinstance(m, models.ResidualBlock) for m in G.modules()) == 8  # 4-32 px, encoder and decoder
    G_in = models.build_generator(models.make_config(norm="instance"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in G_in.modules())


def test_weights_start_from_normal_0_002():
    G = models.build_generator(models.make_config())
    weights = torch.cat([m.weight.flatten() for m in G.modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(weights.mean().item()) < 1e-3
    assert abs(weights.std().item() - 0.02) < 1e-3


@pytest.mark.parametrize("size", [100, 8, 0])
def test_img_size_must_be_a_power_of_two(size):
    with pytest.raises(ValueError, match="power of two"):
        models.make_config(img_size=size)


def test_conditional_generator_output_depends_on_class():
    config = models.make_config(img_size=32, ngf=8, n_classes=3, classes=["a", "b", "c"])
    G = models.build_generator(config).eval()
    masks = torch.zeros(2, 1, 32, 32)
    masks[:, :, 8:24, 8:24] = 1
    with torch.no_grad():
        out_a = G(masks, models.class_planes(torch.tensor([0, 0]), 3, 32))
        out_b = G(masks, models.class_planes(torch.tensor([1, 1]), 3, 32))
    assert (out_a - out_b).abs().mean() > 1e-4
    D = models.build_discriminator(config)
    assert D(masks, out_a, models.class_planes(torch.tensor([0, 0]), 3, 32))[0].shape == (2, 1, 2, 2)


def test_latest_checkpoint_is_highest_epoch_by_number(tmp_path):
    for epoch in (15, 90, 150, 135):
        (tmp_path / f"generator_epoch_{epoch}.pth").write_bytes(b"x")
    (tmp_path / "generator_epoch_best.pth").write_bytes(b"x")
    assert models.latest_generator_path(str(tmp_path)).endswith("generator_epoch_150.pth")
    with pytest.raises(models.CheckpointError, match="no such model folder"):
        models.latest_generator_path(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.CheckpointError, match="no generator_epoch"):
        models.latest_generator_path(str(tmp_path / "empty"))


def test_save_atomic_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pth")
    models.save_atomic({"epoch": 1}, path)

    def crash(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt  # a kill in the middle of writing

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        models.save_atomic({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}


def test_load_generator_rejects_non_checkpoints_and_other_architectures(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(models.CheckpointError, match="notes.pth: not a PixelGAN checkpoint"):
        models.load_generator(str(text))
    config = models.make_config(img_size=32, ngf=4)
    G = models.build_generator(config)
    other = dict(config, ngf=8)
    torch.save({"config": other, "generator": G.state_dict(), "epoch": 1}, tmp_path / "g.pth")
    with pytest.raises(models.CheckpointError, match="do not match"):
        models.load_generator(str(tmp_path / "g.pth"))
    torch.save({"weights": 1}, tmp_path / "dict.pth")
    with pytest.raises(models.CheckpointError, match="not a PixelGAN generator checkpoint"):
        models.load_generator(str(tmp_path / "dict.pth"))


def test_checkpoint_with_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"config": {}, "generator": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(models.CheckpointError, match="evil.pth"):
        models.load_checkpoint(str(tmp_path / "evil.pth"))
