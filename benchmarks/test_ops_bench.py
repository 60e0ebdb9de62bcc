"""Each fused op against its torch eager equivalent at the U-Net's real shapes: GB/s and the fraction
of the device's measured copy bandwidth (extra_info). Goal on H100/H200: >= 80% of copy, >= 2x eager."""

import pytest
import torch
import torch.nn.functional as F
from harness import DEVICE, SIZE, record_bandwidth, run_timed

from ddpm_fast import DDPMSampler, NoiseSchedule, ops
from ddpm_fast.ops import group_norm_silu, q_sample, residual_add, reverse_step

HALF = torch.float16 if DEVICE.type == "cuda" else torch.float32

# The GroupNorm shapes of the cifar10 preset at batch 256 and of the 256px presets at batch 16.
GN_SHAPES = {
    "tiny": [(2, 32, 8, 8)],
    "full": [(256, 128, 32, 32), (256, 256, 16, 16), (256, 256, 4, 4),
             (16, 128, 256, 256), (16, 256, 64, 64), (16, 512, 16, 16), (1, 512, 16, 16)],
}[SIZE]
IMG_SHAPES = {"tiny": [(2, 3, 8, 8)], "full": [(256, 3, 32, 32), (16, 3, 256, 256), (1, 3, 32, 32)]}[SIZE]


def _ids(shapes):
    return ["x".join(map(str, s)) for s in shapes]


def _triton_or_skip():
    why = ops.backend_unavailable_reason("triton", DEVICE)
    if why:
        pytest.skip(why)


@pytest.mark.parametrize("shape", GN_SHAPES, ids=_ids(GN_SHAPES))
@pytest.mark.parametrize("provider", ["torch_eager", "triton"])
def test_group_norm_silu(benchmark, provider, shape):
    n, c, h, w = shape
    x = torch.randn(shape, device=DEVICE, dtype=HALF).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(c, device=DEVICE), torch.randn(c, device=DEVICE)
    add = torch.randn(n, c, device=DEVICE, dtype=HALF)
    if provider == "triton":
        _triton_or_skip()

        def fn():
            with ops.use_backend("triton"):
                return group_norm_silu(x, weight, bias, 32, 1e-6, add=add)
    else:
        def fn():  # what a plain module does: add, GroupNorm, SiLU, each a pass
            return F.silu(F.group_norm(x + add[:, :, None, None], 32, weight.to(HALF), bias.to(HALF), 1e-6))

    benchmark.group = f"group_norm_silu {shape}"
    with torch.no_grad():
        run_timed(benchmark, fn)
    record_bandwidth(benchmark, 2 * x.numel() * x.element_size(), provider=provider, shape=str(shape),
                     dtype=str(HALF))


@pytest.mark.parametrize("shape", GN_SHAPES, ids=_ids(GN_SHAPES))
@pytest.mark.parametrize("provider", ["torch_eager", "triton"])
def test_residual_add(benchmark, provider, shape):
    """The end of a ResBlock: eager torch adds conv2's bias in a pass of its own, then the residual."""
    y, skip = (torch.randn(shape, device=DEVICE, dtype=HALF).contiguous(memory_format=torch.channels_last)
               for _ in range(2))
    bias = torch.randn(shape[1], device=DEVICE, dtype=HALF)
    if provider == "triton":
        _triton_or_skip()

        def fn():
            with ops.use_backend("triton"):
                return residual_add(y, skip, bias)
    else:
        def fn():
            return skip + (y + bias[:, None, None])  # what conv(..., bias) + skip costs after the conv

    benchmark.group = f"residual_add {shape}"
    with torch.no_grad():
        run_timed(benchmark, fn)
    record_bandwidth(benchmark, 3 * y.numel() * y.element_size(), provider=provider, shape=str(shape),
                     dtype=str(HALF))


@pytest.mark.parametrize("shape", IMG_SHAPES, ids=_ids(IMG_SHAPES))
@pytest.mark.parametrize("provider", ["torch_eager", "triton", "triton_in_kernel_noise"])
def test_q_sample(benchmark, provider, shape):
    sched = NoiseSchedule.linear()
    a = sched.sqrt_alphas_cumprod.to(DEVICE, torch.float32)
    s = sched.sqrt_one_minus_alphas_cumprod.to(DEVICE, torch.float32)
    x0 = torch.randn(shape, device=DEVICE)
    noise = torch.randn(shape, device=DEVICE)
    t = torch.randint(0, 1000, (shape[0],), device=DEVICE)
    if provider == "torch_eager":
        def fn():
            return a[t].view(-1, 1, 1, 1) * x0 + s[t].view(-1, 1, 1, 1) * noise
    else:
        _triton_or_skip()
        seed = 0 if provider == "triton_in_kernel_noise" else None

        def fn():
            with ops.use_backend("triton"):
                return q_sample(x0, t, a, s, noise=None if seed is not None else noise, seed=seed)[0]

    benchmark.group = f"q_sample {shape}"
    run_timed(benchmark, fn)
    record_bandwidth(benchmark, 3 * x0.numel() * 4, provider=provider, shape=str(shape), dtype="fp32")


@pytest.mark.parametrize("shape", IMG_SHAPES, ids=_ids(IMG_SHAPES))
@pytest.mark.parametrize("provider", ["torch_eager", "native", "triton"])
def test_reverse_step(benchmark, provider, shape):
    sampler = DDPMSampler(NoiseSchedule.linear())
    coefs, _ = sampler.device_tables(DEVICE)
    x = torch.randn(shape, device=DEVICE)
    eps = torch.randn(shape, device=DEVICE, dtype=HALF)
    noise = torch.randn(shape, device=DEVICE)
    index = torch.full((shape[0],), 500, dtype=torch.int64, device=DEVICE)
    backend = "torch" if provider == "torch_eager" else provider
    why = ops.backend_unavailable_reason(backend, DEVICE)
    if why:
        pytest.skip(why)

    def fn():
        with ops.use_backend(backend):
            return reverse_step(x, eps, coefs, index, noise=noise)

    benchmark.group = f"reverse_step {shape}"
    run_timed(benchmark, fn)
    record_bandwidth(benchmark, x.numel() * (4 + eps.element_size() + 4 + 4), provider=provider,
                     shape=str(shape), dtype=str(HALF))
