// Argument checks shared by the CPU and CUDA reverse-step entry points: one place that says
// what the kernels assume, so neither can be reached with input they would misread.
#pragma once
#include <torch/extension.h>

#include <vector>

#include "layout.h"
#include "reverse_step.h"

namespace ddpm_fast {

inline bool dense_nchw_or_nhwc(const at::Tensor& t) {
  return t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

using OptTensor = c10::optional<at::Tensor>;

// What a step writes (x_prev, and its fp16/bf16 copy) and how its noise is drawn.
struct StepIO {
  OptTensor noise;      // float32, laid out like x_t; or
  OptTensor noise_key;  // int64 [seed, step] on x_t's device, with
  OptTensor images;     // int64 (N,): each sample's global image index (the Philox counter)
  OptTensor out;        // float32 laid out like x_t (may be x_t itself); else a new tensor
  OptTensor half_out;   // fp16/bf16 laid out like x_t: also receives x_prev
  std::vector<at::Tensor> history;  // up to kMaxHistory float32 ring slots laid out like x_t (multistep)
  OptTensor var_values; // model_output's dtype, laid out like x_t: learned-variance v in [-1, 1] (optional)
};

inline void check_reverse_step_args(const at::Tensor& x, const at::Tensor& eps, const OptTensor& eps_uncond,
                                    const at::Tensor& coefs, const at::Tensor& index, const StepIO& io) {
  const OptTensor& noise = io.noise;
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
  if (io.var_values) {
    same_layout(*io.var_values, "model_var_values");
    TORCH_CHECK(io.var_values->scalar_type() == eps.scalar_type(),
                "reverse_step: model_var_values dtype must match model_output");
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
  TORCH_CHECK(index.is_contiguous(), "reverse_step: index must be contiguous");
  TORCH_CHECK(!(noise && io.noise_key), "reverse_step: give noise or a noise key, not both");
  TORCH_CHECK(!io.noise_key == !io.images, "reverse_step: noise_key and images go together");
  if (io.noise_key) {
    TORCH_CHECK(io.noise_key->numel() == 2 && io.noise_key->scalar_type() == at::kLong &&
                    io.noise_key->is_contiguous() && io.noise_key->device() == x.device(),
                "reverse_step: noise_key must be a contiguous int64 [seed, step] tensor on x_t's device");
    TORCH_CHECK(io.images->dim() == 1 && io.images->size(0) == x.size(0) && io.images->scalar_type() == at::kLong &&
                    io.images->is_contiguous() && io.images->device() == x.device(),
                "reverse_step: images must be a contiguous int64 (N,) tensor on x_t's device");
  }
  if (io.out) {
    same_layout(*io.out, "out");
    TORCH_CHECK(io.out->scalar_type() == at::kFloat, "reverse_step: out must be float32");
  }
  TORCH_CHECK(io.history.size() <= static_cast<size_t>(kMaxHistory), "reverse_step: at most ", kMaxHistory,
              " history slots, got ", io.history.size());
  for (size_t k = 0; k < io.history.size(); ++k) {
    const at::Tensor& h = io.history[k];
    same_layout(h, "history");
    TORCH_CHECK(h.scalar_type() == at::kFloat, "reverse_step: history buffers must be float32");
    if (io.out) TORCH_CHECK(!h.is_same(*io.out), "reverse_step: out must not be a history slot");
    for (size_t j = 0; j < k; ++j) {
      TORCH_CHECK(!h.is_same(io.history[j]), "reverse_step: history slots ", j, " and ", k, " are one buffer");
    }
  }
  if (io.half_out) {
    same_layout(*io.half_out, "half_out");
    TORCH_CHECK(io.half_out->scalar_type() == at::kHalf || io.half_out->scalar_type() == at::kBFloat16,
                "reverse_step: half_out must be float16 or bfloat16, got ", io.half_out->scalar_type());
  }
}

}  // namespace ddpm_fast
