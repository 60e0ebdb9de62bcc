"""What every command loads a model from: the embedded model, model folders, train runs, .ckpt files, and openai
.pt files with their flags.

``load_model`` resolves the path (a train run folder samples its newest state), reads the weights without
running pickled code (checkpoint.py, openai.py), refuses non-finite weights up front, and returns the model
with the schedule it was trained with (the checkpoint's own, else the linear 1000-step one).
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

from ddpm_fast.checkpoint import CheckpointError, load_pretrained, load_schedule, resolve_model_path
from ddpm_fast.families import family_of
from ddpm_fast.openai import load_openai, load_openai_classifier
from ddpm_fast.schedule import NoiseSchedule

__all__ = ["DEFAULT_MODEL", "EMBEDDED", "load_classifier", "load_model", "model_path", "student_record"]

_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
DEFAULT_MODEL = os.path.join(_WEIGHTS, "digits")
# The models shipped inside the package, by the name --checkpoint takes: the digits model and its distilled
# student (ddpm_fast.distill: 2 DDIM steps of a v-prediction model).
EMBEDDED = {"digits": DEFAULT_MODEL, "digits-distilled": os.path.join(_WEIGHTS, "digits-distilled")}


def model_path(checkpoint: str | None) -> str:
    """The path --checkpoint names: the embedded digits model for None, an embedded model's folder for its name
    (unless a file or folder of that name exists here), else the path itself."""
    if checkpoint is None:
        return DEFAULT_MODEL
    if checkpoint in EMBEDDED and not os.path.exists(checkpoint):
        return EMBEDDED[checkpoint]
    return checkpoint


def student_record(checkpoint: str | None) -> dict | None:
    """A distilled student's record (NoiseSchedule.student: its sampler, spacing and step counts) from the
    checkpoint's scheduler config, read before anything loads; None for any other model (or one that cannot be
    read here: load_model says why)."""
    try:
        schedule = load_schedule(model_path(checkpoint))
    except (CheckpointError, OSError, ValueError):
        return None
    return None if schedule is None else schedule.student


def load_model(checkpoint: str | None, *, openai_flags: str | None = None, openai_repo: str = "guided-diffusion",
               device=None, prog: str = "ddpm_fast"):
    """(model, schedule) of ``checkpoint`` (None: the embedded digits model) on ``device``; notes (an openai
    flag's default taken, a train run resolved to its newest state) go to stderr as ``prog: ...``."""
    path = model_path(checkpoint)
    if not os.path.exists(path):
        embedded = checkpoint is None or checkpoint in EMBEDDED
        what = "the embedded model is missing from this install" if embedded else "no such file"
        raise CheckpointError(f"{path}: {what}")
    schedule = None
    if openai_flags is not None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            model, schedule = load_openai(path, openai_flags, openai_repo, device=device)
        for w in caught:
            print(f"{prog}: note: {w.message}", file=sys.stderr)
    else:
        used = resolve_model_path(path)
        if os.path.isdir(path) and os.path.normpath(used) != os.path.normpath(path):
            print(f"{prog}: {path} is a training run: sampling {used} (its newest state)", file=sys.stderr)
        model = load_pretrained(used, device=device)
    if not family_of(model).denoiser:
        raise CheckpointError(f"{path}: a {type(model).__name__} (it guides sampling, it does not sample); pass "
                              "a diffusion model, and this one with --classifier")
    _check_finite(model, path)
    return model, schedule or load_schedule(path) or NoiseSchedule.linear(1000)


def _check_finite(model, path: str) -> None:
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # up front: sampling would only turn these into NaN images
        raise CheckpointError(f"{path}: non-finite weights in {', '.join(bad[:4])}"
                              + (f" and {len(bad) - 4} more tensors" if len(bad) > 4 else ""))


def load_classifier(path: str, flags: str | None = None, *, image_size: int | None = None, device=None,
                    prog: str = "ddpm_fast"):
    """A classifier for guidance: guided-diffusion's classifier .pt with its CLASSIFIER_FLAGS (each omitted flag
    at guided-diffusion's default; ``image_size``, the diffusion model's, where the flags name none, as
    classifier_sample.py shares it between the two), or a model folder holding one (save_pretrained), in eval
    mode with its weights fixed (requires_grad False: the guidance gradient is x's alone). Notes go to stderr."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file (--classifier)")
    if os.path.isdir(path):
        if flags is not None:
            raise CheckpointError(f"{path}: a model folder carries its own config; --classifier-flags is for "
                                  "guided-diffusion's .pt files")
        model = load_pretrained(path, device=device)
        if family_of(model).denoiser:
            raise CheckpointError(f"{path}: a diffusion model ({type(model).__name__}), not a classifier")
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            flags = flags or ""
            if image_size is not None and "image_size" not in flags:
                flags = f"--image_size {image_size} {flags}".strip()
            model = load_openai_classifier(path, flags, device=device)
        for w in caught:
            print(f"{prog}: note: {w.message}", file=sys.stderr)
    _check_finite(model, path)
    return model.eval().requires_grad_(False)  # guidance never trains it; fixed weights keep the fast backward
