"""Fused ops and the one backend switch.

DDPM_FAST_BACKEND = auto | triton | cuda | torch, resolved per call from the tensor's device by
``resolve_backend``:
- torch: the pure-PyTorch ``<op>_ref`` in each op's file; the definition of correct, runs anywhere.
- triton: the op's Triton kernel; on a CUDA device, or on the CPU under TRITON_INTERPRET=1.
- cuda: the compiled extension ddpm_fast._C (its CUDA kernels on a GPU, its C++ kernels on the CPU).
- auto: on a CUDA device, cuda then triton then torch, per op by what it implements and what this
  build has, with one warning if it has to fall back to torch; on the CPU, the extension's C++ kernel
  where the op has one (its ``implemented`` tuple is per device: a kernel the
  extension has for the CPU only is listed for the CPU only), else torch.
An explicit backend that cannot run here raises. Ops that do not implement the requested backend
use the next one in auto's order (an op without a cuda kernel runs its triton kernel).

Every Triton launch goes through ``launch``. With DDPM_FAST_RECORD_LAUNCHES=FILE it appends each distinct
variant (kernel, argument types, constexprs, the JIT's integer and alignment specializations, computed by
Triton's own specializer) to FILE: CI runs the tests that way and compiles exactly those variants for
sm_80 and sm_90 (tests/compile_kernels.py), so what the code really launches is what gets compiled.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import os
import threading
import warnings

import torch

BACKENDS = ("auto", "triton", "cuda", "torch")
_FALLBACK_ORDER = ("cuda", "triton", "torch")

_state = threading.local()
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _load_extension():
    try:
        from ddpm_fast import _C
    except ImportError as exc:
        _warn_once(
            "ext",
            f"ddpm_fast: the compiled extension ddpm_fast._C is not available ({exc}); "
            "native kernels are disabled. Reinstall with `pip install --no-build-isolation .`",
        )
        return None
    return _C


_C = _load_extension()


def needs_grad(*tensors) -> bool:
    """Whether autograd records a call on these tensors (the C++ CPU kernels are forward-only)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """channels_last for a dense NHWC 4-D tensor, else contiguous_format (what kernels preserve)."""
    nhwc = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


_recorded: set[str] = set()
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def launch(kernel, grid, *args, **meta):
    """kernel[grid](*args, **meta), recording the variant when DDPM_FAST_RECORD_LAUNCHES names a file."""
    path = os.environ.get("DDPM_FAST_RECORD_LAUNCHES")
    if path:
        _record_launch(path, kernel, args, meta)
    return kernel[grid](*args, **meta)


def _record_launch(path, kernel, args, meta) -> None:
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    fn = getattr(kernel, "fn", kernel)
    names = list(inspect.signature(fn).parameters)
    constexprs = dict(meta)
    options = {k: constexprs.pop(k) for k in _LAUNCH_OPTIONS if k in constexprs}
    signature, attrs = {}, {}
    for name, arg in zip(names, args, strict=False):
        kind, spec = native_specialize_impl(BaseBackend, arg, False, True, True)[:2]
        if kind == "constexpr":
            constexprs[name] = spec if spec is not None else arg
        else:
            signature[name] = kind
            if spec:
                attrs[name] = spec
    for name in constexprs:
        signature[name] = "constexpr"
    line = json.dumps({"kernel": f"{fn.__module__}:{fn.__name__}", "signature": signature,
                       "constexprs": constexprs, "attrs": attrs, "options": options}, sort_keys=True)
    if line not in _recorded:
        _recorded.add(line)
        with open(path, "a") as f:  # one short line per write: safe to share between processes
            f.write(line + "\n")


def extension():
    """The compiled module ddpm_fast._C, or None when this install has none."""
    return _C


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), so bf16 convolutions and GEMMs run on
    oneDNN's fast kernels; without it they take slow generic code, far slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without this query: ask the CPU's flags
        try:
            with open("/proc/cpuinfo") as f:
                flags = f.read()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_backend() -> str:
    name = getattr(_state, "override", None) or os.environ.get("DDPM_FAST_BACKEND", "auto")
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"DDPM_FAST_BACKEND={name!r} is not one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run a block with a given backend (tests and benchmarks compare backends with this)."""
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {BACKENDS}")
    previous = getattr(_state, "override", None)
    _state.override = name
    try:
        yield
    finally:
        _state.override = previous


def backend_unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on ``device`` in this install, else why not."""
    if backend == "torch":
        return None
    if backend == "triton":
        if not triton_available():
            return "triton is not installed"
        if device.type != "cuda" and not triton_interpreting():
            return f"triton kernels need a CUDA device (or TRITON_INTERPRET=1), tensors are on {device}"
        return None
    if backend == "cuda":
        if _C is None:
            return "the extension ddpm_fast._C is not built"
        if device.type == "cuda" and not _C.with_cuda():
            return "ddpm_fast._C was built without its CUDA sources"
        if device.type not in ("cuda", "cpu"):
            return f"no native kernels for device {device}"
        return None
    raise ValueError(f"unknown backend {backend!r}")


def resolve_backend(op: str, device: torch.device, implemented: tuple[str, ...]) -> str:
    """Pick the backend for one call of ``op`` on ``device``; ``implemented`` lists what the op has on
    that device (an op with C++ CPU kernels but no CUDA kernel lists "cuda" for the CPU only)."""
    requested = requested_backend()
    if requested == "auto":
        if device.type != "cuda":
            native = "cuda" in implemented and backend_unavailable_reason("cuda", device) is None
            return "cuda" if native else "torch"
        for cand in _FALLBACK_ORDER:
            if cand in implemented and backend_unavailable_reason(cand, device) is None:
                if cand == "torch":
                    _warn_once("auto-torch", "ddpm_fast: no fused kernels usable on this GPU install; "
                                             "running the torch reference ops")
                return cand
        return "torch"
    why = backend_unavailable_reason(requested, device)
    if why is not None:
        raise RuntimeError(f"DDPM_FAST_BACKEND={requested} cannot run {op}: {why}")
    order = _FALLBACK_ORDER[_FALLBACK_ORDER.index(requested):]
    for cand in order:
        if cand in implemented and backend_unavailable_reason(cand, device) is None:
            return cand
    return "torch"


from ddpm_fast.ops.group_norm_silu import group_norm_silu, group_norm_silu_ref  # noqa: E402
from ddpm_fast.ops.q_sample import q_sample, q_sample_ref  # noqa: E402
from ddpm_fast.ops.residual_add import residual_add, residual_add_ref  # noqa: E402
from ddpm_fast.ops.reverse_step import COEF_COLUMNS, reverse_step, reverse_step_ref  # noqa: E402

__all__ = [
    "BACKENDS",
    "COEF_COLUMNS",
    "backend_unavailable_reason",
    "cpu_has_native_bf16",
    "extension",
    "launch",
    "memory_format",
    "group_norm_silu",
    "group_norm_silu_ref",
    "q_sample",
    "q_sample_ref",
    "residual_add",
    "residual_add_ref",
    "resolve_backend",
    "reverse_step",
    "reverse_step_ref",
    "use_backend",
]
