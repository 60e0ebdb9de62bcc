"""The Triton kernels of ddpm_fast.ops.reverse_step (its launcher imports this module on first use, so a
process that never runs Triton never imports it)."""

import triton
import triton.language as tl


@triton.jit
def _reverse_step_kernel(
    X_ptr, EPS_ptr, EPSU_ptr, VAR_ptr, NOISE_ptr, COEF_ptr, INDEX_ptr, KEY_ptr, IMG_ptr, OUT_ptr, HALF_ptr,
    H0_ptr, H1_ptr, H2_ptr,
    numel, per_sample, channels, hw, num_rows, guidance_scale,
    HAS_UNCOND: tl.constexpr, HAS_VAR: tl.constexpr, NOISE_MODE: tl.constexpr, CLIP: tl.constexpr,
    HAS_HALF: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, HISTORY: tl.constexpr, NUM_COEFS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    # HISTORY: how many ring slots (H0..H2) the step has (0 to 3); the row says which it reads and writes.
    # NOISE_MODE: 0 none, 1 tensor, 2 Philox keyed by KEY_ptr = [seed, step] and the image index.
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < numel
    sample = offs // per_sample
    idx = tl.load(INDEX_ptr + sample, mask=mask, other=0)
    tl.device_assert((idx >= 0) & (idx < num_rows), "reverse_step: index outside the coefficient table")
    row = COEF_ptr + idx * NUM_COEFS
    a = tl.load(row, mask=mask, other=0.0)
    b = tl.load(row + 1, mask=mask, other=0.0)
    c_x0 = tl.load(row + 2, mask=mask, other=0.0)
    c_xt = tl.load(row + 3, mask=mask, other=0.0)
    c_eps = tl.load(row + 4, mask=mask, other=0.0)
    sigma = tl.load(row + 5, mask=mask, other=0.0)
    if HAS_VAR:
        frac = 0.5 * (tl.load(VAR_ptr + offs, mask=mask, other=0.0).to(tl.float32) + 1.0)
        log_var = frac * tl.load(row + 10, mask=mask, other=0.0) + (1.0 - frac) * tl.load(row + 9, mask=mask,
                                                                                        other=0.0)
        sigma = sigma * tl.exp(0.5 * log_var)
    x = tl.load(X_ptr + offs, mask=mask, other=0.0)
    eps = tl.load(EPS_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        u = tl.load(EPSU_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        eps = u + guidance_scale * (eps - u)
    x0 = a * x - b * eps
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
    out = c_x0 * x0 + c_xt * x + c_eps * eps
    if HISTORY >= 1:
        slot = tl.load(row + 13, mask=mask, other=0.0).to(tl.int32) - 1  # -1: the row keeps nothing
        tl.device_assert(slot < HISTORY, "reverse_step: the row keeps its output in a missing history slot")
        kept = tl.load(row + 11, mask=mask, other=0.0) * x0 + tl.load(row + 12, mask=mask, other=0.0) * eps
        out += tl.load(row + 6, mask=mask, other=0.0) * tl.load(H0_ptr + offs, mask=mask, other=0.0)
        if HISTORY >= 2:
            out += tl.load(row + 7, mask=mask, other=0.0) * tl.load(H1_ptr + offs, mask=mask, other=0.0)
        if HISTORY == 3:
            out += tl.load(row + 8, mask=mask, other=0.0) * tl.load(H2_ptr + offs, mask=mask, other=0.0)
        tl.store(H0_ptr + offs, kept, mask=mask & (slot == 0))
        if HISTORY >= 2:
            tl.store(H1_ptr + offs, kept, mask=mask & (slot == 1))
        if HISTORY == 3:
            tl.store(H2_ptr + offs, kept, mask=mask & (slot == 2))
    if NOISE_MODE == 1:
        out += sigma * tl.load(NOISE_ptr + offs, mask=mask, other=0.0)
    if NOISE_MODE == 2:
        # The stream's element counter is the NCHW index inside the image, whatever the layout.
        e = offs - sample * per_sample
        if CHANNELS_LAST:
            e = (e % channels) * hw + e // channels
        image = tl.load(IMG_ptr + sample, mask=mask, other=0)
        step = tl.load(KEY_ptr + 1)
        zero = e.to(tl.int32) * 0
        r0, r1, _, _ = tl.philox(tl.load(KEY_ptr), e.to(tl.int32), image.to(tl.int32),
                                 zero + step.to(tl.int32), zero)
        z, _ = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1))
        out += sigma * z
    tl.store(OUT_ptr + offs, out, mask=mask)
    if HAS_HALF:
        tl.store(HALF_ptr + offs, out.to(HALF_ptr.dtype.element_ty), mask=mask)
