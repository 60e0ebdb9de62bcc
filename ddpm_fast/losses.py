"""L_simple (Ho et al. 2020, eq. 14): || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) ||^2; for a
learned-sigma model L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal 2021, lambda = 0.001)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddpm_fast import ops
from ddpm_fast.config import conditioning_labels
from ddpm_fast.likelihood import vb_terms_from_output
from ddpm_fast.schedule import NoiseSchedule

VLB_WEIGHT = 0.001  # lambda of L_hybrid


def training_loss(model, schedule: NoiseSchedule, x0: torch.Tensor, class_labels=None,
                  cond_drop_prob: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean squared noise-prediction error at t ~ U{0..T-1}, one t per sample.

    With ``cond_drop_prob`` > 0, that fraction of labels is replaced by the null label so the same
    model learns the unconditional eps that classifier-free guidance needs.

    A learned-sigma model (2C output channels: eps, v) trains on L_hybrid: the MSE of the eps half plus
    lambda * T * L_t, L_t the bound's term at t in bits/dim (a one-sample estimate of L_vlb = sum_t L_t), computed
    with the mean's gradient stopped so L_vlb trains the variance alone (improved-diffusion's RESCALED_MSE).
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
    class_labels = drop_labels(num_classes, class_labels, n, device, cond_drop_prob, generator)
    out = model(x_t, t, class_labels)
    c = x0.shape[1]
    if out.shape[1] == c:
        return F.mse_loss(out.float(), noise.float())
    if out.shape[1] != 2 * c:
        raise ValueError(f"training_loss: the model outputs {out.shape[1]} channels; the data has {c} "
                         f"(eps) or {2 * c} (eps and v) expected")
    mse = F.mse_loss(out[:, :c].float(), noise.float())
    frozen = torch.cat([out[:, :c].detach(), out[:, c:]], dim=1)
    vb = vb_terms_from_output(schedule, frozen, x0, x_t, t, clip_denoised=False, variance="learned_range")
    return mse + VLB_WEIGHT * schedule.num_timesteps * vb.mean()


def drop_labels(num_classes, class_labels, n: int, device, cond_drop_prob: float, generator):
    """The labels a training step feeds the model: ``class_labels`` (None: the null label where the model is
    conditional), each replaced by the null label with probability ``cond_drop_prob`` (classifier-free
    guidance's unconditional half). No host read."""
    dropping = class_labels is not None and cond_drop_prob > 0
    labels = conditioning_labels(num_classes, class_labels, n, device, host_check=False)
    if dropping:
        drop = torch.rand(n, device=device, generator=generator) < cond_drop_prob
        labels = torch.where(drop, torch.full_like(labels, num_classes), labels)
    return labels


class NoiseLoss:
    """The Trainer's default loss object: L_simple (L_hybrid for a learned-sigma model) on ``schedule``.

    A loss object is what a way of training owns (its targets and weighting): ``loss(net, x0, labels,
    generator, cond_drop_prob)`` returns the scalar to minimize, drawing everything random from ``generator``
    (the Trainer checkpoints its state), with no host read. The Trainer owns the rest (EMA, AMP, resume, DDP,
    metrics); distillation (ddpm_fast.distill) brings other loss objects to the same loop."""

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule

    def __call__(self, net, x0, class_labels, generator, cond_drop_prob: float) -> torch.Tensor:
        return training_loss(net, self.schedule, x0, class_labels, cond_drop_prob=cond_drop_prob, generator=generator)
