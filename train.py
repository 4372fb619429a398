"""Train the PixelGAN: residual U-Net generator + conditional PatchGAN, LSGAN + lambda * L1.

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
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import models
from dataset import PairedDataset, read_labels, save_image_grid, to_model_range, to_uint8

METRICS_COLUMNS = ["epoch", "step", "lr", "loss_D", "loss_G_gan", "loss_G_l1", "test_l1", "test_psnr", "test_ssim", "seconds"]
N_TEST_IMAGES = 8  # test_epoch_<E>_sample_<K>.png written per evaluation


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="data", help="folder with train/ and test/ from preprocess.py")
    p.add_argument("--batch_size", type=int, default=16, help="per process; the global batch is this x world size")
    p.add_argument("--n_epochs", type=int, default=150)
    p.add_argument("--img_size", type=int, default=128, help="a power of two; the generator has log2(img_size) levels")
    p.add_argument("--num_workers", type=int, default=2, help="DataLoader workers (0: load in the main process)")
    p.add_argument("--eval_freq", type=int, default=10, help="evaluate on the test split every N epochs")
    p.add_argument("--save_freq", type=int, default=10, help="write checkpoints every N epochs (and at the end)")
    p.add_argument("--amp", action="store_true", help="mixed precision: bf16 where supported, else fp16 with loss scaling")
    p.add_argument("--amp_dtype", choices=["auto", "bf16", "fp16"], default="auto")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--beta1", type=float, default=0.5)
    p.add_argument("--lambda_l1", type=float, default=100.0)
    p.add_argument("--lambda_fm", type=float, default=0.0, help="weight of the discriminator feature-matching loss (pix2pixHD)")
    p.add_argument("--gan_loss", choices=["lsgan", "hinge"], default="lsgan")
    p.add_argument("--lr_decay_start", type=float, default=1.0,
                   help="fraction of the epochs after which the lr decays linearly to 0 (pix2pix: 0.5; 1.0: constant)")
    p.add_argument("--ema", type=float, default=0.0, help="decay of an exponential moving average of G used for sampling (0: off)")
    p.add_argument("--diffaug", default="", help="differentiable augmentation of D's inputs: comma list of color,translation,cutout")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--deterministic", action="store_true", help="CUDA: repeatable kernels instead of the fastest ones")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--conditional", action="store_true", help="condition G and D on the class in data_dir/labels.csv")
    # architecture (saved in the checkpoint's config)
    p.add_argument("--norm", choices=["batch", "instance"], default=models.DEFAULT_CONFIG["norm"])
    p.add_argument("--ngf", type=int, default=models.DEFAULT_CONFIG["ngf"])
    p.add_argument("--ndf", type=int, default=models.DEFAULT_CONFIG["ndf"])
    p.add_argument("--upsample", choices=["transpose", "resize"], default=models.DEFAULT_CONFIG["upsample"])
    p.add_argument("--d_spectral_norm", action="store_true")
    p.add_argument("--d_scales", type=int, default=models.DEFAULT_CONFIG["d_scales"],
                   help="discriminators at 1, 1/2, ... of the resolution (pix2pixHD multi-scale D)")
    p.add_argument("--noise_dim", type=int, default=models.DEFAULT_CONFIG["noise_dim"], help="size of the style code z: N(0, I), or learned with --style_encoder")
    p.add_argument("--style_encoder", action="store_true",
                   help="learn the style code from the real image (cVAE, BicycleGAN); needs --noise_dim, e.g. 8")
    p.add_argument("--lambda_kl", type=float, default=0.01, help="weight of the style code's KL term (with --style_encoder)")
    p.add_argument("--noise_injection", action=argparse.BooleanOptionalAction, default=models.DEFAULT_CONFIG["noise_injection"],
                   help="per-pixel noise in the decoder for texture")
    # speed
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action="store_true", help="torch.compile both networks (slow start, faster steps)")
    p.add_argument("--fused_adam", action=argparse.BooleanOptionalAction, default=True, help="fused Adam kernel (else foreach)")
    p.add_argument("--freeze_d", action=argparse.BooleanOptionalAction, default=True,
                   help="no D weight gradients in the G step (--no-freeze_d only to measure what it saves)")
    p.add_argument("--local_bn", action="store_true", help="under DDP keep per-process BatchNorm statistics (default: SyncBatchNorm on CUDA)")
    # bookkeeping
    p.add_argument("--resume", default="", help="a run folder pixelgan_models/<TIMESTAMP> (or its last.pth) to continue")
    p.add_argument("--models_dir", default="pixelgan_models")
    p.add_argument("--outputs_dir", default="pixelgan_outputs")
    p.add_argument("--run_name", default="", help="folder name instead of the timestamp")
    p.add_argument("--log_freq", type=int, default=20, help="steps between progress-bar / TensorBoard loss updates")
    p.add_argument("--max_bad_steps", type=int, default=50, help="stop after this many consecutive non-finite steps")
    p.add_argument("--no_tensorboard", action="store_true")
    return p.parse_args(argv), p


# ---------------------------------------------------------------------------------------------- setup

def resolve_device(name):
    """'auto' -> cuda when there is one, else cpu; anything else as given."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def setup_distributed(device_arg):
    """(device, rank, world_size). DDP only when torchrun's environment is present."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    device_arg = resolve_device(device_arg)
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


def autocast_dtype(device, amp, requested="auto"):
    """The low-precision dtype for --amp, or None for fp32. bf16 needs no loss scaling (fp32's exponent
    range), so it is preferred wherever the hardware runs it natively; fp16 is the CUDA fallback."""
    if not amp:
        return None
    if device.type == "cuda":
        if requested == "fp16" or (requested == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16
        return torch.bfloat16
    if requested == "fp16":
        print("warning: fp16 autocast is CUDA-only here; using bf16 on the CPU", file=sys.stderr)
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    print("warning: --amp ignored: this CPU has no native bf16 (AVX512-BF16/AMX); training in fp32", file=sys.stderr)
    return None


def autocast(device, dtype):
    """Mixed-precision context for dtype (from autocast_dtype); a no-op for fp32 (dtype None)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def diff_augment(masks, *images, policy=""):
    """DiffAugment (Zhao et al. 2020): random, differentiable transforms of D's inputs, so D cannot
    memorise a small training set. Each sample gets one draw, applied alike to its mask and to every
    image passed (real and fake alike when both are given); geometry moves mask and image together."""
    if not policy:
        return (masks, *images)
    n, size, device, dtype = masks.shape[0], masks.shape[-1], masks.device, images[0].dtype
    if "color" in policy:
        brightness = (torch.rand(n, 1, 1, 1, device=device, dtype=dtype) - 0.5) * 0.4
        saturation = torch.rand(n, 1, 1, 1, device=device, dtype=dtype) * 0.6 + 0.7
        contrast = torch.rand(n, 1, 1, 1, device=device, dtype=dtype) * 0.5 + 0.75

        def color(x):
            x = x + brightness
            x = (x - x.mean(dim=1, keepdim=True)) * saturation + x.mean(dim=1, keepdim=True)
            return (x - x.mean(dim=(1, 2, 3), keepdim=True)) * contrast + x.mean(dim=(1, 2, 3), keepdim=True)

        images = [color(x) for x in images]
    tensors = [masks, *images]
    if "translation" in policy:
        shift = size // 8
        dy, dx = torch.randint(-shift, shift + 1, (2,)).tolist()
        tensors = [torch.roll(x, shifts=(dy, dx), dims=(2, 3)) for x in tensors]
    if "cutout" in policy:
        half = size // 8
        cy, cx = torch.randint(0, size, (2, n, 1, 1, 1), device=device)
        ys = torch.arange(size, device=device).view(1, 1, size, 1)
        xs = torch.arange(size, device=device).view(1, 1, 1, size)
        keep = (((ys - cy).abs() >= half) | ((xs - cx).abs() >= half)).to(dtype)
        tensors = [x * keep for x in tensors]
    return tuple(tensors)


def gan_loss(scores, is_real, mode, for_generator=False):
    """Mean over the discriminator's scales of the LSGAN or hinge loss of each score map."""
    losses = []
    for prediction in scores:
        prediction = prediction.float()  # losses in fp32 whatever the autocast dtype
        if mode == "lsgan":
            losses.append(F.mse_loss(prediction, torch.full_like(prediction, 1.0 if is_real else 0.0)))
        elif for_generator:
            losses.append(-prediction.mean())
        else:
            losses.append(F.relu(1.0 - prediction).mean() if is_real else F.relu(1.0 + prediction).mean())
    return sum(losses) / len(losses)


def make_loader(train_set, batch_size, num_workers, seed, device, rank=0, world_size=1):
    """Shuffled batches; each rank gets its own shard of every epoch (set_epoch reshuffles)."""
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True,
                                                  seed=seed, drop_last=True)
    return torch.utils.data.DataLoader(train_set, batch_size=batch_size, sampler=sampler, drop_last=True,
                                       num_workers=num_workers, pin_memory=device.type == "cuda",
                                       persistent_workers=num_workers > 0)


def make_optimizer(params, args):
    # fused Adam: one kernel for all parameters instead of a loop over tensors (CUDA and CPU).
    return torch.optim.Adam(params, lr=args.lr, betas=(args.beta1, 0.999),
                            fused=args.fused_adam, foreach=not args.fused_adam)


def build_trainer(config, args, device, world_size=1):
    """Networks, optimizers, loss scaler and EMA: everything train_step needs (bench.py uses it too)."""
    G, D = models.build_generator(config), models.build_discriminator(config)
    E = models.build_style_encoder(config)
    if world_size > 1 and device.type == "cuda" and config["norm"] == "batch" and not args.local_bn:
        G, D = (torch.nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in (G, D))
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    G, D = G.to(device, memory_format=memory_format), D.to(device, memory_format=memory_format)
    G_params = list(G.parameters())
    if E is not None:
        E = E.to(device, memory_format=memory_format)
        G_params += list(E.parameters())  # the encoder learns from G's loss, in G's optimizer
    dtype = autocast_dtype(device, args.amp, args.amp_dtype)
    trainer = SimpleNamespace(
        G=G, D=D, E=E, G_params=G_params, config=config, device=device, dtype=dtype, memory_format=memory_format,
        opt_G=make_optimizer(G_params, args), opt_D=make_optimizer(D.parameters(), args),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        ema=None, lambda_l1=args.lambda_l1, lambda_fm=args.lambda_fm, lambda_kl=args.lambda_kl, gan_loss=args.gan_loss,
        diffaug=args.diffaug, freeze_D=args.freeze_d, bad_steps=0, step=0,
    )
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
        loss_kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1).mean()
    with mixed:
        fakes = t.G_train(masks, class_planes, z)
    cond = masks if class_planes is None else torch.cat([masks, class_planes], 1)

    with mixed:
        d_real = t.D_train(*diff_augment(cond, reals, policy=t.diffaug))
        d_fake = t.D_train(*diff_augment(cond, fakes.detach(), policy=t.diffaug))
    loss_D = 0.5 * (gan_loss(d_real, True, t.gan_loss) + gan_loss(d_fake, False, t.gan_loss))
    ok_D = optimizer_step(t, loss_D, t.opt_D, t.D.parameters(), "D")

    # D's weights need no gradients here: freezing them skips their weight-gradient kernels,
    # and calling the plain module keeps DDP from waiting for gradients that never come.
    t.D.requires_grad_(not t.freeze_D)
    with mixed:
        cond_aug, fakes_aug, reals_aug = diff_augment(cond, fakes, reals, policy=t.diffaug)
        if t.lambda_fm > 0:
            d_fake_for_G, fake_features = t.D_plain(cond_aug, fakes_aug, return_features=True)
            with torch.no_grad():
                _, real_features = t.D_plain(cond_aug, reals_aug, return_features=True)
        else:
            d_fake_for_G = t.D_plain(cond_aug, fakes_aug)
    loss_G_gan = gan_loss(d_fake_for_G, True, t.gan_loss, for_generator=True)
    loss_G_l1 = F.l1_loss(fakes.float(), reals.float())
    loss_G = loss_G_gan + t.lambda_l1 * loss_G_l1
    if loss_kl is not None:
        loss_G = loss_G + t.lambda_kl * loss_kl
    if t.lambda_fm > 0:
        # Matching D's features of the same (augmented) real image gives G a dense texture signal.
        loss_G = loss_G + t.lambda_fm * sum(F.l1_loss(f.float(), r.float()) for f, r in zip(fake_features, real_features))
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
def refresh_style_bank(t, images_uint8, batch_size=64):
    """Fill the generator's style bank with the style codes (means) of training images, evenly spread
    over the split and repeated when it has fewer images than the bank has rows."""
    if t.E is None:
        return
    bank = sampling_generator(t).style_bank
    index = torch.arange(bank.shape[0]) * len(images_uint8) // bank.shape[0]
    was_training = t.E.training
    t.E.eval()
    codes = []
    for start in range(0, len(index), batch_size):
        images = to_model_range(images_uint8[index[start:start + batch_size]], t.device, t.memory_format)
        with autocast(t.device, t.dtype):
            codes.append(t.E(images)[0])
    t.E.train(was_training)
    bank.copy_(torch.cat(codes))
    if t.G.style_bank is not bank:
        t.G.style_bank.copy_(bank)


@torch.inference_mode()
def evaluate(t, test_set, batch_size, out_dir=None, epoch=0):
    """Mean L1 ([-1, 1] units), PSNR and SSIM over the test split; writes the first test images."""
    from metrics import paired_metrics
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
    if epoch_files:
        models.save_atomic({"kind": "generator", "config": config, "epoch": epoch, "generator": sample_G.state_dict()},
                           os.path.join(model_dir, f"generator_epoch_{epoch}.pth"))
        models.save_atomic({"kind": "discriminator", "config": config, "epoch": epoch, "discriminator": t.D.state_dict()},
                           os.path.join(model_dir, f"discriminator_epoch_{epoch}.pth"))
    models.save_atomic({
        "kind": "training_state", "config": config, "epoch": epoch, "step": t.step, "args": vars(args),
        "generator": sample_G.state_dict(), "generator_train": t.G.state_dict(), "discriminator": t.D.state_dict(),
        "style_encoder": t.E.state_dict() if t.E is not None else None,
        "ema": t.ema.state_dict() if t.ema is not None else None,
        "opt_G": t.opt_G.state_dict(), "opt_D": t.opt_D.state_dict(), "scaler": t.scaler.state_dict(),
        "sched_G": schedulers[0].state_dict(), "sched_D": schedulers[1].state_dict(), "rng": rng_state(t.device),
    }, os.path.join(model_dir, "last.pth"))


def resolve_resume(args, parser, argv):
    """Continue a run: its saved flags win, except those about the machine and the length of the run."""
    path = args.resume
    if os.path.isdir(path):
        path = os.path.join(path, "last.pth")
    state = models.load_checkpoint(path)
    if not isinstance(state, dict) or state.get("kind") != "training_state":
        raise models.CheckpointError(f"{path}: not a training-state checkpoint (last.pth)")
    tokens = argv if argv is not None else sys.argv[1:]
    given = {a.dest for a in parser._actions
             if any(tok == opt or tok.startswith(opt + "=") for tok in tokens for opt in a.option_strings)}
    # Defaults first: a run saved before a flag existed resumes with that flag's default.
    resumed = argparse.Namespace(**{**vars(parser.parse_args([])), **state["args"]})
    for name in ("n_epochs", "num_workers", "device", "eval_freq", "save_freq", "log_freq", "no_tensorboard", "compile"):
        if name in given:
            setattr(resumed, name, getattr(args, name))
    resumed.resume = path
    return resumed, state


def main(argv=None):
    args, parser = parse_args(argv)
    state = None
    if args.resume:
        args, state = resolve_resume(args, parser, argv)
    device, rank, world_size = setup_distributed(args.device)
    master = rank == 0
    if device.type == "cuda":
        # Autotuned cuDNN kernels and TF32 matmuls are the fast path; --deterministic trades them for
        # bit-repeatable runs (CPU runs are repeatable either way).
        torch.backends.cudnn.benchmark = not args.deterministic
        torch.backends.cudnn.deterministic = args.deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not args.deterministic
    torch.manual_seed(args.seed + rank)  # different dropout per rank; weights come from rank 0 via DDP

    # ---- data
    labels = read_labels(args.data_dir)
    classes = sorted(set(labels.values())) if args.conditional else []
    if args.conditional and not classes:
        sys.exit(f"error: --conditional needs {os.path.join(args.data_dir, 'labels.csv')} (preprocess.py --labels)")
    config = state["config"] if state else models.make_config(
        img_size=args.img_size, ngf=args.ngf, ndf=args.ndf, norm=args.norm, upsample=args.upsample,
        d_spectral_norm=args.d_spectral_norm, d_scales=args.d_scales, noise_dim=args.noise_dim, style_encoder=args.style_encoder, noise_injection=args.noise_injection,
        n_classes=len(classes), classes=classes)
    train_set = PairedDataset(os.path.join(args.data_dir, "train"), args.img_size, augment=True,
                              labels=labels, classes=classes, num_workers=max(args.num_workers, 1))
    if not train_set.has_images:
        sys.exit(f"error: {os.path.join(args.data_dir, 'train', 'originals')}: no real images paired with the masks")
    test_dir = os.path.join(args.data_dir, "test")
    test_set = PairedDataset(test_dir, args.img_size, labels=labels, classes=classes,
                             num_workers=max(args.num_workers, 1)) if master and os.path.isdir(test_dir) else None
    for split in (train_set, test_set):
        if args.conditional and split is not None and (split.labels < 0).any():
            missing = split.names[int((split.labels < 0).nonzero()[0])]
            sys.exit(f"error: {os.path.join(args.data_dir, 'labels.csv')}: no label for {split.folder} image {missing}")
    batch_size = args.batch_size
    if len(train_set) < batch_size * world_size:
        batch_size = max(1, len(train_set) // world_size)
        if master:
            print(f"warning: only {len(train_set)} training pairs in {os.path.join(args.data_dir, 'train')}: "
                  f"batch size {batch_size} per process instead of {args.batch_size}", file=sys.stderr)
    loader = make_loader(train_set, batch_size, args.num_workers, args.seed, device, rank, world_size)
    sampler = loader.sampler

    # ---- model
    t = build_trainer(config, args, device, world_size)
    decay_from = int(args.lr_decay_start * args.n_epochs)
    decay = lambda e: 1.0 - max(0, e - decay_from) / max(1, args.n_epochs - decay_from)  # noqa: E731
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, decay) for opt in (t.opt_G, t.opt_D)]
    start_epoch = 1
    if state:
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
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        t.step, start_epoch = state["step"], state["epoch"] + 1

    # ---- run folders: one name for every rank
    if state:
        model_dir = os.path.dirname(os.path.abspath(args.resume))
        run_name = os.path.basename(model_dir)
    else:
        run_name = [args.run_name or time.strftime("%Y%m%d_%H%M%S")]
        if world_size > 1:
            dist.broadcast_object_list(run_name, src=0)
        run_name = run_name[0]
        model_dir = os.path.join(args.models_dir, run_name)
    out_dir = os.path.join(args.outputs_dir, run_name)
    writer = None
    if master:
        try:
            os.makedirs(model_dir, exist_ok=True)
            os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
        except OSError as e:
            sys.exit(f"error: cannot create the run folders ({e})")
        for name in os.listdir(model_dir):
            if ".pth.tmp" in name:  # a save killed mid-write; the file it was replacing is intact
                os.remove(os.path.join(model_dir, name))
        with open(os.path.join(model_dir, "config.json"), "w") as f:
            json.dump({"config": config, "args": vars(args)}, f, indent=2)
        metrics_path = os.path.join(out_dir, "metrics.csv")
        keep = []
        if state and os.path.exists(metrics_path):  # rows past the resumed epoch belong to the lost part
            with open(metrics_path, newline="") as f:
                keep = [row for row in csv.DictReader(f) if int(row["epoch"]) < start_epoch]
        with open(metrics_path, "w", newline="") as f:
            w = csv.DictWriter(f, METRICS_COLUMNS)
            w.writeheader()
            w.writerows(keep)
        if not args.no_tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=t.step if state else None)
        print(f"run {run_name}: {len(train_set)} training pairs, {len(test_set) if test_set else 0} test pairs, "
              f"{world_size} process(es) x batch {batch_size}, device {device}, "
              f"{'fp32' if t.dtype is None else str(t.dtype).replace('torch.', '')}, "
              f"G {models.count_params(t.G) / 1e6:.2f}M / D {models.count_params(t.D) / 1e6:.2f}M params"
              + (f", resuming after epoch {start_epoch - 1}" if state else ""))

    # ---- train
    for epoch in range(start_epoch, args.n_epochs + 1):
        sampler.set_epoch(epoch)
        for module in (t.G_train, t.D_train, t.E_train):
            if module is not None:
                module.train()
        started = time.time()
        sums = {k: torch.zeros((), device=device) for k in ("loss_D", "loss_G_gan", "loss_G_l1")}
        n_steps = 0
        bar = tqdm(loader, desc=f"epoch {epoch}/{args.n_epochs}", disable=None if master else True, leave=False, dynamic_ncols=True)
        for batch_index, (masks, reals, labels_batch, _) in enumerate(bar):
            masks = to_model_range(masks, device, t.memory_format)
            reals = to_model_range(reals, device, t.memory_format)
            planes = models.class_planes(labels_batch.to(device), config["n_classes"], masks.shape[-1])
            losses, fakes = train_step(t, masks, reals, planes)
            if t.bad_steps >= args.max_bad_steps:
                raise SystemExit(f"error: {t.bad_steps} consecutive steps with non-finite losses or gradients; "
                                 f"stopping. Lower --lr or train without --amp; resume from {model_dir}")
            for k, v in losses.items():
                sums[k] += v
            n_steps += 1
            if master and batch_index == 0:
                n = min(8, masks.shape[0])
                save_image_grid([to_uint8(masks[:n]), to_uint8(fakes[:n]), to_uint8(reals[:n])],
                                os.path.join(out_dir, "samples", f"epoch_{epoch}_batch_{batch_index}.png"))
            if master and t.step % args.log_freq == 0:
                values = {k: v.item() for k, v in losses.items()}
                bar.set_postfix(D=f"{values['loss_D']:.3f}", G_gan=f"{values['loss_G_gan']:.3f}", L1=f"{values['loss_G_l1']:.3f}")
                if writer:
                    for k, v in values.items():
                        writer.add_scalar(f"train/{k}", v, t.step)
        bar.close()
        for s in schedulers:
            s.step()
        if world_size > 1:
            # Local BatchNorm statistics drift apart between ranks; rank 0's are the ones saved and evaluated.
            for buffer in t.G.buffers():
                dist.broadcast(buffer, src=0)
            for buffer in t.D.buffers():
                dist.broadcast(buffer, src=0)

        if master:
            evaluating = test_set is not None and (epoch % args.eval_freq == 0 or epoch == args.n_epochs)
            saving = epoch % args.save_freq == 0 or epoch == args.n_epochs
            if evaluating or saving:
                refresh_style_bank(t, train_set.images)
            row = {"epoch": epoch, "step": t.step, "lr": schedulers[0].get_last_lr()[0],
                   **{k: (v / max(n_steps, 1)).item() for k, v in sums.items()}}
            if evaluating:
                scores = evaluate(t, test_set, batch_size=max(batch_size, 32), out_dir=out_dir, epoch=epoch)
                row.update({f"test_{k}": v for k, v in scores.items()})
                print(f"epoch {epoch}: test L1 {scores['l1']:.4f}  PSNR {scores['psnr']:.2f}  SSIM {scores['ssim']:.4f}")
            row["seconds"] = round(time.time() - started, 2)
            with open(metrics_path, "a", newline="") as f:
                csv.DictWriter(f, METRICS_COLUMNS).writerow(row)
            if writer:
                for k, v in row.items():
                    if k.startswith("test_"):
                        writer.add_scalar(f"test/{k[5:]}", v, epoch)
                writer.add_scalar("train/lr", row["lr"], epoch)
            print(f"epoch {epoch}/{args.n_epochs}: D {row['loss_D']:.4f}  G_gan {row['loss_G_gan']:.4f}  "
                  f"L1 {row['loss_G_l1']:.4f}  ({row['seconds']:.1f} s)")
            if saving:
                save_checkpoints(t, args, config, epoch, model_dir, schedulers, epoch_files=True)
        if world_size > 1:
            dist.barrier()

    if master:
        if writer:
            writer.close()
        print(f"done: checkpoints in {model_dir}, samples and metrics in {out_dir}")
    if world_size > 1:
        dist.destroy_process_group()
    return model_dir


if __name__ == "__main__":
    try:
        main()
    except (models.CheckpointError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
