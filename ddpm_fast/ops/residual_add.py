"""residual_add: out = y + skip + bias[c], the end of a ResBlock in one pass.

torch's cuDNN convolution adds its bias in a separate pass over the output (read + write), and the
residual add is another (two reads + a write). The fast ResBlock runs conv2 (and the 1x1 shortcut)
without bias and hands the summed biases to this op: one pass of two reads and a write instead of
five passes. Arithmetic in fp32; the output has the promoted dtype of y and skip (the bias never
promotes: an fp32 master bias under autocast stays out of the dtype), and y's memory format.
On the CPU the extension's C++ kernel runs the calls autograd does not record with y and skip of one
dtype (the fast U-Net's); the others take the reference.
"""

from __future__ import annotations

import torch

from ddpm_fast import ops

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

_IMPLEMENTED = ("triton", "torch")
_IMPLEMENTED_CPU = ("cuda", "triton", "torch")  # csrc/residual_add_cpu.cpp: forward, one dtype

if triton is not None:

    @triton.jit
    def _residual_add_kernel(
        Y_ptr, SKIP_ptr, BIAS_ptr, OUT_ptr,
        numel, num_channels, hw,
        HAS_BIAS: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < numel
        out = tl.load(Y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out += tl.load(SKIP_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            if CHANNELS_LAST:
                c = offs % num_channels
            else:
                c = (offs // hw) % num_channels
            out += tl.load(BIAS_ptr + c, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT_ptr + offs, out.to(OUT_ptr.dtype.element_ty), mask=mask)


def residual_add_ref(y, skip, bias=None):
    """Pure-torch definition: fp32 sum, stored in the promoted dtype of y and skip, y's memory format."""
    out = y.float() + skip.float()
    if bias is not None:
        out = out + bias.float().view(1, -1, 1, 1)
    dtype = torch.promote_types(y.dtype, skip.dtype)
    return out.to(dtype).contiguous(memory_format=ops.memory_format(y))


def _validate(y, skip, bias):
    for name, t in (("y", y), ("skip", skip)):
        if not torch.is_tensor(t) or t.dim() != 4 or not t.is_floating_point():
            desc = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
            raise ValueError(f"residual_add: {name} must be a floating (N, C, H, W) tensor, got {desc}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"residual_add: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if y.shape != skip.shape or y.device != skip.device:
        raise ValueError(f"residual_add: y {tuple(y.shape)} on {y.device} and skip {tuple(skip.shape)} "
                         f"on {skip.device} must match")
    c = y.shape[1]
    if bias is not None and (bias.shape != (c,) or bias.device != y.device or not bias.is_floating_point()):
        raise ValueError(f"residual_add: bias must be a floating ({c},) tensor on {y.device}, "
                         f"got {tuple(bias.shape)} {bias.dtype} on {bias.device}")


def _residual_add_triton(y, skip, bias):
    fmt = ops.memory_format(y)
    y = y.contiguous(memory_format=fmt)
    skip = skip.contiguous(memory_format=fmt)
    out = torch.empty_like(y, dtype=torch.promote_types(y.dtype, skip.dtype))
    numel = y.numel()
    if numel:
        n, c, h, w = y.shape
        block = 1024
        ops.launch(_residual_add_kernel, (triton.cdiv(numel, block),),
            y, skip, bias.contiguous() if bias is not None else y, out, numel, c, h * w,
            HAS_BIAS=bias is not None, CHANNELS_LAST=fmt == torch.channels_last, BLOCK_SIZE=block,
        )
    return out


class _ResidualAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, skip, bias):
        ctx.dtypes = (y.dtype, skip.dtype, None if bias is None else bias.dtype)
        return _residual_add_triton(y, skip, bias)

    @staticmethod
    def backward(ctx, grad):
        y_dtype, skip_dtype, bias_dtype = ctx.dtypes
        dy = grad.to(y_dtype) if ctx.needs_input_grad[0] else None
        dskip = grad.to(skip_dtype) if ctx.needs_input_grad[1] else None
        dbias = grad.sum(dim=(0, 2, 3), dtype=torch.float32).to(bias_dtype) if ctx.needs_input_grad[2] else None
        return dy, dskip, dbias


def residual_add(y, skip, bias=None):
    """y + skip + bias[None, :, None, None] on the backend DDPM_FAST_BACKEND selects."""
    _validate(y, skip, bias)
    implemented = _IMPLEMENTED_CPU if y.device.type == "cpu" else _IMPLEMENTED
    backend = ops.resolve_backend("residual_add", y.device, implemented)
    if backend == "triton":
        return _ResidualAdd.apply(y, skip, bias)
    if backend == "cuda" and y.dtype == skip.dtype and not ops.needs_grad(y, skip, bias):
        fmt = ops.memory_format(y)
        return ops.extension().residual_add(y.contiguous(memory_format=fmt), skip.contiguous(memory_format=fmt),
                                            bias)
    return residual_add_ref(y, skip, bias)
