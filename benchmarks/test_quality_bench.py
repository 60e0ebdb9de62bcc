"""Quality vs steps on the embedded digits model: DDIM and DPM-Solver++(2M) at 5/10/20/50 steps.

(a) ODE error: RMS distance (in [-1, 1] pixel units) of the deterministic sample from a reference solution of
    the same probability-flow ODE from the same x_T: DDIM (eta 0) with 1000 trailing steps, i.e. every
    training timestep, without clipping (clipping bends the ODE path). Its own error is estimated as its RMS
    distance from the 500-step solution (a first-order method: halving the step about halves the error).
    40 images, class k % 10, no guidance, reported for the three spacings.
(b) Frechet distance between generated and real digits in the 32-d hidden layer of a small MLP classifier
    trained here on scikit-learn's 8x8 digits (generated 16x16 samples are area-downsampled to 8x8). A
    measurement aid for this table only, never a metric of record; "fd_real" is the same distance between
    two halves of the real digits (the floor at this sample size). 100 images, each sampler's CLI defaults
    (DDIM: leading spacing, x0 clipped; DPM-Solver++: linspace, unclipped).

Runs on the fp32 reference path (CPU figures on a CPU); extra_info carries every number. The recorded
table is DDPM_FAST_QUALITY=full (about 4 minutes on 2 CPU cores); by default (CI) a quick pass checks the
harness: fewer images, 5 and 20 steps, a 200-step reference.
"""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from harness import record

from ddpm_fast import DDIMSampler, DPMSolverSampler, NoiseSchedule
from ddpm_fast.checkpoint import load_pretrained, load_schedule
from ddpm_fast.loading import DEFAULT_MODEL
from ddpm_fast.noise import initial_noise

FULL = os.environ.get("DDPM_FAST_QUALITY", "quick") == "full"
STEPS = (5, 10, 20, 50) if FULL else (5, 20)
N_RMS, N_FD = (40, 100) if FULL else (8, 30)
REF_STEPS = 1000 if FULL else 200
SPACINGS = ("leading", "linspace", "trailing")


@pytest.fixture(scope="module")
def digits():
    model = load_pretrained(DEFAULT_MODEL).eval()
    schedule = load_schedule(DEFAULT_MODEL) or NoiseSchedule.linear(1000)
    return model, schedule


def _draw(model, sampler, n, seed=0):
    labels = torch.arange(n) % 10
    shape = (n, 1, 16, 16)
    x_T = initial_noise(shape, seed, torch.arange(n), "cpu", torch.contiguous_format)
    with torch.no_grad():
        return sampler.sample(model, shape, x_T=x_T, class_labels=labels, progress=False, seed=seed)


@pytest.fixture(scope="module")
def reference(digits):
    model, schedule = digits
    ref = _draw(model, DDIMSampler(schedule, REF_STEPS, spacing="trailing", clip_denoised=False), N_RMS)
    half = _draw(model, DDIMSampler(schedule, REF_STEPS // 2, spacing="trailing", clip_denoised=False), N_RMS)
    return ref, _rms(half, ref)


def _rms(a, b):
    return float(((a - b) ** 2).mean().sqrt())


@pytest.fixture(scope="module")
def features():
    """Real digits' features and the feature map (the hidden layer of an MLP trained on them)."""
    load_digits = pytest.importorskip("sklearn.datasets").load_digits
    MLPClassifier = pytest.importorskip("sklearn.neural_network").MLPClassifier
    d = load_digits()
    clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=2000, random_state=0).fit(d.data / 16.0, d.target)

    def embed(x8):  # (N, 64) in [0, 1] -> (N, 32) ReLU activations
        return np.maximum(x8 @ clf.coefs_[0] + clf.intercepts_[0], 0.0)

    return embed(d.data / 16.0), embed


def _frechet(a, b):
    from scipy import linalg

    mu = a.mean(0) - b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(ca @ cb).real
    return float(mu @ mu + np.trace(ca + cb - 2 * covmean))


def _to_8x8(x):
    x = ((x.clamp(-1, 1) + 1) / 2).float()
    return F.interpolate(x, size=(8, 8), mode="area").flatten(1).numpy()


def test_reference_solution_error(benchmark, reference, features):
    real, _ = features
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(real))
    fd_real = _frechet(real[perm[:N_FD]], real[perm[N_FD:]])
    benchmark.pedantic(lambda: None, rounds=1)
    benchmark.group = "quality digits (reference)"
    record(benchmark, sampler=f"ddim-{REF_STEPS}-trailing", rms_vs_half_the_steps=round(reference[1], 5),
           fd_real=round(fd_real, 3))


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", ["ddim", "dpm++2m"])
def test_quality_vs_steps(benchmark, digits, reference, features, name, steps):
    model, schedule = digits
    ref, _ = reference
    real, embed = features

    def make(spacing=None, clip=None):
        if name == "ddim":
            return DDIMSampler(schedule, steps, spacing=spacing or "leading",
                               clip_denoised=True if clip is None else clip)
        return DPMSolverSampler(schedule, steps, order=2, spacing=spacing or "linspace",
                                clip_denoised=False if clip is None else clip)

    rms = {f"rms_{s}": round(_rms(_draw(model, make(s, clip=False), N_RMS), ref), 4) for s in SPACINGS}
    default = make()
    x = benchmark.pedantic(lambda: _draw(model, default, N_FD, seed=1), rounds=1)
    fd = _frechet(embed(_to_8x8(x)), real)
    benchmark.group = f"quality digits {steps} steps"
    record(benchmark, sampler=name, steps=steps, **rms, fd=round(fd, 3))
