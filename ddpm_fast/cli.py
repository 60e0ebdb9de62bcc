"""What the commands share: their --help layout, the --out folder the sampling commands (sample, nll) hold, and a
failure as one line.

``in_out_folder`` runs a command's work with ``--out`` held as its run folder (rank 0 of a torchrun holds it;
see fileio.RunFolder). ``run_main`` checks --seed, --device and the DDPM_FAST_* environment (a backend that
cannot run on the device is refused before the model loads) and keeps freed memory for reuse
(base.keep_freed_memory), then ``run_command`` runs the work:
ValueError (CheckpointError and DataError among them) and OSError become ``PROG: error: ...`` and exit 2,
Ctrl-C exit 130 with the command's own notice of what was kept.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

import torch

from ddpm_fast.base import keep_freed_memory
from ddpm_fast.distributed import Dist, parse_device
from ddpm_fast.fileio import RunFolder
from ddpm_fast.noise import check_seed
from ddpm_fast.ops import environment_problem

INTERRUPTED = "interrupted (outputs are written only at the end, each atomically)"


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every command's --help: "(default: X)" after a flag's help, once, where X says something (not None, not a
    switch's False) and the help text does not already state its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is False or default == argparse.SUPPRESS
                or action.option_strings == [] or "%(default)" in text):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def add_run_args(p: argparse.ArgumentParser, out: str) -> None:
    """The flags every sampling command ends with: --device, --out (default ``out``), --no-progress."""
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", default=out, help="output folder")
    p.add_argument("--no-progress", action="store_true")


def run_main(prog: str, parser, args, work) -> int:
    """A sampling command's last checks (--seed, --device: parser errors, before any work), freed memory kept for
    reuse (base.keep_freed_memory: each U-Net call would page-fault its activations in again), then
    ``run_command(prog, work, args)``."""
    try:
        check_seed(args.seed)
    except ValueError as exc:
        parser.error(f"--seed: {exc}")
    try:
        device = parse_device(args.device)
        keep_freed_memory()
    except ValueError as exc:
        parser.error(str(exc))
    problem = environment_problem(device or _default_device())
    if problem:  # not a usage error: one line, no usage
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return 2
    return run_command(prog, work, args, interrupted=INTERRUPTED)


def in_out_folder(args, work):
    """``work(args, dist_ctx)`` with ``args.out`` made, proved writable and held before any work (a bad or busy
    --out fails now) and until the results are written; returns what ``work`` returns."""
    dist_ctx = Dist(args.device)
    with RunFolder(args.out, "--out", active=dist_ctx.rank == 0) as folder:
        if folder.removed:
            print(f"removed {folder.removed} temporary file(s) an interrupted write left in {args.out}",
                  file=sys.stderr)
        return work(args, dist_ctx)


def command_exit(code: int):
    """``sys.exit(code)`` for a command run as ``python -m``: its work is over (an interruption handled, its folder
    released, the code decided), so from here on SIGINT is ignored. Otherwise a second Ctrl-C (or a signal still in
    flight) arriving while the interpreter shuts down, after it has put the default handler back, kills the process
    by SIGINT (exit -2) instead of the code it decided. An interrupted run (130, 143) leaves at once after its
    streams are flushed (``os._exit``): its outputs are written atomically or not at all, so the interpreter's
    shutdown has nothing left to do, and is not given the chance to turn the decided code into a death by SIGINT
    (seen under load in CI, with one SIGINT sent and its notice printed)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if code in (130, 143):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    sys.exit(code)


class Terminated(BaseException):
    """SIGTERM, raised where the command runs so that it unwinds as Ctrl-C does (folders released, nothing half
    written)."""


def _terminate(signum, frame):
    raise Terminated


def run_command(prog: str, work, *args, interrupted: str = "interrupted") -> int:
    """``work(*args)``; returns the exit code (0, 2 for a reported error, 130 for Ctrl-C, 143 for SIGTERM: each
    interruption one notice, its run folder released and, if the run made it and wrote nothing, removed)."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        work(*args)
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{prog}: {interrupted.replace('interrupted', 'terminated (SIGTERM)', 1)}", file=sys.stderr)
        return 143
    except (ValueError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0
