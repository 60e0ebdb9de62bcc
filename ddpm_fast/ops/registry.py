"""The one registry that picks each fused op's implementation, and the launcher every Triton kernel goes through.

Each op (group_norm_silu, residual_add, q_sample, reverse_step, vb_terms, conv3x3; one file each) has up to four
implementations, named by backend:
- torch: the pure-PyTorch ``<op>_ref`` in the op's file; the definition of correct, runs anywhere.
- triton: the op's Triton kernel; on a CUDA device, or on the CPU under TRITON_INTERPRET=1.
- native: the compiled extension ddpm_fast.ops._C (its CUDA kernels on a GPU, its C++ kernels on a CPU).
- auto (the default): on a CUDA device native, then triton, then torch, by what the op implements and
  this build has (one warning when it comes down to torch); on a CPU the native C++ kernel where the op
  has one, else torch.
Each op declares itself once as an ``Op`` (its backends per device type, a kernel per backend, the reference,
the calls each kernel takes), and ``Op`` routes every call. The kernel backends run as ``torch.library`` custom
ops (``torch.ops.ddpm_fast.<op>``: mutations declared, fake implementations), so torch.compile traces through
them and CUDA graphs capture them; the torch backend is plain torch code that autograd and torch.compile see
directly.

The choice is made once per (op, device type): from DDPM_FAST_BACKEND when the package is imported, or
when the user switches (``set_backend``, or ``use_backend`` for a block). An explicit backend that
cannot run an op on a device raises the first time the op runs there; an op that lacks the requested
kernel takes the next one in auto's order. ``cuda``, the old name of ``native``, is accepted with one
warning.

Every Triton launch goes through ``launch``. With DDPM_FAST_RECORD_LAUNCHES=FILE (read at import) it appends
each distinct variant (kernel, argument types, constexprs, the JIT's integer and alignment specializations,
computed by Triton's own specializer) to FILE: CI runs the tests that way and compiles exactly those
variants for sm_80 and sm_90 (tests/compile_kernels.py), so what the code really launches is what gets
compiled.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import json
import os

import torch

from ddpm_fast.base import warn_once

BACKENDS = ("auto", "triton", "native", "torch")
ALIASES = {"cuda": "native"}  # the old name: it also meant the C++ CPU kernels
_FALLBACK_ORDER = ("native", "triton", "torch")


def _load_extension():
    try:
        _C = importlib.import_module("ddpm_fast.ops._C")  # not `from ddpm_fast.ops import`: ops is mid-import
    except ImportError as exc:
        warn_once("ext", f"ddpm_fast: the compiled extension ddpm_fast.ops._C is not available ({exc}); "
                         "native kernels are disabled. Reinstall with `pip install --no-build-isolation .`")
        return None
    return _C


_C = _load_extension()
BACKEND_ENV, RECORD_ENV = "DDPM_FAST_BACKEND", "DDPM_FAST_RECORD_LAUNCHES"
_RECORD_LAUNCHES = os.environ.get(RECORD_ENV) or None
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # triton itself reads it once, at import


def needs_grad(*tensors) -> bool:
    """Whether autograd records a call on these tensors (the native kernels are forward-only)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_recorded: set[str] = set()
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def launch(kernel, grid, *args, **meta):
    """kernel[grid](*args, **meta), recording the variant when DDPM_FAST_RECORD_LAUNCHES names a file."""
    if _RECORD_LAUNCHES:
        _record_launch(_RECORD_LAUNCHES, kernel, args, meta)
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
        try:
            with open(path, "a") as f:  # one short line per write: safe to share between processes
                f.write(line + "\n")
        except OSError as exc:
            raise OSError(f"{RECORD_ENV}={path}: cannot append the launch record ({exc.strerror or exc})") from None


def extension():
    """The compiled module ddpm_fast.ops._C, or None when this install has none."""
    return _C


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), so bf16 convolutions and GEMMs run on
    oneDNN's fast kernels; without it they take emulated or generic code, slower than fp32. (oneDNN's own
    ``_is_mkldnn_bf16_supported`` is true on any AVX-512 CPU, where it emulates bf16: not this question.)"""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(probe is not None for probe in probes):
        return any(bool(probe()) for probe in probes)
    try:  # a torch without these queries: ask the CPU's flags
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The CPU's flags as /proc/cpuinfo lists them (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16_is_faster() -> bool:
    """Whether bf16 convolutions outrun the fp32 fast path on this CPU, so ``--fp16`` (asking for speed) runs bf16.

    A rule on the CPU's flags, not a timing probe (the same command must give the same images on one machine):
    - AMX-BF16: tiles, several times fp32's rate (2.9-3.8 TFLOP/s against ~0.43 on a 2-core Xeon);
    - AVX512-BF16 on a core without AVX512-FP16 (AMD Zen 4/5, Intel Cooper Lake): the bf16 dot product at twice
      fp32's FMA rate (473 against 232 GFLOP/s on a 2-core EPYC);
    - AVX512-BF16 on a core with AVX512-FP16 but no AMX in sight (Sapphire Rapids and later with AMX hidden, as
      in some virtual machines): there the bf16 dot product issues at half fp32's FMA rate, and oneDNN's bf16
      convolution reaches about half of fp32's (200 against 390 GFLOP/s on a 2-core Xeon; benchmarks/RESULTS.md);
    - no native bf16: emulated, far slower.
    """
    if not cpu_has_native_bf16():
        return False
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if amx is not None and bool(amx()):
        return True
    flags = _cpu_flags()
    return "amx_bf16" in flags or "avx512_fp16" not in flags


def cpu_half_dtype() -> torch.dtype:
    """The fast path's dtype for ``--fp16`` on this CPU: bf16 where it is faster (``cpu_bf16_is_faster``), else
    fp32 (never fp16: CPUs have no fast fp16 arithmetic)."""
    return torch.bfloat16 if cpu_bf16_is_faster() else torch.float32


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return _TRITON_INTERPRET


def _canonical(name: str) -> str:
    name = str(name).strip().lower()
    if name in ALIASES:
        warn_once(f"alias-{name}", f"ddpm_fast: backend {name!r} is now called {ALIASES[name]!r}", stacklevel=4)
        name = ALIASES[name]
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {BACKENDS}")
    return name


class _Registry:
    """What each op implements per device type, and the backend chosen for each (op, device type)."""

    def __init__(self):
        self.implemented: dict[str, dict[str, tuple[str, ...]]] = {}
        self.requested = "auto"
        self.chosen: dict[tuple[str, str], str] = {}
        self.bad_environment: str | None = None  # why DDPM_FAST_BACKEND was not taken

    def request(self, name: str) -> None:
        self.requested = name
        self.chosen.clear()

    def backend(self, op: str, device_type: str) -> str:
        key = (op, device_type)
        chosen = self.chosen.get(key)
        if chosen is None:
            chosen = self.chosen[key] = self._choose(op, device_type)
        return chosen

    def _choose(self, op: str, device_type: str) -> str:
        if self.bad_environment:
            warn_once("env-backend", self.bad_environment, stacklevel=5)
        have = self.implemented[op].get(device_type, ("torch",))
        device = torch.device(device_type)
        if self.requested == "auto":
            order = _FALLBACK_ORDER if device_type == "cuda" else ("native", "torch")
            for cand in order:
                if cand in have and backend_unavailable_reason(cand, device) is None:
                    if cand == "torch" and device_type == "cuda":
                        warn_once("auto-torch", "ddpm_fast: no fused kernels usable on this GPU install; "
                                                "running the torch reference ops")
                    return cand
            return "torch"
        why = backend_unavailable_reason(self.requested, device)
        if why is not None:
            raise RuntimeError(f"DDPM_FAST_BACKEND={self.requested} cannot run {op}: {why}")
        for cand in _FALLBACK_ORDER[_FALLBACK_ORDER.index(self.requested):]:
            if cand in have and backend_unavailable_reason(cand, device) is None:
                return cand
        return "torch"


_registry = _Registry()


def register(op: str, implemented: dict[str, tuple[str, ...]]) -> None:
    """Declare the backends ``op`` implements per device type (each op file does this once)."""
    _registry.implemented[op] = implemented


def _constant_result(fn):
    """What torch.compiler.assume_constant_result does (mark ``fn`` so that torch.compile takes its result as a
    constant), without importing torch._dynamo when the package is imported: that import is about a second of
    every CLI start. tests/test_compile.py compiles the fast U-Net with fullgraph=True, so a torch that reads
    another mark fails there."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_result
def backend_for(op: str, device: torch.device | str) -> str:
    """The backend ``op`` runs on tensors of ``device`` (chosen once per device type). torch.compile takes the
    answer as a constant of the graph it traces: a compiled model keeps the backends it was compiled with."""
    return _registry.backend(op, device.type if isinstance(device, torch.device) else torch.device(device).type)


def _tensors(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (b for b in a if isinstance(b, torch.Tensor))


class Op:
    """One fused op, registered once: what it implements per device type, its implementation per backend, and
    how a call is routed among them. Every call of the op goes through ``route``; nothing in an op's file
    branches on the backend a second time.

    ``kernels``: backend -> function of the registered op's arguments returning its outputs. ``reference``: the
    same outputs from the op's pure-torch ``_ref`` (the torch backend, and what the registered op runs after a
    switch to torch under a compiled graph). ``takes``: backend -> predicate on the arguments, the calls that
    backend's kernel can take (the others run the reference: a capability of the op, e.g. the C++ residual_add
    adds tensors of one dtype). ``forward_only``: backends without a backward, whose calls autograd records run
    the reference. ``bind`` makes the registered torch op (``torch.ops.ddpm_fast.<name>``) from the annotated
    function that declares its schema.
    """

    def __init__(self, name: str, implemented: dict[str, tuple[str, ...]], kernels: dict, reference, *,
                 takes: dict | None = None, forward_only=()):
        self.name = name
        self.kernels = dict(kernels)
        self.reference = reference
        self.takes = dict(takes or {})
        self.forward_only = frozenset(forward_only)
        self.registered = None
        register(name, implemented)

    def bind(self, schema_fn, mutates_args=(), name: str | None = None):
        """The registered op ``ddpm_fast::<name>``, its implementation ``implementation`` under ``schema_fn``'s
        signature; returned so that the op's file registers its fake and autograd on it."""
        self.registered = torch.library.custom_op(f"ddpm_fast::{name or self.name}", schema_fn,
                                                  mutates_args=mutates_args)
        return self.registered

    def route(self, *args) -> str:
        """The backend that runs this call: the one chosen for its device, unless that backend has no kernel
        for these arguments (``takes``) or no backward for a call autograd records (``forward_only``)."""
        device = next(_tensors(args)).device
        backend = backend_for(self.name, device)
        if backend not in self.kernels:
            return "torch"
        if backend in self.forward_only and needs_grad(*_tensors(args)):
            return "torch"
        takes = self.takes.get(backend)
        if takes is not None and not takes(*args):
            return "torch"
        return backend

    def implementation(self, *args):
        """What the registered op runs: the routed backend's kernel (the reference where routed there)."""
        return self.kernels.get(self.route(*args), self.reference)(*args)

    def __call__(self, *args):
        """A call from the op's public function. The reference runs as plain torch code (autograd and
        torch.compile see it directly); a kernel through the registered op while torch.compile traces or
        autograd records (both need it), directly otherwise: eager inference then skips the dispatcher's
        ~10 us a call (a few percent of a small U-Net's forward on a CPU)."""
        backend = self.route(*args)
        if backend == "torch":
            return self.reference(*args)
        if torch.compiler.is_compiling() or needs_grad(*_tensors(args)):
            return self.registered(*args)
        return self.kernels[backend](*args)


def requested_backend() -> str:
    return _registry.requested


def set_backend(name: str) -> None:
    """Choose the backend for every op (DDPM_FAST_BACKEND's values); choices are remade on next use."""
    _registry.request(_canonical(name))


@contextlib.contextmanager
def use_backend(name: str):
    """Run a block with a given backend (tests and benchmarks compare backends with this)."""
    name = _canonical(name)
    previous = _registry.requested
    _registry.request(name)
    try:
        yield
    finally:
        _registry.request(previous)


def backend_unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on ``device`` in this install, else why not."""
    backend = _canonical(backend)
    if backend in ("torch", "auto"):
        return None
    if backend == "triton":
        if not triton_available():
            return "triton is not installed"
        if device.type != "cuda" and not triton_interpreting():
            return f"triton kernels need a CUDA device (or TRITON_INTERPRET=1), tensors are on {device}"
        return None
    if _C is None:
        return "the extension ddpm_fast.ops._C is not built"
    if device.type == "cuda" and not _C.with_cuda():
        return "ddpm_fast.ops._C was built without its CUDA sources"
    if device.type not in ("cuda", "cpu"):
        return f"no native kernels for device {device}"
    return None


def environment_problem(device=None) -> str | None:
    """What is wrong with this process's DDPM_FAST_* variables (on ``device``, when given), one line, or None. The
    commands ask before any work; importing the package never fails on them (a bad value warns and runs auto)."""
    raw = os.environ.get(BACKEND_ENV)
    if raw is not None:
        try:
            name = _canonical(raw)
        except ValueError:
            return f"{BACKEND_ENV}={raw!r} is not a backend; set one of {', '.join(BACKENDS)} (or unset it: auto)"
        if device is not None:
            why = backend_unavailable_reason(name, torch.device(device))
            if why is not None:
                return f"{BACKEND_ENV}={name} cannot run on {torch.device(device)}: {why}"
    if _RECORD_LAUNCHES:
        folder = os.path.dirname(os.path.abspath(_RECORD_LAUNCHES))
        if not os.path.isdir(folder):
            return f"{RECORD_ENV}={_RECORD_LAUNCHES}: its folder {folder} does not exist"
    return None


def _backend_from_environment() -> str:
    """DDPM_FAST_BACKEND, or auto for a bad value: the first op then warns once (commands refuse it first)."""
    raw = os.environ.get(BACKEND_ENV, "auto")
    try:
        return _canonical(raw)
    except ValueError:
        _registry.bad_environment = f"ddpm_fast: {BACKEND_ENV}={raw!r} is not one of {BACKENDS}; using auto"
        return "auto"


set_backend(_backend_from_environment())
