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

from ddpm_fast.config import conditioning_labels
from ddpm_fast.engine import capture_graphs
from ddpm_fast.families import family_of
from ddpm_fast.noise import BOUND_STREAM, check_seed, image_indices, normal
from ddpm_fast.ops.vb_terms import (  # noqa: F401 (the reference formulas, re-exported)
    VB_COLUMNS,
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    normal_kl,
    vb_terms,
    vb_terms_ref,
)
from ddpm_fast.schedule import NoiseSchedule

VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def _at(schedule: NoiseSchedule, name: str, t: torch.Tensor) -> torch.Tensor:
    return schedule.device_table(name, t.device)[t].view(-1, 1, 1, 1)


def vb_table(schedule: NoiseSchedule, variance: str, device=None) -> torch.Tensor:
    """The (T, 8) fp32 table of the fused vb_terms op (columns ops.VB_COLUMNS) for ``variance``, built from
    the schedule's float64 tables and cast once; cached per (variance, device)."""
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}")
    device = torch.device(device or "cpu")
    cache = schedule._device_tables  # the schedule's per-device table cache
    key = ("vb_terms table, " + variance, str(device))
    if key not in cache:
        fixed = "log_betas_large" if variance == "fixed_large" else "posterior_log_variance_clipped"
        cols = {"sqrt_recip_alphas_cumprod": "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod": "sqrt_recipm1_alphas_cumprod",
                "posterior_mean_coef1": "posterior_mean_coef1", "posterior_mean_coef2": "posterior_mean_coef2",
                "true_log_variance": "posterior_log_variance_clipped", "model_log_variance": fixed,
                "log_var_min": "posterior_log_variance_clipped", "log_var_max": "log_betas"}
        table = torch.stack([getattr(schedule, cols[c]) for c in VB_COLUMNS], dim=1)
        cache[key] = table.to(device=device, dtype=torch.float32).contiguous()
    return cache[key]


def _split(model_output: torch.Tensor, channels: int):
    """eps and, for a learned-sigma output (2C channels), v."""
    eps = model_output[:, :channels]
    return eps, model_output[:, channels:] if model_output.shape[1] == 2 * channels else None


def vb_terms_from_output(schedule: NoiseSchedule, model_output: torch.Tensor, x_start: torch.Tensor,
                         x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                         variance: str = "fixed_large") -> torch.Tensor:
    """The bound's term at t per image, in bits/dim, from the model's output at (x_t, t): eps (C channels) or
    eps and v (2C, needed by learned_range). The torch reference (autograd flows: the hybrid loss uses it)."""
    eps, v = _split(model_output, x_t.shape[1])
    if variance == "learned_range" and v is None:
        raise ValueError("variance 'learned_range' needs the model's v (its second output half)")
    table = vb_table(schedule, variance, x_t.device)
    # Only the vb column is asked for: eps stands in for the noise (no tensor made per call; the training loss
    # calls this every step).
    return vb_terms_ref(x_start.float(), x_t.float(), eps, eps, table, t, clip_denoised,
                        v if variance == "learned_range" else None)[:, 0]


def default_variance(model, schedule: NoiseSchedule) -> str:
    """The reverse variance a model's checkpoint declares: learned_range for a learned-sigma model; for openai's
    ADM fixed_large unless sigma_small; otherwise the scheduler config's variance_type (diffusers' default,
    fixed_small, when it names none)."""
    return family_of(model).sampled_variance(model.config) or schedule.variance_type or "fixed_small"


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
    evaluated), then K - 1 contiguous strata of 1..T-1 growing geometrically (boundaries near T^(i/(K-1)), at
    least one step each): the terms are largest and change fastest at small t, where the strata are single
    steps (evaluated exactly); at large t, where the terms are small and flat, one draw covers many."""
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= num_timesteps:
        raise ValueError(f"estimate: K must be an int in [2, {num_timesteps}] (t = 0 and at least one more "
                         f"stratum), got {k!r}")
    m = k - 1
    bounds = [1]
    for i in range(1, m + 1):
        target = round(num_timesteps ** (i / m))
        bounds.append(min(max(bounds[-1] + 1, target), num_timesteps - (m - i)))
    return [range(0, 1)] + [range(bounds[i], bounds[i + 1]) for i in range(m)]


def _collapsed_strata_stderr(vb: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The standard error of sum_k |s_k| L_{t_k} (one draw per stratum) per image. A stratum of one step is
    exact; the others are collapsed in adjacent pairs, each pair's draws taken as two from one distribution:
    Var(|s_1| L_1) + Var(|s_2| L_2) ~ (|s_1|^2 + |s_2|^2) (L_1 - L_2)^2 / 2 (a last odd one joins the pair
    before it). Adjacent strata differ in mean too, so it errs on the large side."""
    drawn = [i for i, size in enumerate(sizes) if size > 1]
    var = torch.zeros(vb.shape[0], dtype=vb.dtype, device=vb.device)
    if len(drawn) < 2:
        return var
    pairs = [(drawn[i], drawn[i + 1]) for i in range(0, len(drawn) - 1, 2)]
    if len(drawn) % 2:
        pairs.append((drawn[-2], drawn[-1]))
    for a, b in pairs:
        var += (sizes[a] ** 2 + sizes[b] ** 2) / 2 * (vb[:, a] - vb[:, b]).square()
    return var.sqrt()


def _estimate_timesteps(num_timesteps: int, k: int, seed: int, images: torch.Tensor) -> torch.Tensor:
    """(N, K): one t drawn uniformly in each stratum, from a generator keyed by (seed, image) alone."""
    parts = strata(num_timesteps, k)
    rows = []
    for image in images.tolist():
        g = torch.Generator().manual_seed((seed * 1_000_003 + image) % (2**63 - 1))
        u = torch.rand(k, generator=g, dtype=torch.float64)
        rows.append([p.start + min(int(u[i] * len(p)), len(p) - 1) for i, p in enumerate(parts)])
    return torch.tensor(rows, dtype=torch.int64)


class BoundRows:
    """The batched bound's inner step: (image, t) rows in, their (rows, 3) terms [vb bits/dim, mse, xstart_mse]
    out: Philox noise keyed by (seed, image, t), x_t, one forward, the fused vb_terms. It makes no device->host
    read, so a CUDA graph can capture it over static row buffers (``graph_rows``)."""

    def __init__(self, model, schedule: NoiseSchedule, x_start: torch.Tensor, images: torch.Tensor, labels, seed: int,
                 clip_denoised: bool, variance: str):
        device = x_start.device
        self.model, self.x_start, self.labels, self.clip = model, x_start, labels, clip_denoised
        self.images = images.to(device)
        self.counter = torch.tensor([seed, 0], dtype=torch.int64, device=device)
        self.a_bar = schedule.device_table("sqrt_alphas_cumprod", device)
        self.s_bar = schedule.device_table("sqrt_one_minus_alphas_cumprod", device)
        self.table, self.learned = vb_table(schedule, variance, device), variance == "learned_range"

    def __call__(self, idx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0 = self.x_start[idx]
        noise = normal(self.counter, self.images[idx], x0[0].numel(), BOUND_STREAM, steps=t).view(x0.shape)
        x_t = self.a_bar[t].view(-1, 1, 1, 1) * x0 + self.s_bar[t].view(-1, 1, 1, 1) * noise
        out = self.model(x_t, t, None if self.labels is None else self.labels[idx])
        eps, v = _split(out, x0.shape[1])
        return vb_terms(x0, x_t, eps, noise, self.table, t, self.clip, v if self.learned else None)


class GraphRows:
    """``BoundRows`` at a fixed batch over static (image, t) buffers: on a GPU captured once into a CUDA graph and
    replayed per batch (the rows copied in; a short last batch padded with its first row); on a CPU the same
    buffers and padding, run eagerly (what the captured graph computes)."""

    def __init__(self, rows: BoundRows, batch: int):
        device = rows.x_start.device
        self.rows, self.batch = rows, batch
        self.idx = torch.zeros(batch, dtype=torch.int64, device=device)
        self.t = torch.zeros(batch, dtype=torch.int64, device=device)
        self.out = torch.zeros(batch, 3, dtype=torch.float32, device=device)
        self.graph = None
        if device.type == "cuda":
            self.graph = capture_graphs({"batch": self.step}, device)["batch"]

    def step(self) -> None:
        self.out.copy_(self.rows(self.idx, self.t))

    def __call__(self, idx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        k = len(idx)
        self.idx[:k].copy_(idx)
        self.t[:k].copy_(t)
        if k < self.batch:  # padding rows: valid indices, results dropped
            self.idx[k:].copy_(idx[:1].expand(self.batch - k))
            self.t[k:].copy_(t[:1].expand(self.batch - k))
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()
        return self.out[:k].clone()


@torch.no_grad()
def bits_per_dim(model, schedule: NoiseSchedule, x_start: torch.Tensor, *, seed: int = 0, class_labels=None,
                 clip_denoised: bool = True, variance: str | None = None, image_index=0, batch_size: int = 64,
                 estimate: int | None = None, progress=None, engine: str = "eager") -> Bound:
    """The variational bound of each image of ``x_start`` (float NCHW in [-1, 1], on the 8-bit grid).

    Every (image, t) pair is one row of a batched forward (``batch_size`` rows per call, any mix of images and
    timesteps). x_t of image k at t is drawn from the project's Philox stream keyed by (seed, k, t): an image's
    bound does not depend on the batch it sits in (k = ``image_index`` + its place, or ``image_index[i]``).
    ``estimate`` K: one t per stratum of T/K steps instead of all T, an unbiased estimate of the sum
    (sum_k |stratum_k| L_{t_k}; strata see ``strata``) with its standard error from collapsed pairs of strata
    (``_collapsed_strata_stderr``). ``progress``: a
    callback given the number of rows done after each forward. ``engine="graph"``: each batch is a replay of
    one captured CUDA graph (on a GPU; the fast path's model, fixed shapes); on a CPU the same static-buffer
    loop runs eagerly. Both give the eager loop's numbers.
    """
    if not torch.is_tensor(x_start) or x_start.dim() != 4 or not x_start.is_floating_point():
        raise ValueError("bits_per_dim: x_start must be a floating (N, C, H, W) tensor in [-1, 1]")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"bits_per_dim: batch_size must be a positive int, got {batch_size!r}")
    if engine not in ("eager", "graph"):
        raise ValueError(f"bits_per_dim: engine must be 'eager' or 'graph', got {engine!r}")
    pred = getattr(schedule, "prediction_type", "epsilon")
    if pred != "epsilon":  # the bound's terms read the output as eps (and a distilled student has no bound)
        raise ValueError(f"bits_per_dim: the bound takes an epsilon-prediction model; this one predicts {pred}")
    seed = check_seed(seed)
    variance = variance or default_variance(model, schedule)
    device = next(model.parameters()).device
    x_start = x_start.to(device, torch.float32)
    n, big_t = x_start.shape[0], len(schedule)
    images = image_indices(image_index, n)
    labels = conditioning_labels(model.config.num_classes, class_labels, n, device)
    if estimate is None:
        timesteps = torch.arange(big_t, dtype=torch.int64).expand(n, big_t)
    else:
        timesteps = _estimate_timesteps(big_t, estimate, seed, images)
    k = timesteps.shape[1]
    rows_image = torch.arange(n).repeat_interleave(k)
    rows_t = timesteps.reshape(-1)
    terms = torch.empty(n * k, 3, dtype=torch.float32, device=device)
    rows = BoundRows(model, schedule, x_start, images, labels, seed, clip_denoised, variance)
    if engine == "graph":
        rows = GraphRows(rows, min(batch_size, n * k))
    for start in range(0, n * k, batch_size):
        idx, t = rows_image[start:start + batch_size].to(device), rows_t[start:start + batch_size].to(device)
        terms[start:start + len(idx)] = rows(idx, t)
        if progress is not None:
            progress(len(idx))
    vb, mse, xmse = (v.view(n, k) for v in terms.unbind(1))
    prior = prior_bpd(schedule, x_start)
    if estimate is None:
        total, stderr = vb.sum(1) + prior, torch.zeros_like(prior)
    else:
        sizes = [len(p) for p in strata(big_t, estimate)]
        total = (vb * torch.tensor(sizes, dtype=torch.float32, device=device)).sum(1) + prior
        stderr = _collapsed_strata_stderr(vb, sizes)
    return Bound(total.cpu(), prior.cpu(), vb.cpu(), mse.cpu(), xmse.cpu(), timesteps.clone(), stderr.cpu())
