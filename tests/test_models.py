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


def test_input_noise_lets_one_mask_render_differently_where_noise_maps_are_off():
    """OASIS's 3-D noise: channels beside the mask, one value per image, spread over the image; without it
    (and without noise maps or a style code) the generator is a function of the mask."""
    masks = torch.zeros(2, 1, 32, 32)
    masks[:, :, 8:24, 8:24] = 1
    plain = models.build_generator(models.make_config(**PLAIN, img_size=32, ngf=8)).eval()
    noisy = models.build_generator(models.make_config(**PLAIN, img_size=32, ngf=8, input_noise=4)).eval()
    assert noisy.downs[0].block[0].in_channels == plain.downs[0].block[0].in_channels + 4
    with torch.no_grad():
        assert torch.equal(plain(masks), plain(masks))
        a, b = noisy(masks), noisy(masks)
    assert (a - b).abs().mean() > 1e-4 and (a[0] - a[1]).abs().mean() > 1e-4  # new noise per call and per image


def test_styles_are_drawn_from_lesions_of_about_the_rendered_size():
    G = models.build_generator(models.make_config(img_size=32, ngf=4, style_dim=2))
    rows = G.style_bank.shape[0]
    G.style_bank.copy_(torch.arange(rows, dtype=torch.float32)[:, None].expand(-1, 2))  # row i's code: (i, i)
    # rows 0..127: lesions of 1% of the image, 128..255: 50%
    G.style_areas.copy_(torch.where(torch.arange(rows) < rows // 2, 0.01, 0.5))
    small, large = torch.full((64, 1, 32, 32), -1.0), torch.full((64, 1, 32, 32), -1.0)
    small[:, :, 15:18, 15:18], large[:, :, :16] = 1.0, 1.0  # 9 px of 1,024 and a half
    torch.manual_seed(0)
    assert (G.sample_styles(64, "cpu", areas=models.lesion_area(small))[:, 0] < rows // 2).all()
    assert (G.sample_styles(64, "cpu", areas=models.lesion_area(large))[:, 0] >= rows // 2).all()
    # among the rows of the rendered class, even when none of them is near in size
    G.style_labels.copy_(torch.arange(rows) % 2)
    drawn = G.sample_styles(64, "cpu", torch.ones(64, dtype=torch.long), models.lesion_area(small))[:, 0]
    assert (drawn % 2 == 1).all() and (drawn < rows // 2).all()
    # without known areas (checkpoints saved before them) every row of the class can be drawn
    G.style_areas.fill_(-1.0)
    drawn = G.sample_styles(400, "cpu", torch.ones(400, dtype=torch.long), models.lesion_area(small))[:, 0]
    assert (drawn % 2 == 1).all() and (drawn >= rows // 2).any()


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
    before = [b.clone() for b in D.projected.features.buffers()]
    D(masks, images)
    assert all(torch.equal(b, a) for b, a in zip(before, D.projected.features.buffers()))
    # init_weights leaves the pretrained weights alone
    assert torch.equal(D.projected.features.stem[0].weight, models.FeatureTaps().stem[0].weight)
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


def test_trunk_with_folded_batchnorm_computes_the_pretrained_network():
    """FeatureTaps folds the frozen BatchNorms into their convolutions and runs the strided depthwise ones in
    fp32 under bf16 autocast (speed): the taps must stay those of the package's own network."""
    taps = models.FeatureTaps()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in taps.modules())
    net = weights.load_feature_network()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    reference, h = [], net._swish(net._bn0(net._conv_stem(x)))
    for i, block in enumerate(net._blocks[:models.FEATURE_TAPS[-1] + 1]):
        h = block(h)
        if i in models.FEATURE_TAPS:
            reference.append(h)
    ours = taps(x)
    assert [o.shape for o in ours] == [r.shape for r in reference]
    for o, r in zip(ours, reference):
        assert torch.allclose(o, r, rtol=1e-4, atol=1e-4 * r.abs().max())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = taps(x)
    for o, r in zip(low, reference):  # bf16 rounding only
        assert o.dtype == torch.bfloat16 and (o.float() - r).abs().mean() < 0.05 * r.abs().mean()


def test_real_and_fake_scored_in_one_call_as_if_each_alone():
    """groups=2 (the D step): the frozen trunk runs once over both batches, but every BatchNorm still sees
    each batch alone, so the scores are those of two separate calls."""
    torch.manual_seed(0)
    D = models.build_discriminator(models.make_config(img_size=64)).train()
    masks = (torch.rand(3, 1, 64, 64) > 0.5).float() * 2 - 1
    reals, fakes = torch.rand(3, 3, 64, 64) * 2 - 1, torch.rand(3, 3, 64, 64) * 0.2
    together = D(torch.cat([masks, masks]), torch.cat([reals, fakes]), groups=2)
    real_alone, fake_alone = D(masks, reals), D(masks, fakes)
    assert len(together) == 5
    for both, r, f in zip(together, real_alone, fake_alone):
        assert torch.allclose(both[:3], r, atol=1e-5) and torch.allclose(both[3:], f, atol=1e-5)
    mixed = D(torch.cat([masks, masks]), torch.cat([reals, fakes]))  # one batch: statistics shared
    assert not torch.allclose(mixed[0][:3], real_alone[0], atol=1e-3)


def test_reflect_padding_runs_in_the_autocast_dtype_with_the_same_result(monkeypatch):
    conv = models.Conv2d(4, 5, 3, padding=1, padding_mode="reflect")
    stock = torch.nn.Conv2d(4, 5, 3, padding=1, padding_mode="reflect")
    stock.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, 8, 8)
    assert torch.allclose(conv(x), stock(x), atol=1e-6)
    padded = []
    pad = models.F.pad
    monkeypatch.setattr(models.F, "pad", lambda *a, **k: padded.append(pad(*a, **k)) or padded[-1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = conv(x.bfloat16())
    monkeypatch.undo()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = stock(x.bfloat16())
    assert [p.dtype for p in padded] == [torch.bfloat16]  # stock autocast pads in fp32: a cast and a copy
    assert torch.equal(ours, theirs)  # padding copies values, so the bf16 result is the same


def test_last_noise_map_applied_after_the_last_convolution_gives_the_same_output():
    G = models.build_generator(models.make_config(img_size=32, ngf=8)).eval()
    last = G.out[0]
    assert isinstance(last, models.NoisyOutput)
    torch.nn.init.normal_(last[1].strength)
    h = torch.randn(2, 16, 16, 16)
    torch.manual_seed(1)
    fused = last(h)
    torch.manual_seed(1)
    plain = torch.nn.Sequential.forward(last, h)  # upsample, add the noise, convolve
    assert torch.allclose(fused, plain, atol=1e-5)
    torch.manual_seed(2)
    assert not torch.allclose(last(h), fused, atol=1e-3)  # the noise is in it
