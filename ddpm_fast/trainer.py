"""The Trainer: one training run (model, EMA, AMP, optimizer, generators) and the loop that drives it with exact
resume, DDP, metrics and signals. ``python -m ddpm_fast.train`` (train.py) is its command line.

Everything random is drawn from generators whose states go into the checkpoint (batch indices,
timesteps and noise, label dropout, dropout masks), and every checkpoint is a step boundary written
atomically: a run resumed with --resume continues exactly where the saved one stopped (bit for bit on
the CPU), also after Ctrl-C or SIGTERM, which finish the current step, save and exit (130 / 143).
A checkpoint is written only after the loss, the gradients and the weights about to be saved are
checked finite, so a diverging run stops with an error and keeps its last good checkpoint.
Multi-GPU: torchrun (DistributedDataParallel; gloo on CPU).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from ddpm_fast.checkpoint import (
    CONFIG_NAME,
    CheckpointError,
    read_torch_file,
    save_pretrained,
)
from ddpm_fast.data import (
    MAX_IMAGE_PIXELS,
    BatchStream,
    DataError,
    FolderDataset,
    ImageData,
    batch_loader,
    load_data,
    to_model_range,
)
from ddpm_fast.distributed import Dist, parse_device
from ddpm_fast.families import build_model, config_to_dict, model_preset, train_presets
from ddpm_fast.fileio import RUN_CHECKPOINT, RUN_MODEL_FOLDER, RUN_SAMPLES_FOLDER, RunFolder, atomic_write
from ddpm_fast.images import save_grid
from ddpm_fast.losses import NoiseLoss
from ddpm_fast.metrics import LOSS_PLOT_NAME, METRICS_NAME, MetricsLog, plot_loss
from ddpm_fast.openai import openai_betas
from ddpm_fast.samplers import DDIMSampler, to_uint8
from ddpm_fast.schedule import NoiseSchedule

CHECKPOINT_NAME = RUN_CHECKPOINT
# Flags added after checkpoints were first written: the value that reproduces what those runs did.
_LEGACY_DEFAULTS = {"hflip": "off", "learn_sigma": False}
MAX_TRAIN_SEED = 2**50  # the per-process generators are seeded with seed * 1000 + offsets (< 2**63)
# L_simple is E|eps - eps_hat|^2 per element with eps ~ N(0, 1): about 1 for a model that predicts no noise at
# all. A loss a thousand times that is no training dynamics but diverged weights (one more step is NaN).
DIVERGED_LOSS = 1e3


def _opt(default, help: str, *, run: bool = False, **argparse_kw):
    """A TrainConfig field: its flag's help and argparse options; ``run``: it defines the run (a resumed run
    must use the same value)."""
    return field(default=default, metadata={"help": help, "run": run, "argparse": argparse_kw})


@dataclass
class TrainConfig:
    """Every flag of ``python -m ddpm_fast.train``; the fields marked run-defining must match on --resume."""

    data: str = _opt(None, "an image folder, an .npz of uint8/uint16 images, or 'digits'", run=True, required=True)
    config: str = _opt("digits", "model preset: a DDPM U-Net, or openai's ADM architecture (adm-*)", run=True,
                       choices=train_presets)
    schedule: str = _opt("linear", "beta schedule", run=True, choices=["linear", "cosine"])
    learn_sigma: bool = _opt(False, "learned variance (Improved DDPM): the U-Net also outputs v, trained on "
                             "L_hybrid = L_simple + 0.001 L_vlb; the linear schedule then follows improved-diffusion "
                             "(beta range scaled by 1000/T)", run=True)
    num_timesteps: int = _opt(1000, "diffusion steps T", run=True)
    batch_size: int = _opt(128, "per process", run=True)
    lr: float = _opt(2e-4, "AdamW learning rate", run=True)
    weight_decay: float = _opt(0.0, "AdamW weight decay", run=True)
    warmup: int = _opt(500, "linear learning-rate warm-up steps (0: none)", run=True)
    steps: int = _opt(10000, "total optimizer steps (may grow on --resume)")
    ema_decay: float = _opt(0.999, "EMA decay in [0, 1)", run=True)
    amp: str = _opt("none", "mixed precision (fp16 with loss scaling)", run=True, choices=["none", "fp16", "bf16"])
    grad_clip: float = _opt(1.0, "max gradient norm (0: off)", run=True)
    cond_drop_prob: float = _opt(0.1, "label dropout for classifier-free guidance (conditional presets)", run=True)
    hflip: str = _opt("auto", "random horizontal flips, the paper's augmentation (auto: on for RGB data, off for "
                      "grayscale such as the digits, which are not mirror-symmetric)", run=True,
                      choices=["auto", "on", "off"])
    workers: int = _opt(-1, "processes decoding batches of an image folder ahead of the training step (-1: auto, "
                        "min(4, CPU cores - 1) for a folder, 0 for in-memory data: .npz, digits)")
    max_image_pixels: int = _opt(MAX_IMAGE_PIXELS, "largest image (width x height) an image folder may hold; a "
                                 "larger one is refused before anything is decoded (raise it to use such images)")
    seed: int = _opt(0, f"random seed in [0, 2**{int(math.log2(MAX_TRAIN_SEED))})", run=True)
    sample_every: int = _opt(0, "write a sample grid every N steps (0: off)")
    save_every: int = _opt(1000, "write the checkpoint every N steps (0: only at the end)")
    log_every: int = _opt(50, "update the progress bar's loss and append a line to OUT/metrics.jsonl every N steps")
    out: str = _opt("runs/ddpm", "output folder (checkpoint.pt, samples/, model/)")
    resume: str | None = _opt(None, "continue from a checkpoint (default: OUT/checkpoint.pt)", nargs="?", const="auto")
    overwrite: bool = _opt(False, "start a new run in an --out folder that holds another one (it is replaced)")
    device: str | None = _opt(None, "cpu, cuda or cuda:N (default: cuda if available)")
    export_dtype: str = _opt("float32", "dtype of the exported model/ weights", choices=["float32", "float16"])
    tensorboard: bool = _opt(False, "also log the metrics to OUT/tensorboard/ (needs the tensorboard package)")
    no_progress: bool = _opt(False, "no progress bar")

    @classmethod
    def run_defining(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["run"])

    @staticmethod
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    def errors(self) -> list[str]:
        """What is wrong with these values, one line per flag (empty: fine)."""
        errs = []
        for name in ("batch_size", "steps", "num_timesteps", "log_every"):
            if getattr(self, name) < 1:
                errs.append(f"{self.flag(name)} must be positive, got {getattr(self, name)}")
        for name in ("save_every", "sample_every", "warmup"):
            if getattr(self, name) < 0:
                errs.append(f"{self.flag(name)} must be >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            errs.append(f"--lr must be positive and finite, got {self.lr}")
        for name in ("weight_decay", "grad_clip"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                errs.append(f"{self.flag(name)} must be finite and >= 0, got {v}")
        if not 0.0 <= self.ema_decay < 1.0:
            errs.append(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            errs.append(f"--cond-drop-prob must be in [0, 1], got {self.cond_drop_prob}")
        if self.max_image_pixels < 1:
            errs.append(f"--max-image-pixels must be positive, got {self.max_image_pixels}")
        if self.workers < -1:
            errs.append(f"--workers must be >= 0 (or -1: auto), got {self.workers}")
        elif self.workers > max_workers_accepted():
            errs.append(f"--workers {self.workers} is far more than this machine's {os.cpu_count() or 1} CPU cores "
                        f"(at most that many are used); pass up to {os.cpu_count() or 1}")
        if not 0 <= self.seed < MAX_TRAIN_SEED:
            errs.append(f"--seed must be in [0, 2**{int(math.log2(MAX_TRAIN_SEED))}), got {self.seed}")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            errs.append("--tensorboard needs the tensorboard package (pip install tensorboard)")
        if self.resume is not None and self.overwrite:
            errs.append("--resume continues the run in --out, --overwrite replaces it: pass one of them")
        try:
            parse_device(self.device)
        except ValueError as exc:
            errs.append(str(exc))
        return errs


def max_workers_accepted() -> int:
    """--workers beyond this is refused (a typo, or a machine-killer: each worker is a process holding
    batches); up to it, more workers than cores are capped to the cores."""
    return max(16, 4 * (os.cpu_count() or 1))


def worker_count(requested: int, folder: bool) -> tuple[int, list[str]]:
    """(loader worker processes, notices): -1 picks min(4, cores - 1) for an image folder, 0 for in-memory
    data; a request above the CPU core count is capped to it, with a notice."""
    cores = os.cpu_count() or 1
    if requested < 0:
        return (min(4, max(1, cores - 1)) if folder else 0), []
    if requested > cores:
        return cores, [f"--workers {requested}: this machine has {cores} CPU cores; using {cores} workers"]
    return requested, []


class TrainingDiverged(FloatingPointError):
    """The loss, the gradients or the weights became non-finite; nothing non-finite was saved."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM: the run stopped at a step boundary and saved it."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


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


def _all_finite(tensors) -> torch.Tensor:
    """One device bool: every element of every tensor is finite (no host read)."""
    norms = torch._foreach_norm([t.detach().float() for t in tensors], float("inf"))
    return torch.isfinite(torch.stack(norms)).all()


class Trainer:
    """One training run on this process: model, EMA, optimizer, loss scaler, generators and step count.

    ``step()`` is one optimizer step with no host read; ``state_dict()`` / ``load_state_dict()`` are the
    checkpoint (a step boundary: the generators' states are those the next step draws from);
    ``check_finite()`` and ``verify_weights()`` are the health checks a save runs first (see DIVERGED_LOSS).
    """

    def __init__(self, cfg: TrainConfig, data: ImageData | FolderDataset, dist_ctx: Dist, *, model=None,
                 schedule: NoiseSchedule | None = None, loss=None):
        """``model``, ``schedule``, ``loss``: a run that starts from given weights (a distillation's student) on
        a given schedule with its own loss object (see losses.NoiseLoss); by default the preset's fresh model on
        the flags' schedule, trained on L_simple."""
        self.cfg, self.data, self.dist = cfg, data, dist_ctx
        self.workers, self.notes = worker_count(cfg.workers, isinstance(data, FolderDataset))
        self.device = device = dist_ctx.device
        self.unet_config = ucfg = model.config if model is not None else model_preset(cfg.config, cfg.learn_sigma)
        if ucfg.num_classes and data.labels is None:
            raise DataError(f"preset {cfg.config!r} is class-conditional but {cfg.data} has no labels")
        if data.labels is not None and ucfg.num_classes and data.num_classes > ucfg.num_classes:
            raise DataError(f"{cfg.data} has {data.num_classes} classes, preset {cfg.config!r} takes "
                            f"{ucfg.num_classes}")
        self.labels_used = ucfg.num_classes is not None
        if schedule is not None:
            self.schedule = schedule
        elif cfg.learn_sigma:  # improved-diffusion's betas (its linear range scales with T; cosine is the same)
            self.schedule = openai_betas(cfg.schedule, cfg.num_timesteps)
        else:
            self.schedule = NoiseSchedule.from_name(cfg.schedule, cfg.num_timesteps)

        torch.manual_seed(cfg.seed + dist_ctx.rank)
        model = (build_model(ucfg) if model is None else model).to(device).train()
        if device.type == "cuda":
            model = model.to_fast(torch.float32)  # fp32 masters, channels_last, fused blocks; autocast does fp16
        self.model = model
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.amp_dtype = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.amp]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.gens = {"data": torch.Generator().manual_seed(cfg.seed * 1000 + dist_ctx.rank),
                     "loss": torch.Generator(device).manual_seed(cfg.seed * 1000 + 500 + dist_ctx.rank)}
        self.loss_fn = loss if loss is not None else NoiseLoss(self.schedule)
        self.step_count = 0
        self.net = model
        if dist_ctx.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.loss = None  # the last step's loss (device tensor)
        self.grad_norm = None  # the last step's gradient norm before clipping, when clipping
        # First step whose loss or gradients were non-finite (0: none); kept on the device, read by check_finite.
        self._first_bad = torch.zeros((), dtype=torch.int64, device=device)
        self._last_batch = None
        self._batches = None  # the batch iterator, started from gens["data"] at the first step (and on resume)

    def lr_at(self, step: int) -> float:
        warmup = self.cfg.warmup
        return self.cfg.lr * min(1.0, (step + 1) / warmup) if warmup > 0 else self.cfg.lr

    def _loss(self, net, x0, y, generator, cond_drop_prob):
        amp = self.amp_dtype
        with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            return self.loss_fn(net, x0, y if self.labels_used else None, generator,
                                cond_drop_prob if self.labels_used else 0.0)

    def step(self) -> torch.Tensor:
        """One optimizer step (batch, loss, backward, clip, update, EMA); returns the loss. No host read."""
        cfg, opt = self.cfg, self.opt
        for group in opt.param_groups:
            group["lr"] = self.lr_at(self.step_count)
        batch = self._next_batch()
        x0 = to_model_range(batch["images"], self.device)
        y = batch["labels"].to(self.device) if "labels" in batch else None
        if batch["flip"] is not None:
            flip = batch["flip"].to(self.device)
            x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        if self.device.type == "cuda":
            x0 = x0.contiguous(memory_format=torch.channels_last)
        self._last_batch = (x0, y)
        loss = self._loss(self.net, x0, y, self.gens["loss"], cfg.cond_drop_prob)
        opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        bad = ~(loss.detach() <= DIVERGED_LOSS)  # also true for NaN
        if cfg.grad_clip > 0:
            self.scaler.unscale_(opt)
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            if not self.scaler.is_enabled():  # with fp16 loss scaling, inf gradients only skip the step
                bad = bad | ~torch.isfinite(self.grad_norm)
        self.scaler.step(opt)
        self.scaler.update()
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                e.lerp_(p, 1.0 - cfg.ema_decay)
            for e, b in zip(self.ema.buffers(), self.model.buffers(), strict=True):
                e.copy_(b)
        self.step_count += 1
        self._first_bad = torch.where((self._first_bad == 0) & bad, self.step_count, self._first_bad)
        self.loss = loss.detach()
        return self.loss

    def _next_batch(self) -> dict:
        """The next batch of the index stream; gens["data"] becomes the state after its draws, so a checkpoint
        holds what was consumed, not what the loader's workers have read ahead."""
        if self._batches is None:
            stream = BatchStream(self.gens["data"].get_state(), len(self.data), self.cfg.batch_size,
                                 self.cfg.hflip == "on", self.dist.rank, self.dist.world)
            self._batches = batch_loader(self.data, stream, self.workers, pin_memory=self.device.type == "cuda")
        batch = next(self._batches)
        self.gens["data"].set_state(batch["state"])
        return batch

    def close_data(self) -> None:
        """Stop the batch stream and its workers (on every way out of a run)."""
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    def check_finite(self) -> None:
        """Raise TrainingDiverged if any step so far had a non-finite loss or gradient (one host read)."""
        first = self.dist.max_int(int(self._first_bad))
        if first:
            raise TrainingDiverged(f"the run diverged at step {first} (a non-finite gradient, or a loss non-finite "
                                   f"or above {DIVERGED_LOSS:g}); lower --lr, use --grad-clip or --amp bf16")

    def verify_weights(self) -> None:
        """The weights about to be saved are finite and give a finite loss on the last batch (a no-grad
        forward that leaves every generator as it was); else TrainingDiverged."""
        ok = _all_finite(list(self.model.parameters()) + list(self.ema.parameters()))
        if self._last_batch is not None and bool(ok):
            rng = _rng_state(self.gens)
            try:
                with torch.no_grad():
                    probe = self._loss(self.model, *self._last_batch,
                                       torch.Generator(self.device).manual_seed(self.cfg.seed), 0.0)
            finally:
                _set_rng_state(self.gens, rng)
            ok = ok & (probe <= DIVERGED_LOSS)
        if not self.dist.all_true(ok):
            raise TrainingDiverged(f"the run diverged: the weights after step {self.step_count} are non-finite or "
                                   f"give a loss non-finite or above {DIVERGED_LOSS:g}; lower --lr, use --grad-clip "
                                   "or --amp bf16")

    def state_dict(self) -> dict:
        """The checkpoint (every rank must call it: the generators' states are gathered to rank 0)."""
        rng_all = [_rng_state(self.gens)]
        if self.dist.world > 1:
            import torch.distributed as dist

            rng_all = [None] * self.dist.world
            dist.all_gather_object(rng_all, _rng_state(self.gens))
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step_count, "rng": rng_all,
                "args": dataclasses.asdict(self.cfg), "unet_config": config_to_dict(self.unet_config),
                "scheduler_config": self.schedule.to_config()}

    def load_state_dict(self, state: dict, source: str = "checkpoint") -> None:
        rank = self.dist.rank
        if not isinstance(state["rng"], (list, tuple)):
            raise CheckpointError(f"{source}: broken generator state (a {type(state['rng']).__name__})")
        if rank >= len(state["rng"]):
            raise CheckpointError(f"{source}: saved by {len(state['rng'])} processes, resumed with more")
        try:
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.opt.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{source}: does not match this run ({str(exc).splitlines()[0]})") from None
        try:
            _set_rng_state(self.gens, state["rng"][rank])
        except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as exc:
            raise CheckpointError(f"{source}: broken generator state ({str(exc).splitlines()[0]})") from None
        self.close_data()  # restart the stream from the restored generator
        self.step_count = int(state["step"])


class StopSignals:
    """SIGINT and SIGTERM ask the training loop to stop at the next step boundary (``requested``); a second
    signal only says that a save is under way; a third aborts at once with KeyboardInterrupt (atomic writes
    leave the previous checkpoint intact). Handlers are installed only in the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested: int | None = None
        self.count = 0
        self._old = {}

    def _handle(self, signum, frame):
        self.count += 1
        name = signal.Signals(signum).name
        if self.count >= 3:
            raise KeyboardInterrupt
        if self.requested is None:
            self.requested = signum
            msg = f"\n{name}: finishing the current step, then saving a checkpoint (a third signal aborts)\n"
        else:
            msg = f"\n{name}: already stopping; the checkpoint is being saved (a third signal aborts)\n"
        os.write(2, msg.encode())  # not print: the handler may run in the middle of a write to sys.stderr

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
        return False


def _sample_grid(ema, schedule: NoiseSchedule, path: str) -> None:
    cfg = ema.config
    n = 10 * (cfg.num_classes or 10) if cfg.num_classes else 64
    device = next(ema.parameters()).device
    labels = torch.arange(n, device=device) % cfg.num_classes if cfg.num_classes else None
    x = DDIMSampler(schedule, min(50, schedule.num_timesteps)).sample(
        ema, (n, cfg.in_channels, cfg.sample_size, cfg.sample_size), seed=0, class_labels=labels, progress=False)
    save_grid(to_uint8(x), path, nrow=cfg.num_classes or 8, scale=2)


def _read_resume_state(cfg: TrainConfig, ckpt_path: str) -> tuple[dict, str]:
    path = ckpt_path if cfg.resume == "auto" else cfg.resume
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no checkpoint to resume from")
    state = read_torch_file(path)
    if not isinstance(state, dict) or not {"model", "ema", "optimizer", "scaler", "rng", "step", "args"} <= set(state):
        raise CheckpointError(f"{path}: not a ddpm_fast.train checkpoint")
    saved, step = state["args"], state["step"]
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: its 'args' is a {type(saved).__name__}, not the saved run's flags")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: its 'step' is {step!r}, not a step count")
    diffs = [f"{TrainConfig.flag(k)} {saved.get(k, _LEGACY_DEFAULTS.get(k))!r} (checkpoint) vs {getattr(cfg, k)!r}"
             for k in TrainConfig.run_defining() if saved.get(k, _LEGACY_DEFAULTS.get(k)) != getattr(cfg, k)]
    if diffs:
        raise CheckpointError(f"{path}: the flags differ from the saved run: " + "; ".join(diffs))
    if int(state["step"]) > cfg.steps:
        raise CheckpointError(f"{path}: the saved run is at step {state['step']}, past --steps {cfg.steps}")
    return state, path


def _prepare_out(cfg: TrainConfig, dist_ctx: Dist, ckpt_path: str, folder: RunFolder) -> None:
    """Before any work (the folder is made, writable and held): another run there refused unless --resume /
    --overwrite; what killed writes of ours left is removed."""
    out = cfg.out
    if not dist_ctx.main:
        return
    stale = folder.removed + sum(folder.remove_stale(sub) for sub in (RUN_MODEL_FOLDER, RUN_SAMPLES_FOLDER))
    if stale:
        print(f"removed {stale} temporary file(s) an interrupted save left in {out}", file=sys.stderr)
    existing = [p for p in (ckpt_path, os.path.join(out, RUN_MODEL_FOLDER, CONFIG_NAME)) if os.path.exists(p)]
    if existing and cfg.resume is None:
        if not cfg.overwrite:
            raise CheckpointError(f"--out {out} holds another run ({', '.join(existing)}); pass --resume to "
                                  "continue it or --overwrite to replace it")
        print(f"--overwrite: the run in {out} is replaced from the first save on", file=sys.stderr)


class _RunOutputs:
    """What a run writes besides the weights it trains: the checkpoint (and which step it holds), the
    metrics rows, the loss plot and preview grids. Rank 0 writes; every rank keeps the bookkeeping."""

    def __init__(self, cfg: TrainConfig, trainer: Trainer, dist_ctx: Dist, resume_path: str | None):
        self.cfg, self.trainer, self.dist = cfg, trainer, dist_ctx
        self.ckpt_path = os.path.join(cfg.out, CHECKPOINT_NAME)
        self.saved_at = trainer.step_count if resume_path == self.ckpt_path else None
        self.metrics_path = os.path.join(cfg.out, METRICS_NAME)
        self.plot_path = os.path.join(cfg.out, LOSS_PLOT_NAME)
        board = os.path.join(cfg.out, "tensorboard") if cfg.tensorboard else None
        self.metrics = (MetricsLog(self.metrics_path, trainer.step_count if resume_path else None, board)
                        if dist_ctx.main else None)
        self.warned: set[str] = set()

    def save(self) -> None:
        """The checkpoint of this step, after the loss, gradients and weights to be saved are checked."""
        self.trainer.check_finite()
        self.trainer.verify_weights()
        payload = self.trainer.state_dict()
        if self.dist.main:
            atomic_write(self.ckpt_path, lambda p: torch.save(payload, p))
        self.saved_at = self.trainer.step_count

    def _side(self, what: str, write) -> None:
        """A side output (metrics row, loss plot, preview grid) never ends the run: a failure is one warning
        per kind of output, and the run goes on (the checkpoint, the main work, still fails loudly)."""
        try:
            write()
        except (OSError, ValueError, RuntimeError) as exc:
            if what not in self.warned:
                self.warned.add(what)
                print(f"ddpm_fast.train: warning: {str(exc).strip().splitlines()[0]}; the run goes on without "
                      f"{what}", file=sys.stderr)

    def log(self, step: int, loss: float, lr: float, rate: float) -> None:
        if self.metrics is not None:
            grad = None if self.trainer.grad_norm is None else float(self.trainer.grad_norm)
            self._side("these metrics rows", lambda: self.metrics.append(
                step=step, loss=loss, lr=lr, grad_norm=grad, images_per_s=round(rate, 2), time=round(time.time(), 3)))

    def preview(self, step: int) -> None:
        if self.dist.main:
            grid = os.path.join(self.cfg.out, RUN_SAMPLES_FOLDER, f"step_{step:07d}.png")
            self._side("preview grids", lambda: _sample_grid(self.trainer.ema, self.trainer.schedule, grid))
            self._plot()

    def _plot(self) -> None:
        self._side("the loss plot", lambda: plot_loss(self.metrics_path, self.plot_path))

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self._plot()

    def last_good(self) -> str:
        return (f"{self.ckpt_path} (step {self.saved_at}) is the last good state and was kept"
                if self.saved_at is not None else "no checkpoint was written")


def train(cfg: TrainConfig) -> str:
    """Run the training ``cfg`` describes; returns the exported model folder.

    Raises TrainingInterrupted after SIGINT/SIGTERM (the step boundary it stopped at is saved) and
    TrainingDiverged on non-finite values (the last good checkpoint is kept)."""
    return train_in(cfg, Dist(cfg.device))


def train_in(cfg: TrainConfig, dist_ctx: Dist, *, model=None, schedule: NoiseSchedule | None = None, loss=None,
             keep_group: bool = False) -> str:
    """``train`` in a given process group, optionally from given weights on a given schedule with a given loss
    object (Trainer's arguments: how distillation runs each round on this loop). ``keep_group``: the
    torchrun group stays up afterwards (the caller runs more, and closes it)."""
    with RunFolder(cfg.out, "--out", active=dist_ctx.main) as folder:  # held until the run ends
        return _train(cfg, dist_ctx, folder, dict(model=model, schedule=schedule, loss=loss), keep_group)


def _train(cfg: TrainConfig, dist_ctx: Dist, folder: RunFolder, given: dict, keep_group: bool) -> str:
    cfg, trainer, outputs = _load(cfg, dist_ctx, folder, given)
    close = (lambda: None) if keep_group else dist_ctx.close
    try:
        stopped = _loop(cfg, trainer, outputs, dist_ctx)
    except TrainingDiverged as exc:
        close()
        raise TrainingDiverged(f"{exc}; {outputs.last_good()}") from None
    finally:
        trainer.close_data()
    outputs.close()
    if stopped:
        close()
        name = signal.Signals(stopped).name
        raise TrainingInterrupted(stopped, f"{name} at step {trainer.step_count}: checkpoint saved to "
                                           f"{outputs.ckpt_path} (continue with --resume)")
    export = _export(cfg, trainer, outputs, dist_ctx)
    close()
    return export


def _load(cfg: TrainConfig, dist_ctx: Dist, folder: RunFolder,
          given: dict) -> tuple[TrainConfig, Trainer, _RunOutputs]:
    """Check the output folder, read the state to resume, load the data, build the trainer."""
    ckpt_path = os.path.join(cfg.out, CHECKPOINT_NAME)
    ucfg = given["model"].config if given.get("model") is not None else model_preset(cfg.config)
    if cfg.hflip == "auto":  # resolved before it is compared or saved: the checkpoint says what ran
        cfg = dataclasses.replace(cfg, hflip="on" if ucfg.in_channels == 3 else "off")
    _prepare_out(cfg, dist_ctx, ckpt_path, folder)
    state, resume_path = _read_resume_state(cfg, ckpt_path) if cfg.resume else (None, None)
    data = load_data(cfg.data, ucfg.sample_size, ucfg.in_channels, cfg.max_image_pixels)
    if dist_ctx.main:
        for note in data.notes:
            print(note, file=sys.stderr)
    trainer = Trainer(cfg, data, dist_ctx, **given)
    if dist_ctx.main:
        for note in trainer.notes:
            print(note, file=sys.stderr)
    if state is not None:
        trainer.load_state_dict(state, resume_path)
    return cfg, trainer, _RunOutputs(cfg, trainer, dist_ctx, resume_path)


def _loop(cfg: TrainConfig, trainer: Trainer, outputs: _RunOutputs, dist_ctx: Dist) -> int | None:
    """Step to cfg.steps, logging, checking, saving and previewing on their cadences; returns the signal
    that stopped it early (its step boundary saved), or None."""
    from tqdm.auto import tqdm

    # On the CPU a host read costs nothing: check every step. On a GPU, at the log steps (and every save).
    check_every = 1 if dist_ctx.device.type == "cpu" else cfg.log_every
    last_log = (trainer.step_count, time.perf_counter())
    stopped = None
    with tqdm(total=cfg.steps, initial=trainer.step_count, disable=cfg.no_progress or not dist_ctx.main,
              desc="train", unit="step", dynamic_ncols=True) as bar, StopSignals() as stop:
        while trainer.step_count < cfg.steps:
            loss = trainer.step()
            step = trainer.step_count
            if step % check_every == 0:
                trainer.check_finite()
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                rate = (step - last_log[0]) * cfg.batch_size * dist_ctx.world / max(now - last_log[1], 1e-9)
                last_log = (step, now)
                value, lr = loss.item(), trainer.lr_at(step - 1)
                bar.set_postfix(loss=f"{value:.4f}", img_s=f"{rate:.0f}", lr=f"{lr:.1e}")
                outputs.log(step, value, lr, rate)
            bar.update(1)
            stopped = dist_ctx.max_int(stop.requested or 0) or None
            if stopped:
                break
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                outputs.save()
            if cfg.sample_every and step % cfg.sample_every == 0:
                outputs.preview(step)
        bar.close()
        if outputs.saved_at != trainer.step_count:
            outputs.save()
    return stopped


def _export(cfg: TrainConfig, trainer: Trainer, outputs: _RunOutputs, dist_ctx: Dist) -> str:
    export = os.path.join(cfg.out, RUN_MODEL_FOLDER)
    if dist_ctx.main:
        save_pretrained(trainer.ema, export, schedule=trainer.schedule, dtype=getattr(torch, cfg.export_dtype))
        print(f"done: {trainer.step_count} steps; checkpoint {outputs.ckpt_path}; EMA model {export}")
    dist_ctx.barrier()
    return export
