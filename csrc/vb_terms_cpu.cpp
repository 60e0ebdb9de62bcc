// vb_terms on the CPU: per (image, t) row, the variational bound's term (KL, or the discretized decoder NLL at
// t = 0) in bits/dim, the eps MSE and the x_0 MSE, in one pass over the row's elements.
//
// Same contract as ddpm_fast/ops/vb_terms.py (its module docstring states the formulas): x_start, x_t, noise
// fp32; eps and v (the model output's two halves) fp32, fp16 or bf16, one dtype; all laid out alike (an
// image's elements are one contiguous block in NCHW and in channels_last). Arithmetic in fp32 as the
// reference does it; the per-row sums accumulate in float64. Rows run in parallel.
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>

#include "layout.h"

namespace ddpm_fast {

namespace {

constexpr int64_t kColumns = 8;  // VB_COLUMNS in vb_terms.py

inline float approx_cdf(float x) {
  return 0.5f * (1.f + std::tanh(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

template <typename scalar_t>
void vb_terms_rows(const float* x0, const float* xt, const scalar_t* eps, const scalar_t* var, const float* noise,
                   const float* table, const int64_t* t, float* out, int64_t rows, int64_t per_sample,
                   int64_t num_rows, bool clip) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t step = t[n];
      TORCH_CHECK(step >= 0 && step < num_rows, "vb_terms: t[", n, "] = ", step, " is outside the table of ",
                  num_rows, " rows");
      const float* row = table + step * kColumns;
      const float a = row[0], b = row[1], c1 = row[2], c2 = row[3], true_lv = row[4], fixed_lv = row[5],
                  lv_min = row[6], lv_max = row[7];
      const bool decoder = step == 0;
      const int64_t base = n * per_sample;
      double sum_vb = 0.0, sum_mse = 0.0, sum_x0 = 0.0;
      for (int64_t i = base; i < base + per_sample; ++i) {
        const float e = static_cast<float>(eps[i]);
        float pred = a * xt[i] - b * e;
        if (clip) pred = std::min(std::max(pred, -1.f), 1.f);
        const float mean = c1 * pred + c2 * xt[i];
        float lv = fixed_lv;
        if (var) {
          const float frac = 0.5f * (static_cast<float>(var[i]) + 1.f);
          lv = frac * lv_max + (1.f - frac) * lv_min;
        }
        float term;
        if (decoder) {
          const float centered = x0[i] - mean;
          const float inv_stdv = std::exp(-0.5f * lv);
          const float cdf_plus = approx_cdf(inv_stdv * (centered + 1.f / 255.f));
          const float cdf_min = approx_cdf(inv_stdv * (centered - 1.f / 255.f));
          float log_p;
          if (x0[i] < -0.999f) {
            log_p = std::log(std::max(cdf_plus, 1e-12f));
          } else if (x0[i] > 0.999f) {
            log_p = std::log(std::max(1.f - cdf_min, 1e-12f));
          } else {
            log_p = std::log(std::max(cdf_plus - cdf_min, 1e-12f));
          }
          term = -log_p;
        } else {
          const float d = c1 * x0[i] + c2 * xt[i] - mean;
          term = 0.5f * (-1.f + lv - true_lv + std::exp(true_lv - lv) + d * d * std::exp(-lv));
        }
        const float de = e - noise[i], dx = pred - x0[i];
        sum_vb += term;
        sum_mse += de * de;
        sum_x0 += dx * dx;
      }
      const double inv = 1.0 / static_cast<double>(per_sample);
      out[n * 3] = static_cast<float>(sum_vb * inv / std::log(2.0));
      out[n * 3 + 1] = static_cast<float>(sum_mse * inv);
      out[n * 3 + 2] = static_cast<float>(sum_x0 * inv);
    }
  });
}

}  // namespace

at::Tensor vb_terms_cpu(const at::Tensor& x_start, const at::Tensor& x_t, const at::Tensor& eps,
                        const at::Tensor& noise, const at::Tensor& table, const at::Tensor& t, bool clip,
                        const c10::optional<at::Tensor>& v) {
  TORCH_CHECK(x_t.device().is_cpu(), "vb_terms_cpu: x_t is on ", x_t.device(), "; this kernel runs on the CPU");
  TORCH_CHECK(x_t.dim() == 4 && x_t.scalar_type() == at::kFloat, "vb_terms_cpu: x_t must be a float32 (N, C, H, W) "
              "tensor, got ", x_t.sizes(), " ", x_t.scalar_type());
  const bool cl = channels_last_4d(x_t);
  TORCH_CHECK(cl || x_t.is_contiguous(), "vb_terms_cpu: x_t must be contiguous or channels_last");
  auto same = [&](const at::Tensor& ten, const char* name) {
    TORCH_CHECK(ten.device().is_cpu() && ten.sizes() == x_t.sizes() && ten.strides() == x_t.strides(),
                "vb_terms_cpu: ", name, " must be a CPU tensor shaped and laid out like x_t");
  };
  same(x_start, "x_start");
  same(noise, "noise");
  same(eps, "eps");
  TORCH_CHECK(x_start.scalar_type() == at::kFloat && noise.scalar_type() == at::kFloat,
              "vb_terms_cpu: x_start and noise must be float32");
  if (v) {
    same(*v, "v");
    TORCH_CHECK(v->scalar_type() == eps.scalar_type(), "vb_terms_cpu: v is ", v->scalar_type(), ", eps ",
                eps.scalar_type(), "; they are the two halves of one model output");
  }
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kFloat && table.is_contiguous() &&
                  table.dim() == 2 && table.size(1) == kColumns,
              "vb_terms_cpu: table must be a contiguous float32 (T, ", kColumns, ") CPU tensor");
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == x_t.size(0) &&
                  t.is_contiguous(),
              "vb_terms_cpu: t must be a contiguous int64 (", x_t.size(0), ",) CPU tensor");
  at::Tensor out = at::empty({x_t.size(0), 3}, x_t.options());
  const int64_t per_sample = x_t.size(0) ? x_t.numel() / x_t.size(0) : 0;
  if (per_sample == 0) return out.zero_();
  AT_DISPATCH_V2(eps.scalar_type(), "vb_terms_cpu", AT_WRAP([&] {
    vb_terms_rows<scalar_t>(x_start.data_ptr<float>(), x_t.data_ptr<float>(), eps.data_ptr<scalar_t>(),
                            v ? v->data_ptr<scalar_t>() : nullptr, noise.data_ptr<float>(), table.data_ptr<float>(),
                            t.data_ptr<int64_t>(), out.data_ptr<float>(), x_t.size(0), per_sample, table.size(0),
                            clip);
  }), at::kFloat, at::kBFloat16, at::kHalf);
  return out;
}

}  // namespace ddpm_fast
