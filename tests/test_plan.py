"""Sampling plans: capture safety (no device->host read in a step), per-image seeds, one step for every loop."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import randomize_
from host_sync import HostSyncError, no_host_sync

from ddpm_fast import (
    DDIMSampler,
    DDPMSampler,
    DEISSampler,
    DPMSolverSampler,
    HeunSampler,
    IPNDMSampler,
    NoiseSchedule,
    PLMSSampler,
    UNet,
    UNetConfig,
    UniPCSampler,
    engine,
    ops,
    training_loss,
)
from ddpm_fast.noise import NoiseKey

SAMPLERS = {
    "ddpm": lambda: DDPMSampler(NoiseSchedule.linear(20)),
    "ddim-eta1": lambda: DDIMSampler(NoiseSchedule.cosine(100), 4, eta=1.0),
    "ddim-eta0": lambda: DDIMSampler(NoiseSchedule.linear(100), 4, spacing="trailing"),
    # A distilled student's sampler: a v-prediction model's rows (samplers.reparameterize).
    "ddim-v": lambda: DDIMSampler(_predicting("v_prediction", NoiseSchedule.linear(100)), 2, spacing="trailing"),
    # Orders 1, 2, 3, 2, 1: both history buffers in play.
    "dpm++3m": lambda: DPMSolverSampler(NoiseSchedule.linear(100), 5, order=3),
    "dpm++sde": lambda: DPMSolverSampler(NoiseSchedule.cosine(100), 4, algorithm="sde-dpmsolver++", clip_denoised=True),
    # The compiled solvers (ddpm_fast.solvers): all three ring slots (UniPC-3, PLMS), the eps form (DEIS, PLMS,
    # iPNDM, Heun), a step that keeps nothing (PLMS, Heun), float timesteps (Heun), clipped x0 (UniPC).
    "unipc3": lambda: UniPCSampler(NoiseSchedule.linear(100), 5, order=3, clip_denoised=True),
    "deis3": lambda: DEISSampler(NoiseSchedule.cosine(100), 5, order=3),
    "plms": lambda: PLMSSampler(NoiseSchedule.linear(100), 5),
    "heun": lambda: HeunSampler(NoiseSchedule.linear(100), 3),
    "ipndm": lambda: IPNDMSampler(NoiseSchedule.cosine(100), 5),
}
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0])
# The compiled solvers draw no noise and chunk the U-Net like any other: the per-image-draw and batch-invariance
# tests take one of them (three ring slots, clipped x0); the plan-step tests take them all.
DRAWS = ["ddpm", "ddim-eta1", "ddim-eta0", "dpm++3m", "dpm++sde", "unipc3"]
# The host-read guard: every sampler's step in bf16, the noise-drawing ones in fp16 as well.
HOST_READ_CASES = [(torch.bfloat16, name) for name in SAMPLERS] + [
    (torch.float16, name) for name in ("ddpm", "ddim-eta1", "ddim-eta0", "dpm++3m", "dpm++sde")]


def _predicting(prediction_type, schedule):
    schedule.prediction_type = prediction_type
    return schedule


def _model(num_classes=3):
    return randomize_(UNet(UNetConfig.from_name("tiny", num_classes=num_classes, dropout=0.0)).eval(), 0.05)


def test_guard_catches_host_reads():
    t = torch.tensor([1, 2])
    for read in (lambda: bool(t[0]), lambda: t.item() if t.numel() == 1 else t[0].item(), lambda: int(t[1]),
                 lambda: t.tolist(), lambda: t.cpu(), lambda: t.numpy(), lambda: t.nonzero(), lambda: f"{t}"):
        with pytest.raises(HostSyncError), no_host_sync():
            read()
    with no_host_sync():  # device work is fine
        (t * 2).any()


def test_guard_catches_the_old_seed_truthiness():
    """The bug this guard was made for: `noise_seed or 0` on a device tensor is Tensor.__bool__."""
    seed = torch.tensor([5])
    with pytest.raises(HostSyncError, match="bool"), no_host_sync():
        _ = seed or 0


@pytest.mark.parametrize("dtype, name", HOST_READ_CASES)
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("backend", ["triton", "native"])
def test_fast_plan_step_makes_no_host_read(dtype, name, guided, backend):
    """What the graph engine captures, run on CPU tensors (Triton through its interpreter; the C++ kernels)
    under the guard: any device->host read would be an error inside CUDA-graph capture."""
    _two_steps_without_host_read(dtype, name, guided, backend)


@pytest.mark.parametrize("dtype, guided", [(torch.float16, False), (torch.float16, True), (torch.bfloat16, False)])
@pytest.mark.parametrize("backend", ["triton", "native"])
def test_batch_invariant_plan_step_makes_no_host_read(dtype, guided, backend):
    """The chunked step is captured too: its loop, slicing and padding read nothing back. (Its chunk-sized
    launches are recorded here for the AOT compile as well.) The step's own kernels are the unchunked test's; the
    chunk loop is the same for every sampler: one with ring slots (DPM-Solver++ 3M), chunks of 4 (2 images padded
    to one chunk)."""
    _two_steps_without_host_read(dtype, "dpm++3m", guided, backend, batch_invariant=True, invariant_chunk=4)


def _two_steps_without_host_read(dtype, name, guided, backend, **plan_kw):
    if ops.backend_unavailable_reason(backend, torch.device("cpu")):
        pytest.skip(f"{backend} backend not available here")
    fast = _model().to_fast(dtype)
    kw = dict(class_labels=LABELS[:2], guidance_scale=2.5) if guided else dict(class_labels=LABELS[:2])
    with ops.use_backend(backend):
        plan = SAMPLERS[name]().plan(fast, (2, 3, 8, 8), seed=7, **kw, **plan_kw)
        before = plan.x.clone()
        with no_host_sync():
            plan.step()
            plan.step()
    assert plan.done == 2 and plan.counter.tolist() == [7, 2]
    assert torch.isfinite(plan.x).all() and not torch.equal(plan.x, before)
    torch.testing.assert_close(plan.x_half.float(), plan.x, atol=1e-2, rtol=1e-2)


def test_fast_training_step_makes_no_host_read():
    """The training step of the GPU form (fp32 masters, fused ops, autocast) reads nothing back either."""
    model = randomize_(UNet(UNetConfig.from_name("tiny", num_classes=3)), 0.05).to_fast(torch.float32).train()
    schedule = NoiseSchedule.linear(50)
    x0 = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    with ops.use_backend("triton"), no_host_sync():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = training_loss(model, schedule, x0, torch.tensor([0, 2]), cond_drop_prob=0.5, generator=g)
        loss.backward()
    assert torch.isfinite(loss) and model.conv_in.weight.grad is not None


@pytest.mark.parametrize("name", DRAWS)
@pytest.mark.parametrize("fast", [False, True])
def test_images_do_not_depend_on_the_batch(name, fast):
    """Image k's draws depend on (seed, k, step) only: the same x_T and noise in any batch. The images
    then agree to the network's own batch-size rounding (GEMM/conv blocking, ~1e-7 in fp32)."""
    sampler, model = SAMPLERS[name](), _model()
    if fast:
        model = model.to_fast(torch.bfloat16)
    full = sampler.plan(model, (7, 3, 8, 8), seed=3, class_labels=LABELS)
    parts = [sampler.plan(model, (len(ix), 3, 8, 8), seed=3, class_labels=LABELS[ix], image_index=ix)
             for ix in (torch.tensor([4, 5, 6]), torch.tensor([0, 2]), torch.tensor([3]), torch.tensor([1]))]
    order = torch.cat([p.images for p in parts])
    assert torch.equal(torch.cat([p.x for p in parts])[torch.argsort(order)], full.x), "x_T must be per image"
    with ops.use_backend("torch"):
        want = full.run()
        got = torch.cat([p.run() for p in parts])[torch.argsort(order)]
    # Relative to the result's scale: DPM-Solver without clipping on this random network reaches |x| ~ 100.
    atol = (1e-5 if not fast else 2e-2) * max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, atol=atol, rtol=0)


@pytest.mark.parametrize("name", DRAWS)
@pytest.mark.parametrize("fast", [None, torch.float32, torch.bfloat16])
def test_batch_invariant_images_are_the_same_bits_in_any_batch(name, fast):
    """batch_invariant: image k is the same bits whatever batch it is drawn in (other chunks, other places in
    a chunk, other padding), and whatever loop runs it."""
    sampler, model = SAMPLERS[name](), _model()
    if fast is not None:
        model = model.to_fast(fast)
    kw = dict(seed=3, guidance_scale=2.0, batch_invariant=True, invariant_chunk=3)
    full = sampler.plan(model, (7, 3, 8, 8), class_labels=LABELS, **kw).run()
    parts = [(ix, sampler.plan(model, (len(ix), 3, 8, 8), class_labels=LABELS[ix], image_index=ix, **kw).run())
             for ix in (torch.tensor([4, 5, 6]), torch.tensor([0, 2]), torch.tensor([3]), torch.tensor([1]))]
    for ix, x in parts:
        assert torch.equal(x, full[ix]), f"images {ix.tolist()} changed with the batch"
    looped = engine.GraphEngine().sample(sampler, model, (3, 3, 8, 8), class_labels=LABELS[4:], image_index=4, **kw)
    assert torch.equal(looped, full[4:])


def test_batch_invariant_chunk_is_checked():
    sampler, model = SAMPLERS["ddim-eta1"](), _model()
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="invariant_chunk must be a positive int"):
            sampler.plan(model, (2, 3, 8, 8), seed=1, batch_invariant=True, invariant_chunk=bad)


_THREADS_SCRIPT = """
import sys, torch
from ddpm_fast import DDIMSampler, NoiseSchedule, UNet, UNetConfig
torch.manual_seed(0)
model = UNet(UNetConfig.from_name("digits", dropout=0.0)).eval()
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0.0, 0.05)
if sys.argv[2] == "fast":
    model = model.to_fast(torch.float32)
sampler = DDIMSampler(NoiseSchedule.linear(100), 3, eta=1.0)
x = [sampler.sample(model, (3, 1, 16, 16), seed=5, class_labels=torch.tensor([1, 7, 3]), guidance_scale=2.0,
                    progress=False, batch_invariant=True, invariant_chunk=chunk).contiguous() for chunk in (1, 16)]
torch.save(torch.stack(x), sys.argv[1])
"""


@pytest.mark.slow
@pytest.mark.parametrize("path", ["reference", "fast"])
def test_batch_invariant_bits_do_not_depend_on_the_thread_count(tmp_path, path):
    """A torchrun process runs one thread, a lone process all cores: the same bits either way. (oneDNN splits
    the digits model's 1x1 shortcut convolution by thread count at batch 1-2; without the one-thread forward
    the chunk-1 run fails here.)"""
    script = tmp_path / "run.py"
    script.write_text(_THREADS_SCRIPT)
    got = []
    for threads in ("1", "2"):
        out = tmp_path / f"x{threads}.pt"
        res = subprocess.run([sys.executable, str(script), str(out), path], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS=threads))
        assert res.returncode == 0, res.stderr[-3000:]
        got.append(torch.load(out))
    assert torch.isfinite(got[0]).all() and torch.equal(got[0], got[1])


@pytest.mark.parametrize("name", SAMPLERS)
def test_eager_and_engine_loops_agree_bit_for_bit(name):
    """sample(), plan().run() and the engine's C++ loop run the same plan step."""
    sampler, model = SAMPLERS[name](), _model()
    kw = dict(seed=11, class_labels=LABELS[:3], guidance_scale=1.5)
    a = sampler.sample(model, (3, 3, 8, 8), progress=False, **kw)
    b = sampler.plan(model, (3, 3, 8, 8), **kw).run()
    c = engine.GraphEngine().sample(sampler, model, (3, 3, 8, 8), **kw)
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("backend", ["triton", "native", "torch"])
@pytest.mark.parametrize("name", ["ddim-eta1", "dpm++sde", "dpm++3m"])
def test_fast_path_backends_draw_the_same_noise(backend, name):
    """The fused kernels draw the reference stream: the fast path on every backend samples the same images
    as the torch ops, to fp16 rounding (not merely the same distribution)."""
    if ops.backend_unavailable_reason(backend, torch.device("cpu")):
        pytest.skip(f"{backend} backend not available here")
    sampler, fast = SAMPLERS[name](), _model().to_fast(torch.float16)
    with ops.use_backend("torch"):
        want = sampler.sample(fast, (2, 3, 8, 8), seed=2, class_labels=LABELS[:2], progress=False)
    with ops.use_backend(backend):
        got = sampler.sample(fast, (2, 3, 8, 8), seed=2, class_labels=LABELS[:2], progress=False)
    # Relative to the result's scale (unclipped DPM-Solver on this random network reaches |x| ~ 100).
    torch.testing.assert_close(got, want, atol=5e-3 * max(1.0, want.abs().max().item()), rtol=0)


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_takes_x_T(name):
    sampler, model = SAMPLERS[name](), _model(None)
    x_T = torch.randn(2, 3, 8, 8)
    a = sampler.sample(model, (2, 3, 8, 8), seed=0, x_T=x_T, progress=False)
    b = engine.GraphEngine().sample(sampler, model, (2, 3, 8, 8), seed=0, x_T=x_T)
    c = sampler.sample(model, (2, 3, 8, 8), seed=0, progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    if name == "ddim-eta0":  # deterministic: x_T alone fixes the result
        assert torch.equal(a, sampler.sample(model, (2, 3, 8, 8), seed=99, x_T=x_T, progress=False))
    with pytest.raises(ValueError, match=r"x_T must be a floating tensor of shape \(2, 3, 8, 8\)"):
        sampler.plan(model, (2, 3, 8, 8), x_T=torch.randn(2, 3, 8, 4))


def test_plan_contract_and_restart():
    sampler, model = SAMPLERS["ddpm"](), _model(None)
    plan = sampler.plan(model, (2, 3, 8, 8), seed=5)
    x_T = plan.x.clone()
    plan.step()
    assert plan.done == 1 and plan.counter.tolist() == [5, 1]
    rest = plan.run()
    assert plan.done == sampler.num_steps
    plan.start(seed=5)
    assert torch.equal(plan.x, x_T) and plan.done == 0
    assert torch.equal(plan.run(), rest)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert sampler.plan(model, (2, 3, 8, 8), generator=g1).seed == sampler.plan(model, (2, 3, 8, 8), generator=g2).seed
    for bad, msg in ((-1, "seed must lie in"), (2**64, "seed must lie in"), (1.5, "seed must be an integer")):
        with pytest.raises(ValueError, match=msg):
            sampler.plan(model, (2, 3, 8, 8), seed=bad)
    with pytest.raises(ValueError, match="image_index must be an int or 2 integer indices"):
        sampler.plan(model, (2, 3, 8, 8), seed=0, image_index=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="guidance_scale must be finite"):
        sampler.plan(_model(), (2, 3, 8, 8), seed=0, class_labels=[0, 1], guidance_scale=float("nan"))


def test_noise_key_must_live_with_the_state():
    x = torch.randn(2, 3, 4, 4)
    key = NoiseKey(torch.tensor([1, 0], dtype=torch.int32), torch.arange(2))
    with pytest.raises(ValueError, match="counter must be an int64"):
        ops.reverse_step(x, x, torch.rand(3, len(ops.COEF_COLUMNS)), torch.tensor([0, 1]), key)
