#!/usr/bin/env bash
# The whole GPU check in one command: build, GPU tests, full benchmarks, a markdown table.
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# Writes OUT_DIR/{build.log,tests.log,bench.json,bench.log,results.md,profile_*.txt} (default OUT_DIR: $OUT or ./out).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-out}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 DDPM_FAST_REQUIRE_EXT=1 DDPM_FAST_REQUIRE_CUDA_EXT=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
# Test-time peers missing from the GPU image (diffusers) travel as wheels in .whl/ (see README).
if ls .whl/*.whl >/dev/null 2>&1; then
  python -m pip install -q --no-index --no-deps --no-compile --target /tmp/peers .whl/*.whl && \
    export PYTHONPATH="/tmp/peers${PYTHONPATH:+:$PYTHONPATH}"
fi
python -m pip install --no-build-isolation --no-deps . >"$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
grep "ddpm_fast setup" "$out/build.log"
python -m pytest -q -x tests 2>&1 | tee "$out/tests.log" | tail -15
tests_rc=${PIPESTATUS[0]}
DDPM_FAST_BENCH_SIZE=full python -m pytest benchmarks/ --benchmark-only -q \
  --benchmark-json="$out/bench.json" 2>&1 | tee "$out/bench.log" | tail -40
bench_rc=${PIPESTATUS[0]}
python benchmarks/report.py "$out/bench.json" | tee "$out/results.md"
# What limits the fast path: kernels per forward and the top kernels by device time.
for spec in "cifar10 256" "cifar10 256 --compile" "cifar10 1 --graph" "celebahq256 16"; do
  set -- $spec
  file="$out/profile_$1_b$2${3:+_${3#--}}.txt"
  python benchmarks/profile_unet.py --preset "$1" --batch "$2" ${3:-} >"$file" 2>&1
  head -3 "$file"
done
exit $(( tests_rc || bench_rc ))
