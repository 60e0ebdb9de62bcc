"""Feature caching (DeepCache, cache_interval N) on the embedded digits model: time per image against the
error it costs.

For DDIM and DPM-Solver++(2M) at 20 and 50 steps and N = 1 (every step whole, through the split), 2, 3 and 5:
wall seconds per image of a 100-image run on the fast path (what --fp16 runs on this device; median of
interleaved rounds), model evaluations saved (the deep branch's share), and the RMS distance (in [-1, 1]
pixel units) of the deterministic sample from a reference solution of the probability-flow ODE from the same
x_T (DDIM, every training timestep, unclipped, fp32 reference model), as benchmarks/test_quality_bench.py
measures it; trailing spacing, unclipped, class k % 10, no guidance.

extra_info carries every number. DDPM_FAST_CACHE=full is the recorded run (a few minutes on 2 CPU cores); by
default (CI) a quick pass checks the harness: 16 images, 10 steps, N = 1 and 2, a 200-step reference.
"""

import os
import statistics
import time

import pytest
import torch
from harness import record

from ddpm_fast import DDIMSampler, DPMSolverSampler, NoiseSchedule, ops
from ddpm_fast.checkpoint import load_pretrained, load_schedule
from ddpm_fast.loading import DEFAULT_MODEL
from ddpm_fast.noise import initial_noise

FULL = os.environ.get("DDPM_FAST_CACHE", "quick") == "full"
STEPS = (20, 50) if FULL else (10,)
INTERVALS = (1, 2, 3, 5) if FULL else (1, 2)
N_IMAGES, REF_STEPS, ROUNDS = (100, 1000, 3) if FULL else (16, 200, 1)


@pytest.fixture(scope="module")
def setup():
    model = load_pretrained(DEFAULT_MODEL).eval()
    schedule = load_schedule(DEFAULT_MODEL) or NoiseSchedule.linear(1000)
    shape = (N_IMAGES, 1, 16, 16)
    labels = torch.arange(N_IMAGES) % 10
    x_T = initial_noise(shape, 0, torch.arange(N_IMAGES), "cpu", torch.contiguous_format)
    ref = DDIMSampler(schedule, REF_STEPS, spacing="trailing", clip_denoised=False).sample(
        model, shape, x_T=x_T, class_labels=labels, progress=False, seed=0)
    fast = model.to_fast(ops.cpu_half_dtype())
    return fast, schedule, shape, labels, x_T, ref


def _deep_share(model) -> float:
    """The deep branch's share of the U-Net's parameters (a proxy of its share of the work per step)."""
    shallow = [model.conv_in, model.down_blocks[0].resnets, model.down_blocks[0].attentions, model.up_blocks[-1],
               model.conv_norm_out, model.conv_out]
    n_shallow = sum(p.numel() for m in shallow for p in m.parameters())
    return 1 - n_shallow / sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("solver", ["ddim", "dpm++"])
def test_cache_interval_time_vs_error(benchmark, setup, solver):
    model, schedule, shape, labels, x_T, ref = setup
    info = {}
    for steps in STEPS:
        sampler = (DDIMSampler(schedule, steps, spacing="trailing", clip_denoised=False) if solver == "ddim" else
                   DPMSolverSampler(schedule, steps, spacing="trailing"))
        times = {n: [] for n in INTERVALS}
        out = {}
        for _ in range(ROUNDS):  # interleaved: the machine's noise hits every interval alike
            for n in INTERVALS:
                start = time.perf_counter()
                out[n] = sampler.sample(model, shape, x_T=x_T, class_labels=labels, progress=False, seed=0,
                                        cache_interval=n)
                times[n].append(time.perf_counter() - start)
        for n in INTERVALS:
            whole = len(range(0, steps, n))
            info[f"s{steps}_n{n}_seconds_per_image"] = statistics.median(times[n]) / N_IMAGES
            info[f"s{steps}_n{n}_whole_steps"] = whole
            info[f"s{steps}_n{n}_rms_vs_ode"] = float(((out[n].float() - ref) ** 2).mean().sqrt())
            info[f"s{steps}_n{n}_speedup"] = statistics.median(times[1]) / statistics.median(times[n])
            assert bool(torch.isfinite(out[n]).all())
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the timings are the interleaved rounds above
    record(benchmark, solver=solver, images=N_IMAGES, rounds=ROUNDS, reference_steps=REF_STEPS,
           deep_parameter_share=_deep_share(model), **info)
    print(solver, {k: round(v, 4) for k, v in info.items()})
