"""The likelihood bound on the embedded digits model: anomaly scoring, and what batching timesteps buys.

(a) Anomaly scoring: bits/dim (--estimate K, the unconditional bound through the null label) of digits
    against out-of-distribution images made here: uniform noise, inverted digits (255 - x), and capital letters
    drawn with Pillow's default font, each upscaled to the model's 16x16 like the digits. AUROC of the
    bits/dim score (higher = more anomalous) per OOD kind, with the medians. The embedded model was trained
    on all 1797 of scikit-learn's digits: the "in" set is training data (no held-out split exists for it).
(b) Throughput of the full bound (all T = 1000 terms): bits_per_dim, (image, t) pairs batched per forward, on
    the fp32 reference model and on its fast path (what --fp16 runs on this device), against an eager loop
    over t as improved-diffusion's calc_bpd_loop runs it (one forward per t over the batch of images, the
    reference model), same device, same noise; on the embedded model and on the cifar10 preset (35.7M
    parameters, random weights: the cost does not depend on them).
(c) How close --estimate K comes to the full bound: K = 50 and 200 against all 1000 terms on 16 digits, the
    same noise; the error relative to the bound and in units of the estimate's own standard error.

extra_info carries every number. DDPM_FAST_LIKELIHOOD=full is the recorded run (100 images per kind, K=50;
the throughput on the embedded model, 4 images, 2 interleaved rounds, and on the cifar10 preset, 1 image, 1 round;
the estimate on 16 digits at K = 50 and 200; about 15 minutes on 2 CPU cores). By default (CI) a quick pass checks
the harness: 12 images per kind, K=20, the throughput on small random models with T=100, K = 20 and 50.
"""

import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from harness import record

from ddpm_fast.checkpoint import load_pretrained, load_schedule
from ddpm_fast.data import load_digits, to_model_range
from ddpm_fast.likelihood import bits_per_dim, prior_bpd, vb_terms_bpd
from ddpm_fast.loading import DEFAULT_MODEL
from ddpm_fast.noise import BOUND_STREAM, normal

FULL = os.environ.get("DDPM_FAST_LIKELIHOOD", "quick") == "full"
N_PER_KIND, K = (100, 50) if FULL else (12, 20)
N_THROUGHPUT, ROUNDS = (4, 2) if FULL else (2, 1)


def _letters(n: int, size: int) -> torch.Tensor:
    """uint8 (n, size, size, 1): capital letters in Pillow's default font, white on black, upscaled like the
    digits (drawn at 8x8 scale, then bilinear)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    out = []
    for i in range(n):
        img = Image.new("L", (12, 12), 0)
        ImageDraw.Draw(img).text((3, 0), chr(ord("A") + i % 26), fill=255, font=font)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None, None]
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        out.append((x.clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0))
    return torch.stack(out)


def _auroc(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """P(score of an OOD image > score of an in-distribution one), ties counted half (Mann-Whitney)."""
    diff = outside[:, None] - inside[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


@pytest.fixture(scope="module")
def embedded():
    return load_pretrained(DEFAULT_MODEL).eval(), load_schedule(DEFAULT_MODEL)


def test_anomaly_scoring_auroc(benchmark, embedded):
    model, schedule = embedded
    digits = load_digits(16).images
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(digits), generator=g)[:N_PER_KIND]
    sets = {
        "digits": digits[pick],
        "uniform_noise": torch.randint(0, 256, (N_PER_KIND, 16, 16, 1), generator=g, dtype=torch.uint8),
        "inverted_digits": 255 - digits[pick],
        "letters": _letters(N_PER_KIND, 16),
    }
    scores = {}

    def run():
        for name, images in sets.items():
            x = to_model_range(images, "cpu")
            scores[name] = bits_per_dim(model, schedule, x, seed=0, estimate=K, batch_size=512).total_bpd

    benchmark.pedantic(run, rounds=1, iterations=1)
    info = {f"median_bpd_{k}": float(v.median()) for k, v in scores.items()}
    for name in ("uniform_noise", "inverted_digits", "letters"):
        info[f"auroc_{name}"] = _auroc(scores["digits"], scores[name])
    record(benchmark, images_per_kind=N_PER_KIND, estimate_k=K, **info)
    print(info)
    assert all(torch.isfinite(v).all() for v in scores.values())


def _throughput_model(which: str, embedded):
    """(model, schedule, x0, class label for the eager loop's null label): the embedded digits model or the
    cifar10 preset (random weights, T = 1000); in the quick pass small random stand-ins with T = 100 (50 for
    the cifar10 stand-in)."""
    from ddpm_fast import NoiseSchedule, UNet, UNetConfig

    torch.manual_seed(0)
    if which == "embedded":
        model, schedule = embedded
        if not FULL:
            model = UNet(UNetConfig.from_name("digits", ch=16, num_groups=4)).eval()
            schedule = NoiseSchedule.linear(100)
        return model, schedule, to_model_range(load_digits(16).images[:N_THROUGHPUT], "cpu")
    cfg = UNetConfig.from_name("cifar10") if FULL else UNetConfig.from_name("cifar10", ch=32, ch_mult=(1, 2))
    model = UNet(cfg).eval()
    schedule = NoiseSchedule.linear(1000 if FULL else 50)
    x0 = torch.randint(0, 256, (N_CIFAR, 3, 32, 32), generator=torch.Generator().manual_seed(0)).float() / 127.5 - 1
    return model, schedule, x0


N_CIFAR = 1 if FULL else 2


@pytest.mark.parametrize("which", ["embedded", "cifar10"])
def test_bound_throughput_batched_vs_eager_loop(benchmark, embedded, which):
    model, schedule, x0 = _throughput_model(which, embedded)
    n, big_t = x0.shape[0], len(schedule)
    labels = None if not model.config.num_classes else torch.full((n,), model.config.num_classes)
    rounds = ROUNDS if which == "embedded" else 1

    def eager():
        """improved-diffusion's calc_bpd_loop: for each t (T-1 .. 0), one forward over the batch of images."""
        counter, total = torch.tensor([0, 0]), prior_bpd(schedule, x0)
        with torch.no_grad():
            for t in reversed(range(big_t)):
                ts = torch.full((n,), t)
                z = normal(counter, torch.arange(n), x0[0].numel(), BOUND_STREAM, steps=ts).view(x0.shape)
                x_t = schedule.sqrt_alphas_cumprod[t].float() * x0 + \
                    schedule.sqrt_one_minus_alphas_cumprod[t].float() * z
                total = total + vb_terms_bpd(model, schedule, x0, x_t, ts, class_labels=labels)
        return total

    batch = 256 if which == "embedded" else 64  # nll's default; the small model peaks there on this CPU

    def batched():
        return bits_per_dim(model, schedule, x0, seed=0, batch_size=batch).total_bpd

    from ddpm_fast import ops

    fast_dtype = ops.cpu_half_dtype()  # what --fp16 runs on this CPU
    fast = model.to_fast(fast_dtype)

    def batched_fast():
        return bits_per_dim(fast, schedule, x0, seed=0, batch_size=batch).total_bpd

    providers = (("eager_loop", eager), ("batched", batched), ("batched_fast", batched_fast))
    times = {name: [] for name, _ in providers}
    results = {}
    for _ in range(rounds):  # interleaved rounds: the machine's noise hits all alike
        for name, fn in providers:
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the timings are the interleaved rounds above
    torch.testing.assert_close(results["batched"], results["eager_loop"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results["batched_fast"], results["eager_loop"], rtol=2e-2, atol=1e-2)
    best = {k: min(v) for k, v in times.items()}
    record(benchmark, model=which, images=n, timesteps=big_t, batch=batch,
           fast_dtype=str(fast_dtype).replace("torch.", ""), rounds=rounds,
           **{f"{k}_seconds": v for k, v in best.items()},
           **{f"{k}_images_per_s": n / v for k, v in best.items()},
           speedup_batched=best["eager_loop"] / best["batched"],
           speedup_batched_fast=best["eager_loop"] / best["batched_fast"])
    print(which, {k: [round(s, 2) for s in v] for k, v in times.items()})


def test_estimate_against_the_full_bound(benchmark, embedded):
    """--estimate K (t = 0 and K - 1 strata) against the full bound on the same images and noise: the error
    per image, relative to the bound, and in units of the estimate's own standard error."""
    from ddpm_fast import ops

    model, schedule = embedded
    fast = model.to_fast(ops.cpu_half_dtype())
    n = 16 if FULL else 4
    x0 = to_model_range(load_digits(16).images[100:100 + n], "cpu")
    ks = (50, 200) if FULL else (20, 50)
    info = {}

    def run():
        full = bits_per_dim(fast, schedule, x0, seed=0, batch_size=1000).total_bpd
        for k in ks:
            est = bits_per_dim(fast, schedule, x0, seed=0, batch_size=1000, estimate=k)
            err = est.total_bpd - full
            info[f"k{k}_mean_abs_rel_error"] = float((err.abs() / full).mean())
            info[f"k{k}_max_abs_rel_error"] = float((err.abs() / full).max())
            info[f"k{k}_mean_stderr_rel"] = float((est.stderr / full).mean())
            info[f"k{k}_within_2se"] = float((err.abs() <= 2 * est.stderr).float().mean())
            info[f"k{k}_mean_error_bpd"] = float(err.mean())
        info["full_mean_bpd"] = float(full.mean())

    benchmark.pedantic(run, rounds=1, iterations=1)
    record(benchmark, images=n, timesteps=len(schedule), **info)
    print(info)
    assert all(np.isfinite(v) for v in info.values())
