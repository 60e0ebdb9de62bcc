// CUDA reverse-step kernel: one pass over x_t and the model output, coefficients gathered per
// sample from a device table through a device-side index (so a CUDA graph can replay it while the
// index advances). Model output may be fp32/fp16/bf16; the sampler state stays fp32. Noise z is a
// tensor, or drawn in the kernel from Philox keyed by (seed, step, element), with seed and step read
// from device memory (noise_key = [seed, step]) so a replayed graph draws fresh noise each step.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <curand_kernel.h>
#include <torch/extension.h>

#include "reverse_step_common.h"

namespace ddpm_fast {

constexpr uint64_t kStepKey = 0x9E3779B1ull;  // (seed, step) -> distinct Philox keys

// NOISE: 0 none, 1 tensor, 2 in-kernel Philox.
template <typename scalar_t, bool HAS_UNCOND, int NOISE>
__global__ void reverse_step_kernel(const float* __restrict__ x, const scalar_t* __restrict__ eps,
                                    const scalar_t* __restrict__ eps_uncond, const float* __restrict__ noise,
                                    const int64_t* __restrict__ noise_key, const float* __restrict__ coefs,
                                    const int64_t* __restrict__ index, float* __restrict__ out, int64_t numel,
                                    int64_t per_sample, float w, bool clip) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  uint64_t key = 0;
  if constexpr (NOISE == 2) key = static_cast<uint64_t>(noise_key[0]) + static_cast<uint64_t>(noise_key[1]) * kStepKey;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const float* row = coefs + index[i / per_sample] * kNumCoefs;
    float e = static_cast<float>(eps[i]);
    if constexpr (HAS_UNCOND) {
      const float u = static_cast<float>(eps_uncond[i]);
      e = u + w * (e - u);
    }
    float z = 0.f;
    if constexpr (NOISE == 1) z = noise[i];
    if constexpr (NOISE == 2) {
      curandStatePhilox4_32_10_t state;
      curand_init(key, static_cast<unsigned long long>(i), 0, &state);
      z = curand_normal(&state);
    }
    out[i] = reverse_step_element(row, x[i], e, z, clip);
  }
}

at::Tensor reverse_step_cuda(const at::Tensor& x, const at::Tensor& eps,
                             const c10::optional<at::Tensor>& eps_uncond, const at::Tensor& coefs,
                             const at::Tensor& index, const c10::optional<at::Tensor>& noise,
                             double guidance_scale, bool clip, const c10::optional<at::Tensor>& noise_key) {
  check_reverse_step_args(x, eps, eps_uncond, coefs, index, noise);
  TORCH_CHECK(x.is_cuda(), "reverse_step_cuda: tensors must be on a CUDA device");
  TORCH_CHECK(!(noise && noise_key), "reverse_step: give noise or noise_key, not both");
  if (noise_key) {
    TORCH_CHECK(noise_key->numel() == 2 && noise_key->scalar_type() == at::kLong && noise_key->is_contiguous() &&
                    noise_key->device() == x.device(),
                "reverse_step: noise_key must be a contiguous int64 [seed, step] tensor on x_t's device");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  const int64_t numel = x.numel();
  if (numel == 0) return out;
  const int64_t per_sample = numel / x.size(0);
  const int threads = 256;
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  const int blocks = static_cast<int>(std::min<int64_t>((numel + threads - 1) / threads, max_blocks));
  auto stream = at::cuda::getCurrentCUDAStream();
  const float w = static_cast<float>(guidance_scale);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, eps.scalar_type(), "reverse_step_cuda", [&] {
    const scalar_t* up = eps_uncond ? eps_uncond->data_ptr<scalar_t>() : nullptr;
    const float* zp = noise ? noise->data_ptr<float>() : nullptr;
    const int64_t* kp = noise_key ? noise_key->data_ptr<int64_t>() : nullptr;
    auto launch = [&](auto has_uncond, auto noise_mode) {
      reverse_step_kernel<scalar_t, decltype(has_uncond)::value, decltype(noise_mode)::value>
          <<<blocks, threads, 0, stream>>>(x.data_ptr<float>(), eps.data_ptr<scalar_t>(), up, zp, kp,
                                           coefs.data_ptr<float>(), index.data_ptr<int64_t>(),
                                           out.data_ptr<float>(), numel, per_sample, w, clip);
    };
    using T = std::true_type;
    using F = std::false_type;
    using N0 = std::integral_constant<int, 0>;
    using N1 = std::integral_constant<int, 1>;
    using N2 = std::integral_constant<int, 2>;
    auto with_noise = [&](auto has_uncond) {
      if (zp) launch(has_uncond, N1{});
      else if (kp) launch(has_uncond, N2{});
      else launch(has_uncond, N0{});
    };
    if (up) with_noise(T{});
    else with_noise(F{});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace ddpm_fast
