"""reverse_step: the whole DDPM/DDIM sampler update in one pass.

    eps     = eps_u + w (eps_c - eps_u)                 (classifier-free guidance, optional)
    x0_hat  = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps    (clipped to [-1, 1] if clip_denoised)
    x_prev  = c_x0 x0_hat + c_xt x_t + c_eps eps + sigma z

Coefficients are rows of a (S, 6) fp32 table (columns COEF_COLUMNS) that the samplers build in float64;
``index`` (N,) picks a row per sample and lives on the device, so a CUDA graph can replay the step.
The state x_t and the result are fp32; the model output may be fp32, fp16 or bf16. ``half_out``
(optional) also receives x_prev in fp16/bf16: the copy the next fast-path U-Net call reads.

Noise z: given, or drawn in the kernel from Philox keyed by (noise_seed, step, element); both may be
device tensors, so a replayed graph draws fresh noise as ``step`` advances. ``out`` may be x_t itself
(in place: each element is read before it is written). Streams are backend-specific: the torch
fallback draws from a torch.Generator seeded from (noise_seed, step), equal in law, not in value.
"""

from __future__ import annotations

import torch

from ddpm_fast import ops

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

COEF_COLUMNS = ("sqrt_recip_acp", "sqrt_recipm1_acp", "c_x0", "c_xt", "c_eps", "sigma")
_IMPLEMENTED = ("cuda", "triton", "torch")
_IMPLEMENTED_INKERNEL_NOISE = ("triton", "torch")
_STEP_KEY = 0x9E3779B1  # odd 32-bit constant: (seed, step) -> distinct Philox keys

if triton is not None:

    @triton.jit
    def _reverse_step_kernel(
        X_ptr, EPS_ptr, EPSU_ptr, NOISE_ptr, COEF_ptr, INDEX_ptr, SEED_ptr, STEP_ptr, OUT_ptr, HALF_ptr,
        numel, per_sample, guidance_scale,
        HAS_UNCOND: tl.constexpr, NOISE_MODE: tl.constexpr, CLIP: tl.constexpr, HAS_HALF: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        # NOISE_MODE: 0 none, 1 tensor, 2 in-kernel Philox keyed by (noise_seed, step).
        offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < numel
        row = COEF_ptr + tl.load(INDEX_ptr + offs // per_sample, mask=mask, other=0) * 6
        a = tl.load(row, mask=mask, other=0.0)
        b = tl.load(row + 1, mask=mask, other=0.0)
        c_x0 = tl.load(row + 2, mask=mask, other=0.0)
        c_xt = tl.load(row + 3, mask=mask, other=0.0)
        c_eps = tl.load(row + 4, mask=mask, other=0.0)
        sigma = tl.load(row + 5, mask=mask, other=0.0)
        x = tl.load(X_ptr + offs, mask=mask, other=0.0)
        eps = tl.load(EPS_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_UNCOND:
            u = tl.load(EPSU_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            eps = u + guidance_scale * (eps - u)
        x0 = a * x - b * eps
        if CLIP:
            x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
        out = c_x0 * x0 + c_xt * x + c_eps * eps
        if NOISE_MODE == 1:
            out += sigma * tl.load(NOISE_ptr + offs, mask=mask, other=0.0)
        if NOISE_MODE == 2:
            key = (tl.load(SEED_ptr) + tl.load(STEP_ptr) * 0x9E3779B1) & 0x7FFFFFFF
            out += sigma * tl.randn(key, offs.to(tl.int32))
        tl.store(OUT_ptr + offs, out, mask=mask)
        if HAS_HALF:
            tl.store(HALF_ptr + offs, out.to(HALF_ptr.dtype.element_ty), mask=mask)


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
    noise_seed: int | torch.Tensor | None = None,
    step: int | torch.Tensor = 0,
    half_out: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One reverse step on the backend DDPM_FAST_BACKEND selects; returns x_prev (fp32)."""
    _validate(x_t, model_output, coefs, index, noise, model_output_uncond)
    if noise is not None and noise_seed is not None:
        raise ValueError("reverse_step: give noise or noise_seed, not both")
    if half_out is not None and (half_out.shape != x_t.shape or half_out.dtype not in (torch.float16, torch.bfloat16)
                                 or half_out.stride() != x_t.stride() or half_out.device != x_t.device):
        raise ValueError("reverse_step: half_out must be an fp16/bf16 tensor laid out like x_t")
    if out is not None and (out.shape != x_t.shape or out.dtype != torch.float32 or out.stride() != x_t.stride()
                            or out.device != x_t.device):
        raise ValueError("reverse_step: out must be a float32 tensor laid out like x_t")
    # The extension writes no half copy and no in-place result; its in-kernel noise runs on CUDA only.
    native_ok = half_out is None and out is None and (noise_seed is None or x_t.is_cuda)
    implemented = _IMPLEMENTED if native_ok else _IMPLEMENTED_INKERNEL_NOISE
    backend = ops.resolve_backend("reverse_step", x_t.device, implemented)
    fmt = ops.memory_format(x_t)

    def dense(t, dtype=None):
        if t is None:
            return None
        t = t if dtype is None else t.to(dtype)
        return t.contiguous(memory_format=fmt)

    coefs = coefs.to(device=x_t.device, dtype=torch.float32).contiguous()
    index = index.to(x_t.device).contiguous()  # kernels read it densely (callers may pass an expand)
    if backend == "cuda":
        noise_key = None
        if noise_seed is not None:
            noise_key = torch.cat([_scalar_tensor(noise_seed, "noise_seed", x_t.device),
                                   _scalar_tensor(step, "step", x_t.device)])
        return ops.extension().reverse_step(
            dense(x_t), dense(model_output), dense(model_output_uncond), coefs, index,
            dense(noise, torch.float32), float(guidance_scale), bool(clip_denoised), noise_key,
        )
    if backend == "triton":
        return _reverse_step_triton(dense(x_t), dense(model_output), dense(model_output_uncond), coefs, index,
                                    dense(noise, torch.float32), float(guidance_scale), bool(clip_denoised),
                                    noise_seed, step, half_out, out)
    if noise_seed is not None:
        noise = torch.randn(x_t.shape, device=x_t.device, generator=_torch_generator(noise_seed, step, x_t.device))
    result = reverse_step_ref(x_t, model_output, coefs, index, noise, clip_denoised, model_output_uncond,
                              guidance_scale)
    if half_out is not None:
        half_out.copy_(result)
    return result if out is None else out.copy_(result)


def _scalar_tensor(value, name, device) -> torch.Tensor:
    if torch.is_tensor(value):
        if value.numel() != 1 or value.dtype != torch.int64 or value.device != device:
            raise ValueError(f"reverse_step: {name} must be one int64 on {device}")
        return value
    return torch.tensor([int(value)], dtype=torch.int64, device=device)


def _torch_generator(noise_seed, step, device) -> torch.Generator:
    seed, step = (int(v.item()) if torch.is_tensor(v) else int(v) for v in (noise_seed, step))
    return torch.Generator(device).manual_seed((seed + step * _STEP_KEY) & 0x7FFFFFFF)


def _reverse_step_triton(x, eps, eps_u, coefs, index, noise, w, clip, noise_seed, step, half_out, out):
    numel = x.numel()
    if numel >= 2**31:
        raise ValueError("reverse_step: tensors of 2**31 elements or more are not supported; split the batch")
    out = torch.empty_like(x) if out is None else out
    if numel == 0:
        return out
    noise_mode = 1 if noise is not None else (2 if noise_seed is not None else 0)
    block = 1024
    _reverse_step_kernel[(triton.cdiv(numel, block),)](
        x, eps, eps_u if eps_u is not None else eps, noise if noise is not None else x, coefs, index,
        _scalar_tensor(noise_seed or 0, "noise_seed", x.device), _scalar_tensor(step, "step", x.device),
        out, half_out if half_out is not None else out,
        numel, numel // x.shape[0], w,
        HAS_UNCOND=eps_u is not None, NOISE_MODE=noise_mode, CLIP=clip, HAS_HALF=half_out is not None,
        BLOCK_SIZE=block,
    )
    return out

