"""The architecture (models.py): shapes, parameter counts, patch map, init, the projected critic."""
import pytest
import torch

import models
import weights

# The architecture the counts and shapes below were written for (README quotes them): the plain generator
# and the PatchGAN alone, the original recipe's (train.ORIGINAL_RECIPE); today's default adds to both.
PLAIN = dict(upsample="transpose", noise_maps=False, padding="zeros", style_dim=0, projected_d=False)


def test_default_generator_at_128_has_7_levels_and_maps_mask_to_image():
    config = models.make_config(**PLAIN)
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
    D = models.build_discriminator(models.make_config(**PLAIN))
    [scores] = D(torch.zeros(2, 1, 128, 128), torch.zeros(2, 3, 128, 128))
    assert scores.shape == (2, 1, 8, 8)
    assert models.count_params(D) == 693_409
    D256 = models.build_discriminator(models.make_config(**PLAIN, img_size=256))
    assert D256(torch.zeros(1, 1, 256, 256), torch.zeros(1, 3, 256, 256))[0].shape == (1, 1, 16, 16)


def test_multiscale_discriminator_adds_coarser_patchgans():
    D = models.build_discriminator(models.make_config(**PLAIN, d_scales=3))
    masks, images = torch.zeros(2, 1, 128, 128), torch.randn(2, 3, 128, 128)
    scores = D(masks, images)
    assert [s.shape[-1] for s in scores] == [8, 4, 2]
    assert models.count_params(D) == 3 * 693_409
    # The full-resolution PatchGAN is the single-scale one: old checkpoints load into it unchanged.
    single = models.build_discriminator(models.make_config(**PLAIN))
    D.net.load_state_dict(single.net.state_dict())
    assert torch.equal(D.eval()(masks, images)[0], single.eval()(masks, images)[0])
    with pytest.raises(ValueError, match="d_scales"):
        models.make_config(**PLAIN, img_size=32, d_scales=3)


def test_depth_follows_img_size():
    G = models.build_generator(models.make_config(**PLAIN, img_size=256, ngf=8)).eval()
    assert len(G.downs) == 8
    with torch.no_grad():
        assert G(torch.zeros(1, 1, 256, 256)).shape == (1, 3, 256, 256)


def test_generator_has_batchnorm_dropout_in_inner_decoder_levels_and_residual_blocks():
    G = models.build_generator(models.make_config(**PLAIN))
    dropout_levels = [i for i, up in enumerate(G.ups) if any(isinstance(m, torch.nn.Dropout) for m in up.modules())]
    assert dropout_levels == [0, 1, 2]  # the three innermost
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in G.modules())
    assert sum(isinstance(m, models.ResidualBlock) for m in G.modules()) == 8  # 4-32 px, encoder and decoder
    G_in = models.build_generator(models.make_config(**PLAIN, norm="instance"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in G_in.modules())


def test_weights_start_from_normal_0_002():
    G = models.build_generator(models.make_config(**PLAIN))
    weights = torch.cat([m.weight.flatten() for m in G.modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(weights.mean().item()) < 1e-3
    assert abs(weights.std().item() - 0.02) < 1e-3


@pytest.mark.parametrize("size", [100, 8, 0])
def test_img_size_must_be_a_power_of_two(size):
    with pytest.raises(ValueError, match="power of two"):
        models.make_config(**PLAIN, img_size=size)


def test_conditional_generator_output_depends_on_class():
    config = models.make_config(**PLAIN, img_size=32, ngf=8, n_classes=3, classes=["a", "b", "c"])
    G = models.build_generator(config).eval()
    masks = torch.zeros(2, 1, 32, 32)
    masks[:, :, 8:24, 8:24] = 1
    with torch.no_grad():
        out_a = G(masks, models.class_planes(torch.tensor([0, 0]), 3, 32))
        out_b = G(masks, models.class_planes(torch.tensor([1, 1]), 3, 32))
    assert (out_a - out_b).abs().mean() > 1e-4
    D = models.build_discriminator(config)
    assert D(masks, out_a, models.class_planes(torch.tensor([0, 0]), 3, 32))[0].shape == (2, 1, 2, 2)


def test_projected_discriminator_on_frozen_imagenet_features():
    D = models.build_discriminator(models.make_config(projected_d=True))
    masks, images = torch.zeros(2, 1, 128, 128), torch.rand(2, 3, 128, 128) * 2 - 1
    scores = D(masks, images)
    # the PatchGAN's 8x8 map first, then one map per feature tap (32, 16, 8, 4 px -> 8, 8, 8, 4)
    assert [tuple(s.shape[1:]) for s in scores] == [(1, 8, 8), (1, 8, 8), (1, 8, 8), (1, 8, 8), (1, 4, 4)]
    assert D.n_patch_maps == 1
    # Only the PatchGAN and the light per-scale heads train; the pretrained trunk is in no optimizer,
    # in no checkpoint, and keeps its ImageNet BatchNorm statistics in training mode.
    assert models.count_params(D) == 693_409 + models.count_params(D.projected.heads)
    assert not any(key.startswith("projected.features") for key in D.state_dict())
    assert {"projected.ccm0", "projected.csm0"} <= set(D.state_dict())  # the fixed random mixing is saved
    D.train()
    assert not D.projected.features.training
    before = D.projected.features.stem[1].running_mean.clone()
    D(masks, images)
    assert torch.equal(before, D.projected.features.stem[1].running_mean)
    # init_weights leaves the pretrained weights alone: the trunk still predicts the check photograph.
    trunk = weights.load_feature_network()
    assert torch.equal(D.projected.features.stem[0].weight, trunk._conv_stem.weight)
    # G is trained through the frozen features: gradients reach the image, and the mask changes the scores.
    images.requires_grad_(True)
    sum(s.mean() for s in D(masks, images)[1:]).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    with torch.no_grad():
        other = D.eval()(torch.ones(2, 1, 128, 128), images)
        assert not torch.equal(other[1], D(masks, images)[1])
    # the fixed mixing is the same in every build (its own seed), so saved heads always fit it
    again = models.build_discriminator(models.make_config(projected_d=True))
    assert torch.equal(again.projected.ccm3, D.projected.ccm3)
    with pytest.raises(ValueError, match="projected_d"):
        models.make_config(img_size=16, projected_d=True)
