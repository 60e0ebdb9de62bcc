"""One U-Net forward per provider, same weights, one run; and one training step.

Providers: reference (fp32 NCHW eager), torch_fp16_cl (the fp16 channels_last copy with plain torch
modules and ops: ``to_fast(fold=False)``), torch_compile (torch.compile max-autotune of that model),
diffusers_fp16 (UNet2DModel, same weights), diffusers_compile (torch.compile of it), ddpm_fast (the fast path:
fused ops and folds), ddpm_fast_compile (``compile_model`` of the fast path: Inductor around our registered
ops; what ``sample --compile`` runs). Compiled providers run on a GPU only. extra_info:
img/s, us per image-step, achieved TFLOP/s and its fraction of the measured fp16 matmul rate, peak GPU
memory.
"""

import pytest
import torch
from harness import (
    DEVICE,
    SIZE,
    UNET_SHAPES,
    count_flops,
    matmul_tflops,
    mean_seconds,
    peak_memory_mib,
    random_unet,
    record,
    reset_peak_memory,
    run_timed,
)

from ddpm_fast import NoiseSchedule, compile_model, ops, training_loss
from ddpm_fast.config import to_diffusers_config

HALF = torch.float16 if DEVICE.type == "cuda" else torch.bfloat16
PROVIDERS = ["reference", "torch_fp16_cl", "torch_compile", "diffusers_fp16", "diffusers_compile", "ddpm_fast",
             "ddpm_fast_compile"]


def _forward(provider, model, x, t):
    """(callable, backend) for one forward of ``provider``; skips what cannot run here."""
    if provider == "reference":
        return (lambda: model(x, t)), "torch"
    if provider == "torch_fp16_cl":
        fast = model.to_fast(HALF, fold=False)
        return (lambda: fast(x, t)), "torch"
    if provider == "torch_compile":
        if DEVICE.type != "cuda":
            pytest.skip("torch.compile max-autotune is benchmarked on a GPU only")
        fast = model.to_fast(HALF, fold=False)  # plain torch modules: inductor does its own fusion
        compiled = torch.compile(fast, mode="max-autotune", fullgraph=False)
        xh = x.to(HALF).contiguous(memory_format=torch.channels_last)
        return (lambda: compiled(xh, t)), "torch"
    if provider.endswith("_compile") and DEVICE.type != "cuda":
        pytest.skip("compiled providers are benchmarked on a GPU here (benchmarks/test_cpu_bench.py on a CPU)")
    if provider in ("diffusers_fp16", "diffusers_compile"):
        diffusers = pytest.importorskip("diffusers")
        cfg = {k: v for k, v in to_diffusers_config(model.config).items() if k != "_class_name"}
        twin = diffusers.UNet2DModel(**cfg).eval()
        twin.load_state_dict(model.state_dict())
        twin = twin.to(DEVICE, HALF)
        if provider == "diffusers_compile":
            twin = torch.compile(twin)
        xh = x.to(HALF)
        return (lambda: twin(xh, t).sample), "torch"
    if provider in ("ddpm_fast", "ddpm_fast_compile"):
        why = ops.backend_unavailable_reason("triton", DEVICE)
        if why:
            pytest.skip(why)
        fast = model.to_fast(HALF)
        if provider == "ddpm_fast_compile":
            fast = compile_model(fast)
        return (lambda: fast(x, t)), "auto" if DEVICE.type == "cuda" else "triton"
    raise ValueError(provider)


@pytest.mark.parametrize("preset, batch", UNET_SHAPES, ids=[f"{p}-b{b}" for p, b in UNET_SHAPES])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_unet_forward(benchmark, provider, preset, batch):
    model = random_unet(preset)
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=DEVICE)
    t = torch.randint(0, 1000, (batch,), device=DEVICE)
    with torch.no_grad():
        flops = count_flops(lambda: model(x, t))
        reset_peak_memory()
        fn, backend = _forward(provider, model, x, t)
        with ops.use_backend(backend):
            run_timed(benchmark, fn, rounds=None if SIZE == "full" else 3)
    seconds = mean_seconds(benchmark)
    tflops = flops / seconds / 1e12
    benchmark.group = f"unet-forward {preset} b{batch}"
    record(benchmark, provider=provider, preset=preset, batch=batch,
           dtype="fp32" if provider == "reference" else str(HALF).replace("torch.", ""),
           img_per_s=round(batch / seconds, 1), us_per_img_step=round(seconds / batch * 1e6, 2),
           tflops=round(tflops, 2), frac_of_matmul=round(tflops / matmul_tflops(), 3), peak_mib=peak_memory_mib())


TRAIN_SHAPE = {"tiny": ("tiny", 4), "full": ("cifar10", 128)}[SIZE]


@pytest.mark.parametrize("provider", ["eager_amp", "ddpm_fast_amp"])
def test_train_step(benchmark, provider):
    preset, batch = TRAIN_SHAPE
    model = random_unet(preset).train()
    cfg = model.config
    sched = NoiseSchedule.linear()
    x0 = torch.rand(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=DEVICE) * 2 - 1
    backend = "torch"
    if provider == "ddpm_fast_amp":
        why = ops.backend_unavailable_reason("triton", DEVICE)
        if why:
            pytest.skip(why)
        model = model.to_fast(torch.float32)  # the training form train.py uses: fp32 masters, fused blocks
        x0 = x0.contiguous(memory_format=torch.channels_last)
        backend = "auto" if DEVICE.type == "cuda" else "triton"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEVICE.type == "cuda")
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=HALF == torch.float16)

    def step():
        with ops.use_backend(backend), torch.autocast(DEVICE.type, dtype=HALF):
            loss = training_loss(model, sched, x0)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss

    reset_peak_memory()
    run_timed(benchmark, step, rounds=None if SIZE == "full" else 3)
    benchmark.group = f"train-step {preset} b{batch}"
    record(benchmark, provider=provider, preset=preset, batch=batch, dtype=str(HALF).replace("torch.", ""),
           img_per_s=round(batch / mean_seconds(benchmark), 1), peak_mib=peak_memory_mib())
