// The DDPM/DDIM reverse-step update, shared by the CPU and CUDA kernels.
//
// Every sampler step is one linear form over per-timestep coefficients (a row of the table
// that ddpm_fast.samplers builds in float64 and hands over as fp32):
//   eps     = eps_u + w (eps_c - eps_u)                 (classifier-free guidance, optional)
//   x0_hat  = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps   (optionally clipped to [-1, 1])
//   x_prev  = c_x0 x0_hat + c_xt x_t + c_eps eps + c_h1 h1 + c_h2 h2 + sigma z
//   (multistep) h2 <- h1, h1 <- x0_hat
// With learned variance (Improved DDPM, openai's learned_range) the model also outputs v in [-1, 1] and
//   sigma = sigma_col * exp(0.5 * (frac log_var_max + (1 - frac) log_var_min)),  frac = (v + 1) / 2,
// where sigma_col is 1 on noisy steps and 0 on the last, log_var_max = log beta_t and log_var_min the
// clipped log posterior variance.
// DDPM uses (c_x0, c_xt) = posterior mean coefficients, c_eps = 0; DDIM uses c_x0 = sqrt(abar_prev),
// c_xt = 0, c_eps = sqrt(1 - abar_prev - sigma^2); DPM-Solver++ (multistep) weighs this step's data
// prediction x0_hat and the previous ones h1, h2, with c_eps = 0. Keeping one form keeps one kernel.
// Column names follow ddpm_fast.ops.reverse_step.COEF_COLUMNS.
#pragma once

#ifdef __CUDACC__
#define DDPM_HD __host__ __device__ __forceinline__
#else
#define DDPM_HD inline
#endif

namespace ddpm_fast {

enum Coef : int {
  kSqrtRecipAcp = 0,
  kSqrtRecipm1Acp = 1,
  kCoefX0 = 2,
  kCoefXt = 3,
  kCoefEps = 4,
  kSigma = 5,
  kCoefHist1 = 6,
  kCoefHist2 = 7,
  kLogVarMin = 8,
  kLogVarMax = 9,
  kNumCoefs = 10,
};

// x_prev of one element; x0 receives x0_hat (what a multistep solver keeps as h1). h1, h2 are 0 when the
// step keeps no history.
DDPM_HD float learned_sigma(const float* row, float v) {
  const float frac = 0.5f * (v + 1.f);
  return row[kSigma] * expf(0.5f * (frac * row[kLogVarMax] + (1.f - frac) * row[kLogVarMin]));
}

// sigma: row[kSigma], or learned_sigma(row, v) for a learned-variance model.
DDPM_HD float reverse_step_element(const float* row, float x, float eps, float z, bool clip, float h1, float h2,
                                   float sigma, float* x0_out) {
  float x0 = row[kSqrtRecipAcp] * x - row[kSqrtRecipm1Acp] * eps;
  if (clip) x0 = x0 < -1.f ? -1.f : (x0 > 1.f ? 1.f : x0);
  *x0_out = x0;
  return row[kCoefX0] * x0 + row[kCoefXt] * x + row[kCoefEps] * eps + row[kCoefHist1] * h1 + row[kCoefHist2] * h2 +
         sigma * z;
}

}  // namespace ddpm_fast
