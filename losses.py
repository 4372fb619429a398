"""Every term of the training objective: the GAN loss of both critics, DiffAugment of the critics' inputs,
the L1 reconstruction, the ST-LPIPS perceptual distance, MSGAN's mode-seeking term and the style code's KL term."""
import torch
import torch.nn.functional as F

DIFFAUG_POLICIES = {"color", "flip", "translation", "cutout"}


def diff_augment(masks, *images, policy=""):
    """DiffAugment (Zhao et al. 2020): random, differentiable transforms of D's inputs, so D cannot
    memorise a small training set. Each sample gets one draw, applied alike to its mask and to every
    image passed (real and fake alike when both are given); geometry moves mask and image together."""
    if not policy:
        return (masks, *images)
    n, size, device, dtype = masks.shape[0], masks.shape[-1], masks.device, images[0].dtype
    if "color" in policy:
        brightness = (torch.rand(n, 1, 1, 1, device=device, dtype=dtype) - 0.5) * 0.4
        saturation = torch.rand(n, 1, 1, 1, device=device, dtype=dtype) * 0.6 + 0.7
        contrast = torch.rand(n, 1, 1, 1, device=device, dtype=dtype) * 0.5 + 0.75

        def color(x):
            x = x + brightness
            x = (x - x.mean(dim=1, keepdim=True)) * saturation + x.mean(dim=1, keepdim=True)
            return (x - x.mean(dim=(1, 2, 3), keepdim=True)) * contrast + x.mean(dim=(1, 2, 3), keepdim=True)

        images = [color(x) for x in images]
    tensors = [masks, *images]
    if "flip" in policy:
        # Dermoscopy has no up or left (training pairs are flipped and turned already), so each sample can reach
        # the critics in any of the 8 symmetries of the square; measured at equal time: lower FID and a
        # lower AlexNet distance (docs/results.md).
        swap_x, swap_y, transpose = (torch.rand(3, n, 1, 1, 1, device=device) < 0.5)

        def flip(x):
            x = torch.where(swap_x, x.flip(3), x)
            x = torch.where(swap_y, x.flip(2), x)
            return torch.where(transpose, x.transpose(2, 3), x)

        tensors = [flip(x) for x in tensors]
    if "translation" in policy:
        # Per sample, and the uncovered band filled with zeros, as DiffAugment does. A circular shift would
        # join the right edge to the left (and bottom to top) inside the image: the critic then judges that
        # seam, and a generator answers with a dark frame line along one edge of every render.
        shift = size // 8
        dy, dx = torch.randint(-shift, shift + 1, (2, n, 1, 1), device=device)
        rows = torch.arange(size, device=device).view(1, size, 1) - dy + shift
        cols = torch.arange(size, device=device).view(1, 1, size) - dx + shift
        batch = torch.arange(n, device=device).view(n, 1, 1)
        tensors = [F.pad(x, [shift] * 4)[batch, :, rows, cols].permute(0, 3, 1, 2) for x in tensors]
    if "cutout" in policy:
        half = size // 8
        cy, cx = torch.randint(0, size, (2, n, 1, 1, 1), device=device)
        ys = torch.arange(size, device=device).view(1, 1, size, 1)
        xs = torch.arange(size, device=device).view(1, 1, 1, size)
        keep = (((ys - cy).abs() >= half) | ((xs - cx).abs() >= half)).to(dtype)
        tensors = [x * keep for x in tensors]
    return tuple(tensors)


def gan_loss(scores, is_real, n_patch_maps=None):
    """LSGAN loss of the discriminator's score maps: the mean over the PatchGAN's scales (the first
    n_patch_maps maps) plus, with a projected critic, the mean over its scales (the rest), so that
    each critic weighs the same however many scales it has."""
    if n_patch_maps is not None and 0 < n_patch_maps < len(scores):
        return gan_loss(scores[:n_patch_maps], is_real) + gan_loss(scores[n_patch_maps:], is_real)
    target = 1.0 if is_real else 0.0
    # fp32 losses whatever the autocast dtype
    return sum(F.mse_loss(s.float(), torch.full_like(s.float(), target)) for s in scores) / len(scores)


def reconstruction_loss(fakes, reals, scale=1):
    """L1 between the images area-downsampled by scale (a power of two; 1: pixel L1). At 4 it keeps what
    mask and photograph share (layout, colour, brightness) and leaves texture finer than 4 px to the
    critics, which an L1 to one particular photograph would otherwise average into flat colour."""
    return F.l1_loss(F.avg_pool2d(fakes.float(), scale), F.avg_pool2d(reals.float(), scale))


def mode_seeking_loss(fakes_1, fakes_2, scale=1, eps=0.1):
    """MSGAN (Mao et al., CVPR 2019): the inverse of how far two renders of the same input under different
    noise lie apart, so that minimising it makes the noise matter. On images area-downsampled by scale: at 4
    it asks for different layouts of marks and colour, not for per-pixel speckle that the cheapest noise
    map would give. The noise draws' own distance is a constant here (independent N(0, 1) maps), so it is
    left out. eps is MSGAN's 1e-5 raised to 0.1: the noise strengths start at zero, the two renders equal,
    and the gradient 1 / (distance + eps)^2 of the first steps would otherwise fill Adam's second moment
    for thousands of steps."""
    distance = (F.avg_pool2d(fakes_1.float(), scale) - F.avg_pool2d(fakes_2.float(), scale)).abs().mean()
    return 1.0 / (distance + eps)


def perceptual_loss(lpips, fakes, reals):
    """Mean ST-LPIPS distance (lpips: weights.load_stlpips(), frozen); shift-tolerant, so a texture
    drawn a pixel or two off its photograph's costs little."""
    return lpips(fakes, reals).float().mean()


def kl_loss(mu, logvar):
    """KL divergence of the style encoder's N(mu, exp(logvar)) from N(0, I), summed over the code and
    averaged over the batch (the cVAE term of BicycleGAN)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1).mean()
