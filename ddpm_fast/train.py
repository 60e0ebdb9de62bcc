"""python -m ddpm_fast.train: train a DDPM on an image folder, an .npz, or the built-in digits.

The command line of the Trainer (trainer.py: exact resume, also after Ctrl-C or SIGTERM, which save the step
boundary and exit 130 / 143; checkpoints written only when finite; EMA, AMP, metrics). Multi-GPU:
torchrun --nproc_per_node=K -m ddpm_fast.train ... (DistributedDataParallel; gloo on CPU).
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
from ddpm_fast.distributed import parse_device
from ddpm_fast.ops import environment_problem
from ddpm_fast.trainer import TrainConfig, TrainingInterrupted, train


def add_config_flags(p: argparse.ArgumentParser, names=None, defaults: dict | None = None) -> None:
    """TrainConfig's flags (those in ``names``, default all) with their help, type and choices; ``defaults``
    overrides a field's default (another command built on the Trainer, such as distill)."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in names or fields:
        f = fields[name]
        kw = dict(f.metadata["argparse"])
        if callable(kw.get("choices")):  # a table (the model families' presets), read when the parser is built
            kw["choices"] = kw["choices"]()
        if f.type in ("bool", bool):
            kw["action"] = "store_true"
        else:
            kw.setdefault("type", {"int": int, "float": float}.get(str(f.type), str))
            if not kw.get("required"):
                kw["default"] = (defaults or {}).get(name, f.default)
        p.add_argument(TrainConfig.flag(name), help=f.metadata["help"], **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_fast.train", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    add_config_flags(p)
    return p


def run_training(prog: str, parser: argparse.ArgumentParser, cfg: TrainConfig, work) -> tuple[int, object]:
    """A training command's last checks (cfg's flags: parser errors; the environment: one line, exit 2), freed
    memory kept mapped, then ``work()``; returns (exit code, what work returned): 128 + signal after a stop at a
    step boundary, 130 for an abort, 2 for a reported error, each one line on stderr."""
    errors = cfg.errors()
    if errors:
        parser.error("; ".join(errors))
    problem = environment_problem(parse_device(cfg.device) or torch.device("cuda" if torch.cuda.is_available()
                                                                            else "cpu"))
    if problem:  # not a usage error: one line, no usage
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return 2, None
    try:
        keep_freed_memory()  # each step frees and allocates its activations: keep them mapped
    except ValueError as exc:
        parser.error(str(exc))
    try:
        return 0, work()
    except TrainingInterrupted as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 128 + exc.signum, None
    except KeyboardInterrupt:
        print(f"{prog}: aborted; files already written are intact (the last checkpoint, if any)", file=sys.stderr)
        return 130, None
    except (CheckpointError, DataError, ValueError, FloatingPointError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2, None


def main(argv=None) -> int:
    parser = build_parser()
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    return run_training("ddpm_fast.train", parser, cfg, lambda: train(cfg))[0]


if __name__ == "__main__":
    command_exit(main())
