"""Provider registry: each provider builds a callable for one reverse step (U-Net forward + update).

Providers share the same weights and inputs so their timings are comparable in one run. A provider
that cannot run here (no GPU, no extension, missing package) says why and its cases are skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ddpm_fast import DDPMSampler, NoiseSchedule, UNet, ops


@dataclass
class StepCase:
    model: UNet
    sampler: DDPMSampler
    x: torch.Tensor
    t: int


def make_case(preset: str, batch: int, device: torch.device) -> StepCase:
    from harness import random_unet

    model = random_unet(preset).to(device)
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device)
    return StepCase(model, DDPMSampler(NoiseSchedule.linear()), x, 500)


def _reference(case: StepCase) -> Callable[[], torch.Tensor]:
    t_batch = torch.full((case.x.shape[0],), case.t, device=case.x.device)
    noise = torch.randn_like(case.x)

    @torch.no_grad()
    def step():
        with ops.use_backend("torch"):
            eps = case.model(case.x, t_batch)
            return case.sampler.step(eps, case.t, case.x, noise=noise)

    return step


def _ddpm_fast(case: StepCase) -> Callable[[], torch.Tensor]:
    """The fast path: fp16 (bf16 on a CPU) channels_last U-Net on the fused ops, fused step with in-kernel
    noise, writing the half-precision copy the next forward reads."""
    dtype = torch.float16 if case.x.is_cuda else torch.bfloat16
    fast = case.model.to_fast(dtype)
    x = case.x.contiguous(memory_format=torch.channels_last)
    x_half = x.to(dtype)
    t_batch = torch.full((x.shape[0],), case.t, device=x.device)
    backend = "auto" if x.is_cuda else "triton"

    @torch.no_grad()
    def step():
        with ops.use_backend(backend):
            eps = fast(x_half, t_batch)
            return case.sampler.step(eps, case.t, x, noise_seed=0, step=0, half_out=x_half)

    return step


PROVIDERS: dict[str, Callable[[StepCase], Callable[[], torch.Tensor]]] = {
    "reference": _reference,
    "ddpm_fast": _ddpm_fast,
}


def unavailable(name: str, device: torch.device) -> str | None:
    """Why provider ``name`` cannot run on ``device`` (None: it can)."""
    if name == "ddpm_fast":
        return ops.backend_unavailable_reason("triton", device)
    return None
