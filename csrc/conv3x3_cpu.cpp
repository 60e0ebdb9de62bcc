// conv3x3 on the CPU: a 3x3, stride-1, padding-1 convolution by Winograd's minimal filtering F(4x4, 3x3)
// (Lavin & Gray 2016), fp32, channels_last, inference; of the input or of its 2x nearest upsampling (read in
// place: the U-Nets' upsamplers).
//
// Each 4x4 block of outputs (a tile) is Y = A^T [ (G g G^T) (.) (B^T d B) ] A, with d the tile's 6x6 input
// patch and g the 3x3 kernel, per (input, output) channel pair. Summed over the input channels, the
// element-wise product becomes 36 GEMMs, one per position of the 6x6 transformed tile:
// M[k] (tiles x Co) = V[k] (tiles x C) @ U[k] (C x Co). That is 36 multiply-adds per input/output channel
// pair and tile instead of 16 * 9 = 144: 4x fewer than the direct convolution, for the price of the input
// and output transforms (additions over channel rows, linear in C and Co, not in C * Co).
//
// U = G g G^T (36, C, Co) is computed once per weight by the caller (ddpm_fast/ops/conv3x3.py, float64 then
// rounded). Here the tiles are processed in chunks small enough that a chunk's transformed inputs V and
// products M stay in the core's cache: per chunk, the input transform, the 36 GEMMs (an AVX-512 register-blocked
// kernel where the CPU has AVX-512F and C_out is a multiple of 16, else at::bmm, serial inside the parallel
// region) and the output transform with the bias, written into y. One task per chunk.
//
// Precision: fp32 throughout; the transforms' coefficients (up to 8) cost about 10-20x the direct
// convolution's rounding error (measured ~5e-6 relative to the output's scale), well inside the fast path's
// contract (ops/conv3x3.py's tests hold it to the float64 convolution).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

#include "cpu_kernels.h"

namespace ddpm_fast {

namespace {

constexpr int64_t kTile = 4;    // outputs per tile side
constexpr int64_t kPatch = 6;   // inputs per tile side (kTile + 2)
constexpr int64_t kPoints = 36; // kPatch * kPatch

// out[k][c] = sum_j B^T[k][j] in[j][c] for the six rows of B^T (points 0, 1, -1, 2, -2 and infinity):
//   4 0 -5  0 1 0 / 0 -4 -4  1 1 0 / 0 4 -4 -1 1 0 / 0 -2 -1 2 1 0 / 0 2 -1 -2 1 0 / 0 4 0 -5 0 1
DDPM_FAST_INLINE void input_rows(const float* const* in, float* const* out, int64_t n) {
  const float *d0 = in[0], *d1 = in[1], *d2 = in[2], *d3 = in[3], *d4 = in[4], *d5 = in[5];
  float *o0 = out[0], *o1 = out[1], *o2 = out[2], *o3 = out[3], *o4 = out[4], *o5 = out[5];
#pragma GCC ivdep
  for (int64_t c = 0; c < n; ++c) {
    const float a0 = d0[c], a1 = d1[c], a2 = d2[c], a3 = d3[c], a4 = d4[c], a5 = d5[c];
    const float s34 = a3 + a4, s12 = a1 + a2, d43 = a4 - a3, d12 = a1 - a2, d42 = a4 - a2, d31 = a3 - a1;
    o0[c] = 4.f * a0 - 5.f * a2 + a4;
    o1[c] = s34 - 4.f * s12;
    o2[c] = d43 + 4.f * d12;
    o3[c] = d42 + 2.f * d31;
    o4[c] = d42 - 2.f * d31;
    o5[c] = 4.f * a1 - 5.f * a3 + a5;
  }
}

// out[p][c] = sum_k A^T[p][k] in[k][c] (+ bias[c] when given) for the four rows of A^T:
//   1 1 1 1 1 0 / 0 1 -1 2 -2 0 / 0 1 1 4 4 0 / 0 1 -1 8 -8 1
DDPM_FAST_INLINE void output_rows(const float* const* in, float* const* out, const float* bias, int64_t n) {
  const float *m0 = in[0], *m1 = in[1], *m2 = in[2], *m3 = in[3], *m4 = in[4], *m5 = in[5];
  float *o0 = out[0], *o1 = out[1], *o2 = out[2], *o3 = out[3];
#pragma GCC ivdep
  for (int64_t c = 0; c < n; ++c) {
    const float s12 = m1[c] + m2[c], d12 = m1[c] - m2[c], s34 = m3[c] + m4[c], d34 = m3[c] - m4[c];
    const float b = bias ? bias[c] : 0.f;
    o0[c] = m0[c] + s12 + s34 + b;
    o1[c] = d12 + 2.f * d34 + b;
    o2[c] = s12 + 4.f * s34 + b;
    o3[c] = d12 + 8.f * d34 + m5[c] + b;
  }
}

// The output is h x w; the input h x w too, or (upsample) h/2 x w/2, read as its 2x nearest upsampling: pixel
// (hh, ww) of the upsampled image is input pixel (hh >> 1, ww >> 1), and no upsampled copy is made.
struct Geometry {
  int64_t n, c, h, w, co, tiles_h, tiles_w, shift;
  int64_t tiles() const { return n * tiles_h * tiles_w; }
};

// Where tile number t (images in order, rows of tiles within an image) sits: its image, tile row and column.
struct TileAt {
  int64_t img, ty, tx;
  TileAt(const Geometry& g, int64_t t)
      : img(t / (g.tiles_h * g.tiles_w)), ty(t % (g.tiles_h * g.tiles_w) / g.tiles_w), tx(t % g.tiles_w) {}
};

// Tiles per chunk: a chunk's V (36 x tiles x C) and M (36 x tiles x Co) in about 768 KB, so they stay in the
// core's L2 between the transforms and the GEMMs, with at least 32 tiles (fewer and each chunk rereads all of U,
// 36 x C x Co, for too little arithmetic: measured on the cifar10 preset's shapes) and at most 256; and the
// chunks a multiple of the threads, so no thread idles while another runs a last chunk (5 chunks on 2 threads
// cost the embedded model's 16x16 layers ~20%).
int64_t chunk_tiles(const Geometry& g) {
  const int64_t bytes_per_tile = kPoints * (g.c + g.co) * static_cast<int64_t>(sizeof(float));
  const int64_t most = std::clamp<int64_t>((768 << 10) / bytes_per_tile, 32, 256);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t chunks = (g.tiles() + most - 1) / most;
  chunks = (chunks + threads - 1) / threads * threads;
  return std::max<int64_t>(1, (g.tiles() + chunks - 1) / chunks);
}

// V[k][t][:] for the tiles [t0, t0 + count) of the chunk: rows of the 6x6 patch first (Z = d B), then columns.
// Cloned per instruction set as a whole, the row loops inlined (a cloned function is called through the PLT).
DDPM_FAST_CPU_CLONES
void transform_inputs(const float* x, const Geometry& g, int64_t t0, int64_t count, float* v, float* z,
                      const float* zeros) {
  const int64_t c = g.c;
  for (int64_t tt = 0; tt < count; ++tt) {
    const TileAt at(g, t0 + tt);
    const float* in[kPatch];
    float* out[kPatch];
    for (int64_t i = 0; i < kPatch; ++i) {
      const int64_t hh = at.ty * kTile - 1 + i;
      for (int64_t j = 0; j < kPatch; ++j) {
        const int64_t ww = at.tx * kTile - 1 + j;
        const bool inside = hh >= 0 && hh < g.h && ww >= 0 && ww < g.w;
        in[j] = inside ? x + ((at.img * (g.h >> g.shift) + (hh >> g.shift)) * (g.w >> g.shift) + (ww >> g.shift)) * c
                       : zeros;
        out[j] = z + (i * kPatch + j) * c;
      }
      input_rows(in, out, c);
    }
    for (int64_t l = 0; l < kPatch; ++l) {
      for (int64_t i = 0; i < kPatch; ++i) {
        in[i] = z + (i * kPatch + l) * c;
        out[i] = v + ((i * kPatch + l) * count + tt) * c;
      }
      input_rows(in, out, c);
    }
  }
}

// y's 4x4 block of each tile from M[k][t][:]: rows first (W = M A), then columns, with the bias; outputs past
// the image's edge go to scratch.
DDPM_FAST_CPU_CLONES
void transform_outputs(const float* m, const float* bias, const Geometry& g, int64_t t0, int64_t count, float* y,
                       float* w, float* scratch) {
  const int64_t co = g.co;
  for (int64_t tt = 0; tt < count; ++tt) {
    const TileAt at(g, t0 + tt);
    const float* in[kPatch];
    float* out[kTile];
    for (int64_t k = 0; k < kPatch; ++k) {
      for (int64_t l = 0; l < kPatch; ++l) in[l] = m + ((k * kPatch + l) * count + tt) * co;
      for (int64_t q = 0; q < kTile; ++q) out[q] = w + (k * kTile + q) * co;
      output_rows(in, out, nullptr, co);
    }
    for (int64_t q = 0; q < kTile; ++q) {
      for (int64_t k = 0; k < kPatch; ++k) in[k] = w + (k * kTile + q) * co;
      const int64_t ww = at.tx * kTile + q;
      for (int64_t p = 0; p < kTile; ++p) {
        const int64_t hh = at.ty * kTile + p;
        out[p] = hh < g.h && ww < g.w ? y + ((at.img * g.h + hh) * g.w + ww) * co : scratch + p * co;
      }
      output_rows(in, out, bias, co);
    }
  }
}

#if DDPM_FAST_X86_SIMD
// The chunk's 36 GEMMs, M[k] (count x Co) = V[k] (count x C) @ U[k] (C x Co), all row-major, by an AVX-512
// register-blocked kernel: R rows x 16 V columns of M held in R * V accumulators (at most 6 x 4 = 24 zmm), a
// row of U[k] loaded once per k and each V value broadcast against it. At these sizes (C, Co 32-512, 32-256
// rows) at::bmm's per-GEMM setup cost a large part of the arithmetic; U[k] (at most 512 KB) streams from L2.
template <int R, int V>
__attribute__((target("avx512f"))) void gemm_block(const float* a, int64_t lda, const float* b, int64_t ldb,
                                                    float* c, int64_t ldc, int64_t k_dim) {
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_dim; ++k) {
    __m512 row[V];
    for (int v = 0; v < V; ++v) row[v] = _mm512_loadu_ps(b + k * ldb + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * lda + k]);
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(x, row[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
}

using GemmBlock = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t);

template <int V>
GemmBlock gemm_rows(int64_t rows) {
  switch (rows) {
    case 1: return gemm_block<1, V>;
    case 2: return gemm_block<2, V>;
    case 3: return gemm_block<3, V>;
    case 4: return gemm_block<4, V>;
    case 5: return gemm_block<5, V>;
    default: return gemm_block<6, V>;
  }
}

GemmBlock gemm_kernel(int64_t rows, int64_t vectors) {
  switch (vectors) {
    case 1: return gemm_rows<1>(rows);
    case 2: return gemm_rows<2>(rows);
    case 3: return gemm_rows<3>(rows);
    default: return gemm_rows<4>(rows);
  }
}

// c (m x n) = a (m x k) @ b (k x n), row-major and dense; n a multiple of 16.
void gemm_avx512(const float* a, const float* b, float* c, int64_t m, int64_t n, int64_t k) {
  for (int64_t j = 0; j < n; j += 64) {
    const int64_t vectors = std::min<int64_t>(4, (n - j) / 16);
    for (int64_t i = 0; i < m; i += 6) {
      const int64_t rows = std::min<int64_t>(6, m - i);
      gemm_kernel(rows, vectors)(a + i * k, k, b + j, n, c + i * n + j, n, k);
    }
  }
}
#endif

}  // namespace

at::Tensor conv3x3_cpu(const at::Tensor& x, const at::Tensor& u, const c10::optional<at::Tensor>& bias,
                       bool upsample) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4,
              "conv3x3: x must be a float32 (N, C, H, W) CPU tensor, got ", x.scalar_type(), " ", x.sizes(), " on ",
              x.device());
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "conv3x3: x must be channels_last contiguous");
  const int64_t shift = upsample ? 1 : 0, h = x.size(2) << shift, w = x.size(3) << shift;
  const Geometry g{x.size(0), x.size(1), h, w, u.dim() == 3 ? u.size(2) : -1, (h + kTile - 1) / kTile,
                   (w + kTile - 1) / kTile, shift};
  TORCH_CHECK(u.device().is_cpu() && u.scalar_type() == at::kFloat && u.dim() == 3 && u.size(0) == kPoints &&
                  u.size(1) == g.c && u.is_contiguous(),
              "conv3x3: the transformed weight must be a contiguous float32 (36, ", g.c, ", C_out) CPU tensor, got ",
              u.scalar_type(), " ", u.sizes());
  at::Tensor b;
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.co && bias->device().is_cpu(),
                "conv3x3: bias must be a (", g.co, ",) CPU tensor, got ", bias->sizes());
    b = cpu::as_float(*bias);
  }
  at::Tensor y = at::empty({g.n, g.co, g.h, g.w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  if (g.c == 0) return b.defined() ? y.copy_(b.view({1, g.co, 1, 1}).expand_as(y)) : y.zero_();

  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const float* xp = xc.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const float* up = u.data_ptr<float>();
  // The AVX-512 GEMM where the CPU has it (and its loops are on) and C_out fills whole vectors; else at::bmm.
  const bool own_gemm = DDPM_FAST_X86_SIMD && cpu::avx512_enabled() && g.co % 16 == 0;
  const int64_t chunk = chunk_tiles(g), chunks = (g.tiles() + chunk - 1) / chunk;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    at::NoGradGuard no_grad;
    // Scratch, stale but for the zero row the padding reads: every other value is written before it is read.
    const int64_t sizes[] = {kPoints * chunk * g.c, kPoints * chunk * g.co, kPoints * g.c, kPatch * kTile * g.co,
                             kTile * g.co};
    int64_t total = g.c;
    for (const int64_t n : sizes) total += n;
    // Kept per thread between calls, not allocated (and, when large, page-faulted in) on every call.
    thread_local std::vector<float> buffer;
    if (static_cast<int64_t>(buffer.size()) < total) buffer.resize(total);
    float* const zeros = buffer.data();
    std::fill(zeros, zeros + g.c, 0.f);
    float* const v = zeros + g.c;
    float* const m = v + sizes[0];
    float* const z = m + sizes[1];
    float* const w = z + sizes[2];
    float* const scratch = w + sizes[3];
    const auto opts = at::TensorOptions().dtype(at::kFloat);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t t0 = blk * chunk, count = std::min(chunk, g.tiles() - t0);
      transform_inputs(xp, g, t0, count, v, z, zeros);
      if (own_gemm) {
#if DDPM_FAST_X86_SIMD
        for (int64_t k = 0; k < kPoints; ++k)
          gemm_avx512(v + k * count * g.c, up + k * g.c * g.co, m + k * count * g.co, count, g.co, g.c);
#endif
      } else {
        at::Tensor vt = at::from_blob(v, {kPoints, count, g.c}, opts);
        at::Tensor mt = at::from_blob(m, {kPoints, count, g.co}, opts);
        at::bmm_out(mt, vt, u);
      }
      transform_outputs(m, bp, g, t0, count, yp, w, scratch);
    }
  });
  return y;
}

}  // namespace ddpm_fast
