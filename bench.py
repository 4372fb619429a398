"""Benchmark the real training step (train.train_step) and generation path (generate.render).

    python bench.py --amp                         # default 128x128 model, batch 16, on this machine
    python bench.py --compare                     # reference pix2pix U-Net fp32, original recipe and default --amp
    python bench.py --amp --data_dir data         # also one epoch over real data: data wait vs compute
    python bench.py --amp --no-channels_last      # one switch per optimisation, to show each one's gain
    torchrun --nproc_per_node=4 bench.py --amp    # DDP scaling efficiency: N-GPU img/s / (N x 1-GPU img/s)

Throughput is the median over --steps timed steps after --warmup. FLOPs come from
torch.utils.flop_counter; the peak is this device's own best matmul in the same dtype, measured now.
"""
import argparse
import json
import os
import resource
import shlex
import statistics
import time

import torch
import torch.distributed as dist

import models
import train
import generate
from cli import SHARED_LIMITS, ArgumentParser, Range, add_shared_flags, check_device, check_ranges, run_cli
from dataset import PairedDataset, to_model_range


LIMITS = {**SHARED_LIMITS, "gen_batch_size": Range(1, 4096), "steps": Range(1, 100_000), "warmup": Range(0, 100_000)}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared_flags(p, "device", "amp", "batch_size", "num_workers", "img_size")
    p.add_argument("--gen_batch_size", type=int, default=None, help="generation batch (default: --batch_size)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--fused_adam", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--freeze_d", action=argparse.BooleanOptionalAction, default=True,
                   help="D weight gradients skipped in the G step")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="also break the training step's time down by part (torch.profiler; eager step, not with --compile)")
    p.add_argument("--reference", action="store_true",
                   help="time the official pix2pix unet_128 layout instead (ngf 64, no residual blocks)")
    p.add_argument("--original_recipe", action="store_true",
                   help="time the user's original recipe (train.ORIGINAL_RECIPE: PatchGAN only, LSGAN + 100 L1) instead of train.py's default")
    p.add_argument("--compare", action="store_true",
                   help="one run: the reference layout in fp32, the original recipe and train.py's default (both with --amp)")
    p.add_argument("--train_flags", default="",
                   help='train.py flags for the timed configuration, e.g. "--style_dim 0" (with --compare: for its '
                        'default and recipe rows)')
    p.add_argument("--data_dir", default=None, help="also time one epoch over <data_dir>/train")
    p.add_argument("--json", action="store_true", help="one JSON object per measurement")
    args = p.parse_args(argv)
    check_ranges(args, LIMITS)
    check_device(args.device)
    if args.profile and args.compile:
        p.error("--profile breaks the eager step down by module; a compiled step has no module boundaries: drop --compile")
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(device, dtype, n=4096, repeats=10):
    """Best observed GFLOP/s of an n x n matmul: the yardstick for 'fraction of peak'."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # whole-process peak RSS (Linux: KiB)


def timed(fn, device, steps, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def model_config(args):
    if args.reference:  # every architecture key pinned: today's defaults must not leak into the yardstick
        return models.make_config(img_size=args.img_size, ngf=64, g_max_mult=8, ndf=64, res_max_size=0, upsample="transpose",
                                  padding="zeros", noise_maps=False, style_dim=0, projected_d=False, d_scales=1)
    return train.model_config(trainer_args(args))


def trainer_args(args):
    """train.py's flags for this measurement: its defaults (the reference layout and the original recipe
    train with the original recipe's losses)."""
    flags = ["--img_size", str(args.img_size)] + (["--amp", args.amp] if args.amp else []) + (["--compile"] if args.compile else [])
    flags += train.ORIGINAL_RECIPE if args.reference or args.original_recipe else []
    flags = train.parse_args(flags + shlex.split(args.train_flags))[0]
    train.check_mode_seeking(flags)  # a configuration train.py refuses is not timed either
    return flags


def build_trainer(args, config, device, world_size=1):
    """train.build_trainer with the speed switches under test (train.py always takes the fast path)."""
    return train.build_trainer(config, trainer_args(args), device, world_size, channels_last=args.channels_last,
                               fused_adam=args.fused_adam, freeze_d=args.freeze_d)


def arch_name(args):
    return "reference unet_128" if args.reference else "original recipe" if args.original_recipe else "pixelgan default"


def random_batch(batch_size, size):
    masks = (torch.rand(batch_size, 1, size, size) > 0.5).to(torch.uint8) * 255
    images = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8)
    return masks, images


def bench_train(args, device, peaks):
    config = model_config(args)
    trainer = build_trainer(args, config, device)
    masks_u8, images_u8 = random_batch(args.batch_size, args.img_size)
    masks = to_model_range(masks_u8, device, trainer.memory_format)
    reals = to_model_range(images_u8, device, trainer.memory_format)
    step = lambda: train.train_step(trainer, masks, reals)  # noqa: E731
    seconds = timed(step, device, args.steps, args.warmup)
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        step()
    gflop = counter.get_total_flops() / args.batch_size / 1e9
    img_per_s = args.batch_size / seconds
    dtype = trainer.dtype or torch.float32
    result = dict(what="train", device=str(device), dtype=str(dtype).replace("torch.", ""), batch=args.batch_size,
                  img_per_s=img_per_s, gflop_per_img=gflop, peak_gflops=peaks(dtype),
                  peak_mem_mb=peak_memory_mb(device), g_params_m=models.count_params(trainer.G) / 1e6,
                  d_params_m=models.count_params(trainer.D) / 1e6, arch=arch_name(args))
    result["peak_fraction"] = img_per_s * gflop / result["peak_gflops"]
    if args.profile:
        result["profile"] = profile_step(trainer, step, device, args.steps)
    return result, trainer


def bench_generate(args, device, trainer, peaks):
    batch = args.gen_batch_size or args.batch_size
    generator = train.sampling_generator(trainer).eval()
    masks_u8, _ = random_batch(batch, args.img_size)
    config = trainer.config
    seconds = timed(lambda: generate.render(generator, config, masks_u8, device=device, batch_size=batch, amp=args.amp),
                    device, args.steps, args.warmup)
    gflop = models.gflops_per_image(generator, to_model_range(masks_u8[:1], device))
    dtype = trainer.dtype or torch.float32
    result = dict(what="generate", device=str(device), dtype=str(dtype).replace("torch.", ""), batch=batch,
                  img_per_s=batch / seconds, gflop_per_img=gflop, peak_gflops=peaks(dtype),
                  peak_mem_mb=peak_memory_mb(device), arch=arch_name(args))
    result["peak_fraction"] = result["img_per_s"] * gflop / result["peak_gflops"]
    return result


REST = "rest (losses, finite checks, casts, gradient accumulation)"


def step_components(trainer):
    """The parts of a training step that the profile breakdown names, as (name, module) pairs."""
    D = trainer.D
    parts = [("generator", trainer.G), ("style encoder", trainer.E), ("PatchGAN", D.net), *(("PatchGAN", m) for m in D.coarser)]
    if D.projected is not None:
        parts += [("projected: EfficientNet trunk", D.projected.features), ("projected: mixing + heads", D.projected)]
    return [(name, m) for name, m in parts if m is not None]


def profile_step(trainer, step, device, steps):
    """Where a training step's time goes, from torch.profiler: every op's own time goes to the innermost
    part of the step it ran in. Forward ops are placed by hooks on each part's module (and wrappers around
    DiffAugment, the EMA update and the optimizer steps); a backward op by the forward op it differentiates
    (the autograd sequence number they share). Returns {part: [forward ms, backward ms]} per step."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile
    open_ranges, hooks = [], []
    for name, module in step_components(trainer):
        def enter(module, inputs, name=name):
            open_ranges.append(record_function("bench/" + name).__enter__())

        def leave(module, inputs, output):
            open_ranges.pop().__exit__(None, None, None)
        hooks += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    def wrapped(name, fn):
        def call(*a, **k):
            with record_function("bench/" + name):
                return fn(*a, **k)
        return call
    patched = [(train, "diff_augment", "DiffAugment")] + [(opt, "step", "Adam") for opt in (trainer.opt_G, trainer.opt_D)]
    if trainer.ema is not None:
        patched.append((trainer.ema, "update_parameters", "EMA of the generator"))
    patched = [(owner, attr, getattr(owner, attr), label) for owner, attr, label in patched]
    for owner, attr, fn, label in patched:
        setattr(owner, attr, wrapped(label, fn))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            sync(device)
    finally:
        for h in hooks:
            h.remove()
        for owner, attr, fn, _ in patched:
            setattr(owner, attr, fn)
    events = prof.events()

    def enclosing(event):
        while event is not None:
            if event.name.startswith("bench/") or event.name.startswith("autograd::engine::evaluate_function"):
                return event
            event = event.cpu_parent
        return None
    part_of_sequence = {}
    # An op that records no graph (no_grad, the EMA) still shows the current sequence number; the op that
    # creates the graph node is the last one to show it, so later ops overwrite earlier ones.
    for e in sorted(events, key=lambda e: e.time_range.start):
        scope = enclosing(e)
        if e.sequence_nr < 0 or scope is not None and not scope.name.startswith("bench/"):
            continue  # backward ops show their forward op's number
        part_of_sequence[e.sequence_nr] = scope.name[len("bench/"):] if scope is not None else REST
    table = {}
    use_device = device.type == "cuda"
    for e in events:
        own = (e.self_device_time_total if use_device else e.self_cpu_time_total) / 1000 / steps
        scope = enclosing(e)
        if scope is None:
            part, phase = REST, 0
        elif scope.name.startswith("bench/"):
            part, phase = scope.name[len("bench/"):], 0
        else:
            part, phase = part_of_sequence.get(scope.sequence_nr, REST), 1
        table.setdefault(part, [0.0, 0.0])[phase] += own
    return table


def report_profile(table, step_ms, as_json):
    if as_json:
        print(json.dumps({"what": "profile", "step_ms": round(step_ms, 2),
                          "parts": {k: [round(f, 2), round(b, 2)] for k, (f, b) in table.items()}}), flush=True)
        return
    total = sum(f + b for f, b in table.values())
    print(f"profile: {total:.0f} ms per profiled step ({step_ms:.0f} ms unprofiled); forward / backward ms, share")
    for part, (fwd, bwd) in sorted(table.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {part:<58} {fwd:8.1f} {bwd:8.1f}  {100 * (fwd + bwd) / total:5.1f}%")


def bench_epoch(args, device, trainer):
    """One epoch through the real DataLoader: time blocked on data vs time in train_step."""
    started = time.perf_counter()
    train_set = PairedDataset(os.path.join(args.data_dir, "train"), args.img_size, augment=True, num_workers=4)
    cache_s = time.perf_counter() - started
    loader = train.make_loader(train_set, args.batch_size, args.num_workers, 0, device)
    wait = compute = 0.0
    n_images = 0
    started = time.perf_counter()
    iterator = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            masks, reals, _, _ = next(iterator)
        except StopIteration:
            break
        masks = to_model_range(masks, device, trainer.memory_format)
        reals = to_model_range(reals, device, trainer.memory_format)
        sync(device)
        t1 = time.perf_counter()
        train.train_step(trainer, masks, reals)
        sync(device)
        wait += t1 - t0
        compute += time.perf_counter() - t1
        n_images += masks.shape[0]
    total = time.perf_counter() - started
    dtype = trainer.dtype or torch.float32
    return dict(what="epoch", device=str(device), dtype=str(dtype).replace("torch.", ""), batch=args.batch_size,
                img_per_s=n_images / total, images=n_images, epoch_s=total, data_wait_s=wait, compute_s=compute,
                cache_build_s=cache_s, num_workers=args.num_workers, peak_mem_mb=peak_memory_mb(device))


def bench_scaling(args, device, rank, world_size):
    """Every rank times the step alone on its own device (the 1-GPU speed), then under DDP;
    efficiency = total DDP img/s / total single img/s."""
    config = model_config(args)
    masks_u8, images_u8 = random_batch(args.batch_size, args.img_size)
    rates = []
    for processes in (1, world_size):
        trainer = build_trainer(args, config, device, processes)
        masks = to_model_range(masks_u8, device, trainer.memory_format)
        reals = to_model_range(images_u8, device, trainer.memory_format)
        dist.barrier()
        rates.append(args.batch_size / timed(lambda: train.train_step(trainer, masks, reals), device, args.steps, args.warmup))
    totals = torch.tensor(rates, dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    single, together = totals.tolist()
    dtype = trainer.dtype or torch.float32
    return dict(what="scaling", device=str(device), dtype=str(dtype).replace("torch.", ""), batch=args.batch_size,
                processes=world_size, img_per_s=together, single_img_per_s=single / world_size,
                efficiency=together / single, peak_mem_mb=peak_memory_mb(device))


def report(result, as_json):
    if as_json:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}), flush=True)
        return
    if result["what"] == "scaling":
        print(f"scaling   {result['dtype']:>8} b{result['batch']:<3} {result['processes']} processes: "
              f"{result['img_per_s']:8.1f} img/s under DDP vs {result['single_img_per_s']:.1f} img/s alone per process: "
              f"efficiency {100 * result['efficiency']:.0f}%", flush=True)
        return
    if result["what"] == "epoch":
        print(f"epoch     {result['dtype']:>8} b{result['batch']:<3} {result['img_per_s']:8.1f} img/s  "
              f"{result['images']} images in {result['epoch_s']:.2f} s: waiting for data {result['data_wait_s']:.2f} s, "
              f"compute {result['compute_s']:.2f} s (cache built in {result['cache_build_s']:.1f} s, "
              f"{result['num_workers']} workers)", flush=True)
        return
    print(f"{result['what']:<9} {result['dtype']:>8} b{result['batch']:<3} {result['img_per_s']:8.1f} img/s  "
          f"{result['gflop_per_img']:6.2f} GFLOP/img  {100 * result['peak_fraction']:5.1f}% of "
          f"{result['peak_gflops']:.0f} GFLOP/s matmul peak  {result['peak_mem_mb']:7.0f} MB  [{result['arch']}]", flush=True)


def main(argv=None):
    args = parse_args(argv)
    device, rank, world_size = train.setup_distributed(args.device)
    torch.backends.cudnn.benchmark = True  # as train.py does on CUDA
    torch.manual_seed(0)
    if world_size > 1:
        result = bench_scaling(args, device, rank, world_size)
        if rank == 0:
            report(result, args.json)
        # leaving with the process group alive can abort a rank at exit (gloo threads still running)
        dist.destroy_process_group()
        return
    peak_cache = {}

    def peaks(dtype):
        if dtype not in peak_cache:
            peak_cache[dtype] = matmul_peak_gflops(device, dtype)
        return peak_cache[dtype]

    runs = [args]
    if args.compare:
        runs = [argparse.Namespace(**{**vars(args), "reference": True, "original_recipe": False, "amp": None}),
                argparse.Namespace(**{**vars(args), "reference": False, "original_recipe": True, "amp": "auto"}),
                argparse.Namespace(**{**vars(args), "reference": False, "original_recipe": False, "amp": "auto"})]
    if not args.json:
        print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{args.img_size}x{args.img_size}, {args.steps} timed steps after {args.warmup} warm-up")
    results = []
    for run in runs:
        result, trainer = bench_train(run, device, peaks)
        table = result.pop("profile", None)
        report(result, args.json)
        if table is not None:
            report_profile(table, 1000 * result["batch"] / result["img_per_s"], args.json)
        results.append(result)
        generated = bench_generate(run, device, trainer, peaks)
        report(generated, args.json)
        results.append(generated)
        if run.data_dir:
            report(bench_epoch(run, device, trainer), args.json)
    if args.compare and not args.json:
        ref_train, ref_gen = results[0]["img_per_s"], results[1]["img_per_s"]
        for label, (tr, ge) in (("original recipe", results[2:4]), ("default", results[4:6])):
            print(f"{label:>15} vs reference fp32: train x{tr['img_per_s'] / ref_train:.2f}, "
                  f"generate x{ge['img_per_s'] / ref_gen:.2f}")
        print(f"default vs original recipe: {results[4]['gflop_per_img'] / results[2]['gflop_per_img']:.2f}x the FLOPs "
              f"and {results[2]['img_per_s'] / results[4]['img_per_s']:.2f}x the time per training image")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
