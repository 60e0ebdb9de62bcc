// group_norm_silu on the CPU: y = SiLU(GroupNorm(x + add[:, :, None, None])) (forward; inference).
//
// Same contract as ddpm_fast/ops/group_norm_silu.py: fp32 statistics (exact centred variance, merged
// with Chan's formula in double), output in x's dtype and memory format. Both layouts keep their memory
// order: NCHW, one task per (sample, group), whose channels are one contiguous span; channels_last, tasks
// over (sample, block of positions), each row one position's C channels, per-channel partial (mean, M2)
// merged per group. The blocking depends only on the shape, never on the thread count, so results are
// the same for any number of threads and for any batch size.
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_kernels.h"

namespace ddpm_fast {

namespace {

using cpu::load_row;

// Positions per channels_last block: about 16K values, so a block's fp32 copy stays in L2.
int64_t block_positions(int64_t hw, int64_t channels) {
  return std::min<int64_t>(hw, std::max<int64_t>(1, 16384 / channels));
}

struct Moments {  // count, mean, M2 of a set of values
  double count = 0, mean = 0, m2 = 0;
  void merge(double n, double m, double q) {
    if (n == 0) return;
    const double total = count + n;
    const double delta = m - mean;
    mean += delta * (n / total);
    m2 += q + delta * delta * (count * n / total);
    count = total;
  }
};

// Lanes of independent partial sums: enough vector registers in flight to hide the add latency, and the
// loops vectorize without reassociating one accumulator (no -ffast-math).
constexpr int kLanes = 64;

DDPM_FAST_CPU_CLONES
float row_sum(const float* x, int64_t n) {
  float acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += x[i + j];
  float s = 0.f;
  for (; i < n; ++i) s += x[i];
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

DDPM_FAST_CPU_CLONES
float row_sum_squares(const float* x, int64_t n) {
  float acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += x[i + j] * x[i + j];
  float s = 0.f;
  for (; i < n; ++i) s += x[i] * x[i];
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

DDPM_FAST_CPU_CLONES
void add_scalar(float* x, float v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += v;
}

DDPM_FAST_CPU_CLONES
void column_mean_m2(const float* x, int64_t rows, int64_t cols, float* mean, float* m2) {
  // Per-column (channel) mean and centred M2 of a rows x cols block; the inner loops run along a row.
  std::fill(mean, mean + cols, 0.f);
  std::fill(m2, m2 + cols, 0.f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) mean[c] += x[r * cols + c];
  const float inv = 1.f / static_cast<float>(rows);
  for (int64_t c = 0; c < cols; ++c) mean[c] *= inv;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const float d = x[r * cols + c] - mean[c];
      m2[c] += d * d;
    }
}

// The same two functions for bf16 channels_last blocks, converting in registers: the block is read as bf16
// (twice for the statistics, once to normalize) and written once, with no fp32 copy of it in between.
// Per value the arithmetic is the fp32 path's, so the results are the same bits.
DDPM_FAST_CPU_CLONES
void column_mean_m2_bf16(const uint16_t* __restrict__ x, int64_t rows, int64_t cols, float* __restrict__ mean,
                         float* __restrict__ m2) {
  std::fill(mean, mean + cols, 0.f);
  std::fill(m2, m2 + cols, 0.f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) mean[c] += cpu::bf16_value(x[r * cols + c]);
  const float inv = 1.f / static_cast<float>(rows);
  for (int64_t c = 0; c < cols; ++c) mean[c] *= inv;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const float d = cpu::bf16_value(x[r * cols + c]) - mean[c];
      m2[c] += d * d;
    }
}

// y[r, c] = x[r, c] * scale[c] + shift[c] over a rows x cols bf16 block (no SiLU: with the conversions in the
// same loop it runs slower than the fp32 buffer path below, measured).
DDPM_FAST_CPU_CLONES
void affine_rows_bf16(const uint16_t* __restrict__ x, uint16_t* __restrict__ y, int64_t rows, int64_t cols,
                      const float* __restrict__ scale, const float* __restrict__ shift) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* xr = x + r * cols;
    uint16_t* yr = y + r * cols;
    for (int64_t c = 0; c < cols; ++c) yr[c] = cpu::bf16_bits(cpu::bf16_value(xr[c]) * scale[c] + shift[c]);
  }
}

// y = x * scale + shift (per element of the row), then SiLU if asked, in place.
DDPM_FAST_CPU_CLONES
void affine_silu_row(float* x, const float* scale, const float* shift, int64_t n, bool silu) {
  if (silu) {
    for (int64_t i = 0; i < n; ++i) x[i] = cpu::silu(x[i] * scale[i] + shift[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) x[i] = x[i] * scale[i] + shift[i];
  }
}

DDPM_FAST_CPU_CLONES
void affine_silu_scalar(float* x, float scale, float shift, int64_t n, bool silu) {
  if (silu) {
    for (int64_t i = 0; i < n; ++i) x[i] = cpu::silu(x[i] * scale + shift);
  } else {
    for (int64_t i = 0; i < n; ++i) x[i] = x[i] * scale + shift;
  }
}

struct Params {
  int64_t n, c, hw, groups, cg;
  float eps;
  bool silu;
  const float* weight;  // (C,), or (N, C) per sample (affine_stride_n = C), or null
  const float* bias;    // like weight
  const float* add;     // (N, C) or null
  int64_t affine_stride_n;
};

float weight_at(const Params& p, int64_t n, int64_t c) { return p.weight ? p.weight[n * p.affine_stride_n + c] : 1.f; }
float bias_at(const Params& p, int64_t n, int64_t c) { return p.bias ? p.bias[n * p.affine_stride_n + c] : 0.f; }
float add_at(const Params& p, int64_t n, int64_t c) { return p.add ? p.add[n * p.c + c] : 0.f; }

template <typename scalar_t>
void group_norm_nchw(const scalar_t* x, scalar_t* y, const Params& p) {
  const int64_t span = p.cg * p.hw;
  at::parallel_for(0, p.n * p.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(span);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / p.groups, g = task % p.groups;
      const int64_t offset = n * p.c * p.hw + g * span;
      float* v = cpu::work_row(y + offset, buf.data());
      load_row(x + offset, v, span);
      // The group is one contiguous span: its mean in one sum, then x + add centred in place (one
      // offset per channel), the exact centred M2 in a second sum, and the affine + SiLU per channel.
      double total = row_sum(v, span);
      for (int64_t j = 0; j < p.cg; ++j) total += static_cast<double>(add_at(p, n, g * p.cg + j)) * p.hw;
      const float mean = static_cast<float>(total / static_cast<double>(span));
      for (int64_t j = 0; j < p.cg; ++j) add_scalar(v + j * p.hw, add_at(p, n, g * p.cg + j) - mean, p.hw);
      const float rstd = 1.f / std::sqrt(row_sum_squares(v, span) / static_cast<float>(span) + p.eps);
      for (int64_t j = 0; j < p.cg; ++j) {
        const int64_t c = g * p.cg + j;
        affine_silu_scalar(v + j * p.hw, rstd * weight_at(p, n, c), bias_at(p, n, c), p.hw, p.silu);
      }
      cpu::finish_row(v, y + offset, span);
    }
  });
}

template <typename scalar_t>
void group_norm_channels_last(const scalar_t* x, scalar_t* y, const Params& p) {
  const int64_t rows = block_positions(p.hw, p.c);
  const int64_t blocks = (p.hw + rows - 1) / rows;
  // Pass 1: per (sample, block, channel) mean and M2 of the block's positions.
  std::vector<float> part_mean(p.n * blocks * p.c), part_m2(p.n * blocks * p.c);
  at::parallel_for(0, p.n * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(std::is_same_v<scalar_t, at::BFloat16> ? 0 : rows * p.c);  // bf16: no fp32 copy
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, b = task % blocks;
      const int64_t r = std::min(rows, p.hw - b * rows);
      const scalar_t* src = x + (n * p.hw + b * rows) * p.c;
      if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
        column_mean_m2_bf16(reinterpret_cast<const uint16_t*>(src), r, p.c, part_mean.data() + task * p.c,
                            part_m2.data() + task * p.c);
      } else {
        const float* v = cpu::floats(src, buf.data(), r * p.c);
        column_mean_m2(v, r, p.c, part_mean.data() + task * p.c, part_m2.data() + task * p.c);
      }
    }
  });
  // Merge per (sample, group), in a fixed order, into each channel's scale and shift.
  std::vector<float> scale(p.n * p.c), shift(p.n * p.c);
  at::parallel_for(0, p.n * p.groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / p.groups, g = task % p.groups;
      Moments group;
      for (int64_t b = 0; b < blocks; ++b) {
        const double count = static_cast<double>(std::min(rows, p.hw - b * rows));
        const int64_t base = (n * blocks + b) * p.c;
        for (int64_t c = g * p.cg; c < (g + 1) * p.cg; ++c)
          group.merge(count, part_mean[base + c] + add_at(p, n, c), part_m2[base + c]);
      }
      const float mean = static_cast<float>(group.mean);
      const float rstd = static_cast<float>(1.0 / std::sqrt(group.m2 / group.count + p.eps));
      for (int64_t c = g * p.cg; c < (g + 1) * p.cg; ++c) {
        scale[n * p.c + c] = rstd * weight_at(p, n, c);
        shift[n * p.c + c] = (add_at(p, n, c) - mean) * scale[n * p.c + c] + bias_at(p, n, c);
      }
    }
  });
  // Pass 2: normalize each block, row by row.
  at::parallel_for(0, p.n * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(std::is_same_v<scalar_t, at::BFloat16> && !p.silu ? 0 : rows * p.c);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, b = task % blocks;
      const int64_t r = std::min(rows, p.hw - b * rows);
      const int64_t offset = (n * p.hw + b * rows) * p.c;
      if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
        if (!p.silu) {
          affine_rows_bf16(reinterpret_cast<const uint16_t*>(x + offset), reinterpret_cast<uint16_t*>(y + offset), r,
                           p.c, scale.data() + n * p.c, shift.data() + n * p.c);
          continue;
        }
      }
      float* v = cpu::work_row(y + offset, buf.data());
      load_row(x + offset, v, r * p.c);
      for (int64_t i = 0; i < r; ++i)
        affine_silu_row(v + i * p.c, scale.data() + n * p.c, shift.data() + n * p.c, p.c, p.silu);
      cpu::finish_row(v, y + offset, r * p.c);
    }
  });
}

}  // namespace

at::Tensor group_norm_silu_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& add,
                               int64_t num_groups, double eps, bool silu) {
  TORCH_CHECK(x.device().is_cpu(), "group_norm_silu_cpu: x is on ", x.device(), "; this kernel runs on the CPU");
  TORCH_CHECK(x.dim() == 4, "group_norm_silu_cpu: x must be 4-D (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "group_norm_silu_cpu: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  const bool cl = channels_last_4d(x);
  TORCH_CHECK(cl || x.is_contiguous(), "group_norm_silu_cpu: x must be contiguous or channels_last");
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  TORCH_CHECK(c > 0 && hw > 0, "group_norm_silu_cpu: C and H*W must be positive, got shape ", x.sizes());
  TORCH_CHECK(num_groups > 0 && c % num_groups == 0, "group_norm_silu_cpu: ", c,
              " channels are not divisible by num_groups=", num_groups);
  TORCH_CHECK(eps > 0 && std::isfinite(eps), "group_norm_silu_cpu: eps must be positive and finite, got ", eps);
  TORCH_CHECK(weight.has_value() == bias.has_value(), "group_norm_silu_cpu: give both weight and bias, or neither");
  const bool per_sample = weight && weight->dim() == 2;
  auto affine = [&](const c10::optional<at::Tensor>& t, const char* name) {
    if (!t) return at::Tensor();
    const bool ok = per_sample ? (t->dim() == 2 && t->size(0) == n && t->size(1) == c) : (t->dim() == 1 && t->size(0) == c);
    TORCH_CHECK(t->device().is_cpu() && ok, "group_norm_silu_cpu: ", name, " must be a (", c, ",) CPU tensor, or (", n,
                ", ", c, ") per sample (weight and bias alike), got ", t->sizes(), " on ", t->device());
    return cpu::as_float(*t).contiguous();
  };
  const at::Tensor w = affine(weight, "weight"), b = affine(bias, "bias");
  at::Tensor a;
  if (add) {
    TORCH_CHECK(add->device().is_cpu() && add->dim() == 2 && add->size(0) == n && add->size(1) == c,
                "group_norm_silu_cpu: add must be an (", n, ", ", c, ") CPU tensor, got ", add->sizes(), " on ",
                add->device());
    a = cpu::as_float(*add);
  }
  at::Tensor y = at::empty_like(x);
  if (n == 0) return y;
  const Params p{n, c, hw, num_groups, c / num_groups, static_cast<float>(eps), silu,
                 w.defined() ? w.data_ptr<float>() : nullptr, b.defined() ? b.data_ptr<float>() : nullptr,
                 a.defined() ? a.data_ptr<float>() : nullptr, per_sample ? c : 0};
  AT_DISPATCH_V2(x.scalar_type(), "group_norm_silu_cpu", AT_WRAP([&] {
    if (cl) {
      group_norm_channels_last(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), p);
    } else {
      group_norm_nchw(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), p);
    }
  }), at::kFloat, at::kBFloat16, at::kHalf);
  return y;
}

}  // namespace ddpm_fast
