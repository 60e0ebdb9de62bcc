"""group_norm_silu: y = SiLU(GroupNorm(x + add[:, :, None, None])) in one fused op.

``add`` is the per-sample, per-channel (N, C) time-embedding projection that a DDPM ResBlock adds
before its second norm; silu=False gives plain GroupNorm (attention blocks). The affine may be per
sample ((N, C) weight and bias): ``group_norm_scale_shift_silu`` folds ADM's scale-shift norm,
SiLU(GroupNorm(x) * (1 + scale) + shift), into one (the (N, C) fold is tiny; x is read once). Statistics in fp32;
the output keeps the input's dtype and memory format (NCHW or channels_last, no layout flips).

Triton forward, groups of up to SINGLE_PASS_MAX elements (256 channels in 32 groups at 32x32): one
program per group holds it in registers, so x is read once, the variance is the exact centred one, and
it is one launch (at batch 1 the U-Net step is launch-bound). Larger groups, two kernels: each group is
split over SPLIT programs so the grid fills the GPU even at batch 1. ``_stats`` reduces one chunk to
(count, mean, M2) with a per-block Chan/Welford merge (no sum-of-squares cancellation); ``_apply``
merges its group's partials and normalizes its chunk. Each chunk is walked in memory order
(channel-major for NCHW, position-major for channels_last), so loads are coalesced in both formats;
``_apply`` also keeps each group's mean and rstd for the backward.

On the CPU the extension's C++ kernel (csrc/group_norm_silu_cpu.cpp) runs the forward of calls that
autograd does not record; the others take the reference. The kernel backends run as the registered torch
op ddpm_fast::group_norm_silu (y, mean, rstd), whose autograd is ddpm_fast::group_norm_silu_backward.

Backward, two kernels over tiles of (positions x the group's channels): ``_bwd_reduce`` sums
dL/dxhat and dL/dxhat * xhat per group and the weight/bias gradients per channel; ``_bwd_apply``
writes dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) and the per-channel sums of the add
gradient. Partial sums go to buffers finished by torch (deterministic: no atomics). Groups whose tile
fits SINGLE_PASS_MAX take ``_bwd_single_pass``: one program, one read of (x, dy), the same sums.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ddpm_fast.base import memory_format
from ddpm_fast.ops import registry


def group_norm_silu_ref(x, weight, bias, num_groups: int, eps: float, add=None, silu: bool = True):
    """Pure-torch definition: fp32 statistics, result cast back to x's dtype and memory format."""
    h = x.float()
    if add is not None:
        h = h + add.float()[:, :, None, None]
    if weight is not None and weight.dim() == 2:  # a per-sample affine
        h = F.group_norm(h, num_groups, None, None, eps) * weight.float()[:, :, None, None] + \
            bias.float()[:, :, None, None]
    else:
        h = F.group_norm(h, num_groups, None if weight is None else weight.float(),
                         None if bias is None else bias.float(), eps)
    if silu:
        h = F.silu(h)
    return h.to(x.dtype).contiguous(memory_format=memory_format(x))


def _rows(add):
    """``add`` with unit channel stride; a row stride is fine (the U-Net passes column slices of one GEMM)."""
    return add if add is None or add.stride(1) == 1 else add.contiguous()


def _pick_split(n_groups_total: int, group_size: int, block: int, device: torch.device) -> int:
    """Programs per group: enough to give every SM a few programs, never more than blocks per group."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8  # the interpreter: keep the grid small, but still exercise the split path
    split = -(-target // n_groups_total)
    return max(1, min(split, -(-group_size // block), 64))


# Groups up to this many elements are normalized by one program holding the group in registers
# (_group_norm_single_pass_kernel): one read instead of two, one launch instead of two. At 16 elements
# per thread ptxas (sm_90, fp16, channels_last) needs ~100 registers (backward ~110) and no spills up to
# 8192 elements; 16384 would spill. The backward tile is next_pow2(H*W) x next_pow2(C/G).
SINGLE_PASS_MAX = 8192


def _single_pass_warps(block: int) -> int:
    return max(4, min(16, block // 512))


def _group_norm_silu_fwd(x, weight, bias, num_groups, eps, add, silu, split=None):
    from ddpm_fast.ops.kernels.group_norm_silu import (
        _group_norm_apply_kernel,
        _group_norm_single_pass_kernel,
        _group_norm_stats_kernel,
        triton,
    )

    fmt = memory_format(x)
    x = x.contiguous(memory_format=fmt)
    channels_last = fmt == torch.channels_last
    n, c, h, w = x.shape
    hw, cg = h * w, c // num_groups
    group_size = cg * hw
    y = torch.empty_like(x, memory_format=fmt)
    mean = torch.empty(n * num_groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if x.numel() == 0:
        return y, mean, rstd
    if x.numel() >= 2**31:
        raise ValueError("group_norm_silu: tensors of 2**31 elements or more are not supported; split the batch")
    stride_n, stride_c = x.stride(0), x.stride(1)
    stride_hw = x.stride(3)  # the flattened H*W stride: 1 (NCHW) or C (channels_last)
    add = _rows(add)
    add_arg = add if add is not None else x
    stride_add_n = add.stride(0) if add is not None else 0
    has_affine = weight is not None
    w_arg = weight.contiguous() if has_affine else x
    b_arg = bias.contiguous() if has_affine else x
    stride_w_n = c if has_affine and weight.dim() == 2 else 0  # a per-sample affine's row stride
    if split is None and group_size <= SINGLE_PASS_MAX:
        block = triton.next_power_of_2(group_size)
        registry.launch(_group_norm_single_pass_kernel, (n * num_groups,),
            x, add_arg, w_arg, b_arg, y, mean, rstd, hw, cg, num_groups, group_size, float(eps),
            stride_n, stride_c, stride_hw, stride_add_n, stride_w_n,
            HAS_ADD=add is not None, HAS_AFFINE=has_affine, SILU=bool(silu), CHANNELS_LAST=channels_last,
            BLOCK_SIZE=block, num_warps=_single_pass_warps(block),
        )
        return y, mean, rstd
    # On a GPU 1024-element blocks; the interpreter pays per block, so it gets bigger ones.
    block = 1024 if x.device.type == "cuda" else 4096
    block = min(block, triton.next_power_of_2(group_size))
    split = split or _pick_split(n * num_groups, group_size, block, x.device)
    chunk = -(-group_size // split)
    chunk = -(-chunk // block) * block  # whole blocks per program
    split = -(-group_size // chunk)
    partials = torch.empty(n * num_groups * split * 3, device=x.device, dtype=torch.float32)
    grid = (n * num_groups, split)
    registry.launch(_group_norm_stats_kernel, grid,
        x, add_arg, partials, hw, cg, num_groups, chunk, group_size, stride_n, stride_c, stride_hw, stride_add_n,
        SPLIT=split, HAS_ADD=add is not None, CHANNELS_LAST=channels_last, BLOCK_SIZE=block,
    )
    registry.launch(_group_norm_apply_kernel, grid,
        x, add_arg, w_arg, b_arg, y, partials, mean, rstd, hw, cg, num_groups, chunk, group_size, float(eps),
        stride_n, stride_c, stride_hw, stride_add_n, stride_w_n,
        SPLIT=split, HAS_ADD=add is not None, HAS_AFFINE=has_affine, SILU=bool(silu),
        CHANNELS_LAST=channels_last, BLOCK_SIZE=block,
    )
    return y, mean, rstd


def _group_norm_silu_bwd(grad_y, x, weight, bias, add, mean, rstd, num_groups, silu, split=None):
    """(dx, dweight, dbias, dadd): two passes over (x, dy); per-channel sums finished in torch."""
    from ddpm_fast.ops.kernels.group_norm_silu import (
        _group_norm_bwd_apply_kernel,
        _group_norm_bwd_reduce_kernel,
        _group_norm_bwd_single_pass_kernel,
        triton,
    )

    fmt = memory_format(x)
    x = x.contiguous(memory_format=fmt)
    grad_y = grad_y.contiguous(memory_format=fmt)
    n, c, h, w = x.shape
    hw, cg = h * w, c // num_groups
    cg_p2 = triton.next_power_of_2(cg)
    single = split is None and triton.next_power_of_2(hw) * cg_p2 <= SINGLE_PASS_MAX
    block = 1024 if x.device.type == "cuda" else 4096
    block_s = max(1, min(block // cg_p2, triton.next_power_of_2(hw)))
    if single:
        block_s, split = triton.next_power_of_2(hw), 1
    split = split or _pick_split(n * num_groups, hw, block_s, x.device)
    chunk_s = -(-hw // split)
    chunk_s = -(-chunk_s // block_s) * block_s
    split = -(-hw // chunk_s)
    programs = n * num_groups * split
    part = torch.empty(programs * 2, device=x.device, dtype=torch.float32)
    cpart = torch.empty(programs * 2 * cg_p2, device=x.device, dtype=torch.float32)
    dadd_part = torch.zeros(programs * cg_p2, device=x.device, dtype=torch.float32) if add is not None else part
    dx = torch.empty_like(x)
    has_affine = weight is not None
    add_c = _rows(add)
    args = (x, add_c if add is not None else x, grad_y, weight.contiguous() if has_affine else x,
            bias.contiguous() if has_affine else x, mean, rstd)
    geometry = (hw, cg, num_groups, chunk_s, x.stride(0), x.stride(1), x.stride(3),
                add_c.stride(0) if add is not None else 0)
    flags = dict(SPLIT=split, HAS_ADD=add is not None, HAS_AFFINE=has_affine, SILU=bool(silu), BLOCK_S=block_s,
                 CG_P2=cg_p2)
    grid = (n * num_groups, split)
    if single:
        del flags["SPLIT"]
        registry.launch(_group_norm_bwd_single_pass_kernel, grid, *args, cpart, dx, dadd_part, hw, cg, num_groups,
                   *geometry[4:], num_warps=_single_pass_warps(block_s * cg_p2), **flags)
    else:
        registry.launch(_group_norm_bwd_reduce_kernel, grid, *args, part, cpart, *geometry, **flags)
        registry.launch(_group_norm_bwd_apply_kernel, grid, *args, part, dx, dadd_part, *geometry, **flags)
    dweight = dbias = dadd = None
    if has_affine:
        per_channel = cpart.view(n, num_groups, split, 2, cg_p2)[..., :cg].sum(dim=(0, 2))  # (G, 2, cg)
        dweight = per_channel[:, 0].reshape(c).to(weight.dtype, copy=True)  # no views: op outputs never alias
        dbias = per_channel[:, 1].reshape(c).to(bias.dtype, copy=True)
    if add is not None:
        dadd = dadd_part.view(n, num_groups, split, cg_p2)[..., :cg].sum(dim=2).reshape(n, c).to(add.dtype, copy=True)
    return dx, dweight, dbias, dadd


def _empty_stats(x, num_groups):
    return (torch.empty(x.shape[0] * num_groups, device=x.device, dtype=torch.float32) for _ in range(2))


def _group_norm_silu_native(x, weight, bias, add, num_groups, eps, silu):
    y = registry.extension().group_norm_silu(x.contiguous(memory_format=memory_format(x)), weight, bias, add,
                                             num_groups, eps, silu)
    return y, *_empty_stats(x, num_groups)  # forward-only: calls autograd records never reach it


def _group_norm_silu_triton(x, weight, bias, add, num_groups, eps, silu):
    return _group_norm_silu_fwd(x, weight, bias, num_groups, eps, add, silu)


def _group_norm_silu_reference(x, weight, bias, add, num_groups, eps, silu):
    return group_norm_silu_ref(x, weight, bias, num_groups, eps, add, silu), *_empty_stats(x, num_groups)


def _per_channel_backward(x, weight, bias, add, *rest) -> bool:
    """The fused backward is per channel: a per-sample affine under autograd takes the reference."""
    return weight is None or weight.dim() == 1 or not registry.needs_grad(x, weight, bias, add)


# The op's outputs are (y, mean, rstd): the statistics (N * G,) fp32 the Triton backward reads. On the CPU the
# extension's forward kernel (csrc/group_norm_silu_cpu.cpp) runs the calls autograd does not record.
GROUP_NORM_SILU = registry.Op(
    "group_norm_silu", {"cuda": ("triton", "torch"), "cpu": ("native", "triton", "torch")},
    kernels={"triton": _group_norm_silu_triton, "native": _group_norm_silu_native},
    reference=_group_norm_silu_reference, takes={"triton": _per_channel_backward}, forward_only=("native",))


def _group_norm_silu_kernels(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                             add: torch.Tensor | None, num_groups: int, eps: float,
                             silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return GROUP_NORM_SILU.implementation(x, weight, bias, add, num_groups, eps, silu)


_group_norm_silu_op = GROUP_NORM_SILU.bind(_group_norm_silu_kernels)


@_group_norm_silu_op.register_fake
def _(x, weight, bias, add, num_groups, eps, silu):
    return torch.empty_like(x, memory_format=memory_format(x)), *_empty_stats(x, num_groups)


@torch.library.custom_op("ddpm_fast::group_norm_silu_backward", mutates_args=())
def _group_norm_silu_backward_op(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                                 bias: torch.Tensor | None, add: torch.Tensor | None, mean: torch.Tensor,
                                 rstd: torch.Tensor, num_groups: int, silu: bool) -> list[torch.Tensor]:
    """[dx, dweight, dbias, dadd]; an absent input's gradient is an empty tensor."""
    grads = _group_norm_silu_bwd(grad_y, x, weight, bias, add, mean, rstd, num_groups, silu)
    return [g if g is not None else x.new_empty(0) for g in grads]


@_group_norm_silu_backward_op.register_fake
def _(grad_y, x, weight, bias, add, mean, rstd, num_groups, silu):
    return [torch.empty_like(x, memory_format=memory_format(x))] + [
        torch.empty_like(t) if t is not None else x.new_empty(0) for t in (weight, bias, add)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, add, num_groups, _eps, silu = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, add, mean, rstd)
    ctx.config = (num_groups, silu)


def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, bias, add, mean, rstd = ctx.saved_tensors
    grads = torch.ops.ddpm_fast.group_norm_silu_backward(grad_y, x, weight, bias, add, mean, rstd, *ctx.config)
    dx, dweight, dbias, dadd = (g if src is not None else None for g, src in zip(grads, (x, weight, bias, add),
                                                                                 strict=True))
    return dx, dweight, dbias, dadd, None, None, None


_group_norm_silu_op.register_autograd(_backward, setup_context=_setup_context)


def _validate(x, weight, bias, num_groups, add):
    if not torch.is_tensor(x) or x.dim() != 4 or not x.is_floating_point():
        desc = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"group_norm_silu: x must be a floating (N, C, H, W) tensor, got {desc}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"group_norm_silu: x must be float32, float16 or bfloat16, got {x.dtype}")
    _validate_params(x.shape, x.device, weight, bias, num_groups, add)


def _validate_params(shape, device, weight, bias, num_groups, add, op="group_norm_silu"):
    """The checks of everything but x, for an input of ``shape`` on ``device``."""
    n, c, h, w = shape
    if h * w == 0 or c == 0:
        # No statistics exist over an empty group (torch raises, a kernel would write nothing): one answer.
        raise ValueError(f"{op}: x has shape {tuple(shape)}; C and H*W must be positive")
    if num_groups < 1 or c % num_groups:
        raise ValueError(f"{op}: {c} channels are not divisible by num_groups={num_groups}")
    if (weight is None) != (bias is None):
        raise ValueError(f"{op}: give both weight and bias, or neither")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (p.shape not in ((c,), (n, c)) or p.device != device or p.shape != weight.shape):
            raise ValueError(f"{op}: {name} must have shape ({c},), or ({n}, {c}) per sample, like the "
                             f"weight, on {device}; got {tuple(p.shape)} on {p.device}")
    if add is not None and (add.shape != (n, c) or add.device != device):
        raise ValueError(f"{op}: add must have shape ({n}, {c}) on {device}, got {tuple(add.shape)}")


def group_norm_silu(x, weight, bias, num_groups: int, eps: float = 1e-6, add=None, silu: bool = True):
    """SiLU(GroupNorm(x + add[:, :, None, None])) on the backend the registry chose for x's device."""
    _validate(x, weight, bias, num_groups, add)
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"group_norm_silu: eps must be positive and finite, got {eps}")
    return GROUP_NORM_SILU(x, weight, bias, add, int(num_groups), float(eps), bool(silu))[0]


def _group_norm_silu_cat_native(x, x2, weight, bias, add, num_groups, eps, silu):
    cl = torch.channels_last
    return registry.extension().group_norm_silu_cat(x.contiguous(memory_format=cl), x2.contiguous(memory_format=cl),
                                                    weight, bias, add, num_groups, eps, silu)


def _group_norm_silu_cat_reference(x, x2, weight, bias, add, num_groups, eps, silu):
    return group_norm_silu(torch.cat([x, x2], dim=1), weight, bias, num_groups, eps, add, silu)


# The joined kernel: fp32 or bf16 on a CPU, forward-only (csrc/group_norm_silu_cpu.cpp).
GROUP_NORM_SILU_CAT = registry.Op(
    "group_norm_silu_cat", {"cuda": ("torch",), "cpu": ("native", "torch")},
    kernels={"native": _group_norm_silu_cat_native}, reference=_group_norm_silu_cat_reference,
    takes={"native": lambda x, x2, *rest: x.dtype == x2.dtype and x.dtype in (torch.float32, torch.bfloat16)},
    forward_only=("native",))


def joins_in_place(x: torch.Tensor, x2: torch.Tensor) -> bool:
    """Whether ``group_norm_silu_cat(x, x2, ...)`` reads the two inputs in place (the native kernel: fp32 or bf16 on
    a CPU, no autograd) instead of making their concatenation."""
    return x2.device == x.device and GROUP_NORM_SILU_CAT.route(x, x2) == "native"


def _group_norm_silu_cat_kernel(x: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor | None,
                                bias: torch.Tensor | None, add: torch.Tensor | None, num_groups: int, eps: float,
                                silu: bool) -> torch.Tensor:
    return GROUP_NORM_SILU_CAT.implementation(x, x2, weight, bias, add, num_groups, eps, silu)


_group_norm_silu_cat_op = GROUP_NORM_SILU_CAT.bind(_group_norm_silu_cat_kernel)


@_group_norm_silu_cat_op.register_fake
def _(x, x2, weight, bias, add, num_groups, eps, silu):
    n, c1, h, w = x.shape
    return x.new_empty((n, c1 + x2.shape[1], h, w)).contiguous(memory_format=torch.channels_last)


def group_norm_silu_cat(x, x2, weight, bias, num_groups: int, eps: float = 1e-6, add=None, silu: bool = True):
    """``group_norm_silu(torch.cat([x, x2], 1), ...)``: a U-Net decoder block's first norm over its input and the
    skip it joins. Where ``joins_in_place`` the native kernel reads both in place and writes the normalized
    concatenation (channels_last), the same bits as the kernel on the concatenated tensor with one copy of it
    fewer; elsewhere the concatenation and group_norm_silu."""
    for name, t in (("x", x), ("x2", x2)):
        if not torch.is_tensor(t) or t.dim() != 4:
            desc = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
            raise ValueError(f"group_norm_silu_cat: {name} must be an (N, C, H, W) tensor, got {desc}")
    if x.shape[0] != x2.shape[0] or x.shape[2:] != x2.shape[2:] or x.dtype != x2.dtype or x.device != x2.device:
        raise ValueError(f"group_norm_silu_cat: x {tuple(x.shape)} {x.dtype} on {x.device} and x2 {tuple(x2.shape)} "
                         f"{x2.dtype} on {x2.device} must differ only in their channels")
    args = (x, x2, weight, bias, add, int(num_groups), float(eps), bool(silu))
    if GROUP_NORM_SILU_CAT.route(*args) == "native":
        n, c1, h, w = x.shape
        _validate_params((n, c1 + x2.shape[1], h, w), x.device, weight, bias, num_groups, add, "group_norm_silu_cat")
        if not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"group_norm_silu_cat: eps must be positive and finite, got {eps}")
    return GROUP_NORM_SILU_CAT(*args)


def group_norm_scale_shift_silu_ref(x, weight, bias, num_groups: int, eps: float, scale, shift, silu: bool = True):
    """Pure-torch definition of ADM's scale-shift norm: SiLU(GroupNorm(x) * (1 + scale) + shift), scale and shift
    (N, C); fp32 statistics and arithmetic, the result in x's dtype and memory format."""
    h = F.group_norm(x.float(), num_groups, weight.float(), bias.float(), eps)
    h = h * (1 + scale.float()[:, :, None, None]) + shift.float()[:, :, None, None]
    if silu:
        h = F.silu(h)
    return h.to(x.dtype).contiguous(memory_format=memory_format(x))


def group_norm_scale_shift_silu(x, weight, bias, num_groups: int, eps: float, scale, shift, silu: bool = True):
    """SiLU(GroupNorm(x) * (1 + scale) + shift) in one pass over x: (norm * w + b)(1 + s) + shift is the
    per-sample affine w(1 + s), b(1 + s) + shift, folded here in fp32 ((N, C): tiny) and applied by the kernel."""
    n, c = x.shape[:2] if torch.is_tensor(x) and x.dim() == 4 else (None, None)
    for name, t in (("scale", scale), ("shift", shift)):
        if not torch.is_tensor(t) or t.shape != (n, c):
            desc = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
            raise ValueError(f"group_norm_scale_shift_silu: {name} must have shape ({n}, {c}), got {desc}")
    if weight is None or bias is None:
        raise ValueError("group_norm_scale_shift_silu: weight and bias are required")
    gain = 1 + scale.float()
    return group_norm_silu(x, weight.float()[None] * gain, bias.float()[None] * gain + shift.float(), num_groups, eps,
                           silu=silu)
