"""Train the PixelGAN: residual U-Net generator against a conditional PatchGAN and a projected critic,
LSGAN + lambda * L1.

    python train.py --data_dir data --batch_size 32 --amp --n_epochs 150 --img_size 128
    python train.py --resume pixelgan_models/<TIMESTAMP>            # continue a stopped run
    torchrun --nproc_per_node=4 train.py --data_dir data --amp      # DistributedDataParallel

Checkpoints go to pixelgan_models/<TIMESTAMP>/, sample grids, test images, metrics.csv and
TensorBoard logs to pixelgan_outputs/<TIMESTAMP>/.
"""
import argparse
import csv
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoints
import models
import weights
from cli import (AMP_DTYPES, SHARED_LIMITS, ArgumentParser, Range, UsageError, add_shared_flags, ascii_int, atomic_path, autocast,
                 autocast_dtype, check_device, check_memory, check_name, check_ranges, describe_os_error, run_cli,
                 save_image_grid)
from dataset import PairedDataset, read_labels, to_model_range, to_uint8
from losses import DIFFAUG_POLICIES, diff_augment, gan_loss, kl_loss, mode_seeking_loss, perceptual_loss, reconstruction_loss

# The user's original recipe (PatchGAN alone, LSGAN + 100 L1, transposed convolutions, no jitter, no DiffAugment,
# no mode-seeking term): these flags on top of the defaults reproduce it; bench.py --original_recipe times it.
ORIGINAL_RECIPE = ["--no-projected_d", "--diffaug", "", "--lambda_l1", "100", "--l1_scale", "1", "--lambda_lpips", "0",
                   "--upsample", "transpose", "--padding", "zeros", "--no-noise_maps", "--style_dim", "0", "--ema", "0", "--jitter", "0",
                   "--lambda_ms", "0"]
METRICS_COLUMNS = ["epoch", "step", "lr", "loss_D", "loss_G_gan", "loss_G_l1", "test_l1", "test_psnr", "test_ssim", "seconds"]
N_TEST_IMAGES = 8  # test_epoch_<E>_sample_<K>.png written per evaluation
LAMBDA_KL = 0.01  # weight of the style code's KL term (BicycleGAN's)
LOG_EVERY = 20  # steps between progress-bar / TensorBoard loss updates: the only host syncs of the loop
MAX_BAD_STEPS = 50  # consecutive steps with non-finite losses or gradients that stop a run

# Flags this version no longer has, with what replaces them; given on the command line, refused by name.
RETIRED_FLAGS = {
    "amp_dtype": "--amp takes the dtype: --amp bf16 or --amp fp16 (--amp alone: bf16 where supported, else fp16)",
    "ngf": "--width sets the generator's and the PatchGAN's base width together",
    "ndf": "--width sets the generator's and the PatchGAN's base width together",
    "norm": "the networks use batch norm (models.make_config(norm='instance') still builds the other)",
    "lambda_kl": f"the style code's KL weight is fixed at {LAMBDA_KL}",
    "local_bn": "multi-GPU CUDA runs always synchronise BatchNorm statistics (SyncBatchNorm)",
    "deterministic": "CUDA runs take the fast kernels (cuDNN autotuning, TF32); CPU runs repeat for a given --seed",
    "log_freq": f"losses are logged every {LOG_EVERY} steps",
    "max_bad_steps": f"a run stops after {MAX_BAD_STEPS} consecutive non-finite steps",
}


def parse_args(argv=None):
    """(flags, parser). The architecture's defaults are models.DEFAULT_CONFIG's: a new run's config."""
    arch = models.DEFAULT_CONFIG
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="data", help="folder with train/ and test/ from preprocess.py")
    p.add_argument("--n_epochs", type=int, default=150)
    p.add_argument("--eval_freq", type=int, default=10, help="evaluate on the test split every N epochs")
    p.add_argument("--save_freq", type=int, default=10, help="write checkpoints every N epochs (and at the end)")
    add_shared_flags(p, batch_size="per process; the global batch is this x world size",
                     img_size="a power of two; the generator has log2(img_size) levels",
                     num_workers="DataLoader workers (0: load in the main process)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--beta1", type=float, default=0.5)
    p.add_argument("--lr_decay_start", type=float, default=1.0,
                   help="fraction of the epochs after which the lr decays linearly to 0 (pix2pix: 0.5; 1.0: constant)")
    p.add_argument("--ema", type=float, default=0.99,
                   help="decay of an exponential moving average of G that checkpoints and samples use (0: off)")
    # losses (losses.py)
    p.add_argument("--lambda_l1", type=float, default=100.0)
    p.add_argument("--l1_scale", type=int, default=4,
                   help="L1 between the images area-downsampled by this factor (a power of two): it keeps what mask and "
                        "photograph share (layout, colour, brightness) and leaves finer texture to the critics; 1: pixel L1")
    p.add_argument("--lambda_lpips", type=float, default=0.0,
                   help="weight of the shift-tolerant LPIPS (AlexNet) perceptual loss between G(mask) and the real image")
    p.add_argument("--lambda_ms", type=float, default=0.3,
                   help="weight of MSGAN's mode-seeking term: 1 / mean |G(mask, n1) - G(mask, n2)| between two noise draws "
                        "of one mask and style, on images pooled like the L1 (G runs on a doubled batch: about 1.4x per epoch; "
                        "0: off, as before December 2026)")
    p.add_argument("--jitter", type=float, default=0.125,
                   help="decode training pairs this fraction larger and train on random img_size crops of them "
                        "(pix2pix's random jitter; 0: none)")
    p.add_argument("--diffaug", default="color,translation,cutout,flip",
                   help="differentiable augmentation of D's inputs (both critics): comma list of color,translation,cutout,flip; '' for none")
    # architecture (saved in the checkpoint's config)
    p.add_argument("--conditional", action="store_true", help="condition G and D on the class in data_dir/labels.csv")
    p.add_argument("--width", type=int, default=arch["ngf"],  # ngf and ndf, equal in DEFAULT_CONFIG
                   help="base width of the generator (ngf) and of the PatchGAN (ndf)")
    p.add_argument("--upsample", choices=["transpose", "resize"], default=arch["upsample"],
                   help="decoder upsampling: bilinear resize + 3x3 convolution, or transposed convolution (the recipe's)")
    p.add_argument("--padding", choices=["zeros", "reflect"], default=arch["padding"],
                   help="the generator's convolution padding; reflect gives no layer the image edge to anchor marks to")
    p.add_argument("--noise_maps", action=argparse.BooleanOptionalAction, default=arch["noise_maps"],
                   help="per-pixel noise at every decoder level with a learned strength per channel (StyleGAN), so that "
                        "texture is drawn anew for every render instead of stamped at fixed pixels")
    p.add_argument("--style_dim", type=int, default=arch["style_dim"],
                   help="size of a style code learned from the real image (cVAE, BicycleGAN); sampling draws the codes of "
                        "training images of the rendered class; generate.py --style_image needs it (0: none, the recipe's)")
    p.add_argument("--input_noise", type=int, default=arch["input_noise"],
                   help="channels of noise beside the mask at the generator's input, one value per image and channel "
                        "(OASIS's 3-D noise), so that the encoder can lay out marks anew in each render (0: none)")
    p.add_argument("--projected_d", action=argparse.BooleanOptionalAction, default=arch["projected_d"],
                   help="a projected discriminator on frozen ImageNet EfficientNet-Lite0 features beside the PatchGAN "
                        "(--no-projected_d: the PatchGAN alone)")
    p.add_argument("--d_scales", type=int, default=arch["d_scales"],
                   help="discriminators at 1, 1/2, ... of the resolution (pix2pixHD multi-scale D)")
    # speed (bench.py measures the others: channels_last, fused Adam, frozen D in the G step)
    p.add_argument("--compile", action="store_true", help="torch.compile both networks (slow start, faster steps)")
    # bookkeeping
    p.add_argument("--resume", default="", help="a run folder pixelgan_models/<TIMESTAMP> (or its last.pth) to continue")
    p.add_argument("--models_dir", default="pixelgan_models")
    p.add_argument("--outputs_dir", default="pixelgan_outputs")
    p.add_argument("--run_name", default="", help="folder name instead of the timestamp")
    p.add_argument("--no_tensorboard", action="store_true")
    # before argparse, whose "unrecognized arguments" would not say what to use instead
    for token in argv if argv is not None else sys.argv[1:]:
        name = token.split("=", 1)[0].removeprefix("--no-").removeprefix("--")
        if token.startswith("--") and name in RETIRED_FLAGS:
            p.error(f"--{name} was removed: {RETIRED_FLAGS[name]}")
    return p.parse_args(argv), p


# ---------------------------------------------------------------------------------------------- setup

def model_config(args, classes=()):
    """The architecture the flags ask for (what checkpoints carry as their config)."""
    return models.make_config(
        img_size=args.img_size, ngf=args.width, ndf=args.width, upsample=args.upsample, noise_maps=args.noise_maps,
        padding=args.padding, d_scales=args.d_scales, projected_d=args.projected_d, style_dim=args.style_dim,
        input_noise=args.input_noise, n_classes=len(classes), classes=list(classes))


def setup_distributed(device_arg):
    """(device, rank, world_size). DDP only when torchrun's environment is present."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    device_arg = check_device(device_arg)
    if not distributed:
        return torch.device(device_arg), 0, 1
    rank, world_size, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if device_arg.startswith("cuda"):
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device, rank, world_size


def make_loader(train_set, batch_size, num_workers, seed, device, rank=0, world_size=1):
    """Shuffled batches; each rank gets its own shard of every epoch (set_epoch reshuffles)."""
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True,
                                                  seed=seed, drop_last=True)
    return torch.utils.data.DataLoader(train_set, batch_size=batch_size, sampler=sampler, drop_last=True,
                                       num_workers=num_workers, pin_memory=device.type == "cuda",
                                       persistent_workers=num_workers > 0)


def make_optimizer(params, args, fused=True):
    # fused Adam: one kernel for all parameters instead of a loop over tensors (CUDA and CPU).
    return torch.optim.Adam(params, lr=args.lr, betas=(args.beta1, 0.999), fused=fused, foreach=not fused)


@dataclass
class Trainer:
    """Everything train_step needs: the networks (and their DDP / compiled wrappers), optimizers, loss
    scaler, loss weights and counters. bench.py builds one too."""
    G: torch.nn.Module
    D: torch.nn.Module
    E: torch.nn.Module | None  # style encoder
    G_params: list  # G's and E's: the encoder learns from G's loss, in G's optimizer
    config: dict
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None: fp32
    memory_format: torch.memory_format
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    lambda_l1: float
    l1_scale: int
    lambda_kl: float
    lambda_lpips: float
    lambda_ms: float
    lpips: torch.nn.Module | None
    diffaug: str
    freeze_D: bool
    ema: torch.optim.swa_utils.AveragedModel | None = None
    G_train: torch.nn.Module | None = None  # what the training step calls: DDP and/or compiled wrappers
    D_train: torch.nn.Module | None = None
    E_train: torch.nn.Module | None = None
    D_plain: torch.nn.Module | None = None  # D without DDP's gradient hooks, for the G step
    bad_steps: int = 0  # consecutive steps skipped for non-finite losses or gradients
    step: int = 0


def build_trainer(config, args, device, world_size=1, channels_last=True, fused_adam=True, freeze_d=True):
    """The Trainer for a config and train.py's flags. The keyword switches exist for bench.py, which
    measures what each speed measure buys; training always takes the fast path."""
    G, D = models.build_generator(config), models.build_discriminator(config)
    E = models.build_style_encoder(config)
    if world_size > 1 and device.type == "cuda" and config["norm"] == "batch":
        G, D = (torch.nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in (G, D))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    G, D = G.to(device, memory_format=memory_format), D.to(device, memory_format=memory_format)
    G_params = list(G.parameters())
    if E is not None:
        E = E.to(device, memory_format=memory_format)
        G_params += list(E.parameters())  # the encoder learns from G's loss, in G's optimizer
    dtype = autocast_dtype(device, args.amp)
    trainer = Trainer(
        G=G, D=D, E=E, G_params=G_params, config=config, device=device, dtype=dtype, memory_format=memory_format,
        opt_G=make_optimizer(G_params, args, fused_adam), opt_D=make_optimizer(D.parameters(), args, fused_adam),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        lambda_l1=args.lambda_l1, l1_scale=args.l1_scale, lambda_kl=LAMBDA_KL, diffaug=args.diffaug, freeze_D=freeze_d,
        lambda_lpips=args.lambda_lpips, lambda_ms=args.lambda_ms, lpips=weights.load_stlpips().to(device) if args.lambda_lpips > 0 else None,
    )
    if args.lambda_ms > 0:
        for m in G.modules():
            if isinstance(m, models.Dropout):
                m.shared_halves = True
    if args.ema > 0:
        # use_buffers: BatchNorm statistics are averaged too, so the EMA model is usable in eval mode.
        trainer.ema = torch.optim.swa_utils.AveragedModel(
            G, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema), use_buffers=True)
    if world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        # No buffer broadcast at every forward: D runs twice (real, fake) before one backward, and the
        # broadcast's in-place write to BatchNorm's running statistics breaks that backward on some
        # torch versions. The statistics are broadcast from rank 0 after each epoch instead.
        ddp = lambda m: DDP(m, device_ids=ids, broadcast_buffers=False)  # noqa: E731
        trainer.G_train, trainer.D_train = ddp(G), ddp(D)
        trainer.E_train = ddp(E) if E is not None else None
    else:
        trainer.G_train, trainer.D_train, trainer.E_train = G, D, E
    if args.compile:
        trainer.G_train, trainer.D_train = torch.compile(trainer.G_train), torch.compile(trainer.D_train)
        # The generator step calls D without DDP's gradient hooks; compile that path too.
        trainer.D_plain = torch.compile(D)
    else:
        trainer.D_plain = D
    return trainer


def optimizer_step(t, loss, optimizer, params, name):
    """Backward + step, skipping the update when loss or gradients are not finite. The check reads the
    all-reduced gradient norm, so under DDP every rank takes the same decision."""
    t.scaler.scale(loss).backward()
    t.scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    finite = bool(torch.isfinite(grad_norm))
    if finite:
        t.scaler.step(optimizer)
    elif t.dtype != torch.float16 or not torch.isfinite(loss):  # fp16 overflow is the scaler's normal business
        print(f"\nwarning: step {t.step}: non-finite {name} loss/gradients ({loss.item():.4g}); update skipped", file=sys.stderr)
    optimizer.zero_grad(set_to_none=True)
    return finite


def train_step(t, masks, reals, class_planes=None):
    """One pix2pix iteration: D on (mask, real) vs (mask, G(mask)), then G against the updated D.
    Returns the losses as tensors (no host sync) and the generated batch."""
    mixed = autocast(t.device, t.dtype)
    z, loss_kl = None, None
    if t.E is not None:
        # cVAE: the real image's own style code (reparameterised), so L1 compares like with like.
        with mixed:
            mu, logvar = t.E_train(reals)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        loss_kl = kl_loss(mu, logvar)
    with mixed:
        if t.lambda_ms > 0:
            # MSGAN: each mask twice in one batch (one forward, so DDP sees each parameter once), with the same
            # style code and dropout mask and new noise maps; only the first render meets the critics and the L1.
            doubled = lambda x: None if x is None else torch.cat([x, x])  # noqa: E731
            fakes, fakes_2 = t.G_train(doubled(masks), doubled(class_planes), doubled(z)).chunk(2)
        else:
            fakes = t.G_train(masks, class_planes, z)
    cond = masks if class_planes is None else torch.cat([masks, class_planes], 1)

    # Real and fake batch in one call: the frozen trunk runs once over both, everything with batch statistics
    # still sees each batch alone (groups=2). Each batch keeps its own DiffAugment draw.
    real_in, fake_in = diff_augment(cond, reals, policy=t.diffaug), diff_augment(cond, fakes.detach(), policy=t.diffaug)
    with mixed:
        scores = t.D_train(torch.cat([real_in[0], fake_in[0]]), torch.cat([real_in[1], fake_in[1]]), groups=2)
    d_real, d_fake = zip(*(s.chunk(2) for s in scores))
    n_patch = t.D.n_patch_maps
    loss_D = 0.5 * (gan_loss(d_real, True, n_patch) + gan_loss(d_fake, False, n_patch))
    ok_D = optimizer_step(t, loss_D, t.opt_D, t.D.parameters(), "D")

    # D's weights need no gradients here: freezing them skips their weight-gradient kernels,
    # and calling the plain module keeps DDP from waiting for gradients that never come.
    t.D.requires_grad_(not t.freeze_D)
    with mixed:
        d_fake_for_G = t.D_plain(*diff_augment(cond, fakes, policy=t.diffaug))
    loss_G_gan = gan_loss(d_fake_for_G, True, n_patch)
    loss_G_l1 = reconstruction_loss(fakes, reals, t.l1_scale)
    loss_G = loss_G_gan + t.lambda_l1 * loss_G_l1
    if t.lpips is not None:
        with mixed:
            loss_G = loss_G + t.lambda_lpips * perceptual_loss(t.lpips, fakes, reals)
    if loss_kl is not None:
        loss_G = loss_G + t.lambda_kl * loss_kl
    if t.lambda_ms > 0:
        loss_G = loss_G + t.lambda_ms * mode_seeking_loss(fakes, fakes_2, t.l1_scale)
    ok_G = optimizer_step(t, loss_G, t.opt_G, t.G_params, "G")
    t.D.requires_grad_(True)
    if not t.freeze_D:
        t.opt_D.zero_grad(set_to_none=True)  # D gradients from G's loss must not leak into the next D step
    t.scaler.update()

    t.bad_steps = 0 if (ok_D and ok_G) else t.bad_steps + 1
    if t.ema is not None and ok_G:
        t.ema.update_parameters(t.G)
    t.step += 1
    return dict(loss_D=loss_D.detach(), loss_G_gan=loss_G_gan.detach(), loss_G_l1=loss_G_l1.detach()), fakes.detach()


def sampling_generator(t):
    """The weights to sample with: the EMA copy when there is one."""
    return t.ema.module if t.ema is not None else t.G


@torch.no_grad()
def refresh_style_bank(t, images_uint8, labels=None, masks_uint8=None, batch_size=64):
    """Fill the generator's style bank with the style codes (means) of training images, evenly spread
    over the split and repeated when it has fewer images than the bank has rows. With class labels the
    generator's style_labels keep each row's class, so a melanoma is rendered with a melanoma's look; with
    the masks its style_areas keep each row's lesion area, so a large lesion gets a large lesion's look."""
    if t.E is None:
        return
    bank_size = t.G.style_bank.shape[0]
    index = torch.arange(bank_size) * len(images_uint8) // bank_size
    row_labels = labels[index] if labels is not None and t.config["n_classes"] else torch.full((len(index),), -1)
    was_training = t.E.training
    t.E.eval()
    codes = []
    for start in range(0, len(index), batch_size):
        images = to_model_range(images_uint8[index[start:start + batch_size]], t.device, t.memory_format)
        with autocast(t.device, t.dtype):
            codes.append(t.E(images)[0])
    t.E.train(was_training)
    codes = torch.cat(codes)
    areas = models.lesion_area(to_model_range(masks_uint8[index], t.device)) if masks_uint8 is not None else None
    for G in {t.G, sampling_generator(t)}:  # the trained generator and its EMA copy, if any
        G.style_bank.copy_(codes)
        G.style_labels.copy_(row_labels)
        if areas is not None:
            G.style_areas.copy_(areas)


@torch.inference_mode()
def test_scores(t, test_set, batch_size, out_dir=None, epoch=0):
    """Mean L1 ([-1, 1] units), PSNR and SSIM over the test split; writes the first test images.
    The style draws come from a fixed seed on a forked random state: every evaluation renders the same
    looks, and evaluating leaves the training's random stream (so resume's bit-identity) untouched."""
    from metrics import paired_metrics
    with torch.random.fork_rng(devices=[t.device] if t.device.type == "cuda" else []):
        torch.manual_seed(0)
        G = sampling_generator(t)
        was_training = G.training
        G.eval()
        sums, count = {}, 0
        n_classes = t.config["n_classes"]
        for start in range(0, len(test_set), batch_size):
            index = slice(start, start + batch_size)
            masks = to_model_range(test_set.masks[index], t.device, t.memory_format)
            reals = to_model_range(test_set.images[index], t.device, t.memory_format)
            planes = models.class_planes(test_set.labels[index].to(t.device), n_classes, masks.shape[-1])
            with autocast(t.device, t.dtype):
                fakes = G(masks, planes).float()
            for name, values in paired_metrics(fakes, reals).items():
                sums[name] = sums.get(name, 0.0) + values.sum().item()
            count += masks.shape[0]
            if out_dir is not None and start < N_TEST_IMAGES:
                for k in range(min(masks.shape[0], N_TEST_IMAGES - start)):
                    save_image_grid([to_uint8(masks[k:k + 1]), to_uint8(fakes[k:k + 1]), to_uint8(reals[k:k + 1])],
                                    os.path.join(out_dir, f"test_epoch_{epoch}_sample_{start + k}.png"), columns=True)
        G.train(was_training)
        return {name: total / count for name, total in sums.items()}


# ----------------------------------------------------------------------------------------- checkpoints

def rng_state(device):
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoints(t, args, config, epoch, model_dir, schedulers, epoch_files):
    sample_G = sampling_generator(t)
    # The style encoder travels with the generator (generate.py --style_image), and so does the class of
    # each style-bank row (looks drawn from the rendered class only).
    style = {"style_encoder": t.E.state_dict() if t.E is not None else None,
             "style_labels": sample_G.style_labels if t.E is not None else None,
             "style_areas": sample_G.style_areas if t.E is not None else None}
    if epoch_files:
        checkpoints.save_atomic({"kind": "generator", "config": config, "epoch": epoch, "generator": sample_G.state_dict(),
                                 **style}, os.path.join(model_dir, f"generator_epoch_{epoch}.pth"))
        checkpoints.save_atomic({"kind": "discriminator", "config": config, "epoch": epoch, "discriminator": t.D.state_dict()},
                                os.path.join(model_dir, f"discriminator_epoch_{epoch}.pth"))
    checkpoints.save_atomic({
        "kind": "training_state", "config": config, "epoch": epoch, "step": t.step, "args": vars(args),
        "generator": sample_G.state_dict(), "generator_train": t.G.state_dict(), "discriminator": t.D.state_dict(),
        **style, "ema": t.ema.state_dict() if t.ema is not None else None,
        "opt_G": t.opt_G.state_dict(), "opt_D": t.opt_D.state_dict(), "scaler": t.scaler.state_dict(),
        "sched_G": schedulers[0].state_dict(), "sched_D": schedulers[1].state_dict(), "rng": rng_state(t.device),
    }, os.path.join(model_dir, "last.pth"))


# Numeric flags out of these ranges are refused before any work (a resumed run's saved flags too).
TRAIN_LIMITS = {
    **SHARED_LIMITS, "n_epochs": Range(1, 1_000_000), "eval_freq": Range(1), "save_freq": Range(1),
    "lr": Range(0, 1, lo_open=True), "beta1": Range(0, 1, hi_open=True), "lr_decay_start": Range(0, 1),
    "ema": Range(0, 1, hi_open=True), "width": Range(1, 512), "d_scales": Range(1, 8), "style_dim": Range(0, 1024),
    "input_noise": Range(0, 256),
    "lambda_l1": Range(0, 1e6), "l1_scale": Range(1, 64), "lambda_lpips": Range(0, 1e6), "lambda_ms": Range(0, 1e6), "jitter": Range(0, 1),
}
ACTIVATION_BYTES_PER_PIXEL = 128  # a lower bound on what one training pixel costs in activations and gradients


def check_mode_seeking(args):
    if args.lambda_ms > 0 and not (args.noise_maps or args.input_noise):
        raise UsageError("--lambda_ms needs noise in the generator (--noise_maps or --input_noise): without it the two "
                         "renders of a mask are equal and the term only doubles G's cost; add --lambda_ms 0")


def validate_args(args, resuming=False):
    """Refuse bad flags (UsageError, one line) before any data is read or any folder is made."""
    check_ranges(args, TRAIN_LIMITS)
    if args.amp not in (None, *AMP_DTYPES):  # a resumed run's saved value; the command line is checked by argparse
        raise UsageError(f"--amp must be one of {', '.join(AMP_DTYPES)}, got {args.amp!r}")
    unknown = set(filter(None, args.diffaug.split(","))) - DIFFAUG_POLICIES
    if unknown:
        raise UsageError(f"--diffaug: unknown policy {sorted(unknown)[0]!r} (choose from {', '.join(sorted(DIFFAUG_POLICIES))})")
    if args.l1_scale & (args.l1_scale - 1) or args.l1_scale > args.img_size // 4:
        raise UsageError(f"--l1_scale must be a power of two and at most --img_size / 4 ({args.img_size // 4}), got {args.l1_scale}")
    check_mode_seeking(args)
    check_device(args.device)
    check_memory(args.batch_size * args.img_size ** 2 * ACTIVATION_BYTES_PER_PIXEL,
                 f"--batch_size {args.batch_size} at --img_size {args.img_size}", "lower --batch_size or --img_size")
    if resuming:
        return
    model_config(args)  # the architecture's own limits (a power-of-two size, widths, parameter count)
    if args.run_name:
        check_name(args.run_name, "--run_name")
        # early, before data is read; under torchrun only rank 0 (which claims it) may look: the others can
        # start after rank 0 has made the folder
        for folder in (args.models_dir, args.outputs_dir) if os.environ.get("RANK", "0") == "0" else ():
            if os.path.lexists(os.path.join(folder, args.run_name)):
                raise UsageError(f"{os.path.join(folder, args.run_name)} already exists: continue that run with --resume "
                                 f"{os.path.join(args.models_dir, args.run_name)}, or choose another --run_name")


def claim_run_folders(models_dir, outputs_dir, run_name=""):
    """Create a new run's model and output folders: (name, model_dir, out_dir). os.mkdir is atomic, so of
    two runs started in the same second one gets <time>_2; an explicit run_name that exists is refused
    (continuing a run is --resume's job), so no run ever writes into another's folders."""
    os.makedirs(models_dir, exist_ok=True)
    os.makedirs(outputs_dir, exist_ok=True)
    base = run_name or time.strftime("%Y%m%d_%H%M%S")
    for k in range(1, 1000):
        name = base if k == 1 else f"{base}_{k}"
        model_dir, out_dir = os.path.join(models_dir, name), os.path.join(outputs_dir, name)
        try:
            os.mkdir(model_dir)
        except FileExistsError:
            if run_name:
                raise UsageError(f"{model_dir} already exists: continue that run with --resume {model_dir}, "
                                 "or choose another --run_name") from None
            continue
        try:
            os.mkdir(out_dir)
        except FileExistsError:
            os.rmdir(model_dir)
            if run_name:
                raise UsageError(f"{out_dir} already exists (outputs of an earlier run): choose another --run_name") from None
            continue
        return name, model_dir, out_dir
    raise UsageError(f"{models_dir}: no free run name after {base}_999; pass --run_name")


RUN = {}  # the run folder of this process's run, for the Ctrl-C message


def interrupted_message():
    model_dir = RUN.get("model_dir")
    if model_dir and os.path.isfile(os.path.join(model_dir, "last.pth")):
        return f"interrupted; resume with: python train.py --resume {model_dir}"
    if model_dir:
        return f"interrupted before the first checkpoint in {model_dir}: nothing to resume; start the run again"
    return "interrupted before training started"


def _same_kind(value, default):
    if isinstance(default, bool) or isinstance(value, bool):
        return type(value) is type(default) or default is None
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if default is None:
        return value is None or isinstance(value, (str, int, float))
    return type(value) is type(default)


# Training flags that were removed (gan_loss and lambda_fm lost their ablations, README, Results), with the value
# training now always has; a run saved with another value cannot be continued as it was trained.
REMOVED_FLAGS = {"gan_loss": "lsgan", "lambda_fm": 0.0, "lambda_kl": LAMBDA_KL, "local_bn": False}
REMOVED_IN = {"gan_loss": "November", "lambda_fm": "November"}

# Loss flags added after runs were saved without them, with the value those runs trained with.
ADDED_FLAGS = {"l1_scale": 1, "jitter": 0.0, "lambda_ms": 0.0}

# Flags a resumed run takes from the command line; every other setting is the run's own.
RESUME_OVERRIDES = ("n_epochs", "num_workers", "device", "eval_freq", "save_freq", "no_tensorboard", "compile", "data_dir",
                    "outputs_dir")


def resolve_resume(args, parser, argv):
    """Continue a run: its saved flags win, except those about the machine, the length of the run and
    where files are. Folders never come from the checkpoint, so a crafted last.pth cannot choose where
    anything is written: the model folder is the one given to --resume, outputs go to
    --outputs_dir/<run> (default pixelgan_outputs), data is read from --data_dir if given."""
    path = args.resume
    if os.path.isdir(path):
        path = os.path.join(path, "last.pth")
    state = checkpoints.load_checkpoint(path)
    if not isinstance(state, dict) or state.get("kind") != "training_state":
        raise checkpoints.CheckpointError(f"{path}: not a training-state checkpoint (last.pth)")
    checkpoints.check_training_state(state, path)
    tokens = argv if argv is not None else sys.argv[1:]
    given = {a.dest for a in parser._actions
             if any(tok == opt or tok.startswith(opt + "=") for tok in tokens for opt in a.option_strings)}
    defaults = vars(parser.parse_args([]))
    for name, off in REMOVED_FLAGS.items():
        if state["args"].get(name, off) != off:
            raise UsageError(f"{path}: trained with --{name} {state['args'][name]}, an option this version no longer has; "
                             f"resume it with a version from before {REMOVED_IN.get(name, 'December')} 2026")
    saved = {k: v for k, v in state["args"].items() if k in defaults}
    # The model is the checkpoint's whatever the flags say; recorded as such (runs saved before --style_dim
    # replaced --noise_dim/--style_encoder, --width --ngf/--ndf, or before a default changed, have no or another value).
    saved.update({key: state["config"][key] for key in ("style_dim", "upsample", "padding", "noise_maps", "input_noise")})
    saved["width"] = state["config"]["ngf"]
    if type(saved.get("amp")) is bool:  # saved before --amp took the dtype (then --amp_dtype)
        saved["amp"] = state["args"].get("amp_dtype", "auto") if saved["amp"] else None
    for name, value in saved.items():
        if not _same_kind(value, defaults[name]):
            raise checkpoints.CheckpointError(f"{path}: saved argument {name} = {str(value)[:60]!r} has the wrong type")
    # Defaults first: a run saved before a flag existed resumes with that flag's default, or with the value it
    # trained with where the default has changed since (ADDED_FLAGS).
    resumed = argparse.Namespace(**{**defaults, **ADDED_FLAGS, **saved})
    for name in RESUME_OVERRIDES:
        if name in given:
            setattr(resumed, name, getattr(args, name))
    model_dir = os.path.dirname(os.path.abspath(path))
    resumed.models_dir, resumed.run_name = os.path.dirname(model_dir), os.path.basename(model_dir)
    if "outputs_dir" not in given:
        resumed.outputs_dir = args.outputs_dir
        if saved.get("outputs_dir", args.outputs_dir) != args.outputs_dir:
            print(f"note: outputs go to {os.path.join(args.outputs_dir, resumed.run_name)}; the run's saved --outputs_dir "
                  f"{saved['outputs_dir']} is used only when given again", file=sys.stderr)
    ignored = sorted(given - set(RESUME_OVERRIDES) - {"resume"})
    if ignored:
        print(f"note: --resume continues {model_dir} with its saved settings; ignoring "
              f"{', '.join('--' + name for name in ignored)} given on the command line", file=sys.stderr)
    resumed.resume = path
    validate_args(resumed, resuming=True)
    return resumed, state


def start_or_resume(argv):
    """(args, saved training state or None): the flags, checked, and for --resume the run's own."""
    args, parser = parse_args(argv)
    validate_args(args, resuming=bool(args.resume))
    if args.resume:
        return resolve_resume(args, parser, argv)
    return args, None


def configure_backends(args, device, rank):
    if device.type == "cuda":
        # Autotuned cuDNN kernels and TF32 matmuls: the fast path (CPU runs are repeatable either way).
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed + rank)  # different dropout per rank; weights come from rank 0 via DDP


def load_splits(args, master):
    """(classes, train set, test set or None): every pair decoded once; the test split on rank 0 only."""
    labels = read_labels(args.data_dir)
    classes = sorted(set(labels.values())) if args.conditional else []
    if args.conditional and not classes:
        raise UsageError(f"--conditional needs {os.path.join(args.data_dir, 'labels.csv')} (preprocess.py --labels)")
    train_set = PairedDataset(os.path.join(args.data_dir, "train"), args.img_size, augment=True, labels=labels,
                              classes=classes, num_workers=max(args.num_workers, 1), jitter=args.jitter)
    if not train_set.has_images:
        raise UsageError(f"{os.path.join(args.data_dir, 'train', 'originals')}: no real images paired with the masks")
    test_dir = os.path.join(args.data_dir, "test")
    test_set = PairedDataset(test_dir, args.img_size, labels=labels, classes=classes,
                             num_workers=max(args.num_workers, 1)) if master and os.path.isdir(test_dir) else None
    for split in (train_set, test_set):
        if args.conditional and split is not None and (split.labels < 0).any():
            missing = split.names[int((split.labels < 0).nonzero()[0])]
            raise UsageError(f"{os.path.join(args.data_dir, 'labels.csv')}: no label for {split.folder} image {missing}")
    return classes, train_set, test_set


def per_process_batch(args, train_set, world_size, master):
    if len(train_set) >= args.batch_size * world_size:
        return args.batch_size
    batch_size = max(1, len(train_set) // world_size)
    if master:
        print(f"warning: only {len(train_set)} training pairs in {os.path.join(args.data_dir, 'train')}: "
              f"batch size {batch_size} per process instead of {args.batch_size}", file=sys.stderr)
    return batch_size


def make_schedulers(t, args):
    """Constant learning rate, then (from lr_decay_start x n_epochs on) a linear decay to 0, as pix2pix."""
    decay_from = int(args.lr_decay_start * args.n_epochs)
    decay = lambda e: 1.0 - max(0, e - decay_from) / max(1, args.n_epochs - decay_from)  # noqa: E731
    return [torch.optim.lr_scheduler.LambdaLR(opt, decay) for opt in (t.opt_G, t.opt_D)]


def restore_training_state(t, schedulers, state):
    """The mirror of save_checkpoints: the trainer and schedulers as they were after the saved epoch.
    Returns the first epoch still to train."""
    t.G.load_state_dict(state["generator_train"])
    t.D.load_state_dict(state["discriminator"])
    if t.E is not None:
        t.E.load_state_dict(state["style_encoder"])
    if t.ema is not None:
        t.ema.load_state_dict(state["ema"])
    t.opt_G.load_state_dict(state["opt_G"])
    t.opt_D.load_state_dict(state["opt_D"])
    t.scaler.load_state_dict(state["scaler"])
    schedulers[0].load_state_dict(state["sched_G"])
    schedulers[1].load_state_dict(state["sched_D"])
    torch.set_rng_state(state["rng"]["torch"])
    if t.device.type == "cuda" and "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"], t.device)
    t.step = state["step"]
    return state["epoch"] + 1


def run_folders(args, resuming, master, world_size):
    """(name, model folder, output folder): the resumed run's, or new ones that rank 0 claims and
    every other rank learns the name of (or why there is none)."""
    if resuming:
        model_dir = os.path.dirname(os.path.abspath(args.resume))
        return os.path.basename(model_dir), model_dir, os.path.join(args.outputs_dir, os.path.basename(model_dir))
    claimed = [None, None]
    if master:
        try:
            claimed[0] = claim_run_folders(args.models_dir, args.outputs_dir, args.run_name)
        except UsageError as e:
            claimed[1] = str(e)
        except OSError as e:
            claimed[1] = f"cannot create the run folders: {describe_os_error(e)}"
    if world_size > 1:
        dist.broadcast_object_list(claimed, src=0)
    if claimed[1]:
        raise UsageError(claimed[1])
    return claimed[0]


def open_run_outputs(args, config, model_dir, out_dir, start_epoch, resume_step):
    """Rank 0's files before the first epoch: config.json, metrics.csv (rows past a resumed epoch
    belong to the lost part and go), the TensorBoard writer (or None). Returns (metrics path, writer)."""
    try:
        os.makedirs(model_dir, exist_ok=True)
        os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the run folders: {describe_os_error(e)}") from None
    for name in os.listdir(model_dir):
        if ".pth.tmp" in name or name.startswith(".tmp"):  # a save killed mid-write; what it replaced is intact
            os.remove(os.path.join(model_dir, name))
    with atomic_path(os.path.join(model_dir, "config.json")) as tmp, open(tmp, "w") as f:
        json.dump({"config": config, "args": vars(args)}, f, indent=2)
    metrics_path = os.path.join(out_dir, "metrics.csv")
    keep = []
    if resume_step is not None and os.path.exists(metrics_path):
        with open(metrics_path, newline="") as f:
            keep = [row for row in csv.DictReader(f)
                    if (epoch := ascii_int(row.get("epoch"))) is not None and epoch < start_epoch]
    with atomic_path(metrics_path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, METRICS_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(keep)
    writer = None
    if not args.no_tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=resume_step)
    return metrics_path, writer


@dataclass
class Run:
    """Where a run's files go and what rank 0 evaluates on; the writers are rank 0's only."""
    name: str
    model_dir: str
    out_dir: str
    train_set: PairedDataset
    test_set: PairedDataset | None
    batch_size: int  # per process
    metrics_path: str | None = None
    writer: object | None = None  # TensorBoard SummaryWriter


def train_epoch(t, loader, epoch, args, run, master):
    """One pass over the training split. Returns the mean losses (tensors: no host sync)."""
    for module in (t.G_train, t.D_train, t.E_train):
        if module is not None:
            module.train()
    sums = {k: torch.zeros((), device=t.device) for k in ("loss_D", "loss_G_gan", "loss_G_l1")}
    n_steps = 0
    bar = tqdm(loader, desc=f"epoch {epoch}/{args.n_epochs}", disable=None if master else True, leave=False, dynamic_ncols=True)
    for batch_index, (masks, reals, labels_batch, _) in enumerate(bar):
        masks = to_model_range(masks, t.device, t.memory_format)
        reals = to_model_range(reals, t.device, t.memory_format)
        planes = models.class_planes(labels_batch.to(t.device), t.config["n_classes"], masks.shape[-1])
        losses, fakes = train_step(t, masks, reals, planes)
        if t.bad_steps >= MAX_BAD_STEPS:
            raise UsageError(f"{t.bad_steps} consecutive steps with non-finite losses or gradients; "
                             f"stopping. Lower --lr or train without --amp; resume from {run.model_dir}")
        for k, v in losses.items():
            sums[k] += v
        n_steps += 1
        if master and batch_index == 0:
            n = min(8, masks.shape[0])
            save_image_grid([to_uint8(masks[:n]), to_uint8(fakes[:n]), to_uint8(reals[:n])],
                            os.path.join(run.out_dir, "samples", f"epoch_{epoch}_batch_{batch_index}.png"))
        if master and t.step % LOG_EVERY == 0:
            values = {k: v.item() for k, v in losses.items()}
            bar.set_postfix(D=f"{values['loss_D']:.3f}", G_gan=f"{values['loss_G_gan']:.3f}", L1=f"{values['loss_G_l1']:.3f}")
            if run.writer:
                for k, v in values.items():
                    run.writer.add_scalar(f"train/{k}", v, t.step)
    bar.close()
    return {k: v / max(n_steps, 1) for k, v in sums.items()}


def due(epoch, freq, args):
    """Whether an every-freq-epochs task (evaluation, checkpoints) runs after this epoch: the last always."""
    return epoch % freq == 0 or epoch == args.n_epochs


def end_of_epoch(t, args, run, epoch, mean_losses, started, schedulers):
    """Rank 0 after an epoch: test scores and checkpoints when due, one metrics.csv row, one log line."""
    evaluating = run.test_set is not None and due(epoch, args.eval_freq, args)
    saving = due(epoch, args.save_freq, args)
    row = {"epoch": epoch, "step": t.step, "lr": schedulers[0].get_last_lr()[0],
           **{k: v.item() for k, v in mean_losses.items()}}
    if evaluating:
        scores = test_scores(t, run.test_set, batch_size=max(run.batch_size, 32), out_dir=run.out_dir, epoch=epoch)
        row.update({f"test_{k}": v for k, v in scores.items()})
        print(f"epoch {epoch}: test L1 {scores['l1']:.4f}  PSNR {scores['psnr']:.2f}  SSIM {scores['ssim']:.4f}")
    row["seconds"] = round(time.time() - started, 2)
    with open(run.metrics_path, "a", newline="") as f:
        csv.DictWriter(f, METRICS_COLUMNS).writerow(row)
    if run.writer:
        for k, v in row.items():
            if k.startswith("test_"):
                run.writer.add_scalar(f"test/{k[5:]}", v, epoch)
        run.writer.add_scalar("train/lr", row["lr"], epoch)
    print(f"epoch {epoch}/{args.n_epochs}: D {row['loss_D']:.4f}  G_gan {row['loss_G_gan']:.4f}  "
          f"L1 {row['loss_G_l1']:.4f}  ({row['seconds']:.1f} s)")
    if saving:
        save_checkpoints(t, args, t.config, epoch, run.model_dir, schedulers, epoch_files=True)


def main(argv=None):
    args, state = start_or_resume(argv)
    device, rank, world_size = setup_distributed(args.device)
    master = rank == 0
    configure_backends(args, device, rank)
    classes, train_set, test_set = load_splits(args, master)
    batch_size = per_process_batch(args, train_set, world_size, master)
    loader = make_loader(train_set, batch_size, args.num_workers, args.seed, device, rank, world_size)
    config = state["config"] if state else model_config(args, classes)
    t = build_trainer(config, args, device, world_size)
    schedulers = make_schedulers(t, args)
    start_epoch = restore_training_state(t, schedulers, state) if state else 1
    run = Run(*run_folders(args, bool(state), master, world_size), train_set, test_set, batch_size)
    RUN["model_dir"] = run.model_dir
    if master:
        run.metrics_path, run.writer = open_run_outputs(args, config, run.model_dir, run.out_dir, start_epoch,
                                                        t.step if state else None)
        print(f"run {run.name}: {len(train_set)} training pairs, {len(test_set) if test_set else 0} test pairs, "
              f"{world_size} process(es) x batch {batch_size}, device {device}, "
              f"{'fp32' if t.dtype is None else str(t.dtype).replace('torch.', '')}, "
              f"G {models.count_params(t.G) / 1e6:.2f}M / D {models.count_params(t.D) / 1e6:.2f}M params"
              + (f", resuming after epoch {start_epoch - 1}" if state else ""))

    for epoch in range(start_epoch, args.n_epochs + 1):
        loader.sampler.set_epoch(epoch)
        started = time.time()
        mean_losses = train_epoch(t, loader, epoch, args, run, master)
        for s in schedulers:
            s.step()
        if world_size > 1:
            # Local BatchNorm statistics drift apart between ranks; rank 0's are the ones saved and evaluated.
            # The frozen pretrained trunk is identical everywhere and stays out of the broadcast.
            trained = [b for name, b in t.D.named_buffers() if not name.startswith("projected.features.")]
            averaged = t.ema.buffers() if t.ema is not None else ()  # its BatchNorm statistics average each rank's own
            for buffer in (*t.G.buffers(), *trained, *averaged):
                dist.broadcast(buffer, src=0)
        if due(epoch, args.eval_freq, args) or due(epoch, args.save_freq, args):
            # on every rank, so that all hold the same generator (the sampling looks are buffers of it)
            refresh_style_bank(t, train_set.center_images(), train_set.labels, train_set.center_masks())
        if master:
            end_of_epoch(t, args, run, epoch, mean_losses, started, schedulers)
        if world_size > 1:
            dist.barrier()

    if master:
        if run.writer:
            run.writer.close()
        print(f"done: checkpoints in {run.model_dir}, samples and metrics in {run.out_dir}")
    if world_size > 1:
        dist.destroy_process_group()
    return run.model_dir


if __name__ == "__main__":
    sys.exit(run_cli(main, interrupted_message))
