"""Compile the Triton kernel variants the code really launched, ahead of time for sm_80 and sm_90 (no GPU).

    python tests/compile_kernels.py LAUNCHES.jsonl

LAUNCHES.jsonl is what ``ddpm_fast.ops.launch`` records under DDPM_FAST_RECORD_LAUNCHES while the tests run
through the interpreter: per launch the kernel, its argument types (fp16/bf16/fp32 weights and outputs as
they really were), its constexprs and the JIT's own specializations (integers equal to 1 become
constants, multiples of 16 and 16-byte-aligned pointers get divisibility hints), computed by Triton's
specializer. The interpreter does not type-check kernels the way the compiler does; this sends each
variant through Triton's whole pipeline down to a cubin (ptxas included). Full-size GPU shapes are
multiples of 16 where the small test shapes may not be, so each variant is also compiled with every
integer and pointer marked divisible by 16. Of the tile sizes the test shapes give one flag combination, the
smallest and the largest are compiled (``variants``). Run without TRITON_INTERPRET; prints one line per failure.
"""

import importlib
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile  # noqa: E402

ARCHS = (80, 90)


def _size_key(name: str) -> bool:
    """Constexprs that only size a kernel's tiles (BLOCK_SIZE, BLOCK_S, CG_P2, SPLIT), set by the test shapes."""
    return name.startswith("BLOCK") or name in ("CG_P2", "SPLIT")


def variants(records):
    """Distinct (kernel, signature, constexprs, attrs, options) to compile, as JSON strings.

    The recorded launches differ in their flags (dtypes, HAS_*, CHANNELS_LAST, the JIT's integer-1
    specializations), which change the code, and in tile sizes set by the small test shapes. Every flag
    combination is kept; of its tile sizes the smallest and the largest (the largest is what register pressure
    depends on; the sizes between compile the same code at sizes in between). Each is compiled as recorded and
    with every integer and pointer divisible by 16 (full-size GPU shapes)."""
    groups: dict[str, dict[str, dict]] = {}
    for rec in records:
        flags = {k: v for k, v in rec["constexprs"].items() if not _size_key(k)}
        group = json.dumps([rec["kernel"], rec["signature"], flags, rec["options"]], sort_keys=True)
        sizes = json.dumps(sorted((k, v) for k, v in rec["constexprs"].items() if _size_key(k)))
        groups.setdefault(group, {}).setdefault(sizes, rec)
    seen = set()
    for by_size in groups.values():
        ordered = sorted(by_size.items(), key=lambda kv: [v for _, v in json.loads(kv[0])])
        for rec in {id(r): r for r in (ordered[0][1], ordered[-1][1])}.values():
            all_d = dict(rec, attrs={k: "D" for k, v in rec["signature"].items() if v[0] in "*i"})
            for v in (rec, all_d):
                key = json.dumps(v, sort_keys=True)
                if key not in seen:
                    seen.add(key)
                    yield key


def _compile(job):
    key, arch = job
    v = json.loads(key)
    module, name = v["kernel"].split(":")
    fn = getattr(importlib.import_module(module), name)
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, spec in v["attrs"].items() if "D" in spec}
    try:
        src = ASTSource(fn, v["signature"], constexprs=v["constexprs"], attrs=attrs)
        compile(src, target=GPUTarget("cuda", arch, 32), options=v["options"])
    except Exception as exc:  # report every failing variant, not only the first
        return f"FAIL {name} sm_{arch} {v['signature']} {v['constexprs']}: {type(exc).__name__}: {exc}"[:2000]
    return None


def main(path) -> int:
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    jobs = [(key, arch) for key in sorted(set(variants(records))) for arch in ARCHS]
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with ProcessPoolExecutor(workers) as pool:
        failures = [msg for msg in pool.map(_compile, jobs, chunksize=4) if msg]
    for msg in failures:
        print(msg)
    kernels = sorted({json.loads(k)["kernel"].split(":")[1] for k, _ in jobs})
    print(f"{len(records)} recorded launch variants of {len(kernels)} kernels: {', '.join(kernels)}")
    print(f"compiled {len(jobs) - len(failures)}/{len(jobs)} kernel variants")
    return 1 if failures or not jobs else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
