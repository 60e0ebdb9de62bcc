"""The CPU as a target: the embedded digits model, one U-Net forward and a whole DDIM sampling run, per
provider, on the same weights, interleaved in one run; and one forward of the cifar10 preset (random weights,
the same providers but torch.compile).

Providers: reference (fp32 NCHW, torch ops), fast_fp32_torch / fast_fp32_ext (``to_fast(torch.float32)``:
channels_last, folded blocks; torch ops or the extension's C++ kernels), fast_bf16_torch / fast_bf16_ext
(the same in bf16), diffusers_fp32 / diffusers_bf16 (UNet2DModel with the same weights; sampling with its
DDIMScheduler), compile_reference (torch.compile of the reference), compile_fast (``compile_model`` of what
``sample --fp16 --compile`` runs: Inductor around our registered ops), compile_diffusers_fp32 / _bf16
(torch.compile of diffusers' UNet2DModel), frozen_diffusers_fp32 / _bf16 (the same with Inductor's
``freezing=True`` and a channels_last model and input: weights prepacked for oneDNN, convolutions fused with
their pointwise neighbours), openvino_fp32 / _bf16 (OpenVINO running UNet2DModel converted from torch, precision
hint f32 / bf16, forward only; where openvino is installed); compiled providers in full runs only, compile time
reported; whole runs also reference_invariant / fast_fp32_ext_invariant (``batch_invariant=True``: chunks of 16 images
on one thread, what ``sample --batch-invariant`` runs).
``sample --fp16`` on a CPU runs fast_bf16_ext where the CPU computes bf16 natively, else fast_fp32_ext.

Each round runs every provider once, in order (reversed every other round); the table keeps the best round, the
median and the spread (max/min) per provider, so a noisy neighbour shows as spread rather than as a winner. FLOPs
come from torch's flop counter on the reference forward; GFLOP/s is set against the peak rate measured here in the
provider's dtype (``peak_gflops``: the better of a square matmul and a 3x3 convolution).
DDPM_FAST_CPU_BENCH=full: digits batches 64 and 128, 15 rounds (5 for sampling, 20 steps), cifar10 batch 8;
by default (CI) a quick pass: digits batch 4, 2 rounds, 4 steps, cifar10 batch 1.
DDPM_FAST_CPU_BENCH_ONLY=name,name,...: those providers only (the reference is always kept: ratios need it).
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from harness import KEEPS_FREED_MEMORY, count_flops, random_unet, record

from ddpm_fast import DDIMSampler, NoiseSchedule, ops
from ddpm_fast.checkpoint import load_pretrained, load_schedule
from ddpm_fast.config import to_diffusers_config
from ddpm_fast.loading import DEFAULT_MODEL
from ddpm_fast.unet import compile_model

FULL = os.environ.get("DDPM_FAST_CPU_BENCH", "quick") == "full"
ONLY = {n for n in os.environ.get("DDPM_FAST_CPU_BENCH_ONLY", "").split(",") if n}
BATCHES = (64, 128) if FULL else (4,)
ROUNDS, SAMPLE_ROUNDS = (15, 5) if FULL else (2, 2)
STEPS = 20 if FULL else 4
CIFAR_BATCH = 8 if FULL else 1
CPU = torch.device("cpu")
PROVIDERS = ["reference", "fast_fp32_torch", "fast_fp32_ext", "fast_bf16_torch", "fast_bf16_ext", "diffusers_fp32",
             "diffusers_bf16", "compile_reference", "compile_fast", "compile_diffusers_fp32", "compile_diffusers_bf16",
             "frozen_diffusers_fp32", "frozen_diffusers_bf16", "openvino_fp32", "openvino_bf16", "reference_invariant",
             "fast_fp32_ext_invariant"]
CLI_FP16 = "fast_bf16_ext" if ops.cpu_bf16_is_faster() else "fast_fp32_ext"
CLI_FP16_DTYPE = ops.cpu_half_dtype()


def _best_rate(fn, flop: float, repeats: int) -> float:
    fn()  # warm-up: first calls pick kernels and fault pages in
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return flop / best / 1e9


def peak_gflops(dtype: torch.dtype) -> float:
    """The best rate this CPU reaches in ``dtype`` on dense work, best of 10 after a warm-up: the higher of a
    square matmul (2048; 384 for bf16 without native bf16) and a channels_last 3x3 convolution, 128 -> 128
    channels at 16x16, batch 64 (oneDNN's convolutions run faster than torch's square matmul on some CPUs, so
    a GEMM alone understates what the U-Net's own layers can reach)."""
    size = 384 if dtype == torch.bfloat16 and not ops.cpu_has_native_bf16() else 2048
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    gemm = _best_rate(lambda: a @ b, 2 * size**3, 10)
    if size != 2048:
        return gemm  # no native bf16: the small GEMM is the only affordable probe
    x = torch.randn(64, 128, 16, 16, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(128, 128, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
    conv = _best_rate(lambda: F.conv2d(x, w, padding=1), 2 * 64 * 128 * 128 * 9 * 16 * 16, 10)
    return max(gemm, conv)


@pytest.fixture(scope="module")
def digits():
    model = load_pretrained(DEFAULT_MODEL).eval()
    return model, load_schedule(DEFAULT_MODEL) or NoiseSchedule.linear(1000)


@pytest.fixture(scope="module")
def peaks():
    return {torch.float32: peak_gflops(torch.float32), torch.bfloat16: peak_gflops(torch.bfloat16)}


def _diffusers_twin(model, dtype):
    diffusers = pytest.importorskip("diffusers")
    diffusers.utils.logging.set_verbosity_error()  # its advice on from_pretrained(torch_dtype) does not apply
    cfg = {k: v for k, v in to_diffusers_config(model.config).items() if k != "_class_name"}
    twin = diffusers.UNet2DModel(**cfg).eval()
    twin.load_state_dict(model.state_dict())
    return twin.to(dtype), diffusers


def _inputs(model, batch):
    """(shape, x, t, labels) for a forward of ``model`` at ``batch``; labels k % 10 (None if unconditional)."""
    cfg = model.config
    shape = (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    labels = torch.arange(batch) % min(cfg.num_classes, 10) if cfg.num_classes else None
    return shape, torch.randn(shape), torch.full((batch,), 500), labels


def _flops_per_img(model, batch) -> float:
    """FLOPs of one image's reference forward, by torch's flop counter."""
    _, x, t, labels = _inputs(model, batch)
    return count_flops(lambda: model(x, t, labels)) / batch


def _providers(model, schedule, batch, compile_ok=True):
    """name -> (dtype, forward(), sample_run()[, compile seconds]); each call is one timed unit."""
    shape, x, t, labels = _inputs(model, batch)
    out = {}
    wanted = (lambda name: not ONLY or name in ONLY)

    def ours(name, net, backend, dtype, batch_invariant=False):
        def forward():
            with ops.use_backend(backend):
                return net(x, t, labels)

        def run():
            with ops.use_backend(backend):
                return DDIMSampler(schedule, STEPS).sample(net, shape, seed=0, class_labels=labels, progress=False,
                                                           batch_invariant=batch_invariant)

        out[name] = (dtype, forward, run)

    def compiled(name, make, backend):
        """A compiled provider: built and run once (the compile), its time kept beside it."""
        start = time.perf_counter()
        net = make()
        with torch.no_grad(), ops.use_backend(backend):
            net(x, t, labels)
        return net, time.perf_counter() - start

    ours("reference", model, "torch", torch.float32)
    # sample --batch-invariant: fixed chunks on one thread (a whole-run provider; its forward is the reference's).
    ours("reference_invariant", model, "torch", torch.float32, batch_invariant=True)
    if ops.extension() is not None:
        for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            fast = model.to_fast(dtype)
            ours(f"fast_{tag}_torch", fast, "torch", dtype)
            ours(f"fast_{tag}_ext", fast, "auto", dtype)
        ours("fast_fp32_ext_invariant", model.to_fast(torch.float32), "auto", torch.float32, batch_invariant=True)
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        twin, diffusers = _diffusers_twin(model, dtype)
        out[f"diffusers_{tag}"] = (dtype, *_diffusers_units(twin, diffusers, dtype, schedule, shape, x, t, labels))
        if FULL and compile_ok and wanted(f"compile_diffusers_{tag}"):
            start = time.perf_counter()
            twin_c = torch.compile(twin)
            with torch.no_grad():
                twin_c(x.to(dtype), t, class_labels=labels)
            out[f"compile_diffusers_{tag}"] = (dtype, *_diffusers_units(twin_c, diffusers, dtype, schedule, shape, x,
                                                                        t, labels), time.perf_counter() - start)
        if FULL and compile_ok and wanted(f"frozen_diffusers_{tag}"):
            # Inductor's own CPU route: weights frozen as constants (prepacked for oneDNN, conv + pointwise fused),
            # channels_last model and input. The option is read when the graph compiles (the first call).
            start = time.perf_counter()
            twin_f = _diffusers_twin(model, dtype)[0].to(memory_format=torch.channels_last)
            with torch._inductor.config.patch(freezing=True), torch.no_grad():
                twin_f = torch.compile(twin_f)
                twin_f(x.to(dtype).contiguous(memory_format=torch.channels_last), t, class_labels=labels)
            out[f"frozen_diffusers_{tag}"] = (dtype, *_diffusers_units(twin_f, diffusers, dtype, schedule, shape, x, t,
                                                                       labels, channels_last=True),
                                              time.perf_counter() - start)
        if FULL and compile_ok and wanted(f"openvino_{tag}"):
            unit = _openvino_unit(model, dtype, x, t, labels)
            if unit is not None:
                out[f"openvino_{tag}"] = unit
    if FULL and compile_ok and wanted("compile_reference"):
        net, secs = compiled("compile_reference", lambda: torch.compile(model), "torch")
        ours("compile_reference", net, "torch", torch.float32)
        out["compile_reference"] += (secs,)
    if FULL and compile_ok and wanted("compile_fast") and ops.extension() is not None:
        net, secs = compiled("compile_fast", lambda: compile_model(model.to_fast(CLI_FP16_DTYPE)), "auto")
        ours("compile_fast", net, "auto", CLI_FP16_DTYPE)
        out["compile_fast"] += (secs,)
    if ONLY:
        unknown = ONLY - set(PROVIDERS)
        if unknown:
            raise ValueError(f"DDPM_FAST_CPU_BENCH_ONLY: unknown providers {sorted(unknown)}; known: {PROVIDERS}")
        out = {k: v for k, v in out.items() if k in ONLY or k == "reference"}
    return out


class _Sample(torch.nn.Module):
    """diffusers' UNet2DModel returning its ``.sample`` tensor (what OpenVINO's converter traces)."""

    def __init__(self, twin, conditional: bool):
        super().__init__()
        self.twin, self.conditional = twin, conditional

    def forward(self, x, t, labels=None):
        return self.twin(x, t, class_labels=labels if self.conditional else None).sample


def _openvino_unit(model, dtype, x, t, labels):
    """(dtype, forward, None, convert + compile seconds) of OpenVINO running diffusers' UNet2DModel with the same
    weights (converted from torch, compiled for this CPU with the precision hint f32 or bf16 and torch's thread
    count); None where OpenVINO is not installed. Forward only (no sampling run)."""
    try:
        import openvino as ov
    except ImportError:
        return None
    start = time.perf_counter()
    twin, _ = _diffusers_twin(model, torch.float32)
    args = (x, t) if labels is None else (x, t, labels)
    with torch.no_grad():
        converted = ov.convert_model(_Sample(twin, labels is not None).eval(), example_input=args)
    hint = "bf16" if dtype == torch.bfloat16 else "f32"
    compiled = ov.Core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                          "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    inputs = [a.numpy() for a in args]
    request = compiled.create_infer_request()

    def forward():
        return request.infer(inputs)

    forward()
    return dtype, forward, None, time.perf_counter() - start


def _diffusers_units(twin, diffusers, dtype, schedule, shape, x, t, labels, channels_last=False):
    """(forward, sample_run) of a diffusers UNet2DModel: one forward; DDIM with its own scheduler; with
    ``channels_last`` the inputs are given in that layout."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    xd = x.to(dtype).contiguous(memory_format=layout)

    def forward():
        return twin(xd, t, class_labels=labels).sample

    def run():
        sched = diffusers.DDIMScheduler(num_train_timesteps=schedule.num_timesteps, beta_schedule="linear",
                                        clip_sample=True, set_alpha_to_one=False, timestep_spacing="leading")
        sched.set_timesteps(STEPS)
        xt = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
        for step in sched.timesteps:
            eps = twin(xt.contiguous(memory_format=layout), step, class_labels=labels).sample
            xt = sched.step(eps.float(), step, xt.float()).prev_sample.to(dtype)
        return xt

    return forward, run


def _timed(providers) -> str:
    """The provider pytest-benchmark times: what sample --fp16 runs, or the reference where it is filtered out."""
    return CLI_FP16 if CLI_FP16 in providers else "reference"


def _interleaved(units: dict, rounds: int) -> dict[str, list[float]]:
    times = {name: [] for name in units}
    with torch.no_grad():
        for fn in units.values():  # warm-up, outside the timed rounds
            fn()
        order = list(units.items())
        for r in range(rounds):  # the order reversed every other round: no provider always runs after the same one
            for name, fn in order if r % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return times


def _table(kind, batch, times, per_call_img_steps, flops_per_img_step, dtypes, peaks, compile_s=None):
    compile_s = compile_s or {}
    ref = min(times["reference"])
    rows = []
    memory = "; freed memory kept (every provider)" if KEEPS_FREED_MEMORY else ""
    lines = [f"\n{kind}, batch {batch} (CPU, {torch.get_num_threads()} threads; `sample --fp16` = {CLI_FP16}{memory})",
             "| provider | ms / img-step (best) | median | spread | GFLOP/s | % of peak | vs reference |",
             "|---|---|---|---|---|---|---|"]
    for name, ts in times.items():
        best = min(ts)
        ms = best * 1e3 / per_call_img_steps
        gflops = flops_per_img_step * per_call_img_steps / best / 1e9
        frac = gflops / peaks[dtypes[name]]
        row = dict(provider=name, ms_per_img_step=round(ms, 4), median_ms=round(statistics.median(ts) * 1e3 /
                   per_call_img_steps, 4), spread=round(max(ts) / best, 2), gflops=round(gflops, 1),
                   frac_of_peak=round(frac, 3), speedup_vs_reference=round(ref / best, 2))
        if name in compile_s:
            row["compile_s"] = round(compile_s[name], 1)
        rows.append(row)
        lines.append(f"| {name} | {ms:.3f} | {row['median_ms']:.3f} | {row['spread']:.2f} | {gflops:.1f} | "
                     f"{100 * frac:.0f}% ({str(dtypes[name]).replace('torch.', '')}) | {ref / best:.2f}x |")
    print("\n".join(lines))
    return rows


def _forward_table(benchmark, peaks, model, schedule, batch, model_name, compile_ok=True):
    providers = _providers(model, schedule, batch, compile_ok)
    for name in [k for k in providers if k.endswith("_invariant")]:
        providers.pop(name)  # the same forward as its base; whole runs show what invariance costs
    flops = _flops_per_img(model, batch)
    times = _interleaved({k: v[1] for k, v in providers.items()}, ROUNDS)
    compile_s = {k: v[3] for k, v in providers.items() if len(v) > 3}
    dtypes = {k: v[0] for k, v in providers.items()}
    rows = _table(f"U-Net forward, {model_name}", batch, times, batch, flops, dtypes, peaks, compile_s)
    with torch.no_grad():
        benchmark.pedantic(providers[_timed(providers)][1], rounds=3 if FULL else 1, iterations=1, warmup_rounds=0)
    record(benchmark, kind="forward", model=model_name, batch=batch,
           gflop_per_img=round(flops / 1e9, 4), peak_gflops={str(k): round(v, 1) for k, v in peaks.items()},
           rows=rows, timed=_timed(providers))


@pytest.mark.parametrize("batch", BATCHES)
def test_cpu_unet_forward(benchmark, digits, peaks, batch):
    model, schedule = digits
    _forward_table(benchmark, peaks, model, schedule, batch, "digits")


def test_cpu_unet_forward_cifar10(benchmark, peaks):
    """The cifar10 preset (35.7M parameters, 12.4 GFLOP per image) with random weights: the same providers
    where the convolutions are large."""
    model = random_unet("cifar10").cpu()
    _forward_table(benchmark, peaks, model, NoiseSchedule.linear(1000), CIFAR_BATCH, "cifar10")


# The digits model's 3x3 convolutions at batch 64 (full runs), one of them at batch 4 (quick).
CONV_SHAPES = ([((64, 32, 16, 16), 32), ((64, 64, 8, 8), 64), ((64, 128, 4, 4), 64), ((64, 96, 16, 16), 32)]
               if FULL else [((4, 32, 16, 16), 32)])


@pytest.mark.parametrize("shape, c_out", CONV_SHAPES, ids=[f"{'x'.join(map(str, s))}-{o}" for s, o in CONV_SHAPES])
def test_cpu_conv3x3(benchmark, peaks, shape, c_out):
    """One 3x3 convolution, interleaved: oneDNN's direct form (F.conv2d, channels_last, what the fast blocks ran
    before) against ops.conv3x3's Winograd kernel. GFLOP/s counts the direct form's multiply-adds for both (the
    Winograd kernel does 4x fewer), so its rate is an effective one and may pass the peak."""
    if ops.extension() is None:
        pytest.skip("the extension is not built")
    n, c, h, w = shape
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(c_out, c, 3, 3) / (9 * c) ** 0.5, torch.randn(c_out)
    units = {"onednn_direct": lambda: F.conv2d(x, weight, bias, padding=1),
             "winograd": lambda: ops.conv3x3(x, weight, bias)}
    times = _interleaved(units, 30 if FULL else 3)
    flop = 2 * n * h * w * c * c_out * 9
    base = min(times["onednn_direct"])
    rows, lines = [], [f"\nconv3x3 {shape} -> {c_out} (CPU, {torch.get_num_threads()} threads)",
                       "| provider | ms (best) | median | spread | effective GFLOP/s | % of fp32 peak | vs oneDNN |",
                       "|---|---|---|---|---|---|---|"]
    for name, ts in times.items():
        best = min(ts)
        gflops = flop / best / 1e9
        rows.append(dict(provider=name, ms=round(best * 1e3, 4), median_ms=round(statistics.median(ts) * 1e3, 4),
                         spread=round(max(ts) / best, 2), gflops=round(gflops, 1), speedup=round(base / best, 2)))
        lines.append(f"| {name} | {best * 1e3:.3f} | {statistics.median(ts) * 1e3:.3f} | {max(ts) / best:.2f} | "
                     f"{gflops:.1f} | {100 * gflops / peaks[torch.float32]:.0f}% | {base / best:.2f}x |")
    print("\n".join(lines))
    with torch.no_grad():
        benchmark.pedantic(units["winograd"], rounds=3 if FULL else 1, iterations=1, warmup_rounds=0)
    record(benchmark, kind="conv3x3", shape=list(shape), c_out=c_out, rows=rows)


@pytest.mark.parametrize("batch", BATCHES)
def test_cpu_sampling_run(benchmark, digits, peaks, batch):
    model, schedule = digits
    providers = _providers(model, schedule, batch)
    providers.pop("compile_reference", None)  # the forward table has it; our compiled fast path is the run to see
    providers = {k: v for k, v in providers.items() if v[2] is not None}  # OpenVINO: forward only
    flops = _flops_per_img(model, batch)
    times = _interleaved({k: v[2] for k, v in providers.items()}, SAMPLE_ROUNDS)
    rows = _table(f"DDIM {STEPS} steps, whole run, digits", batch, times, batch * STEPS, flops,
                  {k: v[0] for k, v in providers.items()}, peaks)
    with torch.no_grad():
        benchmark.pedantic(providers[_timed(providers)][2], rounds=1, iterations=1, warmup_rounds=0)
    record(benchmark, kind="sampling", batch=batch, steps=STEPS, rows=rows, timed=_timed(providers))
