"""Shared test setup: seeding, the GPU marker, the Triton interpreter on CPU-only machines."""

import os
import random
import tempfile

import numpy as np
import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when ddpm_fast.ops is imported:
# set it before any test module imports the package.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Record every Triton variant the tests launch (subprocesses inherit it); test_triton_compile.py, run
    # last, compiles exactly those for sm_80 and sm_90.
    os.environ.setdefault("DDPM_FAST_RECORD_LAUNCHES",
                          os.path.join(tempfile.mkdtemp(prefix="ddpm_fast_launches_"), "launches.jsonl"))


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    # The AOT compile check reads what the other tests launched: it runs last.
    items.sort(key=lambda item: item.fspath.basename == "test_triton_compile.py")
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def randomize_(module: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Fresh random values in every parameter (the zero-initialised outputs would hide bugs)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def diffusers_peer(module: str = "diffusers"):
    """The outside reference, HuggingFace diffusers. Skips where it is not installed (the GPU image),
    unless DDPM_FAST_REQUIRE_DIFFUSERS=1 (CI), where a missing peer is a failure, never a silent skip."""
    if os.environ.get("DDPM_FAST_REQUIRE_DIFFUSERS") == "1":
        import importlib

        return importlib.import_module(module)
    return pytest.importorskip(module)


@pytest.fixture(params=["avx512", "portable"])
def cpu_loops(request):
    """Run a test with the C++ kernels' AVX-512 intrinsics loops (SiLU's, the Winograd GEMM; skipped on a CPU
    without AVX-512F) or with their portable forms (plain C++, at::bmm)."""
    from ddpm_fast import ops

    native = ops.extension()
    if native is None:
        pytest.skip("the extension ddpm_fast.ops._C is not built")
    before = native.cpu_avx512()
    if request.param == "avx512" and not before:
        pytest.skip("this CPU has no AVX-512F (or its loops were turned off)")
    native.cpu_avx512(request.param == "avx512")
    yield request.param
    native.cpu_avx512(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 random 8x8 RGB uint8 images in an .npz: training data for the tiny preset."""
    path = tmp_path_factory.mktemp("data") / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(path, arr_0=rng.integers(0, 256, (24, 8, 8, 3), dtype=np.uint8))
    return str(path)
