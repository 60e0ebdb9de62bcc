"""openai's ADM U-Net on the engine: one forward and a whole DDIM run, our fast path against our fp32 reference.

Shapes: tiny (CI) a small ADM; full the ImageNet-64 preset (adm-imagenet64-cond, 296M parameters) at batch 4,
and on a GPU also the 256x256 unconditional preset (adm-256-uncond, 553M) at batch 4. Providers: reference
(ADMUNet fp32 NCHW eager) and ddpm_fast (``to_fast`` in what ``--fp16`` runs on this device: fp16 on a GPU; on
a CPU bf16 where it computes bf16 natively, else fp32 channels_last). extra_info: ms per image-step, the
achieved GFLOP/s.
"""

import pytest
import torch
from harness import DEVICE, SIZE, count_flops, mean_seconds, record, run_timed

from ddpm_fast import DDIMSampler, ops
from ddpm_fast.adm import ADMUNet
from ddpm_fast.openai import config_from_flags
from ddpm_fast.schedule import openai_timesteps

SMALL = ("--image_size 32 --num_channels 64 --num_res_blocks 1 --channel_mult 1,2,2 --attention_resolutions 16,8 "
         "--num_head_channels 32 --learn_sigma True --resblock_updown True --use_scale_shift_norm True")
SHAPES = {
    "tiny": [("small", 32, 2)],
    "full": [("adm-imagenet64-cond", 64, 4)] + ([("adm-256-uncond", 256, 4)] if DEVICE.type == "cuda" else []),
}[SIZE]
DDIM_STEPS = 10


def _fast_dtype() -> torch.dtype:
    if DEVICE.type == "cuda":
        return torch.float16
    return ops.cpu_half_dtype()


def _model(preset: str):
    config, schedule = config_from_flags(SMALL if preset == "small" else preset)
    model = ADMUNet(config).eval()
    with torch.no_grad():  # every parameter random (openai zero-initializes output convolutions)
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.to(DEVICE), schedule


def _provider(provider, model):
    if provider == "reference":
        return model, "torch"
    return model.to_fast(_fast_dtype()), "auto"


def _inputs(model, batch, size):
    x = torch.randn(batch, 3, size, size, device=DEVICE)
    t = torch.randint(0, 1000, (batch,), device=DEVICE)
    y = torch.randint(0, 1000, (batch,), device=DEVICE) if model.config.num_classes else None
    return x, t, y


@pytest.mark.parametrize("preset, size, batch", SHAPES, ids=[f"{p}-b{b}" for p, _, b in SHAPES])
@pytest.mark.parametrize("provider", ["reference", "ddpm_fast"])
def test_adm_forward(benchmark, provider, preset, size, batch):
    model, _ = _model(preset)
    x, t, y = _inputs(model, batch, size)
    net, backend = _provider(provider, model)
    with torch.no_grad(), ops.use_backend(backend):
        flops = count_flops(lambda: net(x, t, y))
        run_timed(benchmark, lambda: net(x, t, y), rounds=3 if SIZE == "full" else None, warmup=1)
    seconds = mean_seconds(benchmark)
    record(benchmark, preset=preset, batch=batch, provider=provider,
           dtype=str(getattr(net, "compute_dtype", None) or torch.float32).replace("torch.", ""),
           ms_per_img_step=1e3 * seconds / batch, gflops=flops / seconds / 1e9)


@pytest.mark.parametrize("preset, size, batch", SHAPES, ids=[f"{p}-b{b}" for p, _, b in SHAPES])
@pytest.mark.parametrize("provider", ["reference", "ddpm_fast"])
def test_adm_ddim_run(benchmark, provider, preset, size, batch):
    """A whole DDIM run as openai samples (eps from the clipped x_0), 10 steps."""
    model, schedule = _model(preset)
    net, backend = _provider(provider, model)
    sampler = DDIMSampler(schedule, timesteps=openai_timesteps(len(schedule), f"ddim{DDIM_STEPS}"),
                          use_clipped_model_output=True)
    labels = list(range(batch)) if model.config.num_classes else None
    shape = (batch, 3, size, size)
    with ops.use_backend(backend):
        run_timed(benchmark, lambda: sampler.sample(net, shape, seed=0, class_labels=labels, progress=False),
                  rounds=2 if SIZE == "full" else None, warmup=1)
    record(benchmark, preset=preset, batch=batch, provider=provider, steps=DDIM_STEPS,
           ms_per_img_step=1e3 * mean_seconds(benchmark) / (batch * DDIM_STEPS))
