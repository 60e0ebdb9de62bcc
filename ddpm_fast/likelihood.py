"""The variational bound's terms (Ho et al. 2020 eq. 5; Nichol & Dhariwal 2021), in bits per dimension.

For t > 0 the term is KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)); at t = 0 it is the decoder's negative
log-likelihood of x_0 under a Gaussian discretized to the 8-bit grid. The reverse process p uses the
model's variance: learned_range (v from a learned-sigma model's second output half), fixed_large (beta_t,
with the posterior variance at t = 0, as improved-diffusion takes it) or fixed_small (the clipped posterior
variance). These are the torch reference definitions, computed in fp32 (float64 tables cast once); the
hybrid training loss (losses.py) uses them with the mean's gradient stopped. ``bits_per_dim`` is the whole
bound per image (prior + every term, or a stratified estimate), batched over (image, t) pairs, its noise
the project's Philox stream keyed by (seed, image, t); ``python -m ddpm_fast.nll`` is its command.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def default_variance(model, schedule: NoiseSchedule) -> str:
    """The reverse variance a model's checkpoint declares: learned_range for a learned-sigma model; for openai's
    ADM fixed_large unless sigma_small; otherwise the scheduler config's variance_type (diffusers' default,
    fixed_small, when it names none)."""
    from ddpm_fast.adm import ADMConfig

    config = model.config
    if config.learn_sigma:
        return "learned_range"
    if isinstance(config, ADMConfig):
        return "fixed_small" if config.sigma_small else "fixed_large"
    return schedule.variance_type or "fixed_small"


def vb_terms_bpd(model, schedule: NoiseSchedule, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                 clip_denoised: bool = True, class_labels=None, variance: str | None = None) -> torch.Tensor:
    """The bound's term at t for each image, in bits/dim: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0,
    the discretized decoder NLL at t = 0 (see the module docstring). ``variance`` None: the model's own."""
    variance = variance or default_variance(model, schedule)
    out = model(x_t, t, class_labels)
    return vb_terms_from_output(schedule, out, x_start, x_t, t, clip_denoised, variance)


def prior_bpd(schedule: NoiseSchedule, x_start: torch.Tensor) -> torch.Tensor:
    """KL(q(x_T | x_0) || N(0, I)) per image in bits/dim: what the schedule leaves of x_0 at T (no model)."""
    last = torch.full((x_start.shape[0],), len(schedule) - 1, dtype=torch.int64, device=x_start.device)
    mean = _at(schedule, "sqrt_alphas_cumprod", last) * x_start.float()
    log_var = torch.log1p(-_at(schedule, "alphas_cumprod", last)).expand_as(mean)
    return normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(mean)).mean(dim=(1, 2, 3)) / math.log(2.0)


@dataclass
class Bound:
    """The bound of N images: ``total_bpd`` (N,) = sum of the vb terms + ``prior_bpd``; per timestep (N, K)
    ``vb``, ``mse`` (eps) and ``xstart_mse`` at ``timesteps`` (N, K) (K = T for the full bound). With an
    estimate, ``total_bpd`` is the stratified estimate of the sum and ``stderr`` its standard error (else 0)."""

    total_bpd: torch.Tensor
    prior_bpd: torch.Tensor
    vb: torch.Tensor
    mse: torch.Tensor
    xstart_mse: torch.Tensor
    timesteps: torch.Tensor
    stderr: torch.Tensor

    @property
    def decoder_bpd(self) -> torch.Tensor:
        """The t = 0 term (nan where an estimate did not draw t = 0)."""
        hit = self.timesteps == 0
        return torch.where(hit, self.vb, torch.zeros_like(self.vb)).sum(1) / hit.any(1).float()


def strata(num_timesteps: int, k: int) -> list[range]:
    """K strata of the T timesteps: t = 0 alone (the decoder term, often the largest single one, is always
    evaluated), then K - 1 contiguous strata of 1..T-1, sizes differing by at most one."""
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= num_timesteps:
        raise ValueError(f"estimate: K must be an int in [2, {num_timesteps}] (t = 0 and at least one more "
                         f"stratum), got {k!r}")
    rest = num_timesteps - 1
    bounds = [1 + round(i * rest / (k - 1)) for i in range(k)]
    return [range(0, 1)] + [range(bounds[i], bounds[i + 1]) for i in range(k - 1)]


def _estimate_timesteps(num_timesteps: int, k: int, seed: int, images: torch.Tensor) -> torch.Tensor:
    """(N, K): one t drawn uniformly in each stratum, from a generator keyed by (seed, image) alone."""
    parts = strata(num_timesteps, k)
    rows = []
    for image in images.tolist():
        g = torch.Generator().manual_seed((seed * 1_000_003 + image) % (2**63 - 1))
        u = torch.rand(k, generator=g, dtype=torch.float64)
        rows.append([p.start + min(int(u[i] * len(p)), len(p) - 1) for i, p in enumerate(parts)])
    return torch.tensor(rows, dtype=torch.int64)


@torch.no_grad()
def bits_per_dim(model, schedule: NoiseSchedule, x_start: torch.Tensor, *, seed: int = 0, class_labels=None,
                 clip_denoised: bool = True, variance: str | None = None, image_index=0, batch_size: int = 64,
                 estimate: int | None = None, progress=None) -> Bound:
    """The variational bound of each image of ``x_start`` (float NCHW in [-1, 1], on the 8-bit grid).

    Every (image, t) pair is one row of a batched forward (``batch_size`` rows per call, any mix of images and
    timesteps). x_t of image k at t is drawn from the project's Philox stream keyed by (seed, k, t): an image's
    bound does not depend on the batch it sits in (k = ``image_index`` + its place, or ``image_index[i]``).
    ``estimate`` K: one t per stratum of T/K steps instead of all T, an unbiased estimate of the sum
    (sum_k |stratum_k| L_{t_k}) with its standard error from collapsed pairs of strata. ``progress``: a
    callback given the number of rows done after each forward.
    """
    from ddpm_fast.config import conditioning_labels
    from ddpm_fast.noise import BOUND_STREAM, check_seed, normal

    if not torch.is_tensor(x_start) or x_start.dim() != 4 or not x_start.is_floating_point():
        raise ValueError("bits_per_dim: x_start must be a floating (N, C, H, W) tensor in [-1, 1]")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"bits_per_dim: batch_size must be a positive int, got {batch_size!r}")
    seed = check_seed(seed)
    variance = variance or default_variance(model, schedule)
    device = next(model.parameters()).device
    x_start = x_start.to(device, torch.float32)
    n, big_t = x_start.shape[0], len(schedule)
    if isinstance(image_index, int):
        images = torch.arange(image_index, image_index + n, dtype=torch.int64)
    else:
        images = torch.as_tensor(image_index, dtype=torch.int64).cpu()
    labels = conditioning_labels(model.config.num_classes, class_labels, n, device)
    if estimate is None:
        timesteps = torch.arange(big_t, dtype=torch.int64).expand(n, big_t)
    else:
        timesteps = _estimate_timesteps(big_t, estimate, seed, images)
    k = timesteps.shape[1]
    rows_image = torch.arange(n).repeat_interleave(k)
    rows_t = timesteps.reshape(-1)
    vb = torch.empty(n * k, dtype=torch.float32, device=device)
    mse, xmse = torch.empty_like(vb), torch.empty_like(vb)
    per_image = x_start[0].numel()
    counter = torch.tensor([seed, 0], dtype=torch.int64, device=device)
    a_bar = schedule.device_table("sqrt_alphas_cumprod", device)
    s_bar = schedule.device_table("sqrt_one_minus_alphas_cumprod", device)
    for start in range(0, n * k, batch_size):
        idx, t = rows_image[start:start + batch_size].to(device), rows_t[start:start + batch_size].to(device)
        x0 = x_start[idx]
        noise = normal(counter, images.to(device)[idx], per_image, BOUND_STREAM, steps=t).view(x0.shape)
        x_t = a_bar[t].view(-1, 1, 1, 1) * x0 + s_bar[t].view(-1, 1, 1, 1) * noise
        out = model(x_t, t, None if labels is None else labels[idx])
        c = x0.shape[1]
        eps = out[:, :c].float()
        vb[start:start + len(idx)] = vb_terms_from_output(schedule, out, x0, x_t, t, clip_denoised, variance)
        mse[start:start + len(idx)] = (eps - noise).square().mean(dim=(1, 2, 3))
        a, b = _at(schedule, "sqrt_recip_alphas_cumprod", t), _at(schedule, "sqrt_recipm1_alphas_cumprod", t)
        pred = a * x_t - b * eps
        if clip_denoised:
            pred = pred.clamp(-1.0, 1.0)
        xmse[start:start + len(idx)] = (pred - x0).square().mean(dim=(1, 2, 3))
        if progress is not None:
            progress(len(idx))
    vb, mse, xmse = (v.view(n, k) for v in (vb, mse, xmse))
    prior = prior_bpd(schedule, x_start)
    if estimate is None:
        total, stderr = vb.sum(1) + prior, torch.zeros_like(prior)
    else:
        sizes = torch.tensor([len(p) for p in strata(big_t, estimate)], dtype=torch.float32, device=device)
        y = vb * sizes
        total = y.sum(1) + prior
        pairs = y[:, 1: 1 + ((k - 1) // 2) * 2].view(n, -1, 2)  # t = 0 is exact: no variance
        stderr = (pairs[..., 0] - pairs[..., 1]).square().sum(1).sqrt()
    return Bound(total.cpu(), prior.cpu(), vb.cpu(), mse.cpu(), xmse.cpu(), timesteps.clone(), stderr.cpu())
