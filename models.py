"""Residual U-Net generator and conditional PatchGAN discriminator (pix2pix with residual connections).

Both networks are rebuilt from a plain config dict that every checkpoint carries, so generate.py,
evaluate.py and resumed runs never need to be told the architecture.

    python models.py [--img_size 128]   prints parameter counts, GFLOPs and output shapes
"""
import argparse
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_CONFIG = dict(
    img_size=128,
    mask_channels=1,
    image_channels=3,
    n_classes=0,          # > 0: class-conditional, one-hot planes appended to the mask (G and D)
    ngf=32,               # generator width at the outermost level; doubles per level up to ngf * g_max_mult
    g_max_mult=4,
    ndf=32,
    norm="batch",
    upsample="transpose",  # transpose | resize (bilinear upsample + 3x3 conv, no checkerboard)
    res_min_size=4,       # residual blocks at every level whose feature map is between these sizes
    res_max_size=32,
    dropout=0.5,
    n_dropout_levels=3,   # innermost decoder levels with dropout, as in pix2pix
    noise_dim=0,          # > 0: a style code z joins the bottleneck (skin tone, vignette, ...): N(0, I), or see style_encoder
    style_encoder=False,  # learn z from the real image while training (cVAE, BicycleGAN); sample it from style_bank
    style_bank_size=256,  # style codes of training images kept in the generator for sampling
    noise_injection=False,  # per-pixel noise with learned per-channel strength in every decoder level (texture)
    d_spectral_norm=False,
    d_scales=1,           # > 1: multi-scale discriminator (pix2pixHD), each scale at half the previous resolution
    classes=[],           # class names, index = one-hot position
)


def make_config(**overrides):
    config = dict(DEFAULT_CONFIG)
    unknown = set(overrides) - set(config)
    if unknown:
        raise ValueError(f"unknown model config keys: {sorted(unknown)}")
    config.update(overrides)
    size = config["img_size"]
    if size < 16 or size & (size - 1):
        raise ValueError(f"img_size must be a power of two >= 16, got {size}")
    if config["norm"] not in ("batch", "instance"):
        raise ValueError(f"norm must be 'batch' or 'instance', got {config['norm']!r}")
    if config["d_scales"] < 1 or size >> (config["d_scales"] - 1) < 16:
        raise ValueError(f"d_scales must be >= 1 and leave the coarsest scale at least 16 px, got {config['d_scales']} at {size}")
    if config["style_encoder"] and config["noise_dim"] < 1:
        raise ValueError("style_encoder needs noise_dim >= 1 (the size of the style code)")
    if config["upsample"] not in ("transpose", "resize"):
        raise ValueError(f"upsample must be 'transpose' or 'resize', got {config['upsample']!r}")
    return config


def n_levels(img_size):
    # Down to a 1x1 bottleneck: 7 levels at 128, 8 at 256.
    return int(math.log2(img_size))


def norm_layer(kind, channels):
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.InstanceNorm2d(channels, affine=True)


class ResidualBlock(nn.Module):
    def __init__(self, channels, norm):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), norm_layer(norm, channels), nn.ReLU(True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), norm_layer(norm, channels),
        )

    def forward(self, x):
        return F.relu(x + self.body(x))


class Down(nn.Module):
    def __init__(self, c_in, c_out, norm, use_norm, residual):
        super().__init__()
        layers = [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=not use_norm)]
        if use_norm:
            layers.append(norm_layer(norm, c_out))
        layers.append(nn.LeakyReLU(0.2, True))
        if residual:
            layers.append(ResidualBlock(c_out, norm))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return self.block(x)


def up_conv(c_in, c_out, mode, bias):
    if mode == "transpose":
        return nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=bias)
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                         nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias))


class NoiseInjection(nn.Module):
    """x + strength * N(0, 1) per pixel (StyleGAN): a source of fine, non-repeating texture.
    The strength starts at zero, so the network only uses the noise as far as it helps."""

    def __init__(self, channels):
        super().__init__()
        self.strength = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x):
        return x + self.strength * torch.randn(x.shape[0], 1, x.shape[2], x.shape[3], device=x.device, dtype=x.dtype)


class Up(nn.Module):
    def __init__(self, c_in, c_out, norm, upsample, dropout, residual, noise=False):
        super().__init__()
        layers = [up_conv(c_in, c_out, upsample, bias=False)] + ([NoiseInjection(c_out)] if noise else [])
        layers += [norm_layer(norm, c_out), nn.ReLU(True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        if residual:
            layers.append(ResidualBlock(c_out, norm))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return self.block(x)


class Generator(nn.Module):
    """U-Net with log2(img_size) levels, residual blocks at the mid resolutions, skip concatenation.

    Residual blocks sit where they buy the most per FLOP: at 4-32 px the receptive field grows
    fast and convolutions are cheap; at 64-128 px they would dominate the cost.
    """

    def __init__(self, config):
        super().__init__()
        c = config
        levels = n_levels(c["img_size"])
        widths = [c["ngf"] * min(2 ** i, c["g_max_mult"]) for i in range(levels)]
        sizes = [c["img_size"] >> (i + 1) for i in range(levels)]  # feature size after each down level
        residual = [c["res_min_size"] <= s <= c["res_max_size"] for s in sizes]
        in_channels = c["mask_channels"] + c["n_classes"]

        self.downs = nn.ModuleList()
        for i in range(levels):
            # No norm at the outermost level (as pix2pix) nor at the 1x1 bottleneck (batch stats of one pixel).
            use_norm = 0 < i < levels - 1
            self.downs.append(Down(in_channels if i == 0 else widths[i - 1], widths[i], c["norm"], use_norm, residual[i]))

        self.noise_dim = c["noise_dim"]
        if c["style_encoder"]:
            # Filled by train.py with the encoded styles of training images; sampling draws rows of it,
            # so every render gets the look of a real image rather than of an arbitrary point in z-space.
            self.register_buffer("style_bank", torch.zeros(c["style_bank_size"], c["noise_dim"]))
        self.ups = nn.ModuleList()
        for i in reversed(range(1, levels)):
            c_in = widths[i] + self.noise_dim if i == levels - 1 else 2 * widths[i]
            dropout = c["dropout"] if i >= levels - c["n_dropout_levels"] else 0.0
            self.ups.append(Up(c_in, widths[i - 1], c["norm"], c["upsample"], dropout, residual[i - 1], c["noise_injection"]))
        self.out = nn.Sequential(up_conv(2 * widths[0], c["image_channels"], c["upsample"], bias=True), nn.Tanh())

    def forward(self, masks, class_planes=None, z=None):
        x = masks if class_planes is None else torch.cat([masks, class_planes], 1)
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
        skips.pop()  # the bottleneck feeds the first up level directly
        if self.noise_dim:
            if z is None:
                z = self.sample_styles(x.shape[0], x.device)
            x = torch.cat([x, z.to(x.dtype).view(x.shape[0], self.noise_dim, 1, 1).expand(-1, -1, *x.shape[2:])], 1)
        for up in self.ups:
            x = torch.cat([up(x), skips.pop()], 1)
        return self.out(x)

    def sample_styles(self, n, device):
        if hasattr(self, "style_bank"):
            return self.style_bank[torch.randint(0, self.style_bank.shape[0], (n,), device=device)]
        return torch.randn(n, self.noise_dim, device=device)


class StyleEncoder(nn.Module):
    """Real image -> (mu, logvar) of its style code (the cVAE encoder of BicycleGAN).

    A binary mask says nothing about skin tone, illumination, vignette or hair, so an L1 loss alone
    averages them into flat beige. Encoding them from the real image lets the generator learn to
    render each one; at sampling time the code of some training image takes its place.
    No normalisation: batch statistics would mix the styles of a batch.
    """

    def __init__(self, config):
        super().__init__()
        c = config
        widths = [c["ndf"], c["ndf"] * 2, c["ndf"] * 4, c["ndf"] * 4]
        layers, c_in = [], c["image_channels"]
        for width in widths:
            layers += [nn.Conv2d(c_in, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
            c_in = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c_in, 2 * c["noise_dim"])

    def forward(self, images):
        mu, logvar = self.head(self.features(images)).float().chunk(2, dim=1)
        return mu, logvar.clamp(-10, 10)


def patch_discriminator(config):
    """Conditional PatchGAN: four stride-2 4x4 convolutions and a 3x3 scoring convolution."""
    c = config
    sn = nn.utils.spectral_norm if c["d_spectral_norm"] else (lambda m: m)
    in_channels = c["mask_channels"] + c["n_classes"] + c["image_channels"]
    widths = [c["ndf"], c["ndf"] * 2, c["ndf"] * 4, c["ndf"] * 8]
    layers = []
    for i, width in enumerate(widths):
        use_norm = i > 0 and not c["d_spectral_norm"]
        layers.append(sn(nn.Conv2d(in_channels if i == 0 else widths[i - 1], width, 4, stride=2, padding=1, bias=not use_norm)))
        if use_norm:
            layers.append(norm_layer(c["norm"], width))
        layers.append(nn.LeakyReLU(0.2, True))
    layers.append(sn(nn.Conv2d(widths[-1], 1, 3, padding=1)))
    return nn.Sequential(*layers)


class Discriminator(nn.Module):
    """Conditional PatchGAN on (mask, image): img_size/16 patches per side, 8x8 at 128.

    With d_scales > 1 (pix2pixHD), further PatchGANs of the same shape score the pair at 1/2, 1/4, ...
    of the resolution: larger patches judge the lesion's overall shape and the vignette, while the
    full-resolution one stays on texture. forward returns one score map per scale, finest first.
    """

    def __init__(self, config):
        super().__init__()
        self.net = patch_discriminator(config)
        self.coarser = nn.ModuleList(patch_discriminator(config) for _ in range(config["d_scales"] - 1))

    def forward(self, masks, images, class_planes=None, return_features=False):
        parts = [masks, images] if class_planes is None else [masks, class_planes, images]
        x = torch.cat(parts, 1)
        scores, features = [], []  # features: every layer's activations, for feature matching (pix2pixHD)
        for k, net in enumerate([self.net, *self.coarser]):
            if k > 0:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            h = x
            for layer in net:
                h = layer(h)
                if return_features and isinstance(layer, nn.LeakyReLU):
                    features.append(h)
            scores.append(h)
        return (scores, features) if return_features else scores


def init_weights(module):
    """N(0, 0.02) for convolutions, N(1, 0.02) for norm scales, as in pix2pix."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            weight = m.weight_orig if hasattr(m, "weight_orig") else m.weight
            nn.init.normal_(weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    return module


def build_generator(config):
    return init_weights(Generator(make_config(**config)))


def build_discriminator(config):
    return init_weights(Discriminator(make_config(**config)))


def build_style_encoder(config):
    """The style encoder for a config with style_encoder set, else None."""
    config = make_config(**config)
    return init_weights(StyleEncoder(config)) if config["style_encoder"] else None


def class_planes(labels, n_classes, size, dtype=torch.float32):
    """One-hot class maps (N x n_classes x size x size) for the conditional model; None if unconditional."""
    if n_classes == 0:
        return None
    onehot = F.one_hot(labels, n_classes).to(dtype)
    return onehot[:, :, None, None].expand(-1, -1, size, size)


def count_params(module):
    return sum(p.numel() for p in module.parameters())


def gflops_per_image(module, *inputs):
    """Forward GFLOPs for one image (multiply-add = 2 FLOPs), from torch's own FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*inputs)
    return counter.get_total_flops() / inputs[0].shape[0] / 1e9


# ---------------------------------------------------------------------------------------------
# Checkpoints: plain dicts of tensors and simple values, loadable with weights_only=True.

def save_atomic(obj, path):
    """Write to a temporary file and rename, so a kill never leaves a truncated checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointError(ValueError):
    pass


def load_checkpoint(path, map_location="cpu"):
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except Exception as e:  # pickle, zip and weights_only errors all mean the same to the user
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a PixelGAN checkpoint ({first_line[:200]})") from None


def load_generator(path, map_location="cpu"):
    """Rebuild the generator a checkpoint was trained with. Returns (generator, config, checkpoint)."""
    ckpt = load_checkpoint(path, map_location)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "generator" not in ckpt:
        raise CheckpointError(f"{path}: not a PixelGAN generator checkpoint (no 'config'/'generator' entries)")
    generator = Generator(make_config(**ckpt["config"]))
    try:
        generator.load_state_dict(ckpt["generator"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the architecture in its config ({str(e).splitlines()[0]})") from None
    return generator, ckpt["config"], ckpt


def epoch_checkpoints(folder, kind="generator"):
    """{epoch: path} of '<kind>_epoch_<N>.pth' files in a run folder."""
    found = {}
    prefix = f"{kind}_epoch_"
    for name in os.listdir(folder):
        if name.startswith(prefix) and name.endswith(".pth") and name[len(prefix):-4].isdigit():
            found[int(name[len(prefix):-4])] = os.path.join(folder, name)
    return found


def latest_generator_path(folder):
    """The highest epoch by number (not by name: 'epoch_90' sorts after 'epoch_150')."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such model folder")
    found = epoch_checkpoints(folder)
    if not found:
        raise CheckpointError(f"{folder}: no generator_epoch_<N>.pth checkpoints in this folder")
    return found[max(found)]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img_size", type=int, default=128)
    parser.add_argument("--ngf", type=int, default=DEFAULT_CONFIG["ngf"])
    parser.add_argument("--ndf", type=int, default=DEFAULT_CONFIG["ndf"])
    parser.add_argument("--upsample", default=DEFAULT_CONFIG["upsample"])
    args = parser.parse_args()
    config = make_config(img_size=args.img_size, ngf=args.ngf, ndf=args.ndf, upsample=args.upsample)
    G, D = build_generator(config).eval(), build_discriminator(config).eval()
    masks = torch.zeros(2, 1, args.img_size, args.img_size)
    images = G(masks)
    patches = D(masks, images)[0]
    print(f"generator     {count_params(G) / 1e6:7.2f}M params  {gflops_per_image(G, masks):6.2f} GFLOP/img  "
          f"{n_levels(args.img_size)} levels  {tuple(masks.shape[1:])} -> {tuple(images.shape[1:])}")
    print(f"discriminator {count_params(D) / 1e6:7.2f}M params  {gflops_per_image(D, masks, images):6.2f} GFLOP/img  "
          f"(mask, image) -> patch map {tuple(patches.shape[1:])}")
