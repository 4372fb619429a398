"""Checkpoints: plain dicts of tensors and simple values, written atomically and read with
weights_only=True, so loading a file never runs code. Every loaded config is checked and brought up to
date (an old checkpoint loads as it was trained), every state dict is compared with the network its
config describes before that network is built.
"""
import os
import warnings

import torch

import models
from cli import ascii_int, atomic_path, load_error_detail


def save_atomic(obj, path):
    """torch.save through a temporary file, synced before the rename: a kill never leaves a truncated checkpoint."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked, named in one line."""


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

# What a checkpoint saved before a config key existed was trained with, where that differs from
# models.DEFAULT_CONFIG (which holds a new run's architecture); keys not listed take DEFAULT_CONFIG's value.
ABSENT_CONFIG = dict(upsample="transpose", noise_maps=False, padding="zeros", projected_d=False, style_dim=0, input_noise=0)


def upgrade_config(config):
    """A checkpoint's config in today's keys: removed options (off) dropped, the style code's two old keys
    (noise_dim, the code's size, and style_encoder, whether it was learned) as style_dim, and keys the
    checkpoint predates set to what it was trained with. ValueError (one line) for what cannot be rebuilt."""
    config = dict(config)
    for key, off in REMOVED_CONFIG.items():
        if config.pop(key, off) is not off:
            raise ValueError(f"trained with {key}, an option this version no longer has (it lost its ablation); "
                             "load it with a version from before November 2026")
    if "noise_dim" in config or "style_encoder" in config:
        size, learned = config.pop("noise_dim", 0), config.pop("style_encoder", False)
        if type(size) is not int or type(learned) is not bool:
            raise ValueError(f"model config: noise_dim must be an int and style_encoder a bool, got {size!r}, {learned!r}"[:300])
        if "style_dim" in config:
            raise ValueError("model config: style_dim together with the older noise_dim/style_encoder")
        if size and not learned:
            raise ValueError("trained with a random style code and no style encoder, an option this version no longer "
                             "has; load it with a version from before December 2026")
        if learned and size < 1:
            raise ValueError("model config: style_encoder needs noise_dim >= 1 (the size of the style code)")
        config["style_dim"] = size
    return {**ABSENT_CONFIG, **config}


def checked_config(ckpt, path):
    """The complete config of a loaded checkpoint, upgraded and validated (CheckpointError naming the file otherwise)."""
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{path}: not a PixelGAN checkpoint (no 'config' entry)")
    try:
        return models.make_config(**upgrade_config(ckpt["config"]))
    except (ValueError, TypeError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: {message if message.startswith('trained with') else 'refused: ' + message}") from None


def load_checkpoint(path, map_location="cpu"):
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
    check_weights(models.Generator, config, ckpt["generator"], path, "generator")
    generator = models.Generator(config)
    try:
        generator.load_state_dict(ckpt["generator"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the architecture in its config ({str(e).splitlines()[0]})") from None
    style_labels = ckpt.get("style_labels")
    if config["style_dim"] and style_labels is not None:
        if not (isinstance(style_labels, torch.Tensor) and style_labels.shape == generator.style_labels.shape
                and not style_labels.is_floating_point() and bool(((style_labels >= -1) & (style_labels < max(1, config["n_classes"]))).all())):
            raise CheckpointError(f"{path}: style_labels must be {config['style_bank_size']} class indices")
        generator.style_labels.copy_(style_labels)
    style_areas = ckpt.get("style_areas")  # absent from checkpoints saved before 7 December 2026: looks drawn by class only
    if config["style_dim"] and style_areas is not None:
        if not (isinstance(style_areas, torch.Tensor) and style_areas.shape == generator.style_areas.shape
                and style_areas.is_floating_point() and bool(((style_areas >= 0) & (style_areas <= 1)).all())):
            raise CheckpointError(f"{path}: style_areas must be {config['style_bank_size']} lesion areas between 0 and 1")
        generator.style_areas.copy_(style_areas)
    return generator, config, ckpt


def load_style_encoder(ckpt, config, path):
    """The style encoder saved beside a generator (train.py --style_dim), or None."""
    if not config["style_dim"] or ckpt.get("style_encoder") is None:
        return None
    check_weights(models.StyleEncoder, config, ckpt["style_encoder"], path, "style encoder")
    encoder = models.StyleEncoder(config)
    encoder.load_state_dict(ckpt["style_encoder"])
    return encoder.eval()


def export_generator(src, dst, dtype=torch.float16):
    """Copy a generator checkpoint (with its style encoder, style labels and areas) to dst with floating-point
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


def check_training_state(state, path):
    """Refuse a last.pth whose entries are not what train.py saves, before any network is built:
    the config within bounds, every network's weights of the shapes that config gives."""
    config = state["config"] = checked_config(state, path)
    if not isinstance(state.get("args"), dict):
        raise CheckpointError(f"{path}: no saved arguments ('args')")
    for key in ("epoch", "step"):
        if type(state.get(key)) is not int or state[key] < 0:
            raise CheckpointError(f"{path}: '{key}' must be a non-negative integer")
    for key in ("opt_G", "opt_D", "scaler", "sched_G", "sched_D", "rng"):
        if not isinstance(state.get(key), dict):
            raise CheckpointError(f"{path}: no '{key}' state")
    rng = state["rng"].get("torch")
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        raise CheckpointError(f"{path}: the saved random-number state is not a torch generator state")
    check_weights(models.Generator, config, state.get("generator_train"), path, "generator")
    if config["style_dim"]:
        check_weights(models.StyleEncoder, config, state.get("style_encoder"), path, "style encoder")
    check_weights(models.Discriminator, config, state.get("discriminator"), path, "discriminator")
