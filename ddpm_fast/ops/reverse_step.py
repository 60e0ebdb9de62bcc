"""reverse_step: the whole DDPM/DDIM sampler update in one pass.

    eps     = eps_u + w (eps_c - eps_u)                 (classifier-free guidance, optional)
    x0_hat  = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps    (clipped to [-1, 1] if clip_denoised)
    x_prev  = c_x0 x0_hat + c_xt x_t + c_eps eps + sigma z

Coefficients are rows of a (S, 6) fp32 table (columns COEF_COLUMNS) that the samplers build in float64;
``index`` (N,) picks a row per sample and lives on the device, so a CUDA graph can replay the step.
The state x_t and the result are fp32; the model output may be fp32, fp16 or bf16.
"""

from __future__ import annotations

import torch

from ddpm_fast import ops

COEF_COLUMNS = ("sqrt_recip_acp", "sqrt_recipm1_acp", "c_x0", "c_xt", "c_eps", "sigma")
_IMPLEMENTED = ("cuda", "torch")


def reverse_step_ref(
    x_t: torch.Tensor,
    model_output: torch.Tensor,
    coefs: torch.Tensor,
    index: torch.Tensor,
    noise: torch.Tensor | None = None,
    clip_denoised: bool = True,
    model_output_uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Pure-torch definition of the update, computed in fp32."""
    shape = (-1,) + (1,) * (x_t.dim() - 1)
    row = coefs.float()[index]
    a, b, c_x0, c_xt, c_eps, sigma = (row[:, i].view(shape) for i in range(len(COEF_COLUMNS)))
    eps = model_output.float()
    if model_output_uncond is not None:
        u = model_output_uncond.float()
        eps = u + guidance_scale * (eps - u)
    x = x_t.float()
    x0 = a * x - b * eps
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
    out = c_x0 * x0 + c_xt * x + c_eps * eps
    if noise is not None:
        out = out + sigma * noise.float()
    return out


def _validate(x_t, model_output, coefs, index, noise, model_output_uncond):
    if not torch.is_tensor(x_t) or x_t.dim() != 4 or x_t.dtype != torch.float32:
        desc = f"{tuple(x_t.shape)} {x_t.dtype}" if torch.is_tensor(x_t) else type(x_t).__name__
        raise ValueError(f"reverse_step: x_t must be a float32 (N, C, H, W) tensor, got {desc}")
    for name, t in (("model_output", model_output), ("model_output_uncond", model_output_uncond),
                    ("noise", noise)):
        if t is None:
            continue
        if t.shape != x_t.shape:
            raise ValueError(f"reverse_step: {name} shape {tuple(t.shape)} != x_t shape {tuple(x_t.shape)}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"reverse_step: {name} must be float32/float16/bfloat16, got {t.dtype}")
        if t.device != x_t.device:
            raise ValueError(f"reverse_step: {name} is on {t.device}, x_t on {x_t.device}")
    if coefs.dim() != 2 or coefs.shape[1] != len(COEF_COLUMNS):
        raise ValueError(f"reverse_step: coefs must be (S, {len(COEF_COLUMNS)}), got {tuple(coefs.shape)}")
    if index.shape != (x_t.shape[0],) or index.dtype != torch.int64:
        raise ValueError(f"reverse_step: index must be int64 of shape ({x_t.shape[0]},), "
                         f"got {tuple(index.shape)} {index.dtype}")


def reverse_step(
    x_t: torch.Tensor,
    model_output: torch.Tensor,
    coefs: torch.Tensor,
    index: torch.Tensor,
    noise: torch.Tensor | None = None,
    clip_denoised: bool = True,
    model_output_uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """One reverse step on the backend DDPM_FAST_BACKEND selects; returns x_prev (fp32)."""
    _validate(x_t, model_output, coefs, index, noise, model_output_uncond)
    backend = ops.resolve_backend("reverse_step", x_t.device, _IMPLEMENTED)
    if backend == "cuda":
        fmt = torch.channels_last if _is_channels_last(x_t) else torch.contiguous_format

        def dense(t, dtype=None):
            if t is None:
                return None
            t = t if dtype is None else t.to(dtype)
            return t.contiguous(memory_format=fmt)

        return ops.extension().reverse_step(
            dense(x_t), dense(model_output), dense(model_output_uncond),
            coefs.to(device=x_t.device, dtype=torch.float32).contiguous(), index.to(x_t.device),
            dense(noise, torch.float32), float(guidance_scale), bool(clip_denoised),
        )
    return reverse_step_ref(x_t, model_output, coefs, index, noise, clip_denoised, model_output_uncond,
                            guidance_scale)


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
