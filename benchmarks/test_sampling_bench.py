"""Whole sampling runs per provider: reference (fp32 eager), eager fast path (fp16), graph engine, and the
batch-invariant forms of the reference and the graph engine (fixed padded chunks: what reproducibility costs).

extra_info: per-step latency (ms) and img-steps/s. Goal on H100/H200 (cifar10 preset): batch-1 DDPM of
1000 steps in <= 0.5 s with the graph engine, >= 5x the eager fp16 path at batch 1.
"""

import pytest
import torch
from harness import DEVICE, SIZE, mean_seconds, peak_memory_mib, random_unet, record, reset_peak_memory, run_timed

from ddpm_fast import DDIMSampler, DDPMSampler, NoiseSchedule, engine, ops

SHAPES = {
    "tiny": [("tiny", 2)],
    "full": [("cifar10", 1), ("cifar10", 16), ("cifar10", 256), ("celebahq256", 1), ("celebahq256", 8)],
}[SIZE]
STEPS = 50 if SIZE == "full" else 4
HALF = torch.float16 if DEVICE.type == "cuda" else torch.bfloat16


def _runner(provider, model, sampler, shape):
    invariant = provider.endswith("_invariant")
    provider = provider.removesuffix("_invariant")
    if provider == "reference":
        return lambda: sampler.sample(model, shape, seed=0, progress=False, batch_invariant=invariant), "torch"
    why = ops.backend_unavailable_reason("triton", DEVICE)
    if why:
        pytest.skip(why)
    fast = model.to_fast(HALF)
    backend = "auto" if DEVICE.type == "cuda" else "triton"
    if provider == "eager_fast":
        return lambda: sampler.sample(fast, shape, seed=0, progress=False), backend
    if DEVICE.type != "cuda":
        pytest.skip("the graph engine captures CUDA graphs on a GPU only")
    eng = engine.GraphEngine()
    return lambda: eng.sample(sampler, fast, shape, seed=0, batch_invariant=invariant), backend


@pytest.mark.parametrize("preset, batch", SHAPES, ids=[f"{p}-b{b}" for p, b in SHAPES])
@pytest.mark.parametrize("provider", ["reference", "eager_fast", "graph", "reference_invariant", "graph_invariant"])
def test_sampling_run(benchmark, provider, preset, batch):
    model = random_unet(preset)
    cfg = model.config
    shape = (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    sampler = DDIMSampler(NoiseSchedule.linear(), STEPS, eta=1.0)
    reset_peak_memory()
    fn, backend = _runner(provider, model, sampler, shape)
    with ops.use_backend(backend):
        run_timed(benchmark, fn, rounds=3, warmup=1)
    seconds = mean_seconds(benchmark)
    benchmark.group = f"sampling {preset} b{batch} ({STEPS} steps)"
    record(benchmark, provider=provider, preset=preset, batch=batch, steps=STEPS,
           ms_per_step=round(seconds / STEPS * 1e3, 3), img_steps_per_s=round(batch * STEPS / seconds, 1),
           peak_mib=peak_memory_mib())


@pytest.mark.skipif(SIZE != "full", reason="the 1000-step run is a full-size (GPU) benchmark")
@pytest.mark.parametrize("provider", ["eager_fast", "graph"])
def test_ddpm_1000_steps_batch1(benchmark, provider):
    model = random_unet("cifar10")
    sampler = DDPMSampler(NoiseSchedule.linear())
    fn, backend = _runner(provider, model, sampler, (1, 3, 32, 32))
    with ops.use_backend(backend):
        run_timed(benchmark, fn, rounds=3, warmup=1)
    seconds = mean_seconds(benchmark)
    benchmark.group = "ddpm cifar10 b1 1000 steps"
    record(benchmark, provider=provider, preset="cifar10", batch=1, steps=1000, seconds=round(seconds, 4),
           ms_per_step=round(seconds, 4))
