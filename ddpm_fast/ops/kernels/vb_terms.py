"""The Triton kernels of ddpm_fast.ops.vb_terms (its launcher imports this module on first use, so a
process that never runs Triton never imports it)."""

import triton
import triton.language as tl


@triton.jit
def _phi(x):
    # 0.5 (1 + tanh(y)) = 1 - 1 / (exp(2y) + 1): the tanh CDF approximation without a tanh instruction.
    y = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return 1.0 - 1.0 / (tl.exp(2.0 * y) + 1.0)


@triton.jit
def _vb_terms_kernel(
    X0_ptr, XT_ptr, EPS_ptr, VAR_ptr, NOISE_ptr, TABLE_ptr, T_ptr, OUT_ptr,
    per_sample, num_rows,
    HAS_VAR: tl.constexpr, CLIP: tl.constexpr, NUM_COLUMNS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    # One program per image: its elements are one contiguous block, reduced in BLOCK_SIZE lanes.
    n = tl.program_id(0).to(tl.int64)
    t = tl.load(T_ptr + n)
    tl.device_assert((t >= 0) & (t < num_rows), "vb_terms: t outside the table")
    row = TABLE_ptr + t * NUM_COLUMNS
    a = tl.load(row)
    b = tl.load(row + 1)
    c1 = tl.load(row + 2)
    c2 = tl.load(row + 3)
    true_lv = tl.load(row + 4)
    fixed_lv = tl.load(row + 5)
    lv_min = tl.load(row + 6)
    lv_max = tl.load(row + 7)
    decoder = t == 0
    base = n * per_sample
    acc_vb = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    acc_mse = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    acc_x0 = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    for start in range(0, per_sample, BLOCK_SIZE):
        offs = start + tl.arange(0, BLOCK_SIZE)
        mask = offs < per_sample
        x0 = tl.load(X0_ptr + base + offs, mask=mask, other=0.0)
        xt = tl.load(XT_ptr + base + offs, mask=mask, other=0.0)
        eps = tl.load(EPS_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(NOISE_ptr + base + offs, mask=mask, other=0.0)
        pred = a * xt - b * eps
        if CLIP:
            pred = tl.minimum(tl.maximum(pred, -1.0), 1.0)
        mean = c1 * pred + c2 * xt
        if HAS_VAR:
            frac = 0.5 * (tl.load(VAR_ptr + base + offs, mask=mask, other=0.0).to(tl.float32) + 1.0)
            lv = frac * lv_max + (1.0 - frac) * lv_min
        else:
            lv = fixed_lv + tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
        if decoder:
            centered = x0 - mean
            inv_stdv = tl.exp(-0.5 * lv)
            cdf_plus = _phi(inv_stdv * (centered + 1.0 / 255.0))
            cdf_min = _phi(inv_stdv * (centered - 1.0 / 255.0))
            log_plus = tl.log(tl.maximum(cdf_plus, 1e-12))
            log_one_minus = tl.log(tl.maximum(1.0 - cdf_min, 1e-12))
            log_delta = tl.log(tl.maximum(cdf_plus - cdf_min, 1e-12))
            term = -tl.where(x0 < -0.999, log_plus, tl.where(x0 > 0.999, log_one_minus, log_delta))
        else:
            d = c1 * x0 + c2 * xt - mean
            term = 0.5 * (-1.0 + lv - true_lv + tl.exp(true_lv - lv) + d * d * tl.exp(-lv))
        acc_vb += tl.where(mask, term, 0.0)
        acc_mse += tl.where(mask, (eps - z) * (eps - z), 0.0)
        acc_x0 += tl.where(mask, (pred - x0) * (pred - x0), 0.0)
    inv = 1.0 / per_sample
    tl.store(OUT_ptr + n * 3, tl.sum(acc_vb, axis=0) * inv * 1.4426950408889634)  # / ln 2
    tl.store(OUT_ptr + n * 3 + 1, tl.sum(acc_mse, axis=0) * inv)
    tl.store(OUT_ptr + n * 3 + 2, tl.sum(acc_x0, axis=0) * inv)
