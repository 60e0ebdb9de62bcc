// residual_add on the CPU: out = y + skip + bias[c] in one pass (forward; inference).
//
// Same contract as ddpm_fast/ops/residual_add.py for y and skip of one dtype (the Python side sends
// mixed dtypes to the reference): fp32 arithmetic, output in that dtype and y's memory format. Rows are
// one position's C channels (channels_last) or one channel's H*W positions (NCHW).
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

#include "cpu_kernels.h"

namespace ddpm_fast {

namespace {

DDPM_FAST_CPU_CLONES
void add_rows(const float* y, const float* skip, const float* bias, float* out, int64_t n) {
  if (bias) {
    for (int64_t i = 0; i < n; ++i) out[i] = y[i] + skip[i] + bias[i];
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = y[i] + skip[i];
  }
}

DDPM_FAST_CPU_CLONES
void add_rows_scalar(const float* y, const float* skip, float bias, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = y[i] + skip[i] + bias;
}

// A block of bf16 rows, converted in registers (no fp32 copies of y, skip and out); per value the fp32 path's
// arithmetic, so the same bits.
DDPM_FAST_CPU_CLONES
void add_rows_bf16(const uint16_t* __restrict__ y, const uint16_t* __restrict__ skip, const float* __restrict__ bias,
                   uint16_t* __restrict__ out, int64_t r0, int64_t r1, int64_t row_len, int64_t channels,
                   bool channels_last) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t at = (r - r0) * row_len;
    if (!bias) {
      for (int64_t i = 0; i < row_len; ++i)
        out[at + i] = cpu::bf16_bits(cpu::bf16_value(y[at + i]) + cpu::bf16_value(skip[at + i]));
    } else if (channels_last) {
      for (int64_t i = 0; i < row_len; ++i)
        out[at + i] = cpu::bf16_bits(cpu::bf16_value(y[at + i]) + cpu::bf16_value(skip[at + i]) + bias[i]);
    } else {
      const float b = bias[r % channels];
      for (int64_t i = 0; i < row_len; ++i)
        out[at + i] = cpu::bf16_bits(cpu::bf16_value(y[at + i]) + cpu::bf16_value(skip[at + i]) + b);
    }
  }
}

template <typename scalar_t>
void residual_add_impl(const scalar_t* y, const scalar_t* skip, const float* bias, scalar_t* out, int64_t rows,
                       int64_t row_len, int64_t channels, bool channels_last) {
  // Blocks of whole rows, about 4K values each (three fp32 scratch rows in L1/L2).
  const int64_t per_block = std::max<int64_t>(1, 4096 / row_len);
  const int64_t blocks = (rows + per_block - 1) / per_block;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    constexpr bool bf16 = std::is_same_v<scalar_t, at::BFloat16>;
    const int64_t scratch = bf16 ? 0 : per_block * row_len;  // bf16: converted in registers
    std::vector<float> sy(scratch), ss(scratch), so(scratch);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * per_block, r1 = std::min(rows, r0 + per_block);
      const int64_t offset = r0 * row_len, count = (r1 - r0) * row_len;
      if constexpr (bf16) {
        add_rows_bf16(reinterpret_cast<const uint16_t*>(y + offset), reinterpret_cast<const uint16_t*>(skip + offset),
                      bias, reinterpret_cast<uint16_t*>(out + offset), r0, r1, row_len, channels, channels_last);
        continue;
      }
      const float* fy = cpu::floats(y + offset, sy.data(), count);
      const float* fs = cpu::floats(skip + offset, ss.data(), count);
      float* fo = cpu::work_row(out + offset, so.data());
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t at = (r - r0) * row_len;
        if (channels_last || !bias) {
          add_rows(fy + at, fs + at, bias, fo + at, row_len);
        } else {
          add_rows_scalar(fy + at, fs + at, bias[r % channels], fo + at, row_len);
        }
      }
      cpu::finish_row(fo, out + offset, count);
    }
  });
}

}  // namespace

at::Tensor residual_add_cpu(const at::Tensor& y, const at::Tensor& skip, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(y.device().is_cpu() && skip.device().is_cpu(), "residual_add_cpu: y is on ", y.device(), ", skip on ",
              skip.device(), "; this kernel runs on the CPU");
  TORCH_CHECK(y.dim() == 4, "residual_add_cpu: y must be 4-D (N, C, H, W), got shape ", y.sizes());
  TORCH_CHECK(y.sizes() == skip.sizes(), "residual_add_cpu: y ", y.sizes(), " and skip ", skip.sizes(),
              " must have the same shape");
  TORCH_CHECK(y.scalar_type() == skip.scalar_type(), "residual_add_cpu: y is ", y.scalar_type(), ", skip ",
              skip.scalar_type(), "; the kernel takes one dtype");
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kBFloat16 || y.scalar_type() == at::kHalf,
              "residual_add_cpu: y must be float32, bfloat16 or float16, got ", y.scalar_type());
  const bool cl = channels_last_4d(y);
  TORCH_CHECK(cl || y.is_contiguous(), "residual_add_cpu: y must be contiguous or channels_last");
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  TORCH_CHECK(skip.is_contiguous(fmt), "residual_add_cpu: skip must have y's memory format (",
              cl ? "channels_last" : "contiguous", ")");
  const int64_t c = y.size(1), hw = y.size(2) * y.size(3);
  at::Tensor b;
  if (bias) {
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == c,
                "residual_add_cpu: bias must be a (", c, ",) CPU tensor, got ", bias->sizes(), " on ",
                bias->device());
    b = cpu::as_float(*bias);
  }
  at::Tensor out = at::empty_like(y);
  if (y.numel() == 0) return out;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const int64_t rows = cl ? y.size(0) * hw : y.size(0) * c;
  const int64_t row_len = cl ? c : hw;
  AT_DISPATCH_V2(y.scalar_type(), "residual_add_cpu", AT_WRAP([&] {
    residual_add_impl(y.data_ptr<scalar_t>(), skip.data_ptr<scalar_t>(), bp, out.data_ptr<scalar_t>(), rows,
                      row_len, c, cl);
  }), at::kFloat, at::kBFloat16, at::kHalf);
  return out;
}

}  // namespace ddpm_fast
