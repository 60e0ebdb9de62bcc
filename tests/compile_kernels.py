"""Compile every Triton kernel ahead of time for real GPU targets (sm_80, sm_90), no GPU needed.

The interpreter that runs the kernels on a CPU does not type-check them the way the compiler does, nor
specialize integer arguments equal to 1 into constants as the JIT does on a GPU. This script sends each
kernel, in its constexpr variants and with such specializations, through Triton's whole pipeline down to
a cubin (ptxas included). Run in a process without TRITON_INTERPRET; prints one line per failure.
"""

import importlib
import itertools
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile  # noqa: E402

INT64_PTRS = {"INDEX_ptr", "SEED_ptr", "STEP_ptr", "T_ptr"}
FP32_PTRS = {"PART_ptr", "CPART_ptr", "MEAN_ptr", "RSTD_ptr", "DADD_ptr", "NOISE_ptr", "OUT_ptr", "COEF_ptr",
             "A_ptr", "S_ptr", "W_ptr", "B_ptr"}
FLOAT_ARGS = {"eps", "guidance_scale"}


def _signature(fn, dtype, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*i64" if name in INT64_PTRS else "*fp32" if name in FP32_PTRS else f"*{dtype}"
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def variants():
    gn = importlib.import_module("ddpm_fast.ops.group_norm_silu")
    qs = importlib.import_module("ddpm_fast.ops.q_sample")
    rs = importlib.import_module("ddpm_fast.ops.reverse_step")
    ra = importlib.import_module("ddpm_fast.ops.residual_add")
    for dtype, add, cl in itertools.product(("fp16", "bf16", "fp32"), (False, True), (False, True)):
        flags = dict(SPLIT=4, HAS_ADD=add, CHANNELS_LAST=cl, BLOCK_SIZE=1024)
        yield gn._group_norm_stats_kernel, dtype, flags
        yield gn._group_norm_apply_kernel, dtype, dict(flags, HAS_AFFINE=True, SILU=add)
        yield gn._group_norm_single_pass_kernel, dtype, dict(HAS_ADD=add, HAS_AFFINE=True, SILU=add, CHANNELS_LAST=cl,
                                                             BLOCK_SIZE=8192 if cl else 4096)
    yield gn._group_norm_single_pass_kernel, "fp16", dict(HAS_ADD=True, HAS_AFFINE=False, SILU=True,
                                                          CHANNELS_LAST=True, BLOCK_SIZE=1, hw=1, cg=1, group_size=1)
    # integer arguments the JIT specializes to the constant 1 (1x1 spatial, one channel per group, split 1)
    yield gn._group_norm_apply_kernel, "fp16", dict(SPLIT=1, HAS_ADD=True, CHANNELS_LAST=True, BLOCK_SIZE=16,
                                                    HAS_AFFINE=False, SILU=True, hw=1, cg=1, chunk=1)
    for dtype, add, affine, silu in (("fp16", True, True, True), ("bf16", False, True, False),
                                     ("fp32", True, False, True)):
        flags = dict(SPLIT=2, HAS_ADD=add, HAS_AFFINE=affine, SILU=silu, BLOCK_S=64, CG_P2=8)
        yield gn._group_norm_bwd_reduce_kernel, dtype, flags
        yield gn._group_norm_bwd_apply_kernel, dtype, flags
        single = {k: v for k, v in flags.items() if k != "SPLIT"}
        yield gn._group_norm_bwd_single_pass_kernel, dtype, dict(single, BLOCK_S=256, CG_P2=16)
    yield gn._group_norm_bwd_apply_kernel, "fp16", dict(SPLIT=1, HAS_ADD=True, HAS_AFFINE=True, SILU=True,
                                                        BLOCK_S=1, CG_P2=1, hw=1, cg=1)
    for dtype, bias, cl in itertools.product(("fp16", "bf16", "fp32"), (False, True), (False, True)):
        yield ra._residual_add_kernel, dtype, dict(HAS_BIAS=bias, CHANNELS_LAST=cl, BLOCK_SIZE=1024)
    for dtype, generate in itertools.product(("fp32", "fp16"), (False, True)):
        yield qs._q_sample_kernel, dtype, dict(GENERATE_NOISE=generate, BLOCK_SIZE=1024)
    for dtype, uncond, noise, half in itertools.product(("fp16", "bf16", "fp32"), (False, True), (0, 1, 2),
                                                        (False, True)):
        yield rs._reverse_step_kernel, dtype, dict(HAS_UNCOND=uncond, NOISE_MODE=noise, CLIP=True, HAS_HALF=half,
                                                   BLOCK_SIZE=1024)


def main() -> int:
    failures, count = 0, 0
    for fn, dtype, constexprs in variants():
        for arch in (80, 90):
            count += 1
            try:
                src = ASTSource(fn, _signature(fn, dtype, constexprs), constexprs=constexprs)
                compile(src, target=GPUTarget("cuda", arch, 32))
            except Exception as exc:  # report every failing variant, not only the first
                failures += 1
                print(f"FAIL {fn.__name__} sm_{arch} {dtype} {constexprs}: {type(exc).__name__}: {exc}"[:2000])
    print(f"compiled {count - failures}/{count} kernel variants")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
