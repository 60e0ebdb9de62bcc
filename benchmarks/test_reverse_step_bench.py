"""One reverse step (U-Net forward + sampler update) per provider: img-steps/s."""

import pytest
from harness import DEVICE, UNET_SHAPES, mean_seconds, record, run_timed
from providers import PROVIDERS, make_case, unavailable


@pytest.mark.parametrize("preset, batch", UNET_SHAPES, ids=[f"{p}-b{b}" for p, b in UNET_SHAPES])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_reverse_step(benchmark, provider, preset, batch):
    why = unavailable(provider, DEVICE)
    if why:
        pytest.skip(why)
    benchmark.group = f"reverse-step {preset} b{batch}"
    case = make_case(preset, batch, DEVICE)
    step = PROVIDERS[provider](case)
    out = run_timed(benchmark, step)
    assert out.shape == case.x.shape
    record(benchmark, provider=provider, preset=preset, batch=batch,
           dtype="fp32" if provider == "reference" else ("fp16" if DEVICE.type == "cuda" else "bf16"),
           img_steps_per_s=round(batch / mean_seconds(benchmark), 2))
