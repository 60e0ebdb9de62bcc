"""python -m ddpm_fast.sample: draw images from a DDPM and write a PNG grid plus an .npz.

With no arguments it samples the embedded distilled student (digits-distilled, one model evaluation; a flag
that asks for another sampler or step count runs its teacher, digits). Output: OUT/grid.png and
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

from ddpm_fast import engine, ops
from ddpm_fast.cli import DefaultsHelpFormatter, add_run_args, command_exit, in_out_folder, run_main
from ddpm_fast.engine import CLASSIFIER_NOT_CAPTURED
from ddpm_fast.families import family_of
from ddpm_fast.images import save_grid, save_npz
from ddpm_fast.loading import DEFAULT_MODEL, EMBEDDED, load_classifier, load_model, model_path, student_record
from ddpm_fast.openai import REPOS
from ddpm_fast.plan import MAX_CACHE_INTERVAL, MAX_GUIDANCE_SCALE, MAX_INVARIANT_CHUNK
from ddpm_fast.samplers import INVARIANT_CHUNK, RunOptions, SamplerRequest, to_uint8
from ddpm_fast.schedule import SPACINGS, openai_timesteps
from ddpm_fast.solvers import SAMPLERS
from ddpm_fast.unet import compile_model

# A final sample this far outside [-1, 1] is a failure, like a non-finite one (unclipped solvers overshoot a
# little; orders of magnitude mean a broken model or setting).
MAX_SAMPLE_MAGNITUDE = 100.0
SHORT_RUN = 10  # model evaluations below which a blown-up run is first blamed on its step count
MAX_CLASS_COLUMNS = 32  # grid.png: one column per class up to this many classes
# The default sampler: the cheapest point of the measured quality-vs-time front whose quality matches the old
# default, DDIM with 100 steps (benchmarks/test_front_bench.py, RESULTS.md): UniPC-2, 5 steps on the embedded
# digits model; its own default (10) on other checkpoints, where published CIFAR-10 figures put UniPC at 10
# evaluations past DDIM at 100. Every other default comes from the sampler's class (samplers.SAMPLERS).
DEFAULT_SAMPLER = "unipc"
EMBEDDED_UNIPC_STEPS = 5
# With no --checkpoint: the embedded distilled student (one DDIM step, ddpm_fast.distill), whose samples match the
# teacher's UniPC-5 (benchmarks/RESULTS.md, "Distilled students"), unless the run asks for what only the teacher
# does (these flags: another sampler or step count, openai respacing, classifier guidance, feature caching); then
# the teacher, the embedded digits model.
DEFAULT_CHECKPOINT = "digits-distilled"
TEACHER_FLAGS = ("sampler", "steps", "timestep_respacing", "classifier", "cache_interval", "eta", "variance", "order",
                 "spacing")
# The flags only some samplers read, and the name each sampler class declares them by (Sampler.cli_options).
SAMPLER_FLAGS = {"eta": "--eta", "variance": "--variance", "timestep_respacing": "--timestep-respacing"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_fast.sample", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    steps = ", ".join(f"{c.default_steps} for {n}" for n, c in SAMPLERS.items() if c.default_steps)
    orders = "; ".join(f"{n} {min(c.orders)}-{max(c.orders)} (default {c.default_order})"
                       for n, c in SAMPLERS.items() if c.orders)
    spacings: dict[str, list[str]] = {}
    for n, c in SAMPLERS.items():
        spacings.setdefault(c.default_spacing, []).append(n)
    spacing = ", ".join(f"{s} for {'/'.join(names)}" for s, names in spacings.items())
    p.add_argument("--checkpoint", default=None,
                   help="a diffusers/ddpm_fast model folder, a pytorch_diffusion .ckpt, a ddpm_fast.train "
                        "checkpoint.pt, or an openai .pt with --openai-flags; digits and digits-distilled name the "
                        "embedded models (default: digits-distilled, its one-step student, unless a flag asks for a "
                        "sampler, steps, respacing, classifier guidance or caching: then digits)")
    p.add_argument("--openai-flags", default=None, metavar="FLAGS",
                   help="the checkpoint is an openai .pt: its MODEL_FLAGS and DIFFUSION_FLAGS, as the repository's "
                        "README prints them (omitted flags take that repository's defaults)")
    p.add_argument("--openai-repo", default="guided-diffusion", choices=list(REPOS),
                   help="which openai repository --openai-flags come from (their defaults differ)")
    p.add_argument("--timestep-respacing", default=None, metavar="SPEC",
                   help="openai's respacing string for ddim/ddpm: 'ddim25', '250' or '10,15,20' (instead of --steps)")
    p.add_argument("--sampler", default=None, choices=list(SAMPLERS),
                   help="; ".join(f"{n}: {c.cli_help}" if c.cli_help else n for n, c in SAMPLERS.items())
                   + f" (default: {DEFAULT_SAMPLER}; a distilled student: the sampler it was trained for)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"reverse steps (default: {steps}, every timestep for ddpm; unipc on the embedded model: "
                        f"{EMBEDDED_UNIPC_STEPS}; a distilled student: the steps it was trained for, and only those)")
    p.add_argument("--allow-few-steps", action="store_true",
                   help="run --steps below the sampler's useful minimum (" + ", ".join(
                       f"{n} {c.min_steps}" for n, c in SAMPLERS.items() if c.min_steps > 1) + ")")
    p.add_argument("--order", type=int, default=None,
                   choices=sorted({o for c in SAMPLERS.values() for o in c.orders}),
                   help=f"solver order: {orders}")
    p.add_argument("--eta", type=float, default=None,
                   help="DDIM eta in [0, 1] (default 0: deterministic; 1: DDPM-like); ddim only")
    p.add_argument("--spacing", default=None, choices=list(SPACINGS),
                   help=f"timestep spacing (default: {spacing}, as diffusers)")
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
    p.add_argument("--classifier", default=None, metavar="PATH",
                   help="classifier guidance: guided-diffusion's classifier .pt (with --classifier-flags), or a "
                        "model folder holding one; it steers each image towards its class")
    p.add_argument("--classifier-flags", default=None, metavar="FLAGS",
                   help="the classifier's CLASSIFIER_FLAGS as guided-diffusion's README prints them (each omitted "
                        "flag at guided-diffusion's default; --image_size at the model's)")
    p.add_argument("--classifier-scale", type=float, default=None,
                   help="the guidance gradient's scale (guided-diffusion's --classifier_scale; default 1.0)")
    p.add_argument("--engine", default="eager", choices=["eager", "graph"],
                   help="graph: capture each step in a CUDA graph and loop in C++ (GPU)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="byte-identical images whatever --batch-size, the torchrun process count and --engine: the "
                        "U-Net always runs on --invariant-chunk images (padded), on one core per process on a CPU")
    p.add_argument("--cache-interval", type=int, default=None, metavar="N",
                   help="feature caching (DeepCache): the whole U-Net every N steps, only its shallow branch "
                        "(first level down, last level up) in between, on the deep features of the last whole step; "
                        "N must be below the run's step count (1: every step whole, no caching)")
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
    add_run_args(p, out="samples")
    return p


def _labels(args, num_classes, classifier=None):
    """The run's labels: the model's classes, or with a classifier its classes (the model's too when it is
    class-conditional: both must know them)."""
    if classifier is not None:
        k = classifier.config.num_classes
        if num_classes and num_classes > k:
            raise ValueError(f"the model has {num_classes} classes, the classifier {k}: its labels cannot steer "
                             "every class")
        top = min(k, num_classes or k)
        if args.class_label is not None:
            if not 0 <= args.class_label < top:
                raise ValueError(f"--class-label must be in [0, {top - 1}] for this classifier")
            return torch.full((args.num_samples,), args.class_label, dtype=torch.int64)
        return torch.arange(args.num_samples, dtype=torch.int64) % top
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
    model, schedule = load_model(args.checkpoint, openai_flags=args.openai_flags, openai_repo=args.openai_repo,
                                 device=dist_ctx.device, prog="ddpm_fast.sample")
    if dist_ctx.rank == 0:
        _check_targets(args, model.config)
    sampler = _build_sampler(args, schedule, model.config)  # before the fast copy: a bad setting fails now
    classifier = None
    if args.classifier is not None:
        classifier = load_classifier(args.classifier, args.classifier_flags, image_size=model.config.sample_size,
                                     device=dist_ctx.device, prog="ddpm_fast.sample")
        _check_classifier_fits(classifier, model.config, args.classifier)
    model, ran = _prepare_model(args, model, dist_ctx.device, notes)
    if classifier is not None and getattr(model, "compute_dtype", None) is not None:
        classifier = classifier.to_fast(model.compute_dtype, copy=False)  # the fast path guides on the fast path
        ran += ", classifier too"
    labels = _labels(args, model.config.num_classes, classifier)
    mine = torch.arange(args.num_samples)[dist_ctx.rank::dist_ctx.world]  # this rank's share of the images
    start = time.perf_counter()
    images = _sample_images(args, model, sampler, mine, labels, show_progress=dist_ctx.rank == 0,
                            classifier=classifier)
    elapsed = time.perf_counter() - start
    images = _gather(dist_ctx, mine, images)
    dist_ctx.close()
    if dist_ctx.rank != 0:
        return None
    classes = classifier.config.num_classes if classifier is not None else model.config.num_classes
    npz, grid_path = _write(args, images, labels, model.config.num_classes or classes)
    for note in notes:
        print(note, file=sys.stderr)
    n = images.shape[0]
    kind = f"{args.sampler} ({sampler.variance})" if args.sampler == "ddpm" else args.sampler
    embedded = args.checkpoint in EMBEDDED and not os.path.exists(args.checkpoint)
    source = f"{args.checkpoint} (embedded), " if embedded else ""
    print(f"{n} images, {source}{kind} {sampler.num_steps} steps, {ran} on {dist_ctx.device} ({args.engine}), "
          f"{n * sampler.num_steps / max(elapsed, 1e-9):.0f} img-steps/s -> {grid_path}, {npz}")
    return npz


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


def _student_defaults(args, parser) -> dict | None:
    """A distilled student (its scheduler config's record, loading.student_record) samples with the sampler,
    spacing and steps it was trained for unless told otherwise; with its own sampler, --steps must be one it was
    trained for. Returns the record when the run is the student's own sampler (None otherwise); settles
    args.sampler (DEFAULT_SAMPLER for any other model)."""
    student = student_record(args.checkpoint)
    if student is None or args.sampler not in (None, student["sampler"]):
        args.sampler = args.sampler or DEFAULT_SAMPLER
        return None
    args.sampler = student["sampler"]
    supported = student["steps"]
    if args.steps is None:
        args.steps = supported[0]
    elif args.steps not in supported:
        said = ", ".join(str(n) for n in supported)
        parser.error(f"--steps {args.steps}: this student ({student.get('method', 'distilled')}) was trained for "
                     f"{said} step(s) of {args.sampler} and samples only those; pass --sampler to run another "
                     "sampler on it")
    if args.spacing is None:
        args.spacing = student["spacing"]
    return student


def _build_sampler(args, schedule, config):
    kept = None
    if args.timestep_respacing is not None:
        kept = openai_timesteps(schedule.num_timesteps, args.timestep_respacing)
    cls = SAMPLERS[args.sampler]
    steps = args.steps
    if steps is None and args.sampler == "unipc" and model_path(args.checkpoint) == DEFAULT_MODEL:
        steps = min(EMBEDDED_UNIPC_STEPS, schedule.num_timesteps)
    family = family_of(config)
    request = SamplerRequest(steps=cls.resolve_steps(steps, schedule.num_timesteps), spacing=args.spacing,
                             order=args.order, eta=args.eta, variance=args.variance, timesteps=kept,
                             openai=family.openai_sampling, learn_sigma=config.learn_sigma,
                             model_variance=family.sampled_variance(config) or "fixed_small")
    return cls.from_request(schedule, request)


def _check_classifier_fits(classifier, config, path) -> None:
    """A classifier guides a model of its own image size and channels: one line otherwise."""
    c = classifier.config
    if (c.image_size, c.in_channels) != (config.sample_size, config.in_channels):
        raise ValueError(f"--classifier {path}: takes {c.image_size}x{c.image_size} images with {c.in_channels} "
                         f"channels; the model samples {config.sample_size}x{config.sample_size} with "
                         f"{config.in_channels}")


def _sample_images(args, model, sampler, mine, labels, show_progress: bool, classifier=None) -> torch.Tensor:
    """uint8 NHWC images of this rank's share ``mine`` (global indices), in --batch-size chunks."""
    from tqdm.auto import tqdm

    cfg = model.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    scale = 1.0 if args.classifier_scale is None else args.classifier_scale
    base = RunOptions(seed=args.seed, guidance_scale=args.guidance_scale, batch_invariant=args.batch_invariant,
                      invariant_chunk=args.invariant_chunk or INVARIANT_CHUNK, cache_interval=args.cache_interval,
                      classifier=classifier, classifier_scale=scale)
    images = []
    bar = tqdm(total=len(mine) * sampler.num_steps, unit="img-step", unit_scale=True, desc="sample",
               disable=args.no_progress or not show_progress, dynamic_ncols=True)
    for chunk in mine.split(args.batch_size) if len(mine) else ():  # a rank beyond the images has none to draw
        # Image k is a function of (--seed, k) alone: batch size and process count do not change it.
        run = RunOptions.of(base, image_index=chunk, class_labels=None if labels is None else labels[chunk])
        if args.engine == "graph":
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
                             f"data range is [-1, 1]) in image {k} and {int(bad.sum())} of this batch; likely causes, "
                             f"most likely first: {'; '.join(_divergence_causes(args, sampler))}; nothing was written")
        images.append(to_uint8(x).cpu())
        bar.update(len(chunk) * sampler.num_steps)
    bar.close()
    return torch.cat(images) if images else torch.empty((0, *shape[1:], shape[0]), dtype=torch.uint8)


def _divergence_causes(args, sampler) -> list[str]:
    """Why a run blew up, most likely first: a short run of a solver that does not clip its data prediction
    overshoots (Heun at 2-3 steps does on the embedded model) before a model or a guidance weight is at fault."""
    causes = []
    if sampler.num_steps < SHORT_RUN:
        clipped = "" if sampler.clip_denoised else ", which does not clip its x0"
        causes.append(f"too few steps for {args.sampler}{clipped} ({sampler.num_steps} model evaluations): take "
                      "more --steps, or --sampler ddim")
    if args.guidance_scale is not None:
        causes.append(f"--guidance-scale {args.guidance_scale:g}")
    if args.classifier is not None:
        causes.append(f"--classifier-scale {1.0 if args.classifier_scale is None else args.classifier_scale:g}")
    causes.append("the checkpoint's weights")
    return causes


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
    # One column per class while the classes cycle along rows a reader can follow (digits, CIFAR-10); an
    # ImageNet model's 1000 classes would make a grid 1000 images wide: about square then.
    nrow = num_classes if num_classes and num_classes <= MAX_CLASS_COLUMNS and args.class_label is None else None
    save_grid(images[: min(n, 400)], grid_path, nrow=nrow, scale=max(1, 128 // max(h, 1)))
    save_npz(images, npz, labels)
    return npz, grid_path


def _cpu_fast_dtype(args, notes: list[str]) -> torch.dtype:
    """The fast path's dtype on a CPU. CPUs have no fast fp16 arithmetic; bf16 is their half type. --fp16 (asking
    for speed) runs bf16 where this CPU computes it faster than the fp32 fast path (ops.cpu_bf16_is_faster), else
    fp32; --bf16 (asking for bf16) gets it, with a note where it is the slower choice."""
    if ops.cpu_bf16_is_faster():
        if args.fp16:
            notes.append("--fp16 on a CPU runs bf16 (the CPU's half type)")
        return torch.bfloat16
    native = ops.cpu_has_native_bf16()
    if args.fp16:
        why = ("bf16 convolutions run slower than the fp32 fast path on this CPU (AVX512-BF16 without AMX, on a core "
               "whose bf16 dot product runs at half its fp32 rate)" if native
               else "this CPU has no native half-precision arithmetic (no AVX512-BF16/AMX)")
        notes.append(f"--fp16: {why}; ran the fast path in fp32 (channels_last, folded blocks, the extension's "
                     "kernels)")
        return torch.float32
    notes.append("--bf16: this CPU runs bf16 slower than fp32 (" + ("no AMX, and its bf16 dot product runs at half "
                 "the fp32 rate" if native else "no native bf16 arithmetic (no AVX512-BF16/AMX)")
                 + "; --fp16 picks the fastest form)")
    return torch.bfloat16


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1:
        parser.error("--num-samples and --batch-size must be positive")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be positive")
    if args.openai_flags is not None and args.checkpoint is None:
        parser.error("--openai-flags describes an openai .pt: give it with --checkpoint")
    if args.checkpoint is None:
        args.checkpoint = "digits" if any(getattr(args, f) is not None for f in TEACHER_FLAGS) else DEFAULT_CHECKPOINT
    student = _student_defaults(args, parser)
    cls = SAMPLERS[args.sampler]
    if args.steps is not None and args.steps < cls.min_steps and not args.allow_few_steps and student is None:
        parser.error(f"--steps {args.steps}: below --sampler {args.sampler}'s useful minimum of {cls.min_steps} "
                     "steps (fewer land far from the sample: benchmarks/RESULTS.md, 'Few steps'); take more, or "
                     "pass --allow-few-steps to run it anyway")
    for option, flag in SAMPLER_FLAGS.items():
        takers = " / ".join(n for n, c in SAMPLERS.items() if option in c.cli_options)
        if option != "timestep_respacing" and getattr(args, option) is not None and option not in cls.cli_options:
            parser.error(f"{flag} applies to --sampler {takers} only (--sampler {args.sampler} ignores it)")
    if args.timestep_respacing is not None and ("timestep_respacing" not in cls.cli_options or args.steps is not None
                                                or args.spacing is not None):
        takers = " / ".join(n for n, c in SAMPLERS.items() if "timestep_respacing" in c.cli_options)
        parser.error(f"--timestep-respacing picks the steps of --sampler {takers}; it replaces --steps and --spacing")
    if args.order is not None and not cls.orders:
        takers = " / ".join(n for n, c in SAMPLERS.items() if c.orders)
        parser.error(f"--order applies to --sampler {takers} only (--sampler {args.sampler} has none)")
    if args.order is not None and args.order not in cls.orders:
        parser.error(f"--order of --sampler {args.sampler} is {min(cls.orders)} to {max(cls.orders)}, got {args.order}")
    if args.eta is not None and not 0 <= args.eta <= 1:
        parser.error("--eta must lie in [0, 1]")
    if args.guidance_scale is not None and not abs(args.guidance_scale) <= MAX_GUIDANCE_SCALE:
        parser.error(f"--guidance-scale must be finite, within +-{MAX_GUIDANCE_SCALE:g}")
    if args.classifier is None and (args.classifier_scale is not None or args.classifier_flags is not None):
        flag = "--classifier-scale" if args.classifier_scale is not None else "--classifier-flags"
        parser.error(f"{flag} needs --classifier PATH (the classifier to guide with)")
    if args.classifier is not None:
        if args.classifier_scale is not None and not abs(args.classifier_scale) <= MAX_GUIDANCE_SCALE:
            parser.error(f"--classifier-scale must be finite, within +-{MAX_GUIDANCE_SCALE:g}")
        if args.engine == "graph":
            parser.error(f"--engine graph with --classifier: {CLASSIFIER_NOT_CAPTURED}")
        if args.batch_invariant or args.cache_interval is not None:
            parser.error("--classifier cannot be combined with --batch-invariant or --cache-interval yet")
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
    command_exit(main())
