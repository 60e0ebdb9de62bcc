"""The variational bound's terms (Ho et al. 2020 eq. 5; Nichol & Dhariwal 2021), in bits per dimension.

For t > 0 the term is KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)); at t = 0 it is the decoder's negative
log-likelihood of x_0 under a Gaussian discretized to the 8-bit grid. The reverse process p uses the
model's variance: learned_range (v from a learned-sigma model's second output half), fixed_large (beta_t,
with the posterior variance at t = 0, as improved-diffusion takes it) or fixed_small (the clipped posterior
variance). These are the torch reference definitions, computed in fp32 (float64 tables cast once); the
hybrid training loss (losses.py) uses them with the mean's gradient stopped.
"""

from __future__ import annotations

import math

import torch

from ddpm_fast.schedule import NoiseSchedule

VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF (the one the published bounds use)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) for x on the 8-bit grid rescaled to [-1, 1] (bins of width 2/255; the end bins reach to
    +-infinity), under N(means, exp(log_scales)^2); elementwise, in nats."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _at(schedule: NoiseSchedule, name: str, t: torch.Tensor) -> torch.Tensor:
    return schedule.device_table(name, t.device)[t].view(-1, 1, 1, 1)


def model_log_variance(schedule: NoiseSchedule, t: torch.Tensor, variance: str, v: torch.Tensor | None = None):
    """log sigma_t^2 of the reverse process (see the module docstring); (N, 1, 1, 1), or per element with v."""
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}")
    if variance == "learned_range":
        if v is None:
            raise ValueError("variance 'learned_range' needs the model's v (its second output half)")
        frac = (v.float() + 1.0) / 2.0
        return frac * _at(schedule, "log_betas", t) + (1.0 - frac) * _at(schedule, "posterior_log_variance_clipped", t)
    if variance == "fixed_large":
        return _at(schedule, "log_betas_large", t)
    return _at(schedule, "posterior_log_variance_clipped", t)


def vb_terms_from_output(schedule: NoiseSchedule, model_output: torch.Tensor, x_start: torch.Tensor,
                         x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                         variance: str = "fixed_large") -> torch.Tensor:
    """The bound's term at t per image, in bits/dim, from the model's output at (x_t, t): eps (C channels) or
    eps and v (2C, needed by learned_range)."""
    c = x_t.shape[1]
    eps = model_output[:, :c].float()
    v = model_output[:, c:] if model_output.shape[1] == 2 * c else None
    x_start, x_t = x_start.float(), x_t.float()
    a, b = _at(schedule, "sqrt_recip_alphas_cumprod", t), _at(schedule, "sqrt_recipm1_alphas_cumprod", t)
    pred_x0 = a * x_t - b * eps
    if clip_denoised:
        pred_x0 = pred_x0.clamp(-1.0, 1.0)
    coef1, coef2 = _at(schedule, "posterior_mean_coef1", t), _at(schedule, "posterior_mean_coef2", t)
    model_mean = coef1 * pred_x0 + coef2 * x_t
    log_var = model_log_variance(schedule, t, variance, v).expand_as(model_mean)
    true_mean = coef1 * x_start + coef2 * x_t
    true_log_var = _at(schedule, "posterior_log_variance_clipped", t)
    kl = normal_kl(true_mean, true_log_var, model_mean, log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
    return torch.where(t == 0, nll, kl)
