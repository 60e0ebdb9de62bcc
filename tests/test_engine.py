"""The graph engine: its C++ CPU loop against the Python samplers, and (GPU) graphs against eager."""

import pytest
import torch
from conftest import randomize_

from ddpm_fast import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverSampler,
    HeunSampler,
    NoiseSchedule,
    UNet,
    UNetConfig,
    UniPCSampler,
    engine,
    ops,
)

needs_ext = pytest.mark.skipif(ops.extension() is None, reason="ddpm_fast.ops._C not built")


@needs_ext
@pytest.mark.parametrize("sampler", [
    DDPMSampler(NoiseSchedule.linear(8)),
    DDPMSampler(NoiseSchedule.cosine(8), variance="fixed_large", clip_denoised=False),
    DDIMSampler(NoiseSchedule.linear(100), 5, eta=1.0),
    DDIMSampler(NoiseSchedule.linear(100), 5, eta=0.0, spacing="trailing"),
], ids=["ddpm-small", "ddpm-large-noclip", "ddim-eta1", "ddim-eta0"])
@pytest.mark.parametrize("guided", [False, True])
def test_cpu_loop_matches_python_sampler(sampler, guided):
    cfg = UNetConfig.from_name("tiny", num_classes=3)
    model = randomize_(UNet(cfg).eval(), 0.05)
    kw = dict(class_labels=torch.tensor([0, 2]), guidance_scale=2.0 if guided else None)
    for backend in ("torch", "auto"):  # reference ops; the extension's C++ kernels
        with ops.use_backend(backend):
            want = sampler.sample(model, (2, 3, 8, 8), seed=4, progress=False, **kw)
            got = engine.GraphEngine().sample(sampler, model, (2, 3, 8, 8), seed=4, **kw)
        # The same plan step, looped from C++: the same images, bit for bit.
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    again = engine.GraphEngine().sample(sampler, model, (2, 3, 8, 8), seed=4, **kw)
    assert torch.equal(got, again)


@needs_ext
def test_cpu_loop_runs_the_plan_step():
    calls = []
    ops.extension().run_steps(lambda: calls.append(len(calls)), 3)
    assert calls == [0, 1, 2]
    with pytest.raises(RuntimeError, match="num_steps must be >= 0"):
        ops.extension().run_steps(lambda: None, -1)


def test_unavailable_reason_on_cpu():
    assert (engine.unavailable_reason("cpu") is None) == (ops.extension() is not None)


# ---- GPU: CUDA graphs ------------------------------------------------------------------------------


def _gpu_model(preset="tiny", **kw):
    cfg = UNetConfig.from_name(preset, dropout=0.0, **kw)
    return randomize_(UNet(cfg).eval(), 0.02).cuda().to_fast(torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", [DDPMSampler(NoiseSchedule.linear(50)),
                                     DDIMSampler(NoiseSchedule.cosine(1000), 20, eta=0.5)])
@pytest.mark.parametrize("guided", [False, True])
def test_graph_equals_eager_fast_path(sampler, guided):
    model = _gpu_model(num_classes=4)
    kw = dict(class_labels=torch.tensor([0, 1, 2, 3], device="cuda"), guidance_scale=3.0 if guided else None)
    with ops.use_backend("triton"):
        eager = sampler.sample(model, (4, 3, 8, 8), seed=5, progress=False, **kw)
        eng = engine.GraphEngine()
        graph = eng.sample(sampler, model, (4, 3, 8, 8), seed=5, **kw)
        again = eng.sample(sampler, model, (4, 3, 8, 8), seed=5, **kw)
    assert torch.equal(graph, again), "graph replays must be deterministic"
    torch.testing.assert_close(graph, eager, atol=0, rtol=0)


GRAPH_SAMPLERS = {
    "ddim-eta1": lambda: DDIMSampler(NoiseSchedule.linear(1000), 6, eta=1.0),
    # Multistep: the history buffers are captured state, zeroed by each restart.
    "dpm++3m": lambda: DPMSolverSampler(NoiseSchedule.linear(1000), 6, order=3),
    "dpm++sde": lambda: DPMSolverSampler(NoiseSchedule.cosine(1000), 6, algorithm="sde-dpmsolver++"),
    # Compiled solvers: three ring slots (UniPC-3), float timesteps and a step that keeps nothing (Heun).
    "unipc3": lambda: UniPCSampler(NoiseSchedule.linear(1000), 6, order=3),
    "heun": lambda: HeunSampler(NoiseSchedule.linear(1000), 4),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", GRAPH_SAMPLERS)
def test_graph_draws_per_image_and_restarts(dtype, name):
    """A cached graph loads new draws (seed, labels, x_T, image indices) into its plan: the same images as
    eager for each call, and image k's draws do not depend on its batch. DDIM and DPM-Solver++ alike."""
    model = randomize_(UNet(UNetConfig.from_name("tiny", num_classes=3, dropout=0.0)).eval(), 0.02)
    fast = model.cuda().to_fast(dtype)
    sampler = GRAPH_SAMPLERS[name]()
    eng = engine.GraphEngine()
    for seed, first in ((1, 0), (2, 10)):
        kw = dict(seed=seed, class_labels=torch.tensor([0, 2, 1], device="cuda"), guidance_scale=2.0,
                  image_index=first)
        graph = eng.sample(sampler, fast, (3, 3, 8, 8), **kw)
        eager = sampler.sample(fast, (3, 3, 8, 8), progress=False, **kw)
        assert torch.equal(graph, eager)
    assert eng.captures == 1
    x_T = torch.randn(3, 3, 8, 8, device="cuda")
    assert torch.equal(eng.sample(sampler, fast, (3, 3, 8, 8), seed=4, x_T=x_T),
                       sampler.sample(fast, (3, 3, 8, 8), seed=4, x_T=x_T, progress=False))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", GRAPH_SAMPLERS)
@pytest.mark.parametrize("chunk", [3, 16])
def test_batch_invariant_graph_and_eager_same_bits_in_any_batch(dtype, name, chunk):
    """batch_invariant on the GPU: image k is the same bits in a batch of 7, 3 or 1, graph or eager (cuBLAS and
    cuDNN pick kernels by shape, not by an image's place in the batch, and every call has the chunk's shape)."""
    model = randomize_(UNet(UNetConfig.from_name("digits", num_classes=3, dropout=0.0)).eval(), 0.02)
    fast = model.cuda().to_fast(dtype)
    sampler = GRAPH_SAMPLERS[name]()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0], device="cuda")
    kw = dict(seed=9, guidance_scale=2.0, batch_invariant=True, invariant_chunk=chunk)
    full = sampler.sample(fast, (7, 1, 16, 16), class_labels=labels, progress=False, **kw)
    eng = engine.GraphEngine()
    for ix in (torch.arange(0, 3), torch.arange(3, 6), torch.arange(6, 7)):
        part = dict(class_labels=labels[ix], image_index=ix, **kw)
        assert torch.equal(eng.sample(sampler, fast, (len(ix), 1, 16, 16), **part), full[ix])
        assert torch.equal(sampler.sample(fast, (len(ix), 1, 16, 16), progress=False, **part), full[ix])
    assert torch.isfinite(full).all()


@pytest.mark.gpu
def test_graph_cache_and_memory():
    model = _gpu_model()
    sampler = DDIMSampler(NoiseSchedule.linear(1000), 10)
    eng = engine.GraphEngine()
    eng.sample(sampler, model, (2, 3, 8, 8), seed=0)
    assert eng.captures == 1
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for seed in range(3):
        eng.sample(sampler, model, (2, 3, 8, 8), seed=seed)
    torch.cuda.synchronize()
    assert eng.captures == 1, "same settings must not re-capture"
    assert torch.cuda.memory_allocated() <= before + 2 * 2 * 3 * 8 * 8 * 4, "memory must not grow across calls"
    eng.sample(sampler, model, (4, 3, 8, 8), seed=0)
    assert eng.captures == 2, "a new shape must capture a new graph"
    eng.sample(DDIMSampler(NoiseSchedule.linear(1000), 20), model, (4, 3, 8, 8), seed=0)
    assert eng.captures == 3, "new sampler settings must capture a new graph"


@pytest.mark.gpu
def test_graph_recaptures_after_a_weight_update():
    """The graph reads weights the fast blocks derived (summed biases, stacked q/k/v): an in-place update
    of a source parameter must re-capture, and the samples must follow the new weights."""
    model = _gpu_model()
    sampler = DDIMSampler(NoiseSchedule.linear(1000), 5)
    eng = engine.GraphEngine()
    with ops.use_backend("triton"):
        first = eng.sample(sampler, model, (2, 3, 8, 8), seed=3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("conv1.bias", "to_q.weight", "conv2.bias")):
                    p.add_(0.05)
        graph = eng.sample(sampler, model, (2, 3, 8, 8), seed=3)
        eager = sampler.sample(model, (2, 3, 8, 8), seed=3, progress=False)
    assert eng.captures == 2
    assert not torch.equal(first, graph)
    torch.testing.assert_close(graph, eager, atol=0, rtol=0)


def test_weights_fingerprint_sees_in_place_updates_and_loads():
    model = UNet(UNetConfig.from_name("tiny"))
    before = engine.weights_fingerprint(model)
    assert engine.weights_fingerprint(model) == before
    model.load_state_dict(UNet(UNetConfig.from_name("tiny")).state_dict())
    loaded = engine.weights_fingerprint(model)
    assert loaded != before
    with torch.no_grad():
        model.conv_in.bias.mul_(2)
    assert engine.weights_fingerprint(model) != loaded


@pytest.mark.gpu
def test_cuda_in_kernel_noise_statistics():
    x = torch.randn(8, 4, 32, 32, device="cuda")
    coefs = torch.zeros(1, len(ops.COEF_COLUMNS), device="cuda")
    coefs[0, ops.COEF_COLUMNS.index("sigma")] = 1.0
    index = torch.zeros(8, dtype=torch.int64, device="cuda")
    ext = ops.extension()

    images = torch.arange(8, device="cuda")

    def z(seed, step):
        key = torch.tensor([seed, step], device="cuda")
        return ext.reverse_step(x, x, None, coefs, index, None, 1.0, False, key, images).flatten().double()

    a, b, c = z(1, 0), z(1, 1), z(1, 0)
    n = a.numel()
    assert torch.equal(a, c)
    assert abs(a.mean().item()) < 5 / n**0.5 and abs(a.var().item() - 1) < 5 * (2 / n) ** 0.5
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 5 / n**0.5
    assert abs(torch.corrcoef(torch.stack([a[:-1], a[1:]]))[0, 1].item()) < 5 / n**0.5
