// Shared pieces of the C++ CPU kernels (group_norm_silu_cpu.cpp, residual_add_cpu.cpp, conv3x3_cpu.cpp, ...).
//
// The extension is built once, with the compiler's baseline flags, and must run on any x86-64 CPU. The
// hot loops are therefore written as plain float loops over contiguous rows (the compiler vectorizes
// them) and compiled for several instruction sets at once with target_clones: the loader picks the
// AVX-512, AVX2+FMA or baseline clone for the CPU it runs on. ATen's at::vec would only give its generic
// (scalar-math) form without per-ISA builds of this file; its exp would be a scalar std::exp per element.
// Where a loop needs an instruction no compiler picks from plain code (SiLU's reciprocal: vrcp14ps and a
// Newton step instead of a division), it has an AVX-512 intrinsics form chosen at run time (avx512_enabled).
// Arithmetic is fp32: fp16 rows are converted to fp32 scratch (load_row/store_row); bf16 rows are
// converted in registers by the bf16 loops (bf16_value/bf16_bits), which read and write bf16 directly.
#pragma once
#include <torch/extension.h>

#include "layout.h"

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define DDPM_FAST_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define DDPM_FAST_X86_SIMD 1
#include <immintrin.h>
#else
#define DDPM_FAST_CPU_CLONES
#define DDPM_FAST_X86_SIMD 0
#endif

// Helpers the cloned loops call must be inlined into every clone to vectorize there.
#if defined(__GNUC__)
#define DDPM_FAST_INLINE inline __attribute__((always_inline))
#else
#define DDPM_FAST_INLINE inline
#endif

namespace ddpm_fast {
namespace cpu {

// Whether loops written with AVX-512 intrinsics run (where a loop needs an instruction the compiler would not
// pick, e.g. vrcp14ps for SiLU's reciprocal): on when the CPU has AVX-512F; set_avx512 turns them off (tests
// hold both forms to the reference) or back on. Defined in group_norm_silu_cpu.cpp.
bool avx512_enabled();
bool avx512_supported();
void set_avx512(bool enabled);

// exp(x) for x in float range, branch-free so it vectorizes: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2],
// p the Cephes expf polynomial (relative error ~2e-7). Inputs are clamped to [-87.3, 88.3] (finite
// results, normal scale factors); NaN propagates through the polynomial.
DDPM_FAST_INLINE float exp_approx(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float t = x * 1.44269504088896341f;
  const int32_t n = static_cast<int32_t>(t + (t >= 0.f ? 0.5f : -0.5f));
  const float fn = static_cast<float>(n);
  const float r = (x - fn * 0.693359375f) + fn * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

DDPM_FAST_INLINE float silu(float v) { return v / (1.f + exp_approx(-v)); }

// bf16 <-> fp32 for one value, inlined into vectorized loops. bf16 is the high half of an fp32: a shift (c10's
// conversion goes through a union and does not vectorize). Back: round to nearest even, NaN kept a quiet NaN,
// c10::BFloat16's rounding.
DDPM_FAST_INLINE float bf16_value(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

DDPM_FAST_INLINE uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

// Row conversions between a tensor's element type and fp32 scratch (cloned: they run once per element).
DDPM_FAST_CPU_CLONES
static void bf16_to_float(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_value(src[i]);
}

DDPM_FAST_CPU_CLONES
static void float_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits(src[i]);
}

template <typename scalar_t>
void load_row(const scalar_t* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    bf16_to_float(reinterpret_cast<const uint16_t*>(src), dst, n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

template <typename scalar_t>
void store_row(const float* src, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    float_to_bf16(src, reinterpret_cast<uint16_t*>(dst), n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

// The fp32 values of src[0, n): src itself for a float tensor, else converted into scratch.
template <typename scalar_t>
const float* floats(const scalar_t* src, float* scratch, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
    load_row(src, scratch, n);
    return scratch;
  }
}

// Where to compute an output row in fp32: the output itself for a float tensor, else scratch
// (then written back by store_row, a no-op copy skipped for float).
template <typename scalar_t>
float* work_row(scalar_t* dst, float* scratch) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return dst;
  } else {
    return scratch;
  }
}

template <typename scalar_t>
void finish_row(const float* work, scalar_t* dst, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, float>) store_row(work, dst, n);
}

// A float32 copy of an optional per-channel (or per-sample, per-channel) tensor, contiguous.
inline at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

}  // namespace cpu
}  // namespace ddpm_fast
