"""What the sampling commands share: a failure is one line and an exit code.

``run_command`` runs a command's work: ValueError (CheckpointError and DataError among them) and OSError
become ``PROG: error: ...`` and exit 2, Ctrl-C exit 130 with the command's own notice of what was kept.
Imports nothing from the package.
"""

from __future__ import annotations

import sys


def run_command(prog: str, work, *args, interrupted: str = "interrupted") -> int:
    """``work(*args)``; returns the exit code (0, 2 for a reported error, 130 for Ctrl-C)."""
    try:
        work(*args)
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0
