"""q_sample: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with per-sample t, in one pass.

The tables are the schedule's sqrt_alphas_cumprod and sqrt_one_minus_alphas_cumprod (any float
dtype; gathered per sample). ``noise`` given, or drawn here (and returned: the loss needs it).
"""

from __future__ import annotations

import torch

from ddpm_fast import ops

_IMPLEMENTED = ("torch",)


def q_sample_ref(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise):
    shape = (-1,) + (1,) * (x0.dim() - 1)
    a = sqrt_alphas_cumprod.to(x0.device, torch.float32)[t].view(shape)
    s = sqrt_one_minus_alphas_cumprod.to(x0.device, torch.float32)[t].view(shape)
    return (a * x0.float() + s * noise.float()).to(x0.dtype)


def _validate(x0, t, sqrt_acp, sqrt_1m_acp, noise):
    if not torch.is_tensor(x0) or not x0.is_floating_point() or x0.dim() < 2:
        raise ValueError("q_sample: x0 must be a floating tensor with batch and feature dimensions")
    if not torch.is_tensor(t) or t.shape != (x0.shape[0],) or t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"q_sample: t must be an integer tensor of shape ({x0.shape[0]},)")
    if sqrt_acp.dim() != 1 or sqrt_acp.shape != sqrt_1m_acp.shape:
        raise ValueError("q_sample: the two coefficient tables must be 1-D of equal length")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= sqrt_acp.numel()):
        raise ValueError(f"q_sample: t must lie in [0, {sqrt_acp.numel() - 1}]")
    if noise is not None and noise.shape != x0.shape:
        raise ValueError(f"q_sample: noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")


def q_sample(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise=None, seed=None,
             generator=None):
    """Returns (x_t, noise)."""
    _validate(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise)
    ops.resolve_backend("q_sample", x0.device, _IMPLEMENTED)
    if noise is None:
        if seed is not None:
            generator = torch.Generator(x0.device).manual_seed(int(seed))
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return q_sample_ref(x0, t.long(), sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise), noise
