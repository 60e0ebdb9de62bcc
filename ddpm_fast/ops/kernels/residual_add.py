"""The Triton kernels of ddpm_fast.ops.residual_add (its launcher imports this module on first use, so a
process that never runs Triton never imports it)."""

import triton
import triton.language as tl


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
