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


# name -> (builder, reason it cannot run here or None)
PROVIDERS: dict[str, Callable[[StepCase], Callable[[], torch.Tensor]]] = {
    "reference": _reference,
}


def unavailable(name: str, device: torch.device) -> str | None:
    return None
