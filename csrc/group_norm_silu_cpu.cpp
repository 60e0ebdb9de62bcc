// group_norm_silu on the CPU: y = SiLU(GroupNorm(x + add[:, :, None, None])) (forward; inference), and its
// two-input form group_norm_silu_cat: the same of torch.cat([x, x2], 1) without making the concatenation.
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
#include <atomic>
#include <cmath>
#include <vector>

#include "cpu_kernels.h"

namespace ddpm_fast {

namespace cpu {
bool avx512_supported() {
#if DDPM_FAST_X86_SIMD
  static const bool supported = __builtin_cpu_supports("avx512f");
  return supported;
#else
  return false;
#endif
}

namespace {
std::atomic<bool>& avx512_flag() {
  static std::atomic<bool> flag{avx512_supported()};
  return flag;
}
}  // namespace

bool avx512_enabled() { return avx512_flag().load(std::memory_order_relaxed); }

void set_avx512(bool enabled) {
  TORCH_CHECK(!enabled || avx512_supported(), "set_avx512: this CPU has no AVX-512F");
  avx512_flag().store(enabled, std::memory_order_relaxed);
}
}  // namespace cpu

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

#if DDPM_FAST_X86_SIMD
// SiLU of 16 lanes with AVX-512 instructions that portable code cannot name: exp(-|v|) on the Cephes polynomial
// scaled by vscalefps, then sigmoid = 1 / (1 + e) (times e below zero) from vrcp14ps and one Newton step, in
// place of a division (16 cycles a vector on AVX-512; the whole SiLU was bound by it). Relative error <= 1.3e-6
// against float64 over [-100, 100]; NaN propagates (the final product with v), +-inf map to +-inf.
__attribute__((target("avx512f"))) inline __m512 silu16(__m512 v) {
  const __m512 x = _mm512_max_ps(_mm512_min_ps(v, _mm512_sub_ps(_mm512_setzero_ps(), v)), _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __m512 e = _mm512_scalef_ps(p, n);  // exp(-|v|) in (0, 1]
  const __m512 d = _mm512_add_ps(e, _mm512_set1_ps(1.f));
  __m512 q = _mm512_rcp14_ps(d);
  q = _mm512_mul_ps(q, _mm512_fnmadd_ps(d, q, _mm512_set1_ps(2.f)));
  const __mmask16 negative = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_mul_ps(v, _mm512_mask_mul_ps(q, negative, e, q));
}

__attribute__((target("avx512f"))) void affine_silu_rows_avx512(const float* x, float* y, int64_t rows, int64_t cols,
                                                                int64_t ldx, int64_t ldy, const float* scale,
                                                                const float* shift) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    float* yr = y + r * ldy;
    int64_t c = 0;
    for (; c + 16 <= cols; c += 16) {
      const __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(xr + c), _mm512_loadu_ps(scale + c), _mm512_loadu_ps(shift + c));
      _mm512_storeu_ps(yr + c, silu16(v));
    }
    if (c < cols) {
      const __mmask16 m = static_cast<__mmask16>((1u << (cols - c)) - 1u);
      const __m512 v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, xr + c), _mm512_maskz_loadu_ps(m, scale + c),
                                       _mm512_maskz_loadu_ps(m, shift + c));
      _mm512_mask_storeu_ps(yr + c, m, silu16(v));
    }
  }
}
#endif

// y[r, c] = x[r, c] * scale[c] + shift[c], then SiLU if asked, over a rows x cols block in one call (a call
// per row cost more than the row's arithmetic at C = 32); rows ldx apart in x, ldy apart in y (a wider y: the
// two-input form writes each input's columns into its share of the output's rows). x may be y (in place).
DDPM_FAST_CPU_CLONES
void affine_silu_rows_portable(const float* x, float* y, int64_t rows, int64_t cols, int64_t ldx, int64_t ldy,
                               const float* __restrict__ scale, const float* __restrict__ shift, bool silu) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    float* yr = y + r * ldy;
    if (silu) {
      for (int64_t c = 0; c < cols; ++c) yr[c] = cpu::silu(xr[c] * scale[c] + shift[c]);
    } else {
      for (int64_t c = 0; c < cols; ++c) yr[c] = xr[c] * scale[c] + shift[c];
    }
  }
}

void affine_silu_rows(const float* x, float* y, int64_t rows, int64_t cols, int64_t ldx, int64_t ldy,
                      const float* scale, const float* shift, bool silu) {
#if DDPM_FAST_X86_SIMD
  if (silu && cpu::avx512_enabled()) return affine_silu_rows_avx512(x, y, rows, cols, ldx, ldy, scale, shift);
#endif
  affine_silu_rows_portable(x, y, rows, cols, ldx, ldy, scale, shift, silu);
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

// The three stages of channels_last, each over one (sample, block) or one (sample, group); every way of
// running them below does the same arithmetic in the same order, so the way never changes a bit.
//
// Two inputs (fp32 and bf16): x holds the first c1 channels and x2 the other C - c1, each channels_last with rows of
// its own width, and y is their concatenation along C, normalized. Per channel the arithmetic is the one-input
// form's, so the result is the same bits as the kernel on the concatenated tensor, without making it.
template <typename scalar_t>
struct ChannelsLast {
  const scalar_t* x;
  const scalar_t* x2;  // null: one input
  scalar_t* y;
  const Params& p;
  int64_t c1, rows, blocks;

  ChannelsLast(const scalar_t* x_, const scalar_t* x2_, int64_t c1_, scalar_t* y_, const Params& p_)
      : x(x_), x2(x2_), y(y_), p(p_), c1(x2_ ? c1_ : p_.c), rows(block_positions(p_.hw, p_.c)),
        blocks((p_.hw + rows - 1) / rows) {}

  int64_t rows_of(int64_t b) const { return std::min(rows, p.hw - b * rows); }

  // Per channel mean and M2 of block b of sample n, into mean/m2 (C each).
  void moments(int64_t n, int64_t b, float* mean, float* m2, std::vector<float>& buf) const {
    const int64_t first = n * p.hw + b * rows;  // the block's first position
    const scalar_t* src = x + first * c1;
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {  // bf16: converted in registers, no fp32 copy
      column_mean_m2_bf16(reinterpret_cast<const uint16_t*>(src), rows_of(b), c1, mean, m2);
      if (x2)
        column_mean_m2_bf16(reinterpret_cast<const uint16_t*>(x2 + first * (p.c - c1)), rows_of(b), p.c - c1,
                            mean + c1, m2 + c1);
    } else if constexpr (std::is_same_v<scalar_t, float>) {
      column_mean_m2(src, rows_of(b), c1, mean, m2);
      if (x2) column_mean_m2(x2 + first * (p.c - c1), rows_of(b), p.c - c1, mean + c1, m2 + c1);
    } else {
      buf.resize(rows * p.c);
      column_mean_m2(cpu::floats(src, buf.data(), rows_of(b) * p.c), rows_of(b), p.c, mean, m2);
    }
  }

  // Group g of sample n: its blocks' partials (``part``: blocks x C means, then blocks x C M2s) merged in block
  // order into each of its channels' scale and shift.
  void scale_shift(int64_t n, int64_t g, const float* part_mean, const float* part_m2, float* scale,
                   float* shift) const {
    Moments group;
    for (int64_t b = 0; b < blocks; ++b) {
      const double count = static_cast<double>(rows_of(b));
      for (int64_t c = g * p.cg; c < (g + 1) * p.cg; ++c)
        group.merge(count, part_mean[b * p.c + c] + add_at(p, n, c), part_m2[b * p.c + c]);
    }
    const float mean = static_cast<float>(group.mean);
    const float rstd = static_cast<float>(1.0 / std::sqrt(group.m2 / group.count + p.eps));
    for (int64_t c = g * p.cg; c < (g + 1) * p.cg; ++c) {
      scale[c] = rstd * weight_at(p, n, c);
      shift[c] = (add_at(p, n, c) - mean) * scale[c] + bias_at(p, n, c);
    }
  }

  // Block b of sample n normalized with its channels' scale and shift.
  void normalize(int64_t n, int64_t b, const float* scale, const float* shift, std::vector<float>& buf) const {
    const int64_t r = rows_of(b);
    const int64_t first = n * p.hw + b * rows, offset = first * p.c;
    if constexpr (std::is_same_v<scalar_t, float>) {
      affine_silu_rows(x + first * c1, y + offset, r, c1, c1, p.c, scale, shift, p.silu);
      if (x2) {
        const int64_t c2 = p.c - c1;
        affine_silu_rows(x2 + first * c2, y + offset + c1, r, c2, c2, p.c, scale + c1, shift + c1, p.silu);
      }
      return;
    }
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      if (x2) {  // the two inputs' rows gathered side by side into one fp32 row per position
        const int64_t c2 = p.c - c1;
        buf.resize(rows * p.c);
        for (int64_t i = 0; i < r; ++i) {
          load_row(x + (first + i) * c1, buf.data() + i * p.c, c1);
          load_row(x2 + (first + i) * c2, buf.data() + i * p.c + c1, c2);
        }
        affine_silu_rows(buf.data(), buf.data(), r, p.c, p.c, p.c, scale, shift, p.silu);
        cpu::store_row(buf.data(), y + offset, r * p.c);
        return;
      }
      if (!p.silu) {
        affine_rows_bf16(reinterpret_cast<const uint16_t*>(x + offset), reinterpret_cast<uint16_t*>(y + offset), r,
                         p.c, scale, shift);
        return;
      }
    }
    buf.resize(rows * p.c);
    load_row(x + offset, buf.data(), r * p.c);
    affine_silu_rows(buf.data(), buf.data(), r, p.c, p.c, p.c, scale, shift, p.silu);
    cpu::store_row(buf.data(), y + offset, r * p.c);
  }
};

template <typename scalar_t>
void group_norm_channels_last(const scalar_t* x, const scalar_t* x2, int64_t c1, scalar_t* y, const Params& p) {
  const ChannelsLast<scalar_t> k(x, x2, c1, y, p);
  const int64_t blocks = k.blocks, c = p.c;
  if (p.n >= at::get_num_threads()) {
    // Enough samples for every thread: one task per sample runs the three stages while its values are in cache.
    at::parallel_for(0, p.n, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> part_mean(blocks * c), part_m2(blocks * c), scale(c), shift(c), buf;
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t b = 0; b < blocks; ++b) k.moments(n, b, part_mean.data() + b * c, part_m2.data() + b * c, buf);
        for (int64_t g = 0; g < p.groups; ++g)
          k.scale_shift(n, g, part_mean.data(), part_m2.data(), scale.data(), shift.data());
        for (int64_t b = 0; b < blocks; ++b) k.normalize(n, b, scale.data(), shift.data(), buf);
      }
    });
    return;
  }
  // Few samples: each stage is parallel over its own tasks, (sample, block) or (sample, group).
  std::vector<float> part_mean(p.n * blocks * c), part_m2(p.n * blocks * c), scale(p.n * c), shift(p.n * c);
  at::parallel_for(0, p.n * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t task = begin; task < end; ++task)
      k.moments(task / blocks, task % blocks, part_mean.data() + task * c, part_m2.data() + task * c, buf);
  });
  at::parallel_for(0, p.n * p.groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / p.groups;
      k.scale_shift(n, task % p.groups, part_mean.data() + n * blocks * c, part_m2.data() + n * blocks * c,
                    scale.data() + n * c, shift.data() + n * c);
    }
  });
  at::parallel_for(0, p.n * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks;
      k.normalize(n, task % blocks, scale.data() + n * c, shift.data() + n * c, buf);
    }
  });
}

}  // namespace

namespace {
// The checked affine and add of an input with n samples and c channels, as fp32 tensors, and the Params over them
// (the tensors must outlive the Params' pointers).
struct Checked {
  at::Tensor w, b, a;
  Params p;
};

Checked check_args(int64_t n, int64_t c, int64_t hw, const c10::optional<at::Tensor>& weight,
                   const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& add, int64_t num_groups,
                   double eps, bool silu) {
  TORCH_CHECK(c > 0 && hw > 0, "group_norm_silu_cpu: C and H*W must be positive, got C = ", c, ", H*W = ", hw);
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
  Checked k;
  k.w = affine(weight, "weight");
  k.b = affine(bias, "bias");
  if (add) {
    TORCH_CHECK(add->device().is_cpu() && add->dim() == 2 && add->size(0) == n && add->size(1) == c,
                "group_norm_silu_cpu: add must be an (", n, ", ", c, ") CPU tensor, got ", add->sizes(), " on ",
                add->device());
    k.a = cpu::as_float(*add);
  }
  k.p = Params{n, c, hw, num_groups, c / num_groups, static_cast<float>(eps), silu,
               k.w.defined() ? k.w.data_ptr<float>() : nullptr, k.b.defined() ? k.b.data_ptr<float>() : nullptr,
               k.a.defined() ? k.a.data_ptr<float>() : nullptr, per_sample ? c : 0};
  return k;
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
  const Checked k = check_args(n, c, hw, weight, bias, add, num_groups, eps, silu);
  at::Tensor y = at::empty_like(x);
  if (n == 0) return y;
  AT_DISPATCH_V2(x.scalar_type(), "group_norm_silu_cpu", AT_WRAP([&] {
    if (cl) {
      group_norm_channels_last<scalar_t>(x.data_ptr<scalar_t>(), nullptr, c, y.data_ptr<scalar_t>(), k.p);
    } else {
      group_norm_nchw(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), k.p);
    }
  }), at::kFloat, at::kBFloat16, at::kHalf);
  return y;
}

at::Tensor group_norm_silu_cat_cpu(const at::Tensor& x, const at::Tensor& x2, const c10::optional<at::Tensor>& weight,
                                   const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& add,
                                   int64_t num_groups, double eps, bool silu) {
  for (const at::Tensor* t : {&x, &x2}) {
    TORCH_CHECK(t->device().is_cpu() && (t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16) &&
                    t->scalar_type() == x.scalar_type() && t->dim() == 4 &&
                    t->is_contiguous(at::MemoryFormat::ChannelsLast),
                "group_norm_silu_cat_cpu: x and x2 must be float32 or bfloat16 (one dtype) channels_last (N, C, H, W) "
                "CPU tensors, got ", t->scalar_type(), " ", t->sizes(), " on ", t->device());
  }
  TORCH_CHECK(x.size(0) == x2.size(0) && x.size(2) == x2.size(2) && x.size(3) == x2.size(3),
              "group_norm_silu_cat_cpu: x ", x.sizes(), " and x2 ", x2.sizes(), " differ beyond their channels");
  const int64_t n = x.size(0), c1 = x.size(1), c = c1 + x2.size(1), hw = x.size(2) * x.size(3);
  TORCH_CHECK(c1 > 0 && x2.size(1) > 0, "group_norm_silu_cat_cpu: both inputs need channels, got ", x.sizes(),
              " and ", x2.sizes());
  const Checked k = check_args(n, c, hw, weight, bias, add, num_groups, eps, silu);
  at::Tensor y = at::empty({n, c, x.size(2), x.size(3)}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (n == 0) return y;
  if (x.scalar_type() == at::kBFloat16) {
    group_norm_channels_last<at::BFloat16>(x.data_ptr<at::BFloat16>(), x2.data_ptr<at::BFloat16>(), c1,
                                           y.data_ptr<at::BFloat16>(), k.p);
  } else {
    group_norm_channels_last<float>(x.data_ptr<float>(), x2.data_ptr<float>(), c1, y.data_ptr<float>(), k.p);
  }
  return y;
}

}  // namespace ddpm_fast
