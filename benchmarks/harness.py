"""Benchmark harness: a size switch and shared helpers.

DDPM_FAST_BENCH_SIZE=tiny|full (default: full on a GPU, tiny otherwise). tiny keeps
`pytest benchmarks/ --benchmark-only` to a minute or two on a CPU; full uses the U-Net's real shapes.
"""

import os

import pytest
import torch

SIZE = os.environ.get("DDPM_FAST_BENCH_SIZE", "full" if torch.cuda.is_available() else "tiny")
if SIZE not in ("tiny", "full"):
    raise pytest.UsageError(f"DDPM_FAST_BENCH_SIZE must be tiny or full, got {SIZE!r}")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (preset, batch) per size: the shapes every U-Net benchmark runs at.
UNET_SHAPES = {
    "tiny": [("tiny", 4)],
    "full": [("cifar10", 256), ("celebahq256", 16)],
}[SIZE]


def device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    return "cpu"


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def run_timed(benchmark, fn, rounds=None, warmup=2):
    """Warm up outside the timed region, then time fn() with a device sync inside each round."""
    for _ in range(warmup):
        fn()
    sync()

    def timed():
        out = fn()
        sync()
        return out

    rounds = rounds or (20 if SIZE == "full" else 5)
    return benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)


def record(benchmark, **info):
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    benchmark.extra_info.update(device=device_name(), size=SIZE, torch=torch.__version__, triton=triton_version,
                                **info)


def mean_seconds(benchmark) -> float:
    return benchmark.stats.stats.mean
