"""residual_add: out = y + skip + bias[c], the end of a ResBlock in one pass.

torch's cuDNN convolution adds its bias in a separate pass over the output (read + write), and the
residual add is another (two reads + a write). The fast ResBlock runs conv2 (and the 1x1 shortcut)
without bias and hands the summed biases to this op: one pass of two reads and a write instead of
five passes. Arithmetic in fp32; the output has the promoted dtype of y and skip (the bias never
promotes: an fp32 master bias under autocast stays out of the dtype), and y's memory format.
On the CPU the extension's C++ kernel runs the calls autograd does not record with y and skip of one
dtype (the fast U-Net's); the others take the reference. The kernel backends run as the registered
torch op ddpm_fast::residual_add, with its autograd registered beside it.
"""

from __future__ import annotations

import torch

from ddpm_fast.base import memory_format
from ddpm_fast.ops import registry


def residual_add_ref(y, skip, bias=None):
    """Pure-torch definition: fp32 sum, stored in the promoted dtype of y and skip, y's memory format."""
    out = y.float() + skip.float()
    if bias is not None:
        out = out + bias.float().view(1, -1, 1, 1)
    dtype = torch.promote_types(y.dtype, skip.dtype)
    return out.to(dtype).contiguous(memory_format=memory_format(y))


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
    from ddpm_fast.ops.kernels.residual_add import _residual_add_kernel, triton

    fmt = memory_format(y)
    y = y.contiguous(memory_format=fmt)
    skip = skip.contiguous(memory_format=fmt)
    out = torch.empty_like(y, dtype=torch.promote_types(y.dtype, skip.dtype))
    numel = y.numel()
    if numel:
        n, c, h, w = y.shape
        block = 1024
        registry.launch(_residual_add_kernel, (triton.cdiv(numel, block),),
            y, skip, bias.contiguous() if bias is not None else y, out, numel, c, h * w,
            HAS_BIAS=bias is not None, CHANNELS_LAST=fmt == torch.channels_last, BLOCK_SIZE=block,
        )
    return out


def _residual_add_native(y, skip, bias):
    fmt = memory_format(y)
    return registry.extension().residual_add(y.contiguous(memory_format=fmt), skip.contiguous(memory_format=fmt), bias)


RESIDUAL_ADD = registry.Op(
    "residual_add", {"cuda": ("triton", "torch"), "cpu": ("native", "triton", "torch")},
    kernels={"triton": _residual_add_triton, "native": _residual_add_native}, reference=residual_add_ref,
    takes={"native": lambda y, skip, bias: y.dtype == skip.dtype},  # csrc/residual_add_cpu.cpp: one dtype
    forward_only=("native",))


def _residual_add_kernels(y: torch.Tensor, skip: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return RESIDUAL_ADD.implementation(y, skip, bias)


_residual_add_op = RESIDUAL_ADD.bind(_residual_add_kernels)


@_residual_add_op.register_fake
def _(y, skip, bias):
    return torch.empty_like(y, dtype=torch.promote_types(y.dtype, skip.dtype), memory_format=memory_format(y))


def _setup_context(ctx, inputs, output):
    y, skip, bias = inputs
    ctx.dtypes = (y.dtype, skip.dtype, None if bias is None else bias.dtype)


def _backward(ctx, grad):
    y_dtype, skip_dtype, bias_dtype = ctx.dtypes
    dbias = None if bias_dtype is None else grad.sum(dim=(0, 2, 3), dtype=torch.float32).to(bias_dtype)
    return grad.to(y_dtype), grad.to(skip_dtype), dbias


_residual_add_op.register_autograd(_backward, setup_context=_setup_context)


def residual_add(y, skip, bias=None):
    """y + skip + bias[None, :, None, None] on the backend the registry chose for y's device."""
    _validate(y, skip, bias)
    return RESIDUAL_ADD(y, skip, bias)
