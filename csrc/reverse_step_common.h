// Argument checks shared by the CPU and CUDA reverse-step entry points: one place that says
// what the kernels assume, so neither can be reached with input they would misread.
#pragma once
#include <torch/extension.h>

#include "reverse_step.h"

namespace ddpm_fast {

inline bool dense_nchw_or_nhwc(const at::Tensor& t) {
  return t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline void check_reverse_step_args(const at::Tensor& x, const at::Tensor& eps,
                                    const c10::optional<at::Tensor>& eps_uncond, const at::Tensor& coefs,
                                    const at::Tensor& index, const c10::optional<at::Tensor>& noise) {
  TORCH_CHECK(x.dim() == 4, "reverse_step: x_t must be 4-D (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "reverse_step: x_t must be float32 (the sampler state), got ",
              x.scalar_type());
  TORCH_CHECK(dense_nchw_or_nhwc(x), "reverse_step: x_t must be contiguous or channels_last");
  auto same_layout = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.sizes() == x.sizes(), "reverse_step: ", name, " shape ", t.sizes(), " != x_t shape ",
                x.sizes());
    TORCH_CHECK(t.strides() == x.strides(), "reverse_step: ", name,
                " must have the same memory format (strides) as x_t");
    TORCH_CHECK(t.device() == x.device(), "reverse_step: ", name, " is on ", t.device(), ", x_t on ",
                x.device());
  };
  same_layout(eps, "model_output");
  TORCH_CHECK(eps.scalar_type() == at::kFloat || eps.scalar_type() == at::kHalf ||
                  eps.scalar_type() == at::kBFloat16,
              "reverse_step: model_output must be float32, float16 or bfloat16, got ", eps.scalar_type());
  if (eps_uncond) {
    same_layout(*eps_uncond, "model_output_uncond");
    TORCH_CHECK(eps_uncond->scalar_type() == eps.scalar_type(),
                "reverse_step: model_output_uncond dtype must match model_output");
  }
  if (noise) {
    same_layout(*noise, "noise");
    TORCH_CHECK(noise->scalar_type() == at::kFloat, "reverse_step: noise must be float32");
  }
  TORCH_CHECK(coefs.dim() == 2 && coefs.size(1) == kNumCoefs && coefs.scalar_type() == at::kFloat &&
                  coefs.is_contiguous(),
              "reverse_step: coefs must be a contiguous float32 (S, ", static_cast<int>(kNumCoefs),
              ") table, got ", coefs.sizes(), " ", coefs.scalar_type());
  TORCH_CHECK(coefs.device() == x.device(), "reverse_step: coefs must be on x_t's device");
  TORCH_CHECK(index.dim() == 1 && index.size(0) == x.size(0) && index.scalar_type() == at::kLong,
              "reverse_step: index must be int64 of shape (N,) = (", x.size(0), ",), got ", index.sizes(),
              " ", index.scalar_type());
  TORCH_CHECK(index.device() == x.device(), "reverse_step: index must be on x_t's device");
}

}  // namespace ddpm_fast
