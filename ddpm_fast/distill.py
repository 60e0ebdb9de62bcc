"""python -m ddpm_fast.distill: a student that samples in a few steps what its teacher samples in many.

Progressive distillation (Salimans & Ho 2022; ddpm_fast.distillation): each round halves the student's DDIM
steps, from --teacher-steps down to --student-steps, on the Trainer (EMA, AMP, exact resume also after Ctrl-C or
SIGTERM, torchrun, metrics). OUT/round<k>_<N>steps/model is round k's student, an ordinary model folder that
``python -m ddpm_fast.sample --checkpoint`` runs with the sampler and steps it was trained for.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from ddpm_fast.base import keep_freed_memory
from ddpm_fast.checkpoint import CheckpointError
from ddpm_fast.cli import DefaultsHelpFormatter, command_exit
from ddpm_fast.data import DataError
from ddpm_fast.distillation import METHODS, SHARED, distill, round_schedule
from ddpm_fast.distributed import parse_device
from ddpm_fast.ops import environment_problem
from ddpm_fast.trainer import TrainConfig, TrainingInterrupted

OWN_DEFAULTS = {"lr": 1e-4, "warmup": 0, "ema_decay": 0.99, "out": "runs/distill", "save_every": 500,
                "batch_size": 64}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_fast.distill", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--teacher", default=None, help="what sample --checkpoint takes: a model folder, a train run, "
                   "a diffusers folder, a pytorch_diffusion .ckpt, an openai .pt with --openai-flags "
                   "(default: the embedded digits model)")
    p.add_argument("--openai-flags", default=None, help="the teacher's openai flags (with an openai .pt)")
    p.add_argument("--method", default="progressive", choices=METHODS, help="distillation method")
    p.add_argument("--teacher-steps", type=int, default=64, help="DDIM steps of the first round's teacher")
    p.add_argument("--student-steps", type=int, default=1, help="steps of the last round's student")
    p.add_argument("--round-steps", type=int, default=2000, help="optimizer steps per round")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in SHARED:
        f = fields[name]
        kw = dict(f.metadata["argparse"])
        if f.type in ("bool", bool):
            kw["action"] = "store_true"
        else:
            kw.setdefault("type", {"int": int, "float": float}.get(str(f.type), str))
            if not kw.get("required"):
                kw["default"] = OWN_DEFAULTS.get(name, f.default)
        if name == "resume":  # the run in --out, round by round: no path to name
            p.add_argument("--resume", action="store_const", const="auto", default=None,
                           help="continue the distillation in --out (the same teacher, method and rounds): finished "
                                "rounds are kept, the current one resumes from its checkpoint")
            continue
        p.add_argument(TrainConfig.flag(name), help=f.metadata["help"], **kw)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rounds = round_schedule(args.teacher_steps, args.student_steps)
    except ValueError as exc:
        parser.error(str(exc))
    if args.round_steps < 1:
        parser.error(f"--round-steps must be positive, got {args.round_steps}")
    if args.openai_flags is not None and args.teacher is None:
        parser.error("--openai-flags describes an openai .pt: give it with --teacher")
    cfg = TrainConfig(**{name: getattr(args, name) for name in SHARED}, steps=args.round_steps)
    errors = cfg.errors()
    if errors:
        parser.error("; ".join(errors))
    problem = environment_problem(parse_device(args.device) or torch.device("cuda" if torch.cuda.is_available()
                                                                             else "cpu"))
    if problem:
        print(f"ddpm_fast.distill: error: {problem}", file=sys.stderr)
        return 2
    try:
        keep_freed_memory()
    except ValueError as exc:
        parser.error(str(exc))
    try:
        export = distill(args, rounds)
    except TrainingInterrupted as exc:
        print(f"ddpm_fast.distill: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("ddpm_fast.distill: aborted; files already written are intact (the last checkpoint, if any)",
              file=sys.stderr)
        return 130
    except (CheckpointError, DataError, ValueError, FloatingPointError, OSError) as exc:
        print(f"ddpm_fast.distill: error: {exc}", file=sys.stderr)
        return 2
    if export is not None:  # rank 0
        print(f"student ({rounds[-1]} steps): {export}")
    return 0


if __name__ == "__main__":
    command_exit(main())
