"""A guard that fails on any device->host read: what code inside a CUDA graph capture must never do.

On a GPU, ``.item()``, ``bool(t)``, ``int(t)``, ``.tolist()``, ``.cpu()``, ``.numpy()``, printing a tensor or an
op whose output shape depends on values (nonzero, masked_select, unique) waits for the device; inside
``torch.cuda.graph`` it is an error. On a CPU the same calls are free and silent, so CPU tests run the
captured code under ``no_host_sync()``, which raises at the first such call made by our code. Calls
made by Triton's interpreter (which runs kernels on CPU tensors through numpy) are allowed: on a GPU
that work is a kernel launch.
"""

from __future__ import annotations

import sys

import torch
from torch.overrides import TorchFunctionMode

_T = torch.Tensor
HOST_READS = {
    _T.item: "Tensor.item()", _T.__bool__: "bool(tensor)", _T.tolist: "Tensor.tolist()",
    _T.__int__: "int(tensor)", _T.__float__: "float(tensor)", _T.__index__: "tensor used as an index/int",
    _T.cpu: "Tensor.cpu()", _T.numpy: "Tensor.numpy()", _T.__array__: "numpy conversion",
    _T.__repr__: "repr(tensor)", _T.__format__: "formatting a tensor", _T.nonzero: "Tensor.nonzero()",
    torch.nonzero: "torch.nonzero", _T.masked_select: "Tensor.masked_select",
    torch.masked_select: "torch.masked_select", torch.unique: "torch.unique", _T.unique: "Tensor.unique",
}


class HostSyncError(AssertionError):
    pass


def _from_triton_interpreter() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name.startswith("triton."):
            return True
        frame = frame.f_back
    return False


class no_host_sync(TorchFunctionMode):
    """``with no_host_sync(): plan.step()`` raises HostSyncError at the first device->host read."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls += 1
        what = HOST_READS.get(func)
        if what is not None and not _from_triton_interpreter():
            raise HostSyncError(f"device->host read inside captured code: {what}")
        return func(*args, **kwargs)
