"""bench.py times the configuration it is told to: train.py's flags and its own speed switches."""
import torch

import bench


def test_bench_builds_the_training_configuration_it_is_given():
    default = bench.parse_args(["--img_size", "32"])
    assert bench.trainer_args(default).style_dim == 8 and bench.model_config(default)["style_dim"] == 8
    previous = bench.parse_args(["--img_size", "32", "--train_flags", "--style_dim 0 --lambda_l1 10 --no-projected_d",
                                 "--no-channels_last", "--no-fused_adam"])
    flags = bench.trainer_args(previous)
    assert flags.style_dim == 0 and flags.lambda_l1 == 10 and not flags.projected_d
    config = bench.model_config(previous)
    trainer = bench.build_trainer(previous, config, torch.device("cpu"))
    assert trainer.E is None and trainer.lambda_l1 == 10 and trainer.memory_format == torch.contiguous_format
    assert not trainer.opt_G.defaults["fused"]
