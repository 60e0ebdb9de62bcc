// CPU twin of the CUDA reverse-step kernel: same coefficients, same per-element formula
// (reverse_step.h), same in-kernel noise stream (philox_normal.h), parallel over samples.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "philox_normal.h"
#include "reverse_step_common.h"

namespace ddpm_fast {

namespace {

template <typename scalar_t, typename half_t>
void reverse_step_cpu_impl(const at::Tensor& x, const at::Tensor& eps, const OptTensor& eps_uncond,
                           const at::Tensor& coefs, const at::Tensor& index, const StepIO& io, at::Tensor& out,
                           float w, bool clip) {
  const int64_t n_batch = x.size(0);
  const int64_t per_sample = x.numel() / n_batch;
  const int64_t channels = x.size(1), hw = x.size(2) * x.size(3);
  const bool cl = channels_last_4d(x);
  const float* xp = x.data_ptr<float>();
  const scalar_t* ep = eps.data_ptr<scalar_t>();
  const scalar_t* up = eps_uncond ? eps_uncond->data_ptr<scalar_t>() : nullptr;
  const scalar_t* vp = io.var_values ? io.var_values->data_ptr<scalar_t>() : nullptr;
  const float* zp = io.noise ? io.noise->data_ptr<float>() : nullptr;
  const int64_t* key = io.noise_key ? io.noise_key->data_ptr<int64_t>() : nullptr;
  const int64_t* images = io.images ? io.images->data_ptr<int64_t>() : nullptr;
  half_t* hp = io.half_out ? io.half_out->data_ptr<half_t>() : nullptr;
  const float* cp = coefs.data_ptr<float>();
  const int64_t* idx = index.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  float* slots[kMaxHistory] = {nullptr, nullptr, nullptr};
  for (size_t k = 0; k < io.history.size(); ++k) slots[k] = io.history[k].data_ptr<float>();
  // N is the outermost dimension in both NCHW and NHWC, so sample n owns one contiguous span.
  at::parallel_for(0, n_batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* row = cp + idx[n] * kNumCoefs;
      const bool noisy = row[kSigma] != 0.f;
      const int push = push_slot(row);
      float* push_to = push >= 0 ? slots[push] : nullptr;
      for (int64_t i = n * per_sample; i < (n + 1) * per_sample; ++i) {
        float e = static_cast<float>(ep[i]);
        if (up) {
          const float u = static_cast<float>(up[i]);
          e = u + w * (e - u);
        }
        float z = 0.f;
        if (zp) z = zp[i];
        if (key && noisy) {
          z = philox_normal(static_cast<uint64_t>(key[0]), nchw_element(i, per_sample, channels, hw, cl),
                            static_cast<uint32_t>(images[n]), static_cast<uint32_t>(key[1]), kStepStream);
        }
        const float h[kMaxHistory] = {slots[0] ? slots[0][i] : 0.f, slots[1] ? slots[1][i] : 0.f,
                                      slots[2] ? slots[2][i] : 0.f};
        float kept;
        const float sigma = vp ? learned_sigma(row, static_cast<float>(vp[i])) : row[kSigma];
        const float v = reverse_step_element(row, xp[i], e, z, clip, h, sigma, &kept);
        op[i] = v;
        if (push_to) push_to[i] = kept;
        if (hp) hp[i] = static_cast<half_t>(v);
      }
    }
  });
}

}  // namespace

at::Tensor reverse_step_cpu(const at::Tensor& x, const at::Tensor& eps, const OptTensor& eps_uncond,
                            const at::Tensor& coefs, const at::Tensor& index, const StepIO& io,
                            double guidance_scale, bool clip) {
  check_reverse_step_args(x, eps, eps_uncond, coefs, index, io);
  TORCH_CHECK(x.is_cpu(), "reverse_step_cpu: tensors must be on the CPU");
  const int64_t n_rows = coefs.size(0);
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t n = 0; n < x.size(0); ++n) {
    TORCH_CHECK(idx[n] >= 0 && idx[n] < n_rows, "reverse_step: index[", n, "] = ", idx[n],
                " is outside the coefficient table of ", n_rows, " rows");
    const float* row = coefs.data_ptr<float>() + idx[n] * kNumCoefs;
    const int push = push_slot(row);
    TORCH_CHECK(push < static_cast<int>(io.history.size()), "reverse_step: table row ", idx[n],
                " keeps its output in history slot ", push, ", but history holds ", io.history.size(), " slot(s)");
    for (int k = static_cast<int>(io.history.size()); k < kMaxHistory; ++k) {
      TORCH_CHECK(row[kCoefSlot0 + k] == 0.f, "reverse_step: table row ", idx[n], " weighs history slot ", k,
                  " (coef_slot", k, "), but history holds ", io.history.size(), " slot(s); pass them");
    }
  }
  at::Tensor out = io.out ? *io.out : at::empty_like(x);
  if (x.numel() == 0) return out;
  const float w = static_cast<float>(guidance_scale);
  const auto half_type = io.half_out ? io.half_out->scalar_type() : at::kHalf;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, eps.scalar_type(), "reverse_step_cpu", [&] {
    if (half_type == at::kBFloat16) {
      reverse_step_cpu_impl<scalar_t, at::BFloat16>(x, eps, eps_uncond, coefs, index, io, out, w, clip);
    } else {
      reverse_step_cpu_impl<scalar_t, at::Half>(x, eps, eps_uncond, coefs, index, io, out, w, clip);
    }
  });
  return out;
}

}  // namespace ddpm_fast
