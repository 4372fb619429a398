"""Training: a step learns, checkpoints are written and resumable, AMP and NaN handling, kill -9."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoints
import losses
import models
import train
from cli import UsageError
from conftest import ROOT, TINY_MODEL, write_dataset
from dataset import PairedDataset, to_model_range


def run_train(data, dirs, *extra):
    return train.main(["--data_dir", data, *TINY_MODEL, *dirs, "--batch_size", "4", *extra])


def weights(path, key="generator"):
    return torch.load(path, weights_only=True)[key]


def test_one_step_changes_both_networks():
    args = train.parse_args(["--lr", "1e-3"])[0]
    t = train.build_trainer(models.make_config(img_size=32, ngf=4, ndf=4), args, torch.device("cpu"))
    before_G = [p.detach().clone() for p in t.G.parameters()]
    before_D = [p.detach().clone() for p in t.D.parameters()]
    masks, reals = torch.rand(4, 1, 32, 32) * 2 - 1, torch.rand(4, 3, 32, 32) * 2 - 1
    losses, fakes = train.train_step(t, masks, reals)
    assert all(torch.isfinite(v) for v in losses.values())
    assert fakes.shape == (4, 3, 32, 32)
    assert all(not torch.equal(a, b) for a, b in zip(before_G, t.G.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(before_D, t.D.parameters()))
    assert all(p.requires_grad for p in t.D.parameters())  # unfrozen again after the G step


def test_training_writes_checkpoints_samples_and_metrics(tiny_data, run_dirs, tmp_path):
    model_dir = run_train(tiny_data, run_dirs, "--n_epochs", "3", "--save_freq", "2", "--eval_freq", "2", "--run_name", "r")
    assert sorted(os.listdir(model_dir)) == sorted([
        "config.json", "last.pth", "generator_epoch_2.pth", "discriminator_epoch_2.pth",
        "generator_epoch_3.pth", "discriminator_epoch_3.pth"])
    out = tmp_path / "outputs" / "r"
    assert (out / "samples" / "epoch_1_batch_0.png").exists()
    assert (out / "test_epoch_2_sample_0.png").exists() and (out / "test_epoch_3_sample_3.png").exists()
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 4 and rows[0].startswith("epoch,step")
    assert rows[2].split(",")[6] != ""  # test L1 at the eval epoch
    generator, config, ckpt = checkpoints.load_generator(os.path.join(model_dir, "generator_epoch_3.pth"))
    assert config["img_size"] == 32 and ckpt["epoch"] == 3


def test_amp_on_cpu_trains_with_finite_losses(tiny_data, run_dirs, tmp_path):
    run_train(tiny_data, run_dirs, "--n_epochs", "1", "--amp", "--run_name", "amp")
    metrics = (tmp_path / "outputs" / "amp" / "metrics.csv").read_text().splitlines()[1].split(",")
    assert all(torch.isfinite(torch.tensor(float(v))) for v in metrics[3:6])


def test_same_seed_same_weights_and_resume_matches_uninterrupted(tiny_data, run_dirs):
    full = run_train(tiny_data, run_dirs, "--n_epochs", "3", "--save_freq", "1", "--run_name", "full")
    again = run_train(tiny_data, run_dirs, "--n_epochs", "3", "--save_freq", "1", "--run_name", "again")
    part = run_train(tiny_data, run_dirs, "--n_epochs", "2", "--save_freq", "1", "--run_name", "part")
    train.main(["--resume", part, "--n_epochs", "3", *run_dirs[2:]])  # outputs never come from the checkpoint
    reference = weights(os.path.join(full, "last.pth"))
    for other in (again, part):
        resumed = weights(os.path.join(other, "last.pth"))
        assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    other_seed = run_train(tiny_data, run_dirs, "--n_epochs", "1", "--seed", "7", "--run_name", "seed7")
    first = weights(os.path.join(full, "generator_epoch_1.pth"))
    assert not all(torch.equal(first[k], v) for k, v in weights(os.path.join(other_seed, "generator_epoch_1.pth")).items())


def test_fewer_images_than_batch_size_warns_and_trains(tiny_data, run_dirs, capsys):
    run_train(tiny_data, run_dirs, "--n_epochs", "1", "--batch_size", "32", "--run_name", "small")
    assert "only 8 training pairs" in capsys.readouterr().err


def test_non_finite_losses_skip_the_step_then_stop_the_run(tiny_data, run_dirs, monkeypatch, capsys):
    real_l1 = torch.nn.functional.l1_loss
    monkeypatch.setattr(losses.F, "l1_loss", lambda a, b: real_l1(a, b) * float("nan"))
    monkeypatch.setattr(train, "MAX_BAD_STEPS", 3)
    with pytest.raises(UsageError, match="consecutive steps with non-finite"):
        run_train(tiny_data, run_dirs, "--n_epochs", "5", "--run_name", "nan")
    assert "non-finite G loss" in capsys.readouterr().err


def test_bad_img_size_is_a_clear_error(tiny_data, run_dirs):
    with pytest.raises(ValueError, match="power of two"):
        run_train(tiny_data, run_dirs, "--n_epochs", "1", "--img_size", "100")


def test_resume_refuses_a_generator_checkpoint(tiny_data, run_dirs):
    model_dir = run_train(tiny_data, run_dirs, "--n_epochs", "1", "--run_name", "g")
    with pytest.raises(checkpoints.CheckpointError, match="not a training-state checkpoint"):
        train.main(["--resume", os.path.join(model_dir, "generator_epoch_1.pth")])


def test_kill_9_then_resume_completes(tmp_path):
    data = write_dataset(str(tmp_path / "data"), n_train=16, n_test=2)
    dirs = ["--models_dir", str(tmp_path / "models"), "--outputs_dir", str(tmp_path / "outputs")]
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data_dir", data, *TINY_MODEL, *dirs,
           "--batch_size", "2", "--n_epochs", "25", "--save_freq", "1", "--eval_freq", "100", "--run_name", "k"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    model_dir = tmp_path / "models" / "k"
    deadline = time.time() + 120
    while not (model_dir / "generator_epoch_2.pth").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # land somewhere inside a later epoch, possibly mid-write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (model_dir / "generator_epoch_25.pth").exists()
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--resume", str(model_dir), *dirs[2:]],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming after epoch" in done.stdout
    assert checkpoints.load_generator(str(model_dir / "generator_epoch_25.pth"))[2]["epoch"] == 25
    assert not [n for n in os.listdir(model_dir) if ".tmp" in n]


def test_quality_options_train(tiny_data, run_dirs):
    model_dir = run_train(tiny_data, run_dirs, "--n_epochs", "2", "--diffaug", "color,translation,cutout",
                          "--ema", "0.9", "--upsample", "resize", "--style_dim", "4", "--lr_decay_start", "0.5",
                          "--noise_maps", "--l1_scale", "4", "--run_name", "q")
    state = torch.load(os.path.join(model_dir, "last.pth"), weights_only=True)
    assert state["ema"] is not None and state["sched_G"]["last_epoch"] == 2
    # the sampling weights are the EMA copy, not the raw generator
    assert not all(torch.equal(state["generator"][k], state["generator_train"][k]) for k in state["generator"])
    generator, config, _ = checkpoints.load_generator(os.path.join(model_dir, "generator_epoch_2.pth"))
    assert config["style_dim"] == 4 and config["upsample"] == "resize"
    masks = torch.zeros(2, 1, 32, 32)
    torch.manual_seed(1)
    a = generator.eval()(masks)
    torch.manual_seed(2)
    assert not torch.equal(a, generator(masks))  # each draw takes another style from the bank
    # noise maps: training moved their strengths off zero, and one style code renders a new texture per draw
    assert config["noise_maps"] and all(bool(p.abs().sum() > 0) for n, p in generator.named_parameters() if "strength" in n)
    z = torch.zeros(2, 4)
    torch.manual_seed(1)
    b = generator(masks, z=z)
    torch.manual_seed(2)
    assert not torch.equal(b, generator(masks, z=z))


def test_l1_scale_compares_downsampled_images(monkeypatch):
    """--l1_scale k: the reconstruction term sees only k x k block means, so texture finer than k px is free."""
    args = train.parse_args(["--img_size", "32", "--width", "4", "--no-projected_d", "--style_dim", "0",
                             "--l1_scale", "4"])[0]
    t = train.build_trainer(train.model_config(args), args, torch.device("cpu"))
    masks = torch.zeros(2, 1, 32, 32)
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 2 - 1.0  # +-1, block mean 0
    monkeypatch.setattr(t, "G_train", lambda m, planes=None, z=None: torch.zeros(2, 3, 32, 32))
    monkeypatch.setattr(train, "optimizer_step", lambda *a, **k: True)
    losses, _ = train.train_step(t, masks, checker.expand(2, 3, 32, 32).clone())
    assert float(losses["loss_G_l1"]) == 0  # pixel L1 would be 1
    t.l1_scale = 1
    assert float(train.train_step(t, masks, checker.expand(2, 3, 32, 32).clone())[0]["loss_G_l1"]) == 1


def test_lambda_ms_renders_each_mask_twice_with_one_style_and_pushes_renders_apart(monkeypatch):
    """--lambda_ms: G sees the batch twice over (same masks, same style code, new noise); only the first
    render meets the critics, and the term's gradient moves G."""
    args = train.parse_args(["--img_size", "32", "--width", "4", "--no-projected_d", "--style_dim", "4",
                             "--lambda_ms", "1", "--seed", "0"])[0]
    torch.manual_seed(0)
    t = train.build_trainer(train.model_config(args), args, torch.device("cpu"))
    calls, seen_by_D = [], []
    G, D = t.G_train, t.D_plain

    def spy_G(masks, planes=None, z=None):
        out = G(masks, planes, z)
        calls.append((masks, z, out.detach()))
        return out

    def spy_D(masks, images, **kw):
        seen_by_D.append(images.shape[0])
        return D(masks, images, **kw)

    monkeypatch.setattr(t, "G_train", spy_G)
    monkeypatch.setattr(t, "D_plain", spy_D)
    masks, reals = (torch.rand(4, 1, 32, 32) > 0.5).float() * 2 - 1, torch.rand(4, 3, 32, 32) * 2 - 1
    _, fakes = train.train_step(t, masks, reals)
    (m, z, out), = calls
    assert m.shape[0] == 8 and torch.equal(m[:4], m[4:]) and torch.equal(z[:4], z[4:])
    # one dropout mask for both halves: with the noise strengths still at zero the two renders are equal
    assert torch.equal(out[:4], out[4:])
    assert fakes.shape[0] == 4 and seen_by_D == [4]
    # the term reaches G: with the other losses switched off, a step still changes G's weights
    t.opt_G = train.make_optimizer(t.G_params, args)  # no momentum from the first step
    t.lambda_l1, before = 0.0, [p.detach().clone() for p in t.G.parameters()]
    monkeypatch.setattr(train, "gan_loss", lambda scores, *a, **k: 0 * sum(s.float().sum() for s in scores))
    train.train_step(t, masks, reals)
    assert any(not torch.equal(a, b) for a, b in zip(before, t.G.parameters()))


def test_mode_seeking_without_noise_in_the_generator_is_refused(tiny_data, run_dirs):
    """The default --lambda_ms with neither noise maps nor input noise: the two renders are equal, the term
    cannot act and only doubles G's cost, so the run is refused before anything is written."""
    with pytest.raises(UsageError, match="--lambda_ms needs noise"):
        train.main(["--data_dir", tiny_data, *TINY_MODEL, "--no-noise_maps", *run_dirs])
    assert not os.path.exists(run_dirs[1])
    train.validate_args(train.parse_args([*TINY_MODEL, "--no-noise_maps", "--input_noise", "4"])[0])  # a noise source too


def test_l1_scale_must_be_a_power_of_two_within_the_image(tiny_data, run_dirs):
    for bad in ("3", "16"):
        with pytest.raises(UsageError, match="--l1_scale"):
            train.main(["--data_dir", tiny_data, *TINY_MODEL, "--l1_scale", bad, *run_dirs])


def test_removed_options_are_refused_by_name_and_old_checkpoints_still_load(tiny_data, run_dirs, tmp_path, capsys):
    for flags in (["--gan_loss", "hinge"], ["--lambda_fm", "10"], ["--d_spectral_norm"], ["--noise_injection"],
                  ["--noise_dim", "8"], ["--style_encoder"], ["--no-channels_last"], ["--no-fused_adam"], ["--no-freeze_d"]):
        with pytest.raises(SystemExit):
            train.parse_args(flags)
        assert f"unrecognized arguments: {' '.join(flags)}" in capsys.readouterr().err
    # Flags retired since: refused by name, in one line that says what replaces each.
    for flag, replacement in (("--amp_dtype", "--amp bf16"), ("--ngf", "--width"), ("--ndf", "--width"), ("--norm", "batch norm"),
                              ("--lambda_kl", "fixed at 0.01"), ("--local_bn", "SyncBatchNorm"), ("--deterministic", "fast kernels"),
                              ("--log_freq", "every 20 steps"), ("--max_bad_steps", "50 consecutive")):
        with pytest.raises(SystemExit):
            train.parse_args([flag, "1"])
        err = capsys.readouterr().err.strip()
        assert f"{flag} was removed: " in err and replacement in err and len(err.splitlines()) == 1
    model_dir = run_train(tiny_data, run_dirs, "--n_epochs", "1", "--run_name", "old")
    # A checkpoint saved before the removal carries the removed architecture switches, off: it loads.
    ckpt = torch.load(os.path.join(model_dir, "generator_epoch_1.pth"), weights_only=True)
    old = tmp_path / "old.pth"
    torch.save({**ckpt, "config": {**ckpt["config"], "noise_injection": False, "d_spectral_norm": False}}, old)
    assert checkpoints.load_generator(str(old))[1]["ngf"] == 4
    # With one of them on it cannot be rebuilt: refused, naming the file and the option.
    torch.save({**ckpt, "config": {**ckpt["config"], "noise_injection": True}}, old)
    with pytest.raises(checkpoints.CheckpointError, match=r"old\.pth.*noise_injection"):
        checkpoints.load_generator(str(old))
    # A run saved with a removed loss cannot be continued as it was trained.
    state = torch.load(os.path.join(model_dir, "last.pth"), weights_only=True)
    torch.save({**state, "args": {**state["args"], "gan_loss": "hinge"}}, os.path.join(model_dir, "last.pth"))
    with pytest.raises(ValueError, match="gan_loss hinge"):
        train.main(["--resume", model_dir, "--n_epochs", "2"])
    torch.save({**state, "args": {**state["args"], "lambda_kl": 0.1}}, os.path.join(model_dir, "last.pth"))
    with pytest.raises(ValueError, match="lambda_kl 0.1"):
        train.main(["--resume", model_dir, "--n_epochs", "2"])


def test_a_run_saved_before_the_texture_defaults_resumes_as_it_was_trained(tiny_data, run_dirs):
    """A last.pth from before --l1_scale / --noise_maps / --padding / --jitter existed: no such args, no such config
    keys. It resumes with pixel L1, no jitter and its own architecture, not with today's defaults."""
    model_dir = run_train(tiny_data, run_dirs, "--n_epochs", "1", "--upsample", "transpose", "--padding", "zeros",
                          "--no-noise_maps", "--lambda_ms", "0", "--run_name", "before")
    path = os.path.join(model_dir, "last.pth")
    state = torch.load(path, weights_only=True)
    args = {k: v for k, v in state["args"].items() if k not in ("l1_scale", "noise_maps", "padding", "jitter", "lambda_ms")}
    config = {k: v for k, v in state["config"].items() if k not in ("noise_maps", "padding")}
    torch.save({**state, "args": args, "config": config}, path)
    train.main(["--resume", model_dir, "--n_epochs", "2"])
    with open(os.path.join(model_dir, "config.json")) as f:
        resumed = json.load(f)
    assert resumed["args"]["l1_scale"] == 1 and not resumed["args"]["noise_maps"] and resumed["args"]["padding"] == "zeros"
    assert resumed["args"]["jitter"] == 0 and resumed["args"]["lambda_ms"] == 0
    assert not resumed["config"]["noise_maps"] and resumed["config"]["padding"] == "zeros"
    assert train.parse_args([])[0].l1_scale == 4  # while a new run takes today's default


def test_style_encoder_learns_codes_and_fills_the_bank(tiny_data, run_dirs):
    args = train.parse_args(["--lr", "1e-3"])[0]
    config = models.make_config(img_size=32, ngf=4, ndf=4, style_dim=4, d_scales=2)
    t = train.build_trainer(config, args, torch.device("cpu"))
    before_E = [p.detach().clone() for p in t.E.parameters()]
    masks, reals = torch.rand(4, 1, 32, 32) * 2 - 1, torch.rand(4, 3, 32, 32) * 2 - 1
    train.train_step(t, masks, reals)
    assert all(not torch.equal(a, b) for a, b in zip(before_E, t.E.parameters()))  # L1 + KL reach the encoder

    model_dir = run_train(tiny_data, run_dirs, "--n_epochs", "2", "--style_dim", "4", "--d_scales", "2", "--run_name", "style")
    state = torch.load(os.path.join(model_dir, "last.pth"), weights_only=True)
    assert state["style_encoder"] is not None
    generator, config, _ = checkpoints.load_generator(os.path.join(model_dir, "generator_epoch_2.pth"))
    assert config["style_dim"] == 4 and config["d_scales"] == 2
    # Each bank row is the style code (mean) of a training image as training sees it (the middle of the jitter's
    # larger decode), spread over the split.
    encoder = models.build_style_encoder(config)
    encoder.load_state_dict(state["style_encoder"])
    train_set = PairedDataset(os.path.join(tiny_data, "train"), 32, augment=True, jitter=train.parse_args([])[0].jitter)
    mu, _ = encoder.eval()(to_model_range(train_set.center_images()[:1], torch.device("cpu")))
    bank = generator.style_bank
    assert bank.shape == (config["style_bank_size"], 4) and bank.abs().sum() > 0
    assert torch.allclose(bank[0], mu[0], atol=1e-5)
    # Sampling draws bank rows: seeded draws repeat, different seeds give different styles.
    masks = torch.zeros(3, 1, 32, 32)
    generator.eval()
    draws = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        draws.append(generator(masks))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    with pytest.raises(ValueError, match="style_encoder"):  # one name per concept: the size says whether there is a code
        models.make_config(style_encoder=True)


def test_default_trains_both_critics_and_resumes(tiny_data, run_dirs):
    """train.py's default: PatchGAN + projected critic on frozen ImageNet features, DiffAugment on D's inputs,
    a style code of 8 learned from the real images, checkpoints holding an EMA (0.99) of G."""
    args = train.parse_args([])[0]
    assert args.projected_d and args.diffaug == "color,translation,cutout,flip" and args.lambda_l1 == 100 and args.style_dim == 8
    assert args.ema == 0.99
    base = ["--data_dir", tiny_data, "--img_size", "32", "--width", "4", "--num_workers", "0",
            "--no_tensorboard", *run_dirs, "--batch_size", "4", "--run_name", "both"]
    model_dir = train.main([*base, "--n_epochs", "1"])
    first = torch.load(os.path.join(model_dir, "last.pth"), weights_only=True)
    assert first["config"]["projected_d"] and first["config"]["style_dim"] == 8
    assert first["style_encoder"] is not None and first["generator"]["style_bank"].abs().sum() > 0
    # the saved generator is the EMA copy, not the weights the optimizer trains
    last_conv = [k for k in first["generator"] if k.startswith("out.") and k.endswith(".weight")][-1]
    assert first["ema"] is not None and not torch.equal(first["generator"][last_conv], first["generator_train"][last_conv])
    model_dir = train.main(["--resume", model_dir, "--n_epochs", "2", "--outputs_dir", run_dirs[3]])
    state = torch.load(os.path.join(model_dir, "last.pth"), weights_only=True)
    heads = [k for k in state["discriminator"] if k.startswith("projected.heads") and k.endswith("weight")]
    assert heads and all(not torch.equal(first["discriminator"][k], state["discriminator"][k]) for k in heads)
    # the fixed random mixing never trains, and the pretrained trunk is not in the checkpoint
    assert torch.equal(first["discriminator"]["projected.ccm0"], state["discriminator"]["projected.ccm0"])
    assert not any(k.startswith("projected.features") for k in state["discriminator"])
    # the original recipe stays reachable by flags: no projected critic, no augmentation
    recipe = train.parse_args(train.ORIGINAL_RECIPE)[0]
    assert not recipe.projected_d and recipe.diffaug == "" and recipe.lambda_l1 == 100 and recipe.upsample == "transpose"
    assert "projected" not in "".join(models.build_discriminator(train.model_config(recipe)).state_dict())
    assert recipe.style_dim == 0 and train.model_config(recipe)["style_dim"] == 0 and recipe.ema == 0
    assert args.jitter == 0.125 and recipe.jitter == 0 and args.lambda_ms == 0.3 and recipe.lambda_ms == 0


def test_the_model_config_defaults_are_train_py_defaults():
    """One source of truth: a run with no architecture flags is models.DEFAULT_CONFIG, nothing else."""
    assert train.model_config(train.parse_args([])[0]) == models.make_config()
    for name, value in models.DEFAULT_CONFIG.items():
        if name in vars(train.parse_args([])[0]):
            assert getattr(train.parse_args([])[0], name) == value, name
