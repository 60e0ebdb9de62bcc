"""Samplers: DDPM ancestral (Ho et al. 2020) and DDIM (Song et al. 2021), with classifier-free guidance.

Each sampler reduces to a float64 coefficient table, one row per kept timestep, in the column
order of ops.COEF_COLUMNS; a step is then ops.reverse_step on that table (reference, Triton or
CUDA by backend). The table is cast to fp32 and moved to a device once, and the state x_t stays fp32.
"""

from __future__ import annotations

import time

import torch

from ddpm_fast import ops
from ddpm_fast.schedule import SPACINGS, NoiseSchedule

VARIANCES = ("fixed_small", "fixed_large")


class _Sampler:
    def __init__(self, schedule: NoiseSchedule, coefs: torch.Tensor, clip_denoised: bool):
        self.schedule = schedule
        self.clip_denoised = bool(clip_denoised)
        self.coefs = coefs  # float64 (S, 6) on the host
        self.timesteps = schedule.timestep_map.flip(0).clone()  # model timesteps, descending
        lookup = torch.full((int(schedule.timestep_map.max()) + 1,), -1, dtype=torch.int64)
        lookup[schedule.timestep_map] = torch.arange(len(schedule), dtype=torch.int64)
        self._index_of = lookup
        self._device_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def device_tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp32 coefficient table, timestep -> row lookup) on ``device``, made once per device."""
        device = torch.device(device)
        if device not in self._device_cache:
            self._device_cache[device] = (self.coefs.to(device, torch.float32).contiguous(),
                                          self._index_of.to(device))
        return self._device_cache[device]

    def index_for(self, t, n: int, device) -> torch.Tensor:
        """Rows of the coefficient table for model timestep(s) t, as an int64 (n,) tensor on device."""
        t = torch.as_tensor(t)
        if t.is_floating_point() or t.dim() > 1 or (t.dim() == 1 and t.shape[0] != n):
            raise ValueError(f"t must be an integer or an integer tensor of shape ({n},), got {tuple(t.shape)}")
        t = t.to(torch.int64).cpu().expand(n)
        bad = (t < 0) | (t >= len(self._index_of))
        if not bad.any():
            bad = self._index_of[t] < 0
        if bad.any():
            raise ValueError(f"timestep {int(t[bad][0])} is not one of this sampler's {self.num_steps} timesteps")
        return self._index_of[t].to(device)

    def step(self, model_output: torch.Tensor, t, x_t: torch.Tensor, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None, model_output_uncond: torch.Tensor | None = None,
             guidance_scale: float = 1.0, noise_seed: int | None = None, step: int | torch.Tensor = 0,
             half_out: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """x_{t-1} from x_t and the model output at timestep t (a pure function of its inputs).

        Noise comes from ``noise`` if given; else, with ``noise_seed``, from the kernel's Philox stream
        keyed by (noise_seed, step); else from ``generator`` where the step needs it.
        With ``model_output_uncond``, eps = eps_uncond + guidance_scale * (model_output - eps_uncond).
        ``half_out`` (fp16/bf16, laid out like x_t) also receives x_{t-1}: the next fast-path model input.
        ``out`` (fp32, laid out like x_t, may be x_t itself) receives x_{t-1} instead of a new tensor.
        """
        if not torch.is_tensor(x_t) or x_t.dtype != torch.float32 or x_t.dim() != 4:
            desc = f"{tuple(x_t.shape)} {x_t.dtype}" if torch.is_tensor(x_t) else type(x_t).__name__
            raise ValueError(f"x_t must be the float32 (N, C, H, W) sampler state, got {desc}")
        coefs, _ = self.device_tables(x_t.device)
        index = self.index_for(t, x_t.shape[0], x_t.device)
        if noise is None and noise_seed is None and bool((self.coefs[index.cpu(), 5] > 0).any()):
            noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=torch.float32)
            noise = noise.contiguous(memory_format=ops.memory_format(x_t))
        return ops.reverse_step(x_t, model_output, coefs, index, noise=noise, clip_denoised=self.clip_denoised,
                                model_output_uncond=model_output_uncond, guidance_scale=guidance_scale,
                                noise_seed=noise_seed, step=step, half_out=half_out, out=out)

    @torch.no_grad()
    def sample(self, model, shape, seed: int | None = None, guidance_scale: float | None = None,
               class_labels=None, progress: bool = True, device=None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Run the whole chain from x_T ~ N(0, I); returns x_0 (fp32, roughly in [-1, 1]).

        A reference model draws all noise from ``generator`` (or one seeded with ``seed``). A fast model
        (UNet.to_fast) keeps x_t channels_last, reads the fp16/bf16 copy the step kernel writes, and
        draws step noise in the kernel, keyed by (seed, step): same seed, same samples, but a
        different stream from the reference path's.
        """
        from tqdm.auto import tqdm

        shape = tuple(int(s) for s in shape)
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError(f"shape must be (N, C, H, W) with positive sizes, got {shape}")
        param = next(model.parameters())
        device = torch.device(device) if device is not None else param.device
        n = shape[0]
        if generator is None and seed is not None:
            generator = torch.Generator(device).manual_seed(int(seed))
        labels, null = _prepare_labels(model, class_labels, guidance_scale, n, device)
        fast_dtype = getattr(model, "compute_dtype", None)

        x = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        x_in, noise_seed = x, None
        if fast_dtype is not None:
            x = x.contiguous(memory_format=torch.channels_last)
            x_in = x if fast_dtype == torch.float32 else x.to(fast_dtype)  # fp32: the model reads x_t itself
            noise_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=device).item())
        bar = tqdm(total=self.num_steps * n, unit="img-step", unit_scale=True, disable=not progress,
                   desc=type(self).__name__, leave=False)
        start = time.perf_counter()
        for i, t in enumerate(self.timesteps.tolist()):
            t_batch = torch.full((n,), t, dtype=torch.int64, device=device)
            kw = dict(generator=generator)
            if fast_dtype is not None:
                # The model has consumed x_in by the time the step runs: update both buffers in place.
                kw = dict(noise_seed=noise_seed, step=i, half_out=None if x_in is x else x_in, out=x)
            eps_c, eps_u = model_eps(model, x_in, t_batch, labels, null)
            if eps_u is not None:
                x = self.step(eps_c, t, x, model_output_uncond=eps_u, guidance_scale=float(guidance_scale), **kw)
            else:
                x = self.step(eps_c, t, x, **kw)
            if fast_dtype is None:
                x_in = x
            bar.update(n)
        bar.close()
        self.last_run_seconds = time.perf_counter() - start
        return x



def model_eps(model, x_in, t, labels, null):
    """(eps_cond, eps_uncond): with a null label, both halves of guidance in one batched forward;
    without one, (eps, None)."""
    if null is None:
        return model(x_in, t, labels), None
    eps = model(torch.cat([x_in, x_in]), torch.cat([t, t]), torch.cat([labels, null]))
    eps_c, eps_u = eps.chunk(2)
    return eps_c, eps_u


def _prepare_labels(model, class_labels, guidance_scale, n, device):
    num_classes = getattr(getattr(model, "config", None), "num_classes", None)
    if guidance_scale is not None and not num_classes:
        raise ValueError("guidance_scale needs a class-conditional model (config.num_classes)")
    if class_labels is None:
        if guidance_scale is not None:
            raise ValueError("guidance_scale needs class_labels")
        if num_classes:
            # A conditional model without labels samples unconditionally: the null label.
            return torch.full((n,), num_classes, dtype=torch.int64, device=device), None
        return None, None
    if not num_classes:
        raise ValueError("class_labels given, but the model is unconditional")
    labels = torch.as_tensor(class_labels, dtype=torch.int64, device=device)
    if labels.dim() == 0:
        labels = labels.expand(n)
    if labels.shape != (n,):
        raise ValueError(f"class_labels must be an int or have shape ({n},), got {tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"class_labels must lie in [0, {num_classes - 1}]")
    null = torch.full_like(labels, num_classes) if guidance_scale is not None else None
    return labels, null


class DDPMSampler(_Sampler):
    """Ancestral sampling with sigma_t^2 = posterior variance (fixed_small) or beta_t (fixed_large).

    Runs on any schedule, full or respaced (NoiseSchedule.respace) for shortened DDPM.
    """

    def __init__(self, schedule: NoiseSchedule, variance: str = "fixed_small", clip_denoised: bool = True):
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}")
        s = schedule
        var = s.posterior_variance if variance == "fixed_small" else s.betas
        sigma = var.clamp(min=0).sqrt()
        sigma[0] = 0.0  # no noise on the last step
        coefs = torch.stack([s.sqrt_recip_alphas_cumprod, s.sqrt_recipm1_alphas_cumprod, s.posterior_mean_coef1,
                             s.posterior_mean_coef2, torch.zeros_like(sigma), sigma], dim=1)
        self.variance = variance
        super().__init__(schedule, coefs, clip_denoised)


class DDIMSampler(_Sampler):
    """DDIM with eta (0: deterministic; 1: DDPM-like noise) on ``num_steps`` respaced timesteps."""

    def __init__(self, schedule: NoiseSchedule, num_steps: int, eta: float = 0.0, spacing: str = "leading",
                 clip_denoised: bool = True):
        if spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")
        if not eta >= 0.0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        s = schedule.respace(schedule.space_timesteps(num_steps, spacing))
        acp, acp_prev = s.alphas_cumprod, s.alphas_cumprod_prev
        var = (1 - acp_prev) / (1 - acp) * (1 - acp / acp_prev)
        sigma = eta * var.clamp(min=0).sqrt()
        c_eps = (1 - acp_prev - sigma**2).clamp(min=0).sqrt()
        coefs = torch.stack([s.sqrt_recip_alphas_cumprod, s.sqrt_recipm1_alphas_cumprod, acp_prev.sqrt(),
                             torch.zeros_like(acp), c_eps, sigma], dim=1)
        self.eta, self.spacing = float(eta), spacing
        super().__init__(s, coefs, clip_denoised)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] NCHW floats -> uint8 NHWC images (the layout image and FID tools read)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
