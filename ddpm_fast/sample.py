"""python -m ddpm_fast.sample: draw images from a DDPM and write a PNG grid plus an .npz.

With no arguments it samples the embedded default model (digits). Output: OUT/grid.png and
OUT/samples_NxHxWxC.npz (uint8 NHWC in arr_0, labels in arr_1 for conditional models), the format
FID tools read. Same seed, same draws: image k's randomness depends only on (--seed, k), whatever
--batch-size, the number of processes or --engine; with --batch-invariant its bits do too.
Multi-GPU: torchrun --nproc_per_node=K -m ddpm_fast.sample ... shards the images over ranks; rank 0
gathers and writes one .npz. openai's guided-diffusion / improved-diffusion .pt files load with
--openai-flags (the MODEL_FLAGS and DIFFUSION_FLAGS their READMEs print) and sample as openai does:
learned variance for learned-sigma models, DDIM with eps recomputed from the clipped x_0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

from ddpm_fast import ops
from ddpm_fast.adm import ADMConfig
from ddpm_fast.checkpoint import CheckpointError, load_pretrained, load_schedule, resolve_model_path
from ddpm_fast.cli import in_out_folder, run_main
from ddpm_fast.images import save_grid, save_npz
from ddpm_fast.openai import REPOS, load_openai, openai_timesteps
from ddpm_fast.plan import MAX_CACHE_INTERVAL, MAX_GUIDANCE_SCALE, MAX_INVARIANT_CHUNK
from ddpm_fast.samplers import INVARIANT_CHUNK, DDIMSampler, DDPMSampler, DPMSolverSampler, RunOptions, to_uint8
from ddpm_fast.schedule import NoiseSchedule
from ddpm_fast.solvers import DEISSampler, HeunSampler, IPNDMSampler, PLMSSampler, UniPCSampler
from ddpm_fast.unet import compile_model

# A final sample this far outside [-1, 1] is a failure, like a non-finite one (unclipped solvers overshoot a
# little; orders of magnitude mean a broken model or setting).
MAX_SAMPLE_MAGNITUDE = 100.0
# Default steps per sampler (ddpm: every timestep of the schedule), and the default sampler: the cheapest point
# of the measured quality-vs-time front whose quality matches the old default, DDIM with 100 steps
# (benchmarks/test_front_bench.py, RESULTS.md): UniPC-2, 5 steps on the embedded digits model; 10 on other
# checkpoints, where published CIFAR-10 figures put UniPC at 10 evaluations past DDIM at 100.
DEFAULT_STEPS = {"ddpm": None, "ddim": 100, "dpm++": 20, "dpm++sde": 20, "unipc": 10, "deis": 10, "plms": 20,
                 "heun": 10, "ipndm": 10}
DEFAULT_SAMPLER = "unipc"
EMBEDDED_UNIPC_STEPS = 5
COMPILED = {"unipc": UniPCSampler, "deis": DEISSampler, "plms": PLMSSampler, "heun": HeunSampler,
            "ipndm": IPNDMSampler}
ORDERS = {"dpm++": 3, "dpm++sde": 3, "unipc": 3, "deis": 3, "ipndm": 4}  # the highest --order of each
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "digits")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_fast.sample", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="a diffusers/ddpm_fast model folder, a pytorch_diffusion .ckpt, a ddpm_fast.train "
                        "checkpoint.pt, or an openai .pt with --openai-flags (default: the embedded digits model)")
    p.add_argument("--openai-flags", default=None, metavar="FLAGS",
                   help="the checkpoint is an openai .pt: its MODEL_FLAGS and DIFFUSION_FLAGS, as the repository's "
                        "README prints them (omitted flags take that repository's defaults)")
    p.add_argument("--openai-repo", default="guided-diffusion", choices=list(REPOS),
                   help="which openai repository --openai-flags come from (their defaults differ)")
    p.add_argument("--timestep-respacing", default=None, metavar="SPEC",
                   help="openai's respacing string for ddim/ddpm: 'ddim25', '250' or '10,15,20' (instead of --steps)")
    p.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=list(DEFAULT_STEPS),
                   help="ddpm: ancestral; ddim; dpm++: multistep DPM-Solver++ (ODE), dpm++sde: its SDE variant; "
                        "unipc: UniPC (bh2); deis: DEIS log-rho; plms: PNDM's PLMS (steps + 1 model calls); heun: "
                        "Heun (2 steps - 1 model calls); ipndm: variable-step iPNDM")
    p.add_argument("--steps", type=int, default=None,
                   help="reverse steps (default: " + ", ".join(f"{v} for {k}" for k, v in DEFAULT_STEPS.items() if v)
                        + f", every timestep for ddpm; unipc on the embedded model: {EMBEDDED_UNIPC_STEPS})")
    p.add_argument("--order", type=int, default=None, choices=[1, 2, 3, 4],
                   help="solver order: dpm++ / dpm++sde / unipc / deis 1-3 (default 2), ipndm 1-4 (default 4)")
    p.add_argument("--eta", type=float, default=None,
                   help="DDIM eta in [0, 1] (default 0: deterministic; 1: DDPM-like); ddim only")
    p.add_argument("--spacing", default=None, choices=["leading", "trailing", "linspace"],
                   help="timestep spacing (default: leading for ddim/ddpm/plms, linspace for the others, as "
                        "diffusers)")
    p.add_argument("--variance", default=None, choices=["fixed_small", "fixed_large", "learned_range"],
                   help="DDPM sigma^2: posterior variance (fixed_small), beta (fixed_large) or the model's own "
                        "(learned_range); default: learned_range for a learned-sigma model, else what the "
                        "checkpoint declares (openai: fixed_large unless sigma_small; others fixed_small); ddpm only")
    p.add_argument("--num-samples", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class-label", type=int, default=None,
                   help="conditional models: this class for every image (default: cycle through the classes)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance weight w: eps = eps_u + w (eps_c - eps_u) (conditional models)")
    p.add_argument("--engine", default="eager", choices=["eager", "graph"],
                   help="graph: capture each step in a CUDA graph and loop in C++ (GPU)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="byte-identical images whatever --batch-size, the torchrun process count and --engine: the "
                        "U-Net always runs on --invariant-chunk images (padded), on one core per process on a CPU")
    p.add_argument("--cache-interval", type=int, default=None, metavar="N",
                   help="feature caching (DeepCache): the whole U-Net every N steps, only its shallow branch "
                        "(first level down, last level up) in between, on the deep features of the last whole step")
    p.add_argument("--invariant-chunk", type=int, default=None,
                   help=f"images per U-Net call with --batch-invariant (default {INVARIANT_CHUNK}); the bits "
                        "depend on it, so compare runs made with the same value")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true",
                           help="fast path: fp16 channels_last, fused kernels on a GPU; on a CPU bf16 where the CPU "
                                "computes it natively, else fp32 channels_last (the CPU's fastest form)")
    precision.add_argument("--bf16", action="store_true", help="fast path in bf16 (GPU or CPU)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the U-Net (Inductor; the fused ops are registered torch ops it keeps): "
                        "a one-time compile of tens of seconds, then faster steps")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--no-progress", action="store_true")
    return p


def _labels(args, num_classes):
    if not num_classes:
        if args.class_label is not None or args.guidance_scale is not None:
            flag = "--class-label" if args.class_label is not None else "--guidance-scale"
            raise ValueError(f"{flag} needs a class-conditional model; this checkpoint is unconditional")
        return None
    if args.class_label is not None:
        if not 0 <= args.class_label < num_classes:
            raise ValueError(f"--class-label must be in [0, {num_classes - 1}] for this model")
        return torch.full((args.num_samples,), args.class_label, dtype=torch.int64)
    return torch.arange(args.num_samples, dtype=torch.int64) % num_classes


def run(args) -> str | None:
    """Load, prepare, sample, write; returns the .npz path on rank 0 (None on the others)."""
    return in_out_folder(args, _run)


def _run(args, dist_ctx) -> str | None:
    notes: list[str] = []
    model, schedule = _load(args, dist_ctx.device)
    if dist_ctx.rank == 0:
        _check_targets(args, model.config)
    sampler = _build_sampler(args, schedule, model.config)  # before the fast copy: a bad setting fails now
    model, ran = _prepare_model(args, model, dist_ctx.device, notes)
    labels = _labels(args, model.config.num_classes)
    mine = torch.arange(args.num_samples)[dist_ctx.rank::dist_ctx.world]  # this rank's share of the images
    start = time.perf_counter()
    images = _sample_images(args, model, sampler, mine, labels, show_progress=dist_ctx.rank == 0)
    elapsed = time.perf_counter() - start
    images = _gather(dist_ctx, mine, images)
    dist_ctx.close()
    if dist_ctx.rank != 0:
        return None
    npz, grid_path = _write(args, images, labels, model.config.num_classes)
    for note in notes:
        print(note, file=sys.stderr)
    n = images.shape[0]
    kind = f"{args.sampler} ({sampler.variance})" if args.sampler == "ddpm" else args.sampler
    print(f"{n} images, {kind} {sampler.num_steps} steps, {ran} on {dist_ctx.device} ({args.engine}), "
          f"{n * sampler.num_steps / max(elapsed, 1e-9):.0f} img-steps/s -> {grid_path}, {npz}")
    return npz


def _load(args, device):
    path = args.checkpoint or DEFAULT_MODEL
    if not os.path.exists(path):
        what = "the embedded model is missing from this install" if args.checkpoint is None else "no such file"
        raise CheckpointError(f"{path}: {what}")
    if args.openai_flags is not None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            model, schedule = load_openai(path, args.openai_flags, args.openai_repo, device=device)
        for w in caught:
            print(f"ddpm_fast.sample: note: {w.message}", file=sys.stderr)
    else:
        used = resolve_model_path(path)
        if os.path.isdir(path) and os.path.normpath(used) != os.path.normpath(path):
            print(f"ddpm_fast.sample: {path} is a training run: sampling {used} (its newest state)", file=sys.stderr)
        model, schedule = load_pretrained(used, device=device), None
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # up front: sampling would only turn these into NaN images
        raise CheckpointError(f"{path}: non-finite weights in {', '.join(bad[:4])}"
                              + (f" and {len(bad) - 4} more tensors" if len(bad) > 4 else ""))
    return model, schedule or load_schedule(path) or NoiseSchedule.linear(1000)


def _prepare_model(args, model, device, notes: list[str]):
    """The model the run samples (fast path, compiled) and a description of it; settles --engine."""
    dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else None
    if args.engine == "graph" and device.type == "cuda" and dtype is None:
        dtype = torch.float16
        notes.append("--engine graph runs the fast path: using fp16 (pass --bf16 for bf16)")
    if dtype is not None and device.type == "cpu":
        dtype = _cpu_fast_dtype(args, notes)
    if dtype is not None:
        model = model.to_fast(dtype, copy=False)  # the reference is not needed again: no second copy
    ran = "fast path " + str(dtype).replace("torch.", "") if dtype is not None else "fp32"
    if args.compile:
        model = compile_model(model)
        ran += ", compiled"
    if args.engine == "graph":
        from ddpm_fast import engine

        why = engine.unavailable_reason(device)
        if why:
            notes.append(f"--engine graph: {why}; ran the eager loop instead")
            args.engine = "eager"
        elif device.type != "cuda":
            notes.append("--engine graph: no CUDA device; ran the C++ loop without CUDA graphs")
    if args.batch_invariant:
        ran += f", batch-invariant (chunks of {args.invariant_chunk or INVARIANT_CHUNK})"
    if args.cache_interval:
        ran += f", deep features cached (whole U-Net every {args.cache_interval} steps)"
    return model, ran


def _build_sampler(args, schedule, config):
    openai = isinstance(config, ADMConfig)
    kept = None
    if args.timestep_respacing is not None:
        kept = openai_timesteps(schedule.num_timesteps, args.timestep_respacing)
    if args.sampler == "ddim":
        # openai's DDIM recomputes eps from the clipped x_0; their checkpoints are sampled that way.
        steps = None if kept is not None else args.steps or min(100, schedule.num_timesteps)
        return DDIMSampler(schedule, steps, eta=args.eta or 0.0, spacing=args.spacing or "leading",
                           use_clipped_model_output=openai, timesteps=kept)
    embedded = args.sampler == "unipc" and args.checkpoint is None
    default = EMBEDDED_UNIPC_STEPS if embedded else DEFAULT_STEPS[args.sampler]
    steps = args.steps or min(default or 1, schedule.num_timesteps)
    if args.sampler in ("dpm++", "dpm++sde"):
        return DPMSolverSampler(schedule, steps, order=args.order or 2,
                                algorithm="sde-dpmsolver++" if args.sampler == "dpm++sde" else "dpmsolver++",
                                spacing=args.spacing or "linspace")
    if args.sampler in COMPILED:
        kw = {} if args.order is None else {"order": args.order}
        return COMPILED[args.sampler](schedule, steps, spacing=args.spacing or (
            "leading" if args.sampler == "plms" else "linspace"), **kw)
    if kept is not None:
        schedule = schedule.respace(kept)
    elif args.steps and args.steps != schedule.num_timesteps:
        schedule = schedule.respace(schedule.space_timesteps(args.steps, args.spacing or "leading"))
    variance = args.variance
    if variance is None and config.learn_sigma:
        variance = "learned_range"
    elif variance is None:
        variance = "fixed_large" if openai and not config.sigma_small else "fixed_small"
    if variance == "learned_range" and not config.learn_sigma:
        raise ValueError("--variance learned_range needs a learned-sigma model (this one outputs eps only)")
    return DDPMSampler(schedule, variance=variance)


def _sample_images(args, model, sampler, mine, labels, show_progress: bool) -> torch.Tensor:
    """uint8 NHWC images of this rank's share ``mine`` (global indices), in --batch-size chunks."""
    from tqdm.auto import tqdm

    cfg = model.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    base = RunOptions(seed=args.seed, guidance_scale=args.guidance_scale, batch_invariant=args.batch_invariant,
                      invariant_chunk=args.invariant_chunk or INVARIANT_CHUNK, cache_interval=args.cache_interval)
    images = []
    bar = tqdm(total=len(mine) * sampler.num_steps, unit="img-step", unit_scale=True, desc="sample",
               disable=args.no_progress or not show_progress, dynamic_ncols=True)
    for chunk in mine.split(args.batch_size) if len(mine) else ():  # a rank beyond the images has none to draw
        # Image k is a function of (--seed, k) alone: batch size and process count do not change it.
        run = RunOptions.of(base, image_index=chunk, class_labels=None if labels is None else labels[chunk])
        if args.engine == "graph":
            from ddpm_fast import engine

            with warnings.catch_warnings():  # the CLI prints its own one-line notes
                warnings.simplefilter("ignore", RuntimeWarning)
                x = engine.sample(sampler, model, (len(chunk), *shape), run)
        else:
            x = sampler.sample(model, (len(chunk), *shape), run, progress=False)
        # Never write NaN as black pixels, nor values orders of magnitude outside the data range as saturated
        # ones: either means a broken model or setting, and nothing is written for this run.
        bad = ~(x.abs() <= MAX_SAMPLE_MAGNITUDE).flatten(1).all(1)  # NaN fails the comparison too
        if bool(bad.any()):
            k = int(chunk[bad.nonzero()[0, 0]])
            raise ValueError(f"sampling produced non-finite values or values beyond +-{MAX_SAMPLE_MAGNITUDE:g} (the "
                             f"data range is [-1, 1]) in image {k} and {int(bad.sum())} of this batch; check the "
                             "checkpoint's weights and --guidance-scale; nothing was written")
        images.append(to_uint8(x).cpu())
        bar.update(len(chunk) * sampler.num_steps)
    bar.close()
    return torch.cat(images) if images else torch.empty((0, *shape[1:], shape[0]), dtype=torch.uint8)


def _gather(dist_ctx, mine, images) -> torch.Tensor:
    """On rank 0, every rank's images in global order (torchrun); elsewhere this rank's."""
    if dist_ctx.world == 1:
        return images
    import torch.distributed as dist

    gathered = [None] * dist_ctx.world if dist_ctx.rank == 0 else None
    dist.gather_object((mine, images), gathered, dst=0)
    if dist_ctx.rank != 0:
        return images
    order = torch.cat([g[0] for g in gathered])
    return torch.cat([g[1] for g in gathered])[torch.argsort(order)]


def _targets(args, n: int, h: int, w: int, c: int) -> tuple[str, str]:
    return os.path.join(args.out, f"samples_{n}x{h}x{w}x{c}.npz"), os.path.join(args.out, "grid.png")


def _check_targets(args, config) -> None:
    """Before any work: the files the run will write must be writable files (not folders)."""
    size = config.sample_size
    for path in _targets(args, args.num_samples, size, size, config.in_channels):
        if os.path.exists(path) and not os.path.isfile(path):
            raise OSError(f"{path}: exists and is not a file; the run writes it (move it away or pick another --out)")


def _write(args, images, labels, num_classes):
    """grid.png, then the .npz (the result FID tools read) last: each atomic, and no .npz unless the grid
    was written too, so a failed run never leaves a result that looks complete."""
    n, h, w, c = images.shape
    npz, grid_path = _targets(args, n, h, w, c)
    nrow = num_classes if num_classes and args.class_label is None else None
    save_grid(images[: min(n, 400)], grid_path, nrow=nrow, scale=max(1, 128 // max(h, 1)))
    save_npz(images, npz, labels)
    return npz, grid_path


def _cpu_fast_dtype(args, notes: list[str]) -> torch.dtype:
    """The fast path's dtype on a CPU. CPUs have no fast fp16 arithmetic; bf16 is their half type where they
    compute it natively (AVX512-BF16, AMX). Without it bf16 convolutions run generic code far slower than
    fp32, so --fp16 (asking for speed) runs the fast path in fp32 there; --bf16 (asking for bf16) gets it."""
    if ops.cpu_has_native_bf16():
        if args.fp16:
            notes.append("--fp16 on a CPU runs bf16 (the CPU's half type)")
        return torch.bfloat16
    if args.fp16:
        notes.append("--fp16: this CPU has no native half-precision arithmetic (no AVX512-BF16/AMX); ran the fast "
                     "path in fp32 (channels_last, folded blocks, the extension's kernels)")
        return torch.float32
    notes.append("--bf16: this CPU has no native bf16 arithmetic (no AVX512-BF16/AMX); bf16 runs far slower than "
                 "fp32 here (--fp16 picks the fastest form)")
    return torch.bfloat16


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1:
        parser.error("--num-samples and --batch-size must be positive")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be positive")
    if args.eta is not None and args.sampler != "ddim":
        parser.error(f"--eta applies to --sampler ddim only (--sampler {args.sampler} ignores it)")
    if args.variance is not None and args.sampler != "ddpm":
        parser.error(f"--variance applies to --sampler ddpm only (--sampler {args.sampler} ignores it)")
    if args.timestep_respacing is not None and (args.sampler not in ("ddim", "ddpm") or args.steps is not None
                                                or args.spacing is not None):
        parser.error("--timestep-respacing picks the steps of --sampler ddim / ddpm; it replaces --steps and "
                     "--spacing")
    if args.openai_flags is not None and args.checkpoint is None:
        parser.error("--openai-flags describes an openai .pt: give it with --checkpoint")
    if args.order is not None and args.sampler not in ORDERS:
        parser.error(f"--order applies to --sampler {' / '.join(ORDERS)} only (--sampler {args.sampler} has none)")
    if args.order is not None and args.order > ORDERS[args.sampler]:
        parser.error(f"--order of --sampler {args.sampler} is 1 to {ORDERS[args.sampler]}, got {args.order}")
    if args.eta is not None and not 0 <= args.eta <= 1:
        parser.error("--eta must lie in [0, 1]")
    if args.guidance_scale is not None and not abs(args.guidance_scale) <= MAX_GUIDANCE_SCALE:
        parser.error(f"--guidance-scale must be finite, within +-{MAX_GUIDANCE_SCALE:g}")
    if args.invariant_chunk is not None and not args.batch_invariant:
        parser.error("--invariant-chunk applies with --batch-invariant only")
    if args.cache_interval is not None and not 1 <= args.cache_interval <= MAX_CACHE_INTERVAL:
        parser.error(f"--cache-interval must be in [1, {MAX_CACHE_INTERVAL}], got {args.cache_interval}")
    if args.cache_interval is not None and args.batch_invariant:
        parser.error("--cache-interval cannot be combined with --batch-invariant yet")
    if args.invariant_chunk is not None and not 1 <= args.invariant_chunk <= MAX_INVARIANT_CHUNK:
        parser.error(f"--invariant-chunk must be in [1, {MAX_INVARIANT_CHUNK}] (the U-Net always runs on that many "
                     f"images, padded), got {args.invariant_chunk}")
    return run_main("ddpm_fast.sample", parser, args, run)


if __name__ == "__main__":
    sys.exit(main())
