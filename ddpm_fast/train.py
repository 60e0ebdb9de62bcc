"""python -m ddpm_fast.train: train a DDPM on an image folder, an .npz, or the built-in digits.

Everything random is drawn from generators whose states go into the checkpoint (batch indices,
timesteps and noise, label dropout, dropout masks), and the checkpoint is written atomically: a run
resumed with --resume continues exactly where the saved one stopped (bit for bit on the CPU).
Multi-GPU: torchrun --nproc_per_node=K -m ddpm_fast.train ... (DistributedDataParallel; gloo on CPU).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

from ddpm_fast.checkpoint import CheckpointError, atomic_write, read_torch_file, save_pretrained
from ddpm_fast.config import PRESETS, UNetConfig
from ddpm_fast.data import DataError, load_data
from ddpm_fast.distributed import Dist
from ddpm_fast.images import save_grid
from ddpm_fast.losses import training_loss
from ddpm_fast.samplers import DDIMSampler, to_uint8
from ddpm_fast.schedule import NoiseSchedule
from ddpm_fast.unet import UNet

CHECKPOINT_NAME = "checkpoint.pt"
# Flags that define the run: a resumed run must use the same ones.
_RUN_DEFINING = ("data", "config", "schedule", "num_timesteps", "batch_size", "lr", "ema_decay", "amp",
                 "grad_clip", "cond_drop_prob", "seed", "warmup", "weight_decay")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_fast.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="an image folder, an .npz of uint8 images, or 'digits'")
    p.add_argument("--config", default="digits", choices=sorted(PRESETS), help="U-Net preset")
    p.add_argument("--schedule", default="linear", choices=["linear", "cosine"], help="beta schedule")
    p.add_argument("--num-timesteps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=128, help="per process")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=500, help="linear learning-rate warm-up steps")
    p.add_argument("--steps", type=int, default=10000, help="total optimizer steps")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--amp", default="none", choices=["none", "fp16", "bf16"],
                   help="mixed precision (fp16 with loss scaling)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--cond-drop-prob", type=float, default=0.1,
                   help="label dropout for classifier-free guidance (conditional presets)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-every", type=int, default=0, help="write a sample grid every N steps (0: off)")
    p.add_argument("--save-every", type=int, default=1000, help="write the checkpoint every N steps")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--out", default="runs/ddpm", help="output folder (checkpoint, samples, model/)")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint (default: OUT/checkpoint.pt)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--export-dtype", default="float32", choices=["float32", "float16"],
                   help="dtype of the exported model/ weights")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _rng_state(gens: dict) -> dict:
    state = {k: g.get_state() for k, g in gens.items()}
    state["torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(gens: dict, state: dict) -> None:
    for k, g in gens.items():
        g.set_state(state[k])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _lr_at(step: int, args) -> float:
    return args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup > 0 else args.lr


def _sample_grid(ema: UNet, schedule: NoiseSchedule, path: str, device) -> None:
    cfg = ema.config
    n = 10 * (cfg.num_classes or 10) if cfg.num_classes else 64
    labels = torch.arange(n, device=device) % cfg.num_classes if cfg.num_classes else None
    x = DDIMSampler(schedule, min(50, schedule.num_timesteps)).sample(
        ema, (n, cfg.in_channels, cfg.sample_size, cfg.sample_size), seed=0, class_labels=labels, progress=False)
    save_grid(to_uint8(x), path, nrow=cfg.num_classes or 8, scale=2)


def train(args) -> str:
    dist_ctx = Dist(args.device)
    device = dist_ctx.device
    out = args.out
    ckpt_path = os.path.join(out, CHECKPOINT_NAME)
    resume_path = (ckpt_path if args.resume == "auto" else args.resume) if args.resume else None
    state = None
    if resume_path:
        if os.path.isdir(resume_path):
            resume_path = os.path.join(resume_path, CHECKPOINT_NAME)
        if not os.path.isfile(resume_path):
            raise CheckpointError(f"{resume_path}: no checkpoint to resume from")
        state = read_torch_file(resume_path)
        if not isinstance(state, dict) or "model" not in state or "args" not in state:
            raise CheckpointError(f"{resume_path}: not a ddpm_fast.train checkpoint")
        saved = state["args"]
        diffs = [f"--{k.replace('_', '-')} {saved.get(k)!r} (checkpoint) vs {getattr(args, k)!r}"
                 for k in _RUN_DEFINING if saved.get(k) != getattr(args, k)]
        if diffs:
            raise CheckpointError(f"{resume_path}: the flags differ from the saved run: " + "; ".join(diffs))

    cfg = UNetConfig.from_name(args.config)
    data = load_data(args.data, cfg.sample_size, cfg.in_channels)
    if cfg.num_classes and data.labels is None:
        raise DataError(f"preset {args.config!r} is class-conditional but {args.data} has no labels")
    if data.labels is not None and cfg.num_classes and data.num_classes > cfg.num_classes:
        raise DataError(f"{args.data} has {data.num_classes} classes, preset {args.config!r} takes {cfg.num_classes}")
    labels_used = cfg.num_classes is not None
    schedule = NoiseSchedule.from_name(args.schedule, args.num_timesteps)

    torch.manual_seed(args.seed + dist_ctx.rank)
    model = UNet(cfg).to(device)
    if device.type == "cuda":
        model = model.to_fast(torch.float32)  # fp32 masters, channels_last, fused blocks; autocast does fp16
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    amp_dtype = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    gens = {"data": torch.Generator().manual_seed(args.seed * 1000 + dist_ctx.rank),
            "loss": torch.Generator(device).manual_seed(args.seed * 1000 + 500 + dist_ctx.rank)}
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        rng = state["rng"][dist_ctx.rank] if dist_ctx.rank < len(state["rng"]) else None
        if rng is None:
            raise CheckpointError(f"{resume_path}: saved by {len(state['rng'])} processes, resumed with more")
        _set_rng_state(gens, rng)
        step = int(state["step"])

    net = model
    if dist_ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def save(at_step):
        rng_all = [_rng_state(gens)]
        if dist_ctx.world > 1:
            import torch.distributed as dist

            rng_all = [None] * dist_ctx.world
            dist.all_gather_object(rng_all, _rng_state(gens))
        if not dist_ctx.main:
            return
        payload = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                   "scaler": scaler.state_dict(), "step": at_step, "rng": rng_all, "args": vars(args),
                   "unet_config": cfg.to_dict(), "scheduler_config": schedule.to_config()}
        os.makedirs(out, exist_ok=True)
        atomic_write(ckpt_path, lambda p: torch.save(payload, p))

    from tqdm.auto import tqdm

    bar = tqdm(total=args.steps, initial=step, disable=args.no_progress or not dist_ctx.main, desc="train",
               unit="step", dynamic_ncols=True)
    seen, t0 = 0, time.perf_counter()
    try:
        while step < args.steps:
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, args)
            idx = torch.randint(0, len(data), (args.batch_size,), generator=gens["data"])
            x0, y = data.batch(idx, device)
            if device.type == "cuda":
                x0 = x0.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = training_loss(net, schedule, x0, y if labels_used else None,
                                     cond_drop_prob=args.cond_drop_prob if labels_used else 0.0,
                                     generator=gens["loss"])
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if args.grad_clip > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            scaler.step(opt)
            scaler.update()
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                    e.lerp_(p, 1.0 - args.ema_decay)
                for e, b in zip(ema.buffers(), model.buffers(), strict=True):
                    e.copy_(b)
            step += 1
            seen += args.batch_size * dist_ctx.world
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower --lr or use --grad-clip")
            if step % args.log_every == 0 or step == args.steps:
                rate = seen / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.0f}", lr=f"{_lr_at(step - 1, args):.1e}")
            bar.update(1)
            if args.save_every and step % args.save_every == 0 and step < args.steps:
                save(step)
            if args.sample_every and step % args.sample_every == 0 and dist_ctx.main:
                _sample_grid(ema, schedule, os.path.join(out, "samples", f"step_{step:07d}.png"), device)
    except KeyboardInterrupt:
        bar.close()
        save(step)
        if dist_ctx.main:
            print(f"interrupted at step {step}; checkpoint saved to {ckpt_path} (continue with --resume)",
                  file=sys.stderr)
        dist_ctx.close()
        raise SystemExit(130) from None
    bar.close()
    save(step)
    export = os.path.join(out, "model")
    if dist_ctx.main:
        save_pretrained(ema, export, schedule=schedule, dtype=getattr(torch, args.export_dtype))
        print(f"done: {step} steps; checkpoint {ckpt_path}; EMA model {export}")
    dist_ctx.barrier()
    dist_ctx.close()
    return export


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("batch_size", "steps", "num_timesteps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if not 0.0 <= args.ema_decay < 1.0:
        parser.error("--ema-decay must be in [0, 1)")
    if not 0.0 <= args.cond_drop_prob <= 1.0:
        parser.error("--cond-drop-prob must be in [0, 1]")
    try:
        train(args)
    except (CheckpointError, DataError, ValueError, FloatingPointError, OSError) as exc:
        print(f"ddpm_fast.train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
