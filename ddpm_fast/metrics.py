"""Training metrics: ``OUT/metrics.jsonl`` (one JSON object per logged step) and the ``OUT/loss.png`` curve.

Each line is appended, flushed and fsync'ed on its own, so a crash loses at most the line being written
(a torn last line is skipped on reading). A resumed run keeps the lines up to its checkpoint's step and
continues the file; a new run starts a new one. With a TensorBoard folder the same rows also go to
TensorBoard (torch.utils.tensorboard; the tensorboard package is optional).
"""

from __future__ import annotations

import json
import math
import os
import sys

from ddpm_fast.fileio import atomic_write, atomic_write_text

METRICS_NAME = "metrics.jsonl"
LOSS_PLOT_NAME = "loss.png"


def read_metrics(path: str, problems: list[str] | None = None) -> list[dict]:
    """The rows of a metrics file. A line that is not a JSON object with an integer step (a torn last line
    after a crash, a hand edit, a stray byte) is skipped; ``problems`` (if given) receives one
    "file:line: what" entry per skipped line, except a torn last line, which a crash legitimately leaves."""
    rows = []
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return rows
    last = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            bad = None if isinstance(row, dict) and _is_step(row.get("step")) else "no integer 'step'"
        except UnicodeDecodeError:
            bad = "not UTF-8 text"
        except json.JSONDecodeError:
            bad = None if number - 1 == last and not raw.endswith(b"}") else "not a JSON object"
            if bad is None:  # the torn last line of a crash: expected, skipped quietly
                continue
        if bad is not None:
            if problems is not None:
                problems.append(f"{path}:{number}: {bad}; skipped")
            continue
        rows.append(row)
    return rows


def _is_step(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class MetricsLog:
    """Appends rows to ``path``. ``resume_step``: None starts a new file; an int keeps the rows up to that
    step (what a resumed run continues from) and drops the rest (steps an interrupted run logged after its
    last checkpoint, which the resumed run logs again)."""

    def __init__(self, path: str, resume_step: int | None, tensorboard_dir: str | None = None):
        self.path = path
        self.board = None
        if tensorboard_dir is not None:  # purge_step: a resumed run replaces what followed its checkpoint
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(tensorboard_dir, purge_step=None if resume_step is None else resume_step + 1)
        problems: list[str] = []
        kept = [] if resume_step is None else [r for r in read_metrics(path, problems) if r["step"] <= resume_step]
        for problem in problems[:5]:
            print(f"ddpm_fast.train: note: {problem}", file=sys.stderr)
        if len(problems) > 5:
            print(f"ddpm_fast.train: note: {path}: {len(problems) - 5} more such lines skipped", file=sys.stderr)
        if resume_step is None and not os.path.exists(path):
            return
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def append(self, **row) -> None:
        """One row, strict JSON: a non-finite float is written as null and its key listed under "nonfinite".
        The line is appended whole or not at all: a failed write (a full disk) is cut back off and raised as
        one OSError naming the file."""
        bad = sorted(k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v))
        clean = {k: (None if k in bad else v) for k, v in row.items()}
        if bad:
            clean["nonfinite"] = bad
        data = (json.dumps(clean, allow_nan=False) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OSError(f"{self.path}: cannot append ({exc.strerror or exc})") from None
        try:
            size = os.fstat(fd).st_size
            try:
                written = 0
                while written < len(data):
                    written += os.write(fd, data[written:])
                os.fsync(fd)
            except OSError as exc:
                try:
                    os.ftruncate(fd, size)  # no torn line
                except OSError:
                    pass
                raise OSError(f"{self.path}: cannot append ({exc.strerror or exc}); the row of step "
                              f"{row.get('step')} was not written") from None
        finally:
            os.close(fd)
        if self.board is not None:
            for key, value in row.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.board.add_scalar(key, value, row["step"])
            self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def plot_loss(metrics_path: str, png_path: str, smoothing: float = 0.9) -> bool:
    """Write the loss curve (raw, faint; exponentially smoothed; log y) to ``png_path`` atomically.
    Returns False (and writes nothing) when there is nothing to plot."""
    rows = [r for r in read_metrics(metrics_path) if isinstance(r.get("loss"), (int, float)) and r["loss"] > 0]
    if not rows:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global state, no display
    from matplotlib.figure import Figure

    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    smooth, avg = [], None
    for v in loss:
        avg = v if avg is None else smoothing * avg + (1 - smoothing) * v
        smooth.append(avg)
    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
    ax.plot(steps, smooth, color="tab:blue", linewidth=1.6, label=f"EMA {smoothing:g}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("L_simple")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png"))
    return True
