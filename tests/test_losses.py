"""The training objective's terms (losses.py)."""
import torch

import losses
import weights


def test_diff_augment_transforms_mask_real_and_fake_alike():
    torch.manual_seed(0)
    masks = (torch.rand(6, 1, 32, 32) > 0.5).float() * 2 - 1
    images = masks.expand(-1, 3, -1, -1).clone()
    m, real, fake = losses.diff_augment(masks, images, images.clone(), policy="translation,cutout")
    assert torch.equal(real, fake) and torch.equal(real, m.expand(-1, 3, -1, -1))
    assert not torch.equal(m, masks)  # something moved or was cut out
    _, real_c, fake_c = losses.diff_augment(masks, images, images.clone(), policy="color")
    assert torch.equal(real_c, fake_c) and not torch.equal(real_c, images)
    assert losses.diff_augment(masks, images, policy="")[1] is images


def test_diff_augment_translation_shifts_each_sample_and_fills_with_zeros():
    torch.manual_seed(0)
    size, shift = 32, 4
    images = torch.arange(size * size, dtype=torch.float32).view(1, 1, size, size).add(1).repeat(16, 3, 1, 1)
    masks = torch.ones(16, 1, size, size)
    m, moved = losses.diff_augment(masks, images, policy="translation")
    offsets = set()
    for k in range(16):
        kept = m[k, 0].nonzero()
        (top, left), (bottom, right) = kept.min(0).values.tolist(), kept.max(0).values.tolist()
        dy, dx = (top if top else bottom - (size - 1)), (left if left else right - (size - 1))
        assert max(abs(dy), abs(dx)) <= shift and m[k, 0].sum() == (size - abs(dy)) * (size - abs(dx))
        # what is kept is the image moved by (dy, dx); nothing wraps around from the opposite edge
        assert torch.equal(moved[k][:, top:bottom + 1, left:right + 1],
                           images[k][:, max(-dy, 0):size - max(dy, 0), max(-dx, 0):size - max(dx, 0)])
        assert moved[k].sum() == moved[k][:, top:bottom + 1, left:right + 1].sum()
        offsets.add((dy, dx))
    assert len(offsets) > 8  # one draw per sample, not one per batch


def test_diff_augment_flip_draws_each_sample_one_symmetry_of_the_square():
    torch.manual_seed(0)
    base = torch.arange(16.0).view(1, 1, 4, 4)  # no two of its 8 symmetries are equal
    masks = base.repeat(64, 1, 1, 1)
    images = (base * 2).repeat(64, 3, 1, 1)
    m, real, fake = losses.diff_augment(masks, images, images.clone(), policy="flip")
    assert torch.equal(real, fake) and torch.equal(real, 2 * m.expand(-1, 3, -1, -1))
    symmetries = [torch.rot90(b, k, (2, 3)) for b in (base, base.flip(3)) for k in range(4)]
    seen = {next(i for i, s in enumerate(symmetries) if torch.equal(x[None], s)) for x in m}  # each a symmetry
    assert len(seen) == 8
    x = images.clone().requires_grad_(True)
    losses.diff_augment(masks, x, policy="flip")[1].sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # a permutation of pixels: the gradient reaches every one once


def test_perceptual_loss_is_zero_for_equal_images_and_grows_with_blur():
    lpips = weights.load_stlpips()
    photo = weights.check_photo(64)
    blurred = torch.nn.functional.avg_pool2d(photo, 3, stride=1, padding=1, count_include_pad=False)
    blurrier = torch.nn.functional.avg_pool2d(photo, 7, stride=1, padding=3, count_include_pad=False)
    assert float(lpips(photo, photo).flatten()[0]) == 0 and float(losses.perceptual_loss(lpips, photo, photo)) == 0
    assert 0 < float(lpips(photo, blurred).flatten()[0]) < float(lpips(photo, blurrier).flatten()[0])
    fake = blurred.clone().requires_grad_(True)
    lpips(fake, photo).sum().backward()
    assert fake.grad.abs().sum() > 0 and not any(p.requires_grad for p in lpips.parameters())


def test_gan_loss_weighs_the_patchgan_and_the_projected_critic_alike():
    patch, projected = [torch.zeros(2, 1, 8, 8)], [torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)]
    assert float(losses.gan_loss(patch, is_real=True)) == 1 and float(losses.gan_loss(patch, is_real=False)) == 0
    # each critic's maps averaged on their own, then summed: 1 (PatchGAN) + 2/3 (two of three projected maps off)
    assert abs(float(losses.gan_loss(patch + projected, True, n_patch_maps=1)) - (1 + 2 / 3)) < 1e-6


def test_reconstruction_and_kl_terms():
    checker = ((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2 - 1.0).expand(1, 3, 8, 8)
    assert float(losses.reconstruction_loss(checker, torch.zeros_like(checker))) == 1
    assert float(losses.reconstruction_loss(checker, torch.zeros_like(checker), scale=2)) == 0  # 2x2 means are 0
    assert float(losses.kl_loss(torch.zeros(4, 8), torch.zeros(4, 8))) == 0  # the prior itself
    assert float(losses.kl_loss(torch.ones(4, 8), torch.zeros(4, 8))) == 4  # 0.5 x 8 dimensions x 1


def test_mode_seeking_loss_is_the_inverse_distance_of_the_pooled_renders():
    a = torch.zeros(2, 3, 8, 8)
    assert abs(float(losses.mode_seeking_loss(a, a + 0.5)) - 1 / 0.6) < 1e-5
    assert abs(float(losses.mode_seeking_loss(a, a)) - 10) < 1e-5  # identical renders: the term is at its largest
    checker = ((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2 - 1.0).expand(2, 3, 8, 8)
    # per-pixel speckle whose 2 x 2 means are 0 does not count as a different render at scale 2
    assert abs(float(losses.mode_seeking_loss(a, checker, scale=1)) - 1 / 1.1) < 1e-5
    assert abs(float(losses.mode_seeking_loss(a, checker, scale=2)) - 10) < 1e-5
