// CUDA reverse-step kernel: one pass over x_t and the model output, coefficients gathered per
// sample from a device table through a device-side index (so a CUDA graph can replay it while the
// index advances). Model output may be fp32/fp16/bf16; the sampler state stays fp32. Noise z is a
// tensor, or drawn in the kernel from the project's Philox stream (philox_normal.h) keyed by
// noise_key = [seed, step] and each sample's global image index, read from device memory, so a
// replayed graph draws fresh noise each step. out may alias x (each element is read, then written).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "philox_normal.h"
#include "reverse_step_common.h"

namespace ddpm_fast {

template <typename T>
struct Tag {
  using type = T;
};

// NOISE: 0 none, 1 tensor, 2 in-kernel Philox.
template <typename scalar_t, typename half_t, bool HAS_UNCOND, int NOISE, bool HAS_HALF>
__global__ void reverse_step_kernel(const float* x, const scalar_t* __restrict__ eps,
                                    const scalar_t* __restrict__ eps_uncond,
                                    const scalar_t* __restrict__ var_values, const float* __restrict__ noise,
                                    const int64_t* __restrict__ noise_key, const int64_t* __restrict__ images,
                                    const float* __restrict__ coefs, const int64_t* __restrict__ index,
                                    int64_t num_rows, float* out, half_t* __restrict__ half_out,
                                    float* __restrict__ slot0, float* __restrict__ slot1,
                                    float* __restrict__ slot2, int64_t numel,
                                    int64_t per_sample, int64_t channels, int64_t hw, bool channels_last, float w,
                                    bool clip) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const int64_t n = i / per_sample;
    const int64_t r = index[n];
    CUDA_KERNEL_ASSERT(r >= 0 && r < num_rows && "reverse_step: index outside the coefficient table");
    const float* row = coefs + r * kNumCoefs;
    float e = static_cast<float>(eps[i]);
    if constexpr (HAS_UNCOND) {
      const float u = static_cast<float>(eps_uncond[i]);
      e = u + w * (e - u);
    }
    float z = 0.f;
    if constexpr (NOISE == 1) z = noise[i];
    if constexpr (NOISE == 2) {
      if (row[kSigma] != 0.f) {
        z = philox_normal(static_cast<uint64_t>(noise_key[0]), nchw_element(i, per_sample, channels, hw, channels_last),
                          static_cast<uint32_t>(images[n]), static_cast<uint32_t>(noise_key[1]), kStepStream);
      }
    }
    const float h[kMaxHistory] = {slot0 ? slot0[i] : 0.f, slot1 ? slot1[i] : 0.f, slot2 ? slot2[i] : 0.f};
    const int push = push_slot(row);
    float* push_to = push == 0 ? slot0 : (push == 1 ? slot1 : (push == 2 ? slot2 : nullptr));
    CUDA_KERNEL_ASSERT((push < 0 || push_to != nullptr) && "reverse_step: the row keeps its output in a missing slot");
    float kept;
    const float sigma = var_values ? learned_sigma(row, static_cast<float>(var_values[i])) : row[kSigma];
    const float v = reverse_step_element(row, x[i], e, z, clip, h, sigma, &kept);
    out[i] = v;
    if (push_to) push_to[i] = kept;
    if constexpr (HAS_HALF) half_out[i] = static_cast<half_t>(v);
  }
}

at::Tensor reverse_step_cuda(const at::Tensor& x, const at::Tensor& eps, const OptTensor& eps_uncond,
                             const at::Tensor& coefs, const at::Tensor& index, const StepIO& io,
                             double guidance_scale, bool clip) {
  check_reverse_step_args(x, eps, eps_uncond, coefs, index, io);
  TORCH_CHECK(x.is_cuda(), "reverse_step_cuda: tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = io.out ? *io.out : at::empty_like(x);
  const int64_t numel = x.numel();
  if (numel == 0) return out;
  const int64_t per_sample = numel / x.size(0);
  const int threads = 256;
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  const int blocks = static_cast<int>(std::min<int64_t>((numel + threads - 1) / threads, max_blocks));
  auto stream = at::cuda::getCurrentCUDAStream();
  const float w = static_cast<float>(guidance_scale);
  const bool cl = channels_last_4d(x);
  const auto half_type = io.half_out ? io.half_out->scalar_type() : at::kHalf;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, eps.scalar_type(), "reverse_step_cuda", [&] {
    const scalar_t* up = eps_uncond ? eps_uncond->data_ptr<scalar_t>() : nullptr;
    const scalar_t* vp = io.var_values ? io.var_values->data_ptr<scalar_t>() : nullptr;
    const float* zp = io.noise ? io.noise->data_ptr<float>() : nullptr;
    const int64_t* kp = io.noise_key ? io.noise_key->data_ptr<int64_t>() : nullptr;
    const int64_t* ip = io.images ? io.images->data_ptr<int64_t>() : nullptr;
    float* slots[kMaxHistory] = {nullptr, nullptr, nullptr};
    for (size_t k = 0; k < io.history.size(); ++k) slots[k] = io.history[k].data_ptr<float>();
    auto launch = [&](auto half_tag, auto has_uncond, auto noise_mode, auto has_half) {
      using half_t = typename decltype(half_tag)::type;
      half_t* hp = has_half ? io.half_out->data_ptr<half_t>() : nullptr;
      reverse_step_kernel<scalar_t, half_t, decltype(has_uncond)::value, decltype(noise_mode)::value,
                          decltype(has_half)::value><<<blocks, threads, 0, stream>>>(
          x.data_ptr<float>(), eps.data_ptr<scalar_t>(), up, vp, zp, kp, ip, coefs.data_ptr<float>(),
          index.data_ptr<int64_t>(), coefs.size(0), out.data_ptr<float>(), hp, slots[0], slots[1], slots[2], numel, per_sample,
          x.size(1),
          x.size(2) * x.size(3), cl, w, clip);
    };
    using T = std::true_type;
    using F = std::false_type;
    auto with_half = [&](auto has_uncond, auto noise_mode) {
      if (!io.half_out) launch(Tag<at::Half>{}, has_uncond, noise_mode, F{});
      else if (half_type == at::kBFloat16) launch(Tag<at::BFloat16>{}, has_uncond, noise_mode, T{});
      else launch(Tag<at::Half>{}, has_uncond, noise_mode, T{});
    };
    auto with_noise = [&](auto has_uncond) {
      if (zp) with_half(has_uncond, std::integral_constant<int, 1>{});
      else if (kp) with_half(has_uncond, std::integral_constant<int, 2>{});
      else with_half(has_uncond, std::integral_constant<int, 0>{});
    };
    if (up) with_noise(T{});
    else with_noise(F{});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace ddpm_fast
