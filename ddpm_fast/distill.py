"""python -m ddpm_fast.distill: a student that samples in a few steps what its teacher samples in many.

Progressive distillation (Salimans & Ho 2022; ddpm_fast.distillation): each round halves the student's DDIM
steps, from --teacher-steps down to --student-steps, on the Trainer (EMA, AMP, exact resume also after Ctrl-C or
SIGTERM, torchrun, metrics). OUT/round<k>_<N>steps/model is round k's student, an ordinary model folder that
``python -m ddpm_fast.sample --checkpoint`` runs with the sampler and steps it was trained for.
"""

from __future__ import annotations

import argparse

from ddpm_fast.cli import DefaultsHelpFormatter, command_exit
from ddpm_fast.distillation import METHODS, SHARED, distill, round_schedule
from ddpm_fast.train import add_config_flags, run_training
from ddpm_fast.trainer import TrainConfig

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
    add_config_flags(p, [name for name in SHARED if name != "resume"], OWN_DEFAULTS)
    # the run in --out, round by round: no path to name
    p.add_argument("--resume", action="store_const", const="auto", default=None,
                   help="continue the distillation in --out (the same teacher, method and rounds): finished rounds "
                        "are kept, the current one resumes from its checkpoint")
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
    code, export = run_training("ddpm_fast.distill", parser, cfg, lambda: distill(args, rounds))
    if code:
        return code
    if export is not None:  # rank 0
        print(f"student ({rounds[-1]} steps): {export}")
    return 0


if __name__ == "__main__":
    command_exit(main())
