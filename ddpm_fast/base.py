"""The bottom layer every other module may import: tensor-layout helpers and one-time notices.

Imports only torch, so ops/, noise.py and the model code can share these without importing each other.
"""

from __future__ import annotations

import warnings

import torch

_warned: set[str] = set()


def warn_once(key: str, msg: str, stacklevel: int = 3) -> None:
    """One RuntimeWarning per ``key`` for the life of the process (fallbacks and substitutions)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel)


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """channels_last for a dense NHWC 4-D tensor, else contiguous_format (what kernels preserve)."""
    nhwc = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format
