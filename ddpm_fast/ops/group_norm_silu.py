"""group_norm_silu: y = SiLU(GroupNorm(x + add[:, :, None, None])) in one pass.

``add`` is the per-sample, per-channel (N, C) time-embedding projection that a DDPM ResBlock adds
before its second norm; silu=False gives plain GroupNorm (attention blocks). Statistics in fp32;
the output keeps the input's dtype and memory format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddpm_fast import ops

_IMPLEMENTED = ("torch",)


def group_norm_silu_ref(x, weight, bias, num_groups: int, eps: float, add=None, silu: bool = True):
    """Pure-torch definition: fp32 statistics, result cast back to x's dtype and memory format."""
    h = x.float()
    if add is not None:
        h = h + add.float()[:, :, None, None]
    h = F.group_norm(h, num_groups, None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if silu:
        h = F.silu(h)
    fmt = torch.channels_last if x.dim() == 4 and _is_channels_last(x) else torch.contiguous_format
    return h.to(x.dtype).contiguous(memory_format=fmt)


def _validate(x, weight, bias, num_groups, add):
    if not torch.is_tensor(x) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"group_norm_silu: x must be a floating (N, C, H, W) tensor, got "
                         f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    n, c = x.shape[:2]
    if num_groups < 1 or c % num_groups:
        raise ValueError(f"group_norm_silu: {c} channels are not divisible by num_groups={num_groups}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != (c,):
            raise ValueError(f"group_norm_silu: {name} must have shape ({c},), got {tuple(p.shape)}")
    if add is not None and add.shape != (n, c):
        raise ValueError(f"group_norm_silu: add must have shape ({n}, {c}), got {tuple(add.shape)}")


def group_norm_silu(x, weight, bias, num_groups: int, eps: float = 1e-6, add=None, silu: bool = True):
    _validate(x, weight, bias, num_groups, add)
    ops.resolve_backend("group_norm_silu", x.device, _IMPLEMENTED)
    return group_norm_silu_ref(x, weight, bias, num_groups, eps, add, silu)


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
