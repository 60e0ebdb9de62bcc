// CPU twin of the CUDA reverse-step kernel: same coefficients, same per-element formula
// (reverse_step.h), parallel over samples. The graph engine's CPU loop and tests use it.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "reverse_step_common.h"

namespace ddpm_fast {

at::Tensor reverse_step_cpu(const at::Tensor& x, const at::Tensor& eps,
                            const c10::optional<at::Tensor>& eps_uncond, const at::Tensor& coefs,
                            const at::Tensor& index, const c10::optional<at::Tensor>& noise,
                            double guidance_scale, bool clip) {
  check_reverse_step_args(x, eps, eps_uncond, coefs, index, noise);
  TORCH_CHECK(x.is_cpu(), "reverse_step_cpu: tensors must be on the CPU");
  const int64_t n_batch = x.size(0);
  const int64_t per_sample = x.numel() / std::max<int64_t>(n_batch, 1);
  const int64_t n_rows = coefs.size(0);
  auto idx = index.accessor<int64_t, 1>();
  for (int64_t n = 0; n < n_batch; ++n) {
    TORCH_CHECK(idx[n] >= 0 && idx[n] < n_rows, "reverse_step: index[", n, "] = ", idx[n],
                " is outside the coefficient table of ", n_rows, " rows");
  }
  at::Tensor out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* zp = noise ? noise->data_ptr<float>() : nullptr;
  const float* cp = coefs.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float w = static_cast<float>(guidance_scale);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, eps.scalar_type(), "reverse_step_cpu", [&] {
    const scalar_t* ep = eps.data_ptr<scalar_t>();
    const scalar_t* up = eps_uncond ? eps_uncond->data_ptr<scalar_t>() : nullptr;
    // N is the outermost dimension in both NCHW and NHWC, so sample n owns one contiguous span.
    at::parallel_for(0, n_batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const float* row = cp + idx[n] * kNumCoefs;
        for (int64_t i = n * per_sample; i < (n + 1) * per_sample; ++i) {
          float e = static_cast<float>(ep[i]);
          if (up) {
            const float u = static_cast<float>(up[i]);
            e = u + w * (e - u);
          }
          op[i] = reverse_step_element(row, xp[i], e, zp ? zp[i] : 0.f, clip);
        }
      }
    });
  });
  return out;
}

}  // namespace ddpm_fast
