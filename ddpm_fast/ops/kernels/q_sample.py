"""The Triton kernels of ddpm_fast.ops.q_sample (its launcher imports this module on first use, so a
process that never runs Triton never imports it)."""

import triton
import triton.language as tl


@triton.jit
def _q_sample_kernel(
    X0_ptr, T_ptr, A_ptr, S_ptr, NOISE_ptr, OUT_ptr,
    numel, per_sample, seed,
    GENERATE_NOISE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < numel
    t = tl.load(T_ptr + offs // per_sample, mask=mask, other=0)
    a = tl.load(A_ptr + t, mask=mask, other=0.0)
    s = tl.load(S_ptr + t, mask=mask, other=0.0)
    x0 = tl.load(X0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if GENERATE_NOISE:
        eps = tl.randn(seed, offs.to(tl.int32))
        tl.store(NOISE_ptr + offs, eps.to(NOISE_ptr.dtype.element_ty), mask=mask)
    else:
        eps = tl.load(NOISE_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT_ptr + offs, (a * x0 + s * eps).to(OUT_ptr.dtype.element_ty), mask=mask)
