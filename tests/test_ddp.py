"""Two gloo processes under torchrun: shards, identical weights, one checkpoint that generate.py loads."""
import json
import os
import subprocess
import sys

import torch

import checkpoints
import generate
from conftest import ROOT, TINY_MODEL, write_dataset

# Runs train.main() in each rank, counting what train_step sees, then saves that rank's view.
RANK_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {root!r})
import train
seen, trainer = [], {{}}
real_step = train.train_step
def counting_step(t, masks, reals, planes=None):
    seen.append(masks.shape[0])
    trainer["t"] = t
    return real_step(t, masks, reals, planes)
train.train_step = counting_step
train.main(sys.argv[1:])
t = trainer["t"]
torch.save({{"images": sum(seen), "steps": len(seen),
            "G": {{k: v.clone() for k, v in t.G.state_dict().items()}},
            "D": {{k: v.clone() for k, v in t.D.state_dict().items()}},
            "G_sampled": {{k: v.clone() for k, v in train.sampling_generator(t).state_dict().items()}}}},
           os.path.join({out!r}, "rank" + os.environ["RANK"] + ".pt"))
"""


def test_two_process_gloo_training(tmp_path):
    data = write_dataset(str(tmp_path / "data"), n_train=12, n_test=2)
    script = tmp_path / "rank_main.py"
    script.write_text(RANK_SCRIPT.format(root=ROOT, out=str(tmp_path)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    # with the default projected critic: its frozen trunk stays out of the per-epoch buffer broadcast
    with_projected_d = [a for a in TINY_MODEL if a != "--no-projected_d"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "--data_dir", data, *with_projected_d, "--batch_size", "2", "--n_epochs", "2", "--save_freq", "2",
           "--eval_freq", "1", "--device", "cpu", "--models_dir", str(tmp_path / "models"),
           "--outputs_dir", str(tmp_path / "outputs"), "--run_name", "ddp"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # 12 pairs, 2 ranks: 6 per rank per epoch, 3 steps of 2, over 2 epochs
    assert [r["images"] for r in ranks] == [12, 12] and [r["steps"] for r in ranks] == [6, 6]
    for net in ("G", "D", "G_sampled"):  # G_sampled: the EMA copy that checkpoints hold
        assert all(torch.equal(ranks[0][net][k], ranks[1][net][k]) for k in ranks[0][net])

    model_dir = tmp_path / "models" / "ddp"
    assert sorted(os.listdir(model_dir)) == ["config.json", "discriminator_epoch_2.pth", "generator_epoch_2.pth", "last.pth"]
    state = torch.load(model_dir / "generator_epoch_2.pth", weights_only=True)["generator"]
    assert not any(k.startswith("module.") for k in state)
    assert done.stdout.count("test L1") == 2  # evaluated once per eval epoch, by rank 0 only
    assert [n for n in os.listdir(tmp_path / "outputs" / "ddp") if n.startswith("test_epoch_1_")]

    generate.main(["--model_folder", str(model_dir), "--input_dir", os.path.join(data, "test"),
                   "--output_dir", str(tmp_path / "gen")])
    assert len([n for n in os.listdir(tmp_path / "gen") if n.startswith("gen_only_")]) == 2
    generator, _, _ = checkpoints.load_generator(str(model_dir / "generator_epoch_2.pth"))
    assert all(torch.equal(generator.state_dict()[k], ranks[0]["G_sampled"][k]) for k in state)

    # resumes without torchrun
    resumed = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--resume", str(model_dir),
                              "--n_epochs", "3", "--outputs_dir", str(tmp_path / "outputs")],
                             capture_output=True, text=True, timeout=120, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (model_dir / "generator_epoch_3.pth").exists()


def test_bench_reports_scaling_efficiency_under_torchrun():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "bench.py"), "--device", "cpu", "--img_size", "32", "--batch_size", "2",
           "--steps", "2", "--warmup", "1", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 1 and rows[0]["what"] == "scaling" and rows[0]["processes"] == 2  # printed by rank 0 only
    assert rows[0]["img_per_s"] > 0 and 0 < rows[0]["efficiency"]
