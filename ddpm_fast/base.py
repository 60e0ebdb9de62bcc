"""The bottom layer every other module may import: tensor-layout helpers and one-time notices.

Imports only torch, so ops/, noise.py and the model code can share these without importing each other.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

_warned: set[str] = set()


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and the problem."""


def warn_once(key: str, msg: str, stacklevel: int = 3) -> None:
    """One RuntimeWarning per ``key`` for the life of the process (fallbacks and substitutions)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel)


KEEP_FREED_MEMORY_ENV = "DDPM_FAST_KEEP_FREED_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_KEPT_BYTES = (1 << 30, 32 << 20)  # asked for in turn: glibc refuses an mmap threshold above its heap size / 2


def keep_freed_memory() -> bool:
    """Have the C allocator keep freed memory for reuse instead of handing it back to the OS: glibc's malloc
    (Linux) serves blocks up to 1 GB from its heap and trims the heap only past 1 GB free. A U-Net forward frees
    and allocates its activations each call; with glibc's defaults the large ones are unmapped or trimmed when
    freed, so each call page-faults them in again, zeroed by the kernel: about 3,700 faults per digits forward at
    batch 64 on a CPU, 8% of its time (benchmarks/RESULTS.md). The cost: the process's resident memory stays at
    its peak. The CLIs call this at start; ``DDPM_FAST_KEEP_FREED_MEMORY=0`` leaves the allocator as it is. From
    Python, call it once. Returns whether it applied (False off glibc, or when turned off)."""
    setting = os.environ.get(KEEP_FREED_MEMORY_ENV, "1")
    if setting not in ("0", "1"):
        raise ValueError(f"{KEEP_FREED_MEMORY_ENV} must be 0 or 1, got {setting!r}")
    if setting == "0" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # musl's mallopt is a stub that returns 0: False, nothing changed.
    if not any(mallopt(_M_MMAP_THRESHOLD, size) for size in _KEPT_BYTES):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, _KEPT_BYTES[0]))


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """channels_last for a dense NHWC 4-D tensor, else contiguous_format (what kernels preserve)."""
    nhwc = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


# ---- what a U-Net config would cost, before anything is allocated -------------------------------------


def machine_memory_bytes() -> int:
    """This machine's physical memory (what a model built on it must fit in)."""
    import os

    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def unet_cost(resolutions, channels, num_res_blocks: int, attention, temb_dim: int) -> tuple[float, float]:
    """(parameters, fp32 activation bytes of one image's forward) of a DDPM/ADM-shaped U-Net, estimated
    within tens of percent from its levels (resolution, channels, attention?) alone: the down path's
    ``num_res_blocks`` and the up path's ``num_res_blocks + 1`` ResBlocks (two 3x3 convs, a time projection,
    the up path's skip-concatenated input), attention (4 c^2; scores (HW)^2), resampling convs, the middle;
    activations: the skips the up path keeps, a few working tensors at full size, one attention score map."""
    params = 1.25 * temb_dim * temb_dim  # the time MLP (ch -> temb_dim -> temb_dim, temb_dim = 4 ch)
    act = 0.0
    levels = len(channels)
    for i, (res, c, attn) in enumerate(zip(resolutions, channels, attention, strict=True)):
        c, res, a = float(c), float(res), 4.0 * c * c if attn else 0.0
        params += num_res_blocks * (18 * c * c + temb_dim * c + a)  # down
        params += (num_res_blocks + 1) * (29 * c * c + temb_dim * c + a)  # up: input c + skip
        params += 18 * c * c if i < levels - 1 else 2 * (18 * c * c + temb_dim * c) + 4 * c * c  # resample / mid
        act += 4.0 * res * res * c * (num_res_blocks + 2) + (4.0 * res**4 if attn else 0.0)
    act += 4.0 * 6 * float(resolutions[0]) ** 2 * float(max(channels))
    return params, act


def unet_budget_problem(resolutions, channels, num_res_blocks: int, attention, temb_dim: int,
                        fields: dict[str, object], memory: int | None = None) -> str | None:
    """Why a U-Net of these levels cannot be built on this machine (its fp32 weights, or one image's
    activations, above half its memory), naming ``fields`` (name -> value, as the user wrote them), or None."""
    memory = memory or machine_memory_bytes()
    params, act = unet_cost(resolutions, channels, num_res_blocks, attention, temb_dim)
    names = list(fields)
    if 4 * params > memory / 2:
        what = " with ".join(f"{k} {fields[k]}" for k in names if k != names[-1]) or f"{names[-1]}"
        return (f"{what} make about {params:.3g} parameters ({4 * params / 2**30:,.0f} GiB in fp32), over half of "
                f"this machine's {memory / 2**30:.0f} GiB of memory; not built")
    if act > memory / 2:
        return (f"{names[-1]} {fields[names[-1]]} needs about {act / 2**30:,.0f} GiB of activations for one image, "
                f"over half of this machine's {memory / 2**30:.0f} GiB of memory; not built")
    return None
