// The DDPM/DDIM reverse-step update, shared by the CPU and CUDA kernels.
//
// Every sampler step is one linear form over per-timestep coefficients (a row of the table
// that ddpm_fast.samplers builds in float64 and hands over as fp32):
//   eps     = eps_u + w (eps_c - eps_u)                 (classifier-free guidance, optional)
//   x0_hat  = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps   (optionally clipped to [-1, 1])
//   x_prev  = c_x0 x0_hat + c_xt x_t + c_eps eps + sum_k c_slot_k H_k + sigma z
//   (multistep) H_{push_slot - 1} <- push_x0 x0_hat + push_eps eps      (push_slot 0: nothing kept)
// H_0..H_2 are a multistep solver's ring buffers of earlier model outputs (in x0 or eps form, as its
// table says). The table names slots, not lags: step i's row weighs the slot that holds the output it
// needs and pushes into the oldest one, so a step reads each slot once and writes one, whatever the order.
// With learned variance (Improved DDPM, openai's learned_range) the model also outputs v in [-1, 1] and
//   sigma = sigma_col * exp(0.5 * (frac log_var_max + (1 - frac) log_var_min)),  frac = (v + 1) / 2,
// where sigma_col is 1 on noisy steps and 0 on the last, log_var_max = log beta_t and log_var_min the
// clipped log posterior variance.
// DDPM uses (c_x0, c_xt) = posterior mean coefficients, c_eps = 0; DDIM uses c_x0 = sqrt(abar_prev),
// c_xt = 0, c_eps = sqrt(1 - abar_prev - sigma^2); DPM-Solver++ (multistep) weighs this step's data
// prediction x0_hat and the previous ones; UniPC, DEIS, PLMS, iPNDM and Heun are other rows of the same
// form (ddpm_fast.solvers compiles them). Keeping one form keeps one kernel.
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
  kCoefSlot0 = 6,  // kCoefSlot0 + k weighs ring slot k
  kLogVarMin = 9,
  kLogVarMax = 10,
  kPushX0 = 11,
  kPushEps = 12,
  kPushSlot = 13,  // 0: keep nothing; k >= 1: store push_x0 x0_hat + push_eps eps in slot k - 1
  kNumCoefs = 14,
};
constexpr int kMaxHistory = 3;

// The ring slot a row writes (-1: none).
DDPM_HD int push_slot(const float* row) { return static_cast<int>(row[kPushSlot]) - 1; }

DDPM_HD float learned_sigma(const float* row, float v) {
  const float frac = 0.5f * (v + 1.f);
  return row[kSigma] * expf(0.5f * (frac * row[kLogVarMax] + (1.f - frac) * row[kLogVarMin]));
}

// sigma: row[kSigma], or learned_sigma(row, v) for a learned-variance model.
// x_prev of one element; push_out receives what the row keeps (push_x0 x0_hat + push_eps eps). h holds the
// element's ring slots (0 for slots the step does not have).
DDPM_HD float reverse_step_element(const float* row, float x, float eps, float z, bool clip, const float* h,
                                   float sigma, float* push_out) {
  float x0 = row[kSqrtRecipAcp] * x - row[kSqrtRecipm1Acp] * eps;
  if (clip) x0 = x0 < -1.f ? -1.f : (x0 > 1.f ? 1.f : x0);
  *push_out = row[kPushX0] * x0 + row[kPushEps] * eps;
  return row[kCoefX0] * x0 + row[kCoefXt] * x + row[kCoefEps] * eps + row[kCoefSlot0] * h[0] +
         row[kCoefSlot0 + 1] * h[1] + row[kCoefSlot0 + 2] * h[2] + sigma * z;
}

}  // namespace ddpm_fast
