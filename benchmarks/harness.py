"""Benchmark harness: a size switch and shared helpers.

DDPM_FAST_BENCH_SIZE=tiny|full (default: full on a GPU, tiny otherwise). tiny keeps
`pytest benchmarks/ --benchmark-only` to a minute or two on a CPU; full uses the U-Net's real shapes.
"""

import os

import pytest
import torch

from ddpm_fast.base import keep_freed_memory

SIZE = os.environ.get("DDPM_FAST_BENCH_SIZE", "full" if torch.cuda.is_available() else "tiny")
if SIZE not in ("tiny", "full"):
    raise pytest.UsageError(f"DDPM_FAST_BENCH_SIZE must be tiny or full, got {SIZE!r}")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# What the CLIs do at start (ddpm_fast.keep_freed_memory): freed activations stay mapped, so no provider's forward
# page-faults its buffers in again each call. It applies to the whole benchmark process: every provider alike.
KEEPS_FREED_MEMORY = keep_freed_memory()

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


# Without a GPU the Triton providers run in Triton's interpreter (conftest.py): a tiny run there checks the harness
# and the kernels' launches, its times mean nothing, so it takes one warm-up and two rounds.
HARNESS_CHECK = SIZE == "tiny" and DEVICE.type != "cuda"


def run_timed(benchmark, fn, rounds=None, warmup=2):
    """Warm up outside the timed region, then time fn() with a device sync inside each round."""
    if HARNESS_CHECK:
        warmup, rounds = min(warmup, 1), min(rounds or 2, 2)
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


_COPY_GBPS: dict[str, float] = {}


def copy_bandwidth_gbps() -> float:
    """The device's measured copy bandwidth (read + write bytes per second), measured once per session."""
    key = str(DEVICE)
    if key not in _COPY_GBPS:
        import time

        numel = (256 << 20) if DEVICE.type == "cuda" else (8 << 20)
        src = torch.empty(numel, dtype=torch.float32, device=DEVICE).normal_()
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        sync()
        reps = 20 if DEVICE.type == "cuda" else 5
        start = time.perf_counter()
        for _ in range(reps):
            dst.copy_(src)
        sync()
        seconds = (time.perf_counter() - start) / reps
        _COPY_GBPS[key] = 2 * src.numel() * src.element_size() / seconds / 1e9
    return _COPY_GBPS[key]


def record_bandwidth(benchmark, bytes_moved: int, **info):
    gbps = bytes_moved / mean_seconds(benchmark) / 1e9
    copy = copy_bandwidth_gbps()
    record(benchmark, gb_per_s=round(gbps, 1), copy_gb_per_s=round(copy, 1),
           frac_of_copy=round(gbps / copy, 3), **info)


_MATMUL_TFLOPS: dict[str, float] = {}


def matmul_tflops(dtype=torch.float16) -> float:
    """The device's measured dense matmul rate in this dtype (TFLOP/s), measured once per session."""
    key = f"{DEVICE}-{dtype}"
    if key not in _MATMUL_TFLOPS:
        import time

        size = 8192 if DEVICE.type == "cuda" else 512
        dt = dtype if DEVICE.type == "cuda" else torch.float32
        a = torch.randn(size, size, device=DEVICE, dtype=dt)
        b = torch.randn(size, size, device=DEVICE, dtype=dt)
        for _ in range(3):
            a @ b
        sync()
        reps = 20 if DEVICE.type == "cuda" else 3
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        _MATMUL_TFLOPS[key] = 2 * size**3 * reps / (time.perf_counter() - start) / 1e12
    return _MATMUL_TFLOPS[key]


def count_flops(fn) -> int:
    """FLOPs of one call of fn (convolutions, matmuls, attention), by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def reset_peak_memory():
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(DEVICE)


def peak_memory_mib() -> float | None:
    if DEVICE.type == "cuda":
        return round(torch.cuda.max_memory_allocated(DEVICE) / 2**20, 1)
    return None


def random_unet(preset: str):
    """The preset's U-Net with fresh N(0, 0.02) weights (every provider of a run gets the same ones)."""
    from ddpm_fast import UNet, UNetConfig

    torch.manual_seed(0)
    model = UNet(UNetConfig.from_name(preset, dropout=0.0)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.to(DEVICE)
