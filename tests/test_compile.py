"""torch.compile end to end: the fast U-Net compiles with no graph break (the fused ops are registered torch
ops Inductor keeps), a whole plan step compiles, and ``sample --compile`` writes what the eager run writes.

Compiling takes tens of seconds on a CPU, so these use the small presets and few steps.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import randomize_

from ddpm_fast import DDIMSampler, DPMSolverSampler, NoiseSchedule, UNet, UNetConfig, compile_model, engine, ops
from ddpm_fast.ops.reverse_step import MAX_HISTORY, PUSH_SLOT, SLOT0


def _model(preset="tiny", device="cpu"):
    torch.manual_seed(0)
    return randomize_(UNet(UNetConfig.from_name(preset)).eval(), 0.05).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_unet_compiles_without_graph_breaks(dtype):
    """fullgraph=True raises at the first graph break; the compiled forward computes the eager one."""
    import torch._dynamo

    model = _model("digits")
    fast = model.to_fast(dtype)
    x = torch.randn(4, 1, 16, 16)
    t = torch.tensor([0, 250, 600, 999])
    labels = torch.tensor([1, 3, 10, 7])
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad(), ops.use_backend("auto"):
        want = fast(x, t, labels).float()
        compiled = compile_model(fast)  # fullgraph=True
        got = compiled(x, t, labels).float()
        again = compiled(x, t + 1, labels).float()
    scale = want.abs().max().item()
    print(f"{dtype}: max |compiled - eager| = {(got - want).abs().max().item():.3e} (scale {scale:.3e})")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol * scale, rtol=tol)
    assert not torch.equal(again, got)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, "recompiled for a new t"


def test_registered_ops_have_fake_implementations():
    """torch.library's own checks (schema, fake tensors, mutations declared, autograd registration) on each op."""
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    w, b, add = torch.randn(8), torch.randn(8), torch.randn(2, 8)
    coefs = torch.rand(5, len(ops.COEF_COLUMNS))
    coefs[:, SLOT0 + 1:SLOT0 + MAX_HISTORY] = 0  # one ring slot, which every row writes
    coefs[:, PUSH_SLOT] = 1
    no_history = coefs.clone()
    no_history[:, SLOT0] = no_history[:, PUSH_SLOT] = 0
    index = torch.tensor([1, 3])
    out, h1 = torch.empty_like(x), torch.zeros_like(x)
    cases = [
        (torch.ops.ddpm_fast.group_norm_silu.default, (x, w, b, add, 4, 1e-6, True)),
        (torch.ops.ddpm_fast.residual_add.default, (x, x.clone(), b)),
        (torch.ops.ddpm_fast.reverse_step_.default,
         (x, torch.randn_like(x), None, None, coefs, index, torch.randn_like(x), None, None, 1.0, True, out, None,
          [h1])),
        (torch.ops.ddpm_fast.reverse_step_.default,  # learned variance: v read, sigma per element
         (x, torch.randn_like(x), None, torch.rand_like(x) * 2 - 1, no_history, index, torch.randn_like(x), None, None,
          1.0, True, out, None, [])),
        (torch.ops.ddpm_fast.group_norm_silu.default,  # a per-sample affine (scale-shift norm)
         (x, torch.randn(2, 8), torch.randn(2, 8), None, 4, 1e-5, True)),
    ]
    if ops.extension() is not None:  # the ops only the extension implements (CPU inference forms)
        x2 = torch.randn(2, 4, 4, 4).contiguous(memory_format=torch.channels_last)
        cases += [
            (torch.ops.ddpm_fast.group_norm_silu_cat.default, (x, x2, torch.randn(12), torch.randn(12), None, 4, 1e-6,
                                                               True)),
            (torch.ops.ddpm_fast.conv3x3_winograd.default, (x, torch.randn(8, 8, 3, 3), b, False)),
        ]
    xb, wb = x.bfloat16(), torch.randn(6, 8, 3, 3, dtype=torch.bfloat16)
    rb = torch.randn(2, 6, 4, 4, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    cases += [  # oneDNN on a packed weight: plain, with a fused residual, stride 2
        (torch.ops.ddpm_fast.packed_conv.default, (xb, wb, b[:6].bfloat16(), None, 1, 1)),
        (torch.ops.ddpm_fast.packed_conv.default, (xb, wb, None, rb, 1, 1)),
        (torch.ops.ddpm_fast.packed_conv.default, (xb, wb, b[:6].bfloat16(), None, 2, 1)),
    ]
    with ops.use_backend("native" if ops.extension() is not None else "triton"):
        for op, args in cases:
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("sampler", ["ddim_eta", "dpm++"])
def test_whole_plan_step_compiles(sampler):
    """plan.device_step (U-Net, fused reverse step with in-kernel noise, history shift, counter advance)
    compiled with fullgraph=True gives the eager run's images, with one graph for every step."""
    model = _model("digits")
    fast = model.to_fast(torch.float32)
    if sampler == "dpm++":
        s = DPMSolverSampler(NoiseSchedule.linear(1000), 5, order=2)
    else:
        s = DDIMSampler(NoiseSchedule.linear(1000), 5, eta=1.0)
    shape = (3, 1, 16, 16)
    with torch.no_grad(), ops.use_backend("auto"):
        want = s.plan(fast, shape, seed=3, class_labels=[1, 2, 3]).run()
        plan = s.plan(fast, shape, seed=3, class_labels=[1, 2, 3])
        step = torch.compile(plan.device_step, fullgraph=True, dynamic=False)
        for _ in range(plan.num_steps):
            step()
    got = plan.x
    print("max |compiled plan - eager plan|:", (got - want).abs().max().item())
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_graph_engine_captures_a_compiled_model():
    model = _model("tiny", "cuda")
    fast = model.to_fast(torch.float16)
    s = DDIMSampler(NoiseSchedule.linear(1000), 4, eta=1.0)
    with torch.no_grad():
        want = s.sample(fast, (2, 3, 8, 8), seed=1, progress=False)
        got = engine.GraphEngine().sample(s, compile_model(fast), (2, 3, 8, 8), seed=1)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_sample_cli_compile(tmp_path):
    """sample --compile on the embedded model: it says so, and the images are the eager run's to a level."""
    outs = {}
    for tag, extra in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / tag
        cmd = [sys.executable, "-m", "ddpm_fast.sample", "--num-samples", "6", "--steps", "5", "--fp16",
               "--no-progress", "--out", str(out), *extra]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert res.returncode == 0, res.stderr[-3000:]
        outs[tag] = (res.stdout, np.load(next(out.glob("samples_*.npz")))["arr_0"].astype(int))
    assert "compiled" in outs["compiled"][0] and "compiled" not in outs["eager"][0]
    diff = np.abs(outs["compiled"][1] - outs["eager"][1])
    print("max uint8 difference:", diff.max(), "mean:", diff.mean())
    assert diff.mean() < 1.0 and diff.max() <= 32
