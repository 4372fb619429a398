"""bench.py times the configuration it is told to: train.py's flags and its own speed switches."""
import pytest
import torch

import bench
import losses
import models
import train
from cli import UsageError
from dataset import to_model_range


def test_bench_builds_the_training_configuration_it_is_given():
    default = bench.parse_args(["--img_size", "32"])
    assert bench.trainer_args(default).style_dim == 8 and bench.model_config(default)["style_dim"] == 8
    assert bench.trainer_args(default).lambda_ms == 0.3  # the default's doubled G batch is what gets timed
    with pytest.raises(UsageError, match="--lambda_ms needs noise"):  # train.py refuses it, so bench does not time it
        bench.trainer_args(bench.parse_args(["--img_size", "32", "--train_flags=--no-noise_maps"]))
    previous = bench.parse_args(["--img_size", "32", "--train_flags", "--style_dim 0 --lambda_l1 10 --no-projected_d",
                                 "--no-channels_last", "--no-fused_adam"])
    flags = bench.trainer_args(previous)
    assert flags.style_dim == 0 and flags.lambda_l1 == 10 and not flags.projected_d
    config = bench.model_config(previous)
    trainer = bench.build_trainer(previous, config, torch.device("cpu"))
    assert trainer.E is None and trainer.lambda_l1 == 10 and trainer.memory_format == torch.contiguous_format
    assert not trainer.opt_G.defaults["fused"]


def test_reference_row_is_the_official_unet_128_layout_whatever_the_defaults():
    config = bench.model_config(bench.parse_args(["--reference"]))
    with torch.device("meta"):
        G, D = models.Generator(config), models.Discriminator(config)
    assert (models.count_params(G), models.count_params(D)) == (41_827_523, 2_763_073)  # pix2pix unet_128 + PatchGAN
    assert config["upsample"] == "transpose" and not config["noise_maps"] and D.projected is None


def test_profile_puts_each_part_of_the_step_where_it_ran():
    args = bench.parse_args(["--img_size", "32", "--batch_size", "2", "--profile"])
    trainer = bench.build_trainer(args, bench.model_config(args), torch.device("cpu"))
    masks, images = bench.random_batch(2, 32)
    masks, reals = to_model_range(masks, torch.device("cpu")), to_model_range(images, torch.device("cpu"))
    table = bench.profile_step(trainer, lambda: train.train_step(trainer, masks, reals), torch.device("cpu"), 2)
    forward, backward = {k: v[0] for k, v in table.items()}, {k: v[1] for k, v in table.items()}
    # G, the PatchGAN and the projected heads learn: their backward is theirs; the trunk is differentiated
    # through in the G step only; the optimizer and the EMA run no backward of their own.
    for part in ("generator", "PatchGAN", "projected: mixing + heads", "projected: EfficientNet trunk", "style encoder"):
        assert forward[part] > 0 and backward[part] > 0, part
    assert forward["DiffAugment"] > 0 and forward["Adam"] > 0 and forward["EMA of the generator"] > 0
    assert backward["Adam"] == backward["EMA of the generator"] == 0
    rest = sum(table[bench.REST])
    assert rest < 0.5 * sum(sum(v) for v in table.values())  # the named parts hold most of the step
    # the hooks and wrappers are gone afterwards
    assert not trainer.G._forward_pre_hooks and train.diff_augment is losses.diff_augment
