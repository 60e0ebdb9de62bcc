"""The Triton kernels of ddpm_fast.ops.group_norm_silu (its launcher imports this module on first use, so a
process that never runs Triton never imports it)."""

import triton
import triton.language as tl


@triton.jit
def _load_block(X_ptr, ADD_ptr, n, g, off, end, hw, cg, stride_x_n, stride_c, stride_hw, stride_add_n,
                HAS_ADD: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """One block of group (n, g) as fp32 (x + add), walked in memory order; returns (x, c, offs, mask)."""
    e = off + tl.arange(0, BLOCK_SIZE)  # flat index within the group's cg * hw elements
    mask = e < end
    if CHANNELS_LAST:
        s = e // cg
        c = g * cg + e % cg
    else:
        c = g * cg + e // hw
        s = e % hw
    offs = n * stride_x_n + c * stride_c + s * stride_hw
    x = tl.load(X_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        x += tl.load(ADD_ptr + n * stride_add_n + c, mask=mask, other=0.0).to(tl.float32)
    return x, c, offs, mask


@triton.jit
def _affine_silu(y, W_ptr, B_ptr, c, mask, HAS_AFFINE: tl.constexpr, SILU: tl.constexpr):
    # W_ptr, B_ptr: this sample's row of a per-sample affine, or the per-channel one.
    if HAS_AFFINE:
        y = y * tl.load(W_ptr + c, mask=mask, other=1.0).to(tl.float32)
        y += tl.load(B_ptr + c, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    return y


@triton.jit
def _group_norm_stats_kernel(
    X_ptr, ADD_ptr, PART_ptr,
    hw, cg, num_groups, chunk, group_size,
    stride_x_n, stride_c, stride_hw, stride_add_n,
    SPLIT: tl.constexpr, HAS_ADD: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    pid_g = tl.program_id(0)  # n * num_groups + g
    pid_s = tl.program_id(1)
    n = pid_g // num_groups
    g = pid_g % num_groups
    start = pid_s * chunk
    end = tl.minimum(start + chunk, group_size)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for off in range(start, end, BLOCK_SIZE):
        x, c, offs, mask = _load_block(X_ptr, ADD_ptr, n, g, off, end, hw, cg, stride_x_n, stride_c, stride_hw,
                                       stride_add_n, HAS_ADD, CHANNELS_LAST, BLOCK_SIZE)
        b_count = tl.sum(mask.to(tl.float32), axis=0)
        b_mean = tl.sum(x, axis=0) / b_count
        d = tl.where(mask, x - b_mean, 0.0)
        b_m2 = tl.sum(d * d, axis=0)
        new_count = count + b_count
        delta = b_mean - mean
        mean += delta * (b_count / new_count)
        m2 += b_m2 + delta * delta * (count * b_count / new_count)
        count = new_count
    base = PART_ptr + (pid_g * SPLIT + pid_s) * 3
    tl.store(base, count)
    tl.store(base + 1, mean)
    tl.store(base + 2, m2)


@triton.jit
def _group_norm_apply_kernel(
    X_ptr, ADD_ptr, W_ptr, B_ptr, Y_ptr, PART_ptr, MEAN_ptr, RSTD_ptr,
    hw, cg, num_groups, chunk, group_size, eps,
    stride_x_n, stride_c, stride_hw, stride_add_n, stride_w_n,
    SPLIT: tl.constexpr, HAS_ADD: tl.constexpr, HAS_AFFINE: tl.constexpr, SILU: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    pid_g = tl.program_id(0)
    pid_s = tl.program_id(1)
    n = pid_g // num_groups
    g = pid_g % num_groups
    # Merge this group's SPLIT partials (Chan et al.), identical in every program of the group.
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for i in range(SPLIT):
        base = PART_ptr + (pid_g * SPLIT + i) * 3
        b_count = tl.load(base)
        b_mean = tl.load(base + 1)
        b_m2 = tl.load(base + 2)
        new_count = count + b_count
        w = tl.where(new_count > 0, b_count / tl.maximum(new_count, 1.0), 0.0)
        delta = b_mean - mean
        mean += delta * w
        m2 += b_m2 + delta * delta * count * w
        count = new_count
    rstd = 1.0 / tl.sqrt(m2 / count + eps)
    tl.store(MEAN_ptr + pid_g, mean, mask=pid_s == 0)
    tl.store(RSTD_ptr + pid_g, rstd, mask=pid_s == 0)

    start = pid_s * chunk
    end = tl.minimum(start + chunk, group_size)
    for off in range(start, end, BLOCK_SIZE):
        x, c, offs, mask = _load_block(X_ptr, ADD_ptr, n, g, off, end, hw, cg, stride_x_n, stride_c, stride_hw,
                                       stride_add_n, HAS_ADD, CHANNELS_LAST, BLOCK_SIZE)
        y = _affine_silu((x - mean) * rstd, W_ptr + n * stride_w_n, B_ptr + n * stride_w_n, c, mask,
                         HAS_AFFINE, SILU)
        tl.store(Y_ptr + offs, y.to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _group_norm_single_pass_kernel(
    X_ptr, ADD_ptr, W_ptr, B_ptr, Y_ptr, MEAN_ptr, RSTD_ptr,
    hw, cg, num_groups, group_size, eps,
    stride_x_n, stride_c, stride_hw, stride_add_n, stride_w_n,
    HAS_ADD: tl.constexpr, HAS_AFFINE: tl.constexpr, SILU: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    # A whole group in registers: read once, exact centred variance, no partials, one launch.
    pid_g = tl.program_id(0)
    n = pid_g // num_groups
    g = pid_g % num_groups
    x, c, offs, mask = _load_block(X_ptr, ADD_ptr, n, g, 0, group_size, hw, cg, stride_x_n, stride_c,
                                   stride_hw, stride_add_n, HAS_ADD, CHANNELS_LAST, BLOCK_SIZE)
    count = group_size * 1.0
    mean = tl.sum(x, axis=0) / count
    d = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / count + eps)
    tl.store(MEAN_ptr + pid_g, mean)
    tl.store(RSTD_ptr + pid_g, rstd)
    y = _affine_silu(d * rstd, W_ptr + n * stride_w_n, B_ptr + n * stride_w_n, c, mask, HAS_AFFINE, SILU)
    tl.store(Y_ptr + offs, y.to(Y_ptr.dtype.element_ty), mask=mask)


# ---- backward: tiles of (positions x the group's channels), so per-channel sums are row sums ----


@triton.jit
def _bwd_tile(X_ptr, ADD_ptr, DY_ptr, W_ptr, B_ptr, n, g, s0, s_end, cg, mean, rstd,
              stride_x_n, stride_c, stride_hw, stride_add_n,
              HAS_ADD: tl.constexpr, HAS_AFFINE: tl.constexpr, SILU: tl.constexpr,
              BLOCK_S: tl.constexpr, CG_P2: tl.constexpr):
    """xhat, dL/d(GroupNorm output) and dL/dxhat on one tile; zero outside the mask."""
    s = s0 + tl.arange(0, BLOCK_S)
    cc = tl.arange(0, CG_P2)
    c = g * cg + cc
    c_ok = cc < cg
    mask = (s < s_end)[:, None] & c_ok[None, :]
    offs = n * stride_x_n + c[None, :] * stride_c + s[:, None] * stride_hw
    x = tl.load(X_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        x += tl.load(ADD_ptr + n * stride_add_n + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    dy = tl.load(DY_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_AFFINE:
        w = tl.load(W_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        b = tl.load(B_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    else:
        w = 1.0
        b = 0.0
    if SILU:
        yg = xhat * w + b
        sig = 1.0 / (1.0 + tl.exp(-yg))
        dy = dy * sig * (1.0 + yg * (1.0 - sig))
    return xhat, dy, dy * w, offs, mask


@triton.jit
def _bwd_program(MEAN_ptr, RSTD_ptr, num_groups):
    """This program's group (pid_g = n * num_groups + g), split index, and the group's mean/rstd."""
    pid_g = tl.program_id(0)
    pid_s = tl.program_id(1)
    return pid_g, pid_s, pid_g // num_groups, pid_g % num_groups, tl.load(MEAN_ptr + pid_g), tl.load(
        RSTD_ptr + pid_g)


@triton.jit
def _group_norm_bwd_reduce_kernel(
    X_ptr, ADD_ptr, DY_ptr, W_ptr, B_ptr, MEAN_ptr, RSTD_ptr, PART_ptr, CPART_ptr,
    hw, cg, num_groups, chunk_s,
    stride_x_n, stride_c, stride_hw, stride_add_n,
    SPLIT: tl.constexpr, HAS_ADD: tl.constexpr, HAS_AFFINE: tl.constexpr, SILU: tl.constexpr,
    BLOCK_S: tl.constexpr, CG_P2: tl.constexpr,
):
    pid_g, pid_s, n, g, mean, rstd = _bwd_program(MEAN_ptr, RSTD_ptr, num_groups)
    start = pid_s * chunk_s
    end = tl.minimum(start + chunk_s, hw)
    sum_dxhat = 0.0
    sum_dxhat_xhat = 0.0
    dw = tl.zeros([CG_P2], dtype=tl.float32)
    db = tl.zeros([CG_P2], dtype=tl.float32)
    for s0 in range(start, end, BLOCK_S):
        xhat, dyg, dxhat, offs, mask = _bwd_tile(
            X_ptr, ADD_ptr, DY_ptr, W_ptr, B_ptr, n, g, s0, end, cg, mean, rstd,
            stride_x_n, stride_c, stride_hw, stride_add_n, HAS_ADD, HAS_AFFINE, SILU, BLOCK_S, CG_P2)
        sum_dxhat += tl.sum(tl.sum(dxhat, axis=1), axis=0)
        sum_dxhat_xhat += tl.sum(tl.sum(dxhat * xhat, axis=1), axis=0)
        dw += tl.sum(dyg * xhat, axis=0)
        db += tl.sum(dyg, axis=0)
    prog = pid_g * SPLIT + pid_s
    tl.store(PART_ptr + prog * 2, sum_dxhat)
    tl.store(PART_ptr + prog * 2 + 1, sum_dxhat_xhat)
    cc = tl.arange(0, CG_P2)
    tl.store(CPART_ptr + (prog * 2) * CG_P2 + cc, dw)
    tl.store(CPART_ptr + (prog * 2 + 1) * CG_P2 + cc, db)


@triton.jit
def _group_norm_bwd_apply_kernel(
    X_ptr, ADD_ptr, DY_ptr, W_ptr, B_ptr, MEAN_ptr, RSTD_ptr, PART_ptr, DX_ptr, DADD_ptr,
    hw, cg, num_groups, chunk_s,
    stride_x_n, stride_c, stride_hw, stride_add_n,
    SPLIT: tl.constexpr, HAS_ADD: tl.constexpr, HAS_AFFINE: tl.constexpr, SILU: tl.constexpr,
    BLOCK_S: tl.constexpr, CG_P2: tl.constexpr,
):
    pid_g, pid_s, n, g, mean, rstd = _bwd_program(MEAN_ptr, RSTD_ptr, num_groups)
    total_dxhat = 0.0
    total_dxhat_xhat = 0.0
    for i in range(SPLIT):
        total_dxhat += tl.load(PART_ptr + (pid_g * SPLIT + i) * 2)
        total_dxhat_xhat += tl.load(PART_ptr + (pid_g * SPLIT + i) * 2 + 1)
    count = hw * cg * 1.0  # (hw and cg may both be specialized to the constant 1)
    c1 = total_dxhat / count
    c2 = total_dxhat_xhat / count
    start = pid_s * chunk_s
    end = tl.minimum(start + chunk_s, hw)
    dadd = tl.zeros([CG_P2], dtype=tl.float32)
    for s0 in range(start, end, BLOCK_S):
        xhat, dyg, dxhat, offs, mask = _bwd_tile(
            X_ptr, ADD_ptr, DY_ptr, W_ptr, B_ptr, n, g, s0, end, cg, mean, rstd,
            stride_x_n, stride_c, stride_hw, stride_add_n, HAS_ADD, HAS_AFFINE, SILU, BLOCK_S, CG_P2)
        dx = tl.where(mask, rstd * (dxhat - c1 - xhat * c2), 0.0)
        tl.store(DX_ptr + offs, dx.to(DX_ptr.dtype.element_ty), mask=mask)
        if HAS_ADD:
            dadd += tl.sum(dx, axis=0)
    if HAS_ADD:
        tl.store(DADD_ptr + (pid_g * SPLIT + pid_s) * CG_P2 + tl.arange(0, CG_P2), dadd)


@triton.jit
def _group_norm_bwd_single_pass_kernel(
    X_ptr, ADD_ptr, DY_ptr, W_ptr, B_ptr, MEAN_ptr, RSTD_ptr, CPART_ptr, DX_ptr, DADD_ptr,
    hw, cg, num_groups,
    stride_x_n, stride_c, stride_hw, stride_add_n,
    HAS_ADD: tl.constexpr, HAS_AFFINE: tl.constexpr, SILU: tl.constexpr,
    BLOCK_S: tl.constexpr, CG_P2: tl.constexpr,
):
    # The whole group in one tile: both reductions and dx from one read of (x, dy); SPLIT=1 layouts.
    pid_g, pid_s, n, g, mean, rstd = _bwd_program(MEAN_ptr, RSTD_ptr, num_groups)
    xhat, dyg, dxhat, offs, mask = _bwd_tile(
        X_ptr, ADD_ptr, DY_ptr, W_ptr, B_ptr, n, g, 0, hw, cg, mean, rstd,
        stride_x_n, stride_c, stride_hw, stride_add_n, HAS_ADD, HAS_AFFINE, SILU, BLOCK_S, CG_P2)
    count = hw * cg * 1.0
    c1 = tl.sum(tl.sum(dxhat, axis=1), axis=0) / count
    c2 = tl.sum(tl.sum(dxhat * xhat, axis=1), axis=0) / count
    dx = tl.where(mask, rstd * (dxhat - c1 - xhat * c2), 0.0)
    tl.store(DX_ptr + offs, dx.to(DX_ptr.dtype.element_ty), mask=mask)
    cc = tl.arange(0, CG_P2)
    tl.store(CPART_ptr + (pid_g * 2) * CG_P2 + cc, tl.sum(dyg * xhat, axis=0))
    tl.store(CPART_ptr + (pid_g * 2 + 1) * CG_P2 + cc, tl.sum(dyg, axis=0))
    if HAS_ADD:
        tl.store(DADD_ptr + pid_g * CG_P2 + cc, tl.sum(dx, axis=0))
