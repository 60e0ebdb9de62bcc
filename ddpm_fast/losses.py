"""L_simple (Ho et al. 2020, eq. 14): || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) ||^2."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddpm_fast import ops
from ddpm_fast.config import conditioning_labels
from ddpm_fast.schedule import NoiseSchedule


def training_loss(model, schedule: NoiseSchedule, x0: torch.Tensor, class_labels=None,
                  cond_drop_prob: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean squared noise-prediction error at t ~ U{0..T-1}, one t per sample.

    With ``cond_drop_prob`` > 0, that fraction of labels is replaced by the null label so the same
    model learns the unconditional eps that classifier-free guidance needs.
    """
    if not torch.is_tensor(x0) or x0.dim() != 4 or not x0.is_floating_point():
        raise ValueError("training_loss: x0 must be a floating (N, C, H, W) tensor")
    if not 0.0 <= cond_drop_prob <= 1.0:
        raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
    n, device = x0.shape[0], x0.device
    t = torch.randint(0, schedule.num_timesteps, (n,), device=device, generator=generator)
    noise = torch.randn(x0.shape, device=device, dtype=x0.dtype, generator=generator)
    x_t, _ = ops.q_sample(x0, t, schedule.device_table("sqrt_alphas_cumprod", device),
                          schedule.device_table("sqrt_one_minus_alphas_cumprod", device), noise=noise)
    num_classes = getattr(model, "module", model).config.num_classes  # DistributedDataParallel wraps the model
    dropping = class_labels is not None and cond_drop_prob > 0
    class_labels = conditioning_labels(num_classes, class_labels, n, device, host_check=False)
    if dropping:
        drop = torch.rand(n, device=device, generator=generator) < cond_drop_prob
        class_labels = torch.where(drop, torch.full_like(class_labels, num_classes), class_labels)
    eps = model(x_t, t, class_labels)
    return F.mse_loss(eps.float(), noise.float())
