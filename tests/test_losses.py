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
