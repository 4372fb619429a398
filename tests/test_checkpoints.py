"""Checkpoint I/O (checkpoints.py): finding, saving, refusing, and loading old checkpoints as they were trained."""
import os

import pytest
import torch

import checkpoints
import models


def test_latest_checkpoint_is_highest_epoch_by_number(tmp_path):
    for epoch in (15, 90, 150, 135):
        (tmp_path / f"generator_epoch_{epoch}.pth").write_bytes(b"x")
    (tmp_path / "generator_epoch_best.pth").write_bytes(b"x")
    assert checkpoints.latest_generator_path(str(tmp_path)).endswith("generator_epoch_150.pth")
    with pytest.raises(checkpoints.CheckpointError, match="no such model folder"):
        checkpoints.latest_generator_path(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoints.CheckpointError, match="no generator_epoch"):
        checkpoints.latest_generator_path(str(tmp_path / "empty"))


def test_save_atomic_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pth")
    checkpoints.save_atomic({"epoch": 1}, path)

    def crash(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt  # a kill in the middle of writing

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_atomic({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}


def test_load_generator_rejects_non_checkpoints_and_other_architectures(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(checkpoints.CheckpointError, match="notes.pth: not a PixelGAN checkpoint"):
        checkpoints.load_generator(str(text))
    config = models.make_config(img_size=32, ngf=4)
    G = models.build_generator(config)
    other = dict(config, ngf=8)
    torch.save({"config": other, "generator": G.state_dict(), "epoch": 1}, tmp_path / "g.pth")
    with pytest.raises(checkpoints.CheckpointError, match="do not match"):
        checkpoints.load_generator(str(tmp_path / "g.pth"))
    torch.save({"weights": 1}, tmp_path / "dict.pth")
    with pytest.raises(checkpoints.CheckpointError, match="not a PixelGAN generator checkpoint"):
        checkpoints.load_generator(str(tmp_path / "dict.pth"))


def test_checkpoint_with_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"config": {}, "generator": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(checkpoints.CheckpointError, match="evil.pth"):
        checkpoints.load_checkpoint(str(tmp_path / "evil.pth"))


def test_old_checkpoint_configs_are_upgraded_to_what_they_were_trained_with():
    """Keys a checkpoint predates take the value it was trained with, not today's default; the style code's
    two old keys become style_dim; what this version cannot rebuild is refused."""
    old = checkpoints.upgrade_config({"noise_dim": 8, "style_encoder": True, "noise_injection": False})
    assert old["style_dim"] == 8 and "noise_dim" not in old and "style_encoder" not in old
    assert (old["upsample"], old["padding"], old["noise_maps"], old["projected_d"]) == ("transpose", "zeros", False, False)
    assert checkpoints.upgrade_config({})["style_dim"] == 0 and checkpoints.upgrade_config({})["input_noise"] == 0
    assert checkpoints.upgrade_config(models.make_config()) == models.make_config()  # today's configs pass unchanged
    with pytest.raises(ValueError, match="no style encoder"):
        checkpoints.upgrade_config({"noise_dim": 8, "style_encoder": False})
    with pytest.raises(ValueError, match="noise_dim must be an int"):
        checkpoints.upgrade_config({"noise_dim": "8", "style_encoder": True})
