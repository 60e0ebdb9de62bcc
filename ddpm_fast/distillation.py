"""Distillation: a student that samples in a few steps what its teacher samples in many (``python -m
ddpm_fast.distill`` is its command line, distill.py).

Progressive distillation (Salimans & Ho 2022, Algorithm 2): each round halves the student's DDIM steps. On the
student's grid of N timesteps (diffusers' "trailing" spacing; the grids of N and 2N steps nest), the target of
the student's one step from t to t'' is the teacher's two deterministic DDIM steps t -> t' -> t'' (our fused step
on the teacher's table), turned into the x_0 that would land one DDIM step on the same point:

    x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)      (x~ = z_t'' at t'' = 0)

The student predicts v (x_0 = alpha_t z_t - sigma_t v: an eps-prediction student is ill-conditioned near t = T,
where alpha_T is about 0.006 with linear betas) and learns on the truncated-SNR weighting,
max(alpha_t^2 / sigma_t^2, 1) |x_0_hat - x~|^2. The student starts from the teacher's weights; each round's
student is the next round's teacher, and each is saved as an ordinary model folder whose scheduler config
records its prediction type, sampler, spacing and step count, so ``sample --checkpoint`` runs it as it was
trained.

Each round is one run of the one Trainer (trainer.train_in) with the loss object ProgressiveLoss: EMA, AMP,
exact resume (also after Ctrl-C / SIGTERM), torchrun, metrics.jsonl + loss.png and the locked --out folder are
the Trainer's. OUT/distill.json says what the run is (teacher, method, rounds); OUT/round<k>_<N>steps/ holds
round k (its checkpoint.pt and, once done, model/).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time

import torch

from ddpm_fast import ops
from ddpm_fast.checkpoint import CONFIG_NAME, CheckpointError, load_pretrained, load_schedule
from ddpm_fast.distributed import Dist
from ddpm_fast.fileio import RUN_MODEL_FOLDER, RunFolder, atomic_write_json
from ddpm_fast.loading import load_model, model_path
from ddpm_fast.losses import drop_labels
from ddpm_fast.samplers import DDIMSampler
from ddpm_fast.schedule import NoiseSchedule, space_timesteps
from ddpm_fast.trainer import TrainConfig, train_in

__all__ = ["METHODS", "ProgressiveLoss", "distill", "progressive_target", "round_schedule", "student_schedule"]

METHODS = ("progressive",)
RECORD_NAME = "distill.json"
SPACING = "trailing"


def round_schedule(teacher_steps: int, student_steps: int) -> list[int]:
    """The students' step counts, one per round: teacher_steps / 2, / 4, ... down to student_steps."""
    for name, n in (("--teacher-steps", teacher_steps), ("--student-steps", student_steps)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    if student_steps >= teacher_steps:
        raise ValueError(f"--student-steps {student_steps} must be below --teacher-steps {teacher_steps} (each "
                         "round halves the steps)")
    ratio = teacher_steps // student_steps
    if teacher_steps % student_steps or ratio & (ratio - 1):
        raise ValueError(f"--teacher-steps {teacher_steps} must be --student-steps {student_steps} times a power "
                         f"of two: each round halves the steps")
    return [teacher_steps >> k for k in range(1, int(math.log2(ratio)) + 1)]


def student_schedule(schedule: NoiseSchedule, steps: int) -> NoiseSchedule:
    """``schedule`` for a v-prediction student of ``steps`` DDIM steps on the trailing grid."""
    s = NoiseSchedule(schedule.betas, name=schedule.name, params=schedule.params)
    s.prediction_type = "v_prediction"
    s.student = {"method": "progressive", "sampler": "ddim", "spacing": SPACING, "steps": [int(steps)]}
    return s


def progressive_target(z_t, x_end, alpha_t, sigma_t, alpha_end, sigma_end):
    """The x_0 whose one DDIM step from z_t (at alpha_t, sigma_t) lands on x_end (at alpha_end, sigma_end):
    Salimans & Ho's x~ (Algorithm 2); at sigma_end = 0 it is x_end / alpha_end."""
    ratio = sigma_end / sigma_t
    return (x_end - ratio * z_t) / (alpha_end - ratio * alpha_t)


class ProgressiveLoss:
    """One round's loss object (see the module docstring): ``loss(net, x0, labels, generator, cond_drop_prob)``
    for a v-prediction student of ``steps`` steps taught by ``teacher`` (frozen, any prediction type its
    ``teacher_schedule`` declares), run on ``teacher`` DDIM's table of 2 ``steps`` trailing timesteps."""

    def __init__(self, teacher, teacher_schedule: NoiseSchedule, steps: int):
        self.teacher = teacher.eval().requires_grad_(False)
        self.steps = int(steps)
        big_t = teacher_schedule.num_timesteps
        grid = space_timesteps(big_t, 2 * self.steps, SPACING)  # ascending; the student's are the odd places
        self.grid = torch.tensor(grid, dtype=torch.int64)
        self.ddim = DDIMSampler(teacher_schedule, timesteps=grid, eta=0.0, clip_denoised=False)
        acp = teacher_schedule.alphas_cumprod.double()
        # alpha, sigma at each grid place, and at "place -1": the clean end (alpha 1, sigma 0)
        a = torch.cat([torch.ones(1, dtype=torch.float64), acp[self.grid].sqrt()])
        self._alpha, self._sigma = a, (1.0 - a * a).clamp(min=0).sqrt()
        self._device: dict = {}

    def _tables(self, device):
        if device not in self._device:
            coefs, _ = self.ddim.device_tables(device)
            rows = self.ddim._index_of[self.grid].to(device)  # the DDIM row of each grid place
            self._device[device] = (coefs, rows, self.grid.to(device), self._alpha.float().to(device),
                                    self._sigma.float().to(device))
        return self._device[device]

    @torch.no_grad()
    def target(self, z, j, labels):
        """The teacher's x~ for student step j (grid place 2j + 1 -> 2j -> 2j - 1, or the clean end)."""
        coefs, rows, grid, alpha, sigma = self._tables(z.device)
        start, mid = 2 * j + 1, 2 * j
        x_mid = ops.reverse_step(z, self.teacher(z, grid[start], labels).float(), coefs, rows[start], None, False)
        x_end = ops.reverse_step(x_mid, self.teacher(x_mid, grid[mid], labels).float(), coefs, rows[mid], None, False)
        shape = (-1,) + (1,) * (z.dim() - 1)
        a_t, s_t = alpha[start + 1].view(shape), sigma[start + 1].view(shape)
        a_e, s_e = alpha[mid].view(shape), sigma[mid].view(shape)  # place 2j - 1 is table index 2j
        return progressive_target(z, x_end, a_t, s_t, a_e, s_e)

    def __call__(self, net, x0, class_labels, generator, cond_drop_prob: float) -> torch.Tensor:
        _, _, grid, alpha, sigma = self._tables(x0.device)
        n, device = x0.shape[0], x0.device
        j = torch.randint(0, self.steps, (n,), device=device, generator=generator)
        eps = torch.randn(x0.shape, device=device, dtype=torch.float32, generator=generator)
        num_classes = getattr(net, "module", net).config.num_classes
        labels = drop_labels(num_classes, class_labels, n, device, cond_drop_prob, generator)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        a_t, s_t = alpha[2 * j + 2].view(shape), sigma[2 * j + 2].view(shape)
        z = (a_t * x0.float() + s_t * eps).contiguous(memory_format=ops.memory_format(x0))
        x_target = self.target(z, j, labels)
        v = net(z, grid[2 * j + 1], labels).float()
        x_hat = a_t * z - s_t * v
        weight = (a_t * a_t / (s_t * s_t)).clamp(min=1.0)  # truncated SNR: max(|x - x^|^2, |eps - eps^|^2)
        return (weight * (x_hat - x_target) ** 2).mean()


# ---- the run: one Trainer run per round ---------------------------------------------------------------------

def _record(args, rounds: list[int]) -> dict:
    """What defines the run: a resumed run must match it."""
    return {"method": args.method, "teacher": os.path.abspath(model_path(args.teacher)),
            "openai_flags": args.openai_flags, "rounds": rounds, "round_steps": args.round_steps,
            "data": args.data, "seed": args.seed}


def _round_dir(out: str, k: int, steps: int) -> str:
    return os.path.join(out, f"round{k + 1}_{steps}steps")


def _check_out(args, record: dict) -> None:
    """Before any work: another run in --out refused unless --resume (which must match it) or --overwrite."""
    path = os.path.join(args.out, RECORD_NAME)
    if not os.path.exists(path):
        if args.resume is not None:
            raise CheckpointError(f"{path}: no distillation to resume")
        return
    if args.overwrite:
        print(f"--overwrite: the distillation in {args.out} is replaced", file=sys.stderr)
        return
    if args.resume is None:
        raise CheckpointError(f"--out {args.out} holds another distillation ({path}); pass --resume to continue "
                              "it or --overwrite to replace it")
    try:
        with open(path) as fh:
            saved = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None
    saved = {k: v for k, v in saved.items() if k in record}
    diffs = [f"{k} {saved.get(k)!r} (saved) vs {v!r}" for k, v in record.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(f"{path}: this run differs from the saved one: " + "; ".join(diffs))


def _load_teacher(args, k: int, rounds: list[int], device):
    """Round k's teacher: the given model for the first round, the previous round's student after."""
    if k == 0:
        model, schedule = load_model(args.teacher, openai_flags=args.openai_flags, device=device,
                                     prog="ddpm_fast.distill")
        if getattr(model.config, "learn_sigma", False):
            raise CheckpointError(f"{args.teacher or 'digits'}: a learned-variance model; distillation takes an "
                                  "eps or v model with a fixed variance")
        return model, schedule
    folder = os.path.join(_round_dir(args.out, k - 1, rounds[k - 1]), RUN_MODEL_FOLDER)
    return load_pretrained(folder, device=device), load_schedule(folder)


# The Trainer's flags a distillation takes (the model, its schedule and variance come from the teacher).
SHARED = ("data", "batch_size", "lr", "weight_decay", "warmup", "ema_decay", "amp", "grad_clip", "cond_drop_prob",
          "hflip", "workers", "max_image_pixels", "seed", "save_every", "log_every", "out", "resume", "overwrite",
          "device", "export_dtype", "no_progress")


def distill(args, rounds: list[int]) -> str:
    """Run the distillation ``args`` describe (the command's flags: teacher, method, round_steps, and the
    Trainer's SHARED ones), one Trainer run per round of ``rounds``; returns the last student's folder. Raises as
    trainer.train does (TrainingInterrupted after a signal: the round's step boundary is saved). Other ranks of a
    torchrun get None."""
    dist_ctx = Dist(args.device)
    record = _record(args, rounds)
    base = TrainConfig(**{name: getattr(args, name) for name in SHARED}, config=f"student of {record['teacher']}",
                       steps=args.round_steps)
    try:
        with RunFolder(args.out, "--out", active=dist_ctx.main):
            if dist_ctx.main:
                _check_out(args, record)
                # the teacher loads before anything is written: one that cannot is refused with nothing made
                teacher0, _ = _load_teacher(args, 0, rounds, dist_ctx.device)
                del teacher0
                atomic_write_json(os.path.join(args.out, RECORD_NAME), record)
            dist_ctx.barrier()
            export = None
            for k, steps in enumerate(rounds):
                folder = _round_dir(args.out, k, steps)
                export = os.path.join(folder, RUN_MODEL_FOLDER)
                if os.path.isfile(os.path.join(export, CONFIG_NAME)) and args.resume is not None:
                    continue  # a finished round
                teacher, schedule = _load_teacher(args, k, rounds, dist_ctx.device)
                student = copy.deepcopy(teacher)  # starts from the teacher's weights
                resume = "auto" if os.path.isfile(os.path.join(folder, "checkpoint.pt")) and args.resume else None
                cfg = dataclasses.replace(base, out=folder, resume=resume, overwrite=args.overwrite)
                started = time.perf_counter()
                if dist_ctx.main:
                    print(f"round {k + 1}/{len(rounds)}: {2 * steps} teacher steps -> {steps} student steps",
                          file=sys.stderr)
                train_in(cfg, dist_ctx, model=student.requires_grad_(True), loss=ProgressiveLoss(teacher, schedule,
                                                                                              steps),
                         schedule=student_schedule(schedule, steps), keep_group=True)
                if dist_ctx.main:
                    _note_round(args.out, k, steps, time.perf_counter() - started)
            return export if dist_ctx.main else None
    finally:
        dist_ctx.close()


def _note_round(out: str, k: int, steps: int, seconds: float) -> None:
    path = os.path.join(out, RECORD_NAME)
    with open(path) as fh:
        record = json.load(fh)
    record.setdefault("round_seconds", {})[str(k + 1)] = round(seconds, 1)
    atomic_write_json(path, record)


