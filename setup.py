"""Build ddpm_fast and its one extension module, ddpm_fast.ops._C.

The C++ sources always build. The CUDA sources build as well when nvcc and a CUDA build of torch are
present, unless DDPM_FAST_SKIP_CUDA=1. Environment pitfalls handled here (see DESIGN.md): torch's CUDA
headers include cusparse.h and friends, which pip's nvidia packages ship outside CUDA_HOME; and torch
may guess CUDA_HOME=/usr/local on machines whose toolkit lives in /usr/local/cuda.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"ddpm_fast setup: {msg}", file=sys.stderr)


def _find_cuda_home():
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def _nvidia_pip_include_dirs():
    """Include folders of pip's nvidia-* packages (cusparse.h, cublas_v2.h, ... live there)."""
    dirs = []
    for site in sys.path:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            dirs += [d for d in glob.glob(os.path.join(site, pattern)) if os.path.isdir(d)]
    return sorted(set(dirs))


def _extensions():
    cuda_home = _find_cuda_home()
    if cuda_home:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    skip_cuda = os.environ.get("DDPM_FAST_SKIP_CUDA", "0") == "1"
    with_cuda = not skip_cuda and cuda_home is not None and torch.version.cuda is not None
    if not skip_cuda and not with_cuda:
        why = "no nvcc found" if cuda_home is None else "torch is a CPU build"
        _log(f"building the C++ part only ({why})")
    elif skip_cuda:
        _log("building the C++ part only (DDPM_FAST_SKIP_CUDA=1)")

    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    # No -std flag: BuildExtension picks the standard the installed torch needs (C++17 or C++20).
    # -fno-trapping-math lets the CPU kernels' float->int conversions (their exp) be vectorized; nothing
    # here relies on floating-point traps. -fopenmp: at::parallel_for is a header template that runs
    # serially unless the extension itself is compiled with OpenMP (it then shares torch's libgomp).
    cxx_flags = ["-O3", "-fno-trapping-math", "-fopenmp"]
    link_flags = ["-fopenmp"]
    define_macros = []
    if with_cuda:
        # Without a GPU to ask, torch would compile for every architecture it knows: pick the
        # ones the engine targets unless the user says otherwise.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        define_macros.append(("DDPM_FAST_WITH_CUDA", "1"))
        ext = CUDAExtension(
            "ddpm_fast.ops._C",
            cpp_sources + sorted(glob.glob("csrc/*.cu")),
            include_dirs=[os.path.join(HERE, "csrc")] + _nvidia_pip_include_dirs(),
            define_macros=define_macros,
            extra_link_args=link_flags,
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "--use_fast_math", "-lineinfo"],
            },
        )
        _log(f"building C++ and CUDA sources (CUDA_HOME={cuda_home}, "
             f"arch list {os.environ['TORCH_CUDA_ARCH_LIST']})")
    else:
        ext = CppExtension(
            "ddpm_fast.ops._C",
            cpp_sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=define_macros,
            extra_link_args=link_flags,
            extra_compile_args={"cxx": cxx_flags},
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
