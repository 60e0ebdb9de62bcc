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
    """The fast path: one step of a sampling plan on the fp16 (bf16 on a CPU) channels_last U-Net and the
    fused ops: fused update with in-kernel noise, writing the half-precision copy the next forward reads."""
    dtype = torch.float16 if case.x.is_cuda else torch.bfloat16
    fast = case.model.to_fast(dtype)
    plan = case.sampler.plan(fast, case.x.shape, seed=0)
    backend = "auto" if case.x.is_cuda else "triton"

    @torch.no_grad()
    def step():
        if plan.done == plan.num_steps:  # rewind the counter (a device write), not the draws
            plan.counter[1:].zero_()
            plan.done = 0
        with ops.use_backend(backend):
            plan.step()
        return plan.x

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
