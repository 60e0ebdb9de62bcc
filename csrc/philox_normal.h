// The project's noise stream on the CPU and the GPU (see ddpm_fast/noise.py, its definition):
//   z = BoxMuller(Philox4x32-10(key = seed, counter = (element, image, step, stream)))
// with the uniform and Box-Muller maps of Triton's tl.randn, so the Triton kernels, these kernels and
// the torch reference draw the same values. ATen's Philox engine (host and device) supplies the rounds.
#pragma once

#include <ATen/core/PhiloxRNGEngine.h>

#include <cmath>
#include <cstdint>

#include "reverse_step.h"

namespace ddpm_fast {

constexpr uint32_t kStepStream = 0;

DDPM_HD float philox_uniform(uint32_t r) {
  int32_t i = static_cast<int32_t>(r);
  if (i < 0) i = ~i;
  return static_cast<float>(i) * 4.6566127342e-10f;
}

DDPM_HD float philox_normal(uint64_t seed, uint32_t element, uint32_t image, uint32_t step, uint32_t stream) {
  // ATen's engine: counter = (offset lo, offset hi, subsequence lo, subsequence hi), key = seed.
  at::Philox4_32 rng(seed, (static_cast<uint64_t>(stream) << 32) | step,
                     (static_cast<uint64_t>(image) << 32) | element);
  const uint32_t r0 = rng();
  const uint32_t r1 = rng();
  float u1 = philox_uniform(r0);
  u1 = u1 < 1.0e-7f ? 1.0e-7f : u1;
  const float u2 = philox_uniform(r1);
  return sqrtf(-2.0f * logf(u1)) * cosf(6.283185307179586f * u2);
}

// The NCHW flat index inside one image of element i (of a batch laid out NCHW or NHWC).
DDPM_HD uint32_t nchw_element(int64_t i, int64_t per_sample, int64_t channels, int64_t hw, bool channels_last) {
  const int64_t e = i % per_sample;
  return static_cast<uint32_t>(channels_last ? (e % channels) * hw + e / channels : e);
}

}  // namespace ddpm_fast
