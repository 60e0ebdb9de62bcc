"""q_sample: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with per-sample t, in one pass.

The tables are the schedule's sqrt_alphas_cumprod and sqrt_one_minus_alphas_cumprod (gathered per
sample inside the kernel). ``noise`` is given, or drawn in the kernel from Philox keyed by ``seed`` and
the element index (and returned: the loss needs it). In-kernel streams are backend-specific: the
torch fallback draws from a torch.Generator seeded with ``seed``, equal in law, not in value.
The Triton kernel runs as the registered torch op ddpm_fast::q_sample.
"""

from __future__ import annotations

import torch

from ddpm_fast.base import memory_format
from ddpm_fast.ops import registry


def q_sample_ref(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise):
    """Pure-torch definition (fp32 arithmetic, result in x0's dtype)."""
    shape = (-1,) + (1,) * (x0.dim() - 1)
    a = sqrt_alphas_cumprod.to(x0.device, torch.float32)[t].view(shape)
    s = sqrt_one_minus_alphas_cumprod.to(x0.device, torch.float32)[t].view(shape)
    return (a * x0.float() + s * noise.float()).to(x0.dtype)


def validate_q_sample_args(x0, t, sqrt_acp, sqrt_1m_acp, noise):
    if not torch.is_tensor(x0) or not x0.is_floating_point() or x0.dim() < 2:
        raise ValueError("q_sample: x0 must be a floating tensor with batch and feature dimensions")
    if not torch.is_tensor(t) or t.shape != (x0.shape[0],) or t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"q_sample: t must be an integer tensor of shape ({x0.shape[0]},)")
    if sqrt_acp.dim() != 1 or sqrt_acp.shape != sqrt_1m_acp.shape:
        raise ValueError("q_sample: the two coefficient tables must be 1-D of equal length")
    # No host read in the training hot path: an immediate error on the CPU, an assert on the GPU.
    torch._assert_async(((t >= 0) & (t < sqrt_acp.numel())).all(),
                        f"q_sample: t must lie in [0, {sqrt_acp.numel() - 1}]")
    if noise is not None and (noise.shape != x0.shape or noise.device != x0.device):
        raise ValueError(f"q_sample: noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)} "
                         "(or on another device)")


def _q_sample_launch(x0, t, sqrt_acp, sqrt_1m_acp, noise, seed):
    from ddpm_fast.ops.kernels.q_sample import _q_sample_kernel, triton

    fmt = memory_format(x0)
    x0 = x0.contiguous(memory_format=fmt)
    generate = noise is None
    noise = torch.empty_like(x0) if generate else noise.contiguous(memory_format=fmt)
    out = torch.empty_like(x0)
    numel = x0.numel()
    if numel >= 2**31:
        raise ValueError("q_sample: tensors of 2**31 elements or more are not supported; split the batch")
    if numel:
        block = 1024
        registry.launch(_q_sample_kernel, (triton.cdiv(numel, block),),
            x0, t.to(torch.int64).contiguous(), sqrt_acp.to(x0.device, torch.float32).contiguous(),
            sqrt_1m_acp.to(x0.device, torch.float32).contiguous(), noise, out,
            numel, numel // x0.shape[0], int(seed or 0) & 0x7FFFFFFF,
            GENERATE_NOISE=generate, BLOCK_SIZE=block,
        )
    return out, noise


def _q_sample_triton(x0, t, sqrt_acp, sqrt_1m_acp, noise, seed):
    """(x_t, the noise it drew); without ``noise`` it draws from ``seed``, with it the second output is empty (an
    op's outputs never alias its inputs)."""
    x_t, drawn = _q_sample_launch(x0, t, sqrt_acp, sqrt_1m_acp, noise, seed)
    return x_t, (drawn if noise is None else x0.new_empty(0))


def _q_sample_reference(x0, t, sqrt_acp, sqrt_1m_acp, noise, seed):
    drawn = torch.randn(x0.shape, generator=torch.Generator(x0.device).manual_seed(seed), device=x0.device,
                        dtype=x0.dtype) if noise is None else noise
    return q_sample_ref(x0, t.long(), sqrt_acp, sqrt_1m_acp, drawn), (drawn if noise is None else x0.new_empty(0))


Q_SAMPLE = registry.Op("q_sample", {"cuda": ("triton", "torch"), "cpu": ("triton", "torch")},
                       kernels={"triton": _q_sample_triton}, reference=_q_sample_reference)


def _q_sample_kernels(x0: torch.Tensor, t: torch.Tensor, sqrt_acp: torch.Tensor, sqrt_1m_acp: torch.Tensor,
                      noise: torch.Tensor | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return Q_SAMPLE.implementation(x0, t, sqrt_acp, sqrt_1m_acp, noise, seed)


_q_sample_op = Q_SAMPLE.bind(_q_sample_kernels)


@_q_sample_op.register_fake
def _(x0, t, sqrt_acp, sqrt_1m_acp, noise, seed):
    fmt = memory_format(x0)
    x_t = torch.empty_like(x0, memory_format=fmt)
    return x_t, (torch.empty_like(x_t) if noise is None else x0.new_empty(0))


def q_sample(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise=None, seed=None, generator=None):
    """Returns (x_t, noise). Without ``noise``, draws it: in the kernel from ``seed`` (Triton), else from
    ``generator`` (or a generator seeded with ``seed``, or the global RNG)."""
    validate_q_sample_args(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise)
    args = (x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise, int(seed or 0))
    in_kernel = Q_SAMPLE.route(*args) == "triton" and noise is None and seed is not None
    if noise is None and not in_kernel:
        if generator is None and seed is not None:
            generator = torch.Generator(x0.device).manual_seed(int(seed))
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        args = (*args[:4], noise, args[5])
    x_t, drawn = Q_SAMPLE(*args)
    return x_t, (drawn if noise is None else noise)
