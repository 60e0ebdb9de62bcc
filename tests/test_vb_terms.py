"""ops.vb_terms (the bound's term, eps MSE and x_0 MSE per row, fused) on each backend vs vb_terms_ref, on fresh
random inputs, and the reference against the likelihood's float64 closed forms (test_likelihood.py)."""

import zlib

import pytest
import torch
from conftest import DEVICES

from ddpm_fast import NoiseSchedule, ops
from ddpm_fast.likelihood import bits_per_dim, vb_table
from ddpm_fast.ops import vb_terms, vb_terms_ref


def _available(device, backend):
    return ops.backend_unavailable_reason(backend, torch.device(device)) is None


def _inputs(shape, dtype, channels_last, learned, device, variance="fixed_large", steps=40):
    """Rows at t = 0 (the decoder), t = 1 and random t: x_0 on the 8-bit grid with pixels at both ends
    (the decoder's open end bins), eps near the truth, v in [-1, 1]."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype, channels_last, learned, variance)).encode()))
    n = shape[0]

    def lay(t):
        t = t.to(device)
        return t.contiguous(memory_format=torch.channels_last) if channels_last else t

    x0 = torch.randint(0, 256, shape, generator=g).float() / 127.5 - 1.0
    x0.view(-1)[:7] = torch.tensor([-1.0, 1.0, -1.0, 1.0, 0.0, -1.0, 1.0])
    noise = torch.randn(shape, generator=g)
    schedule = NoiseSchedule.linear(steps)
    t = torch.randint(0, steps, (n,), generator=g)
    t[0], t[min(1, n - 1)] = 0, 1 if n > 1 else 0
    abar = schedule.alphas_cumprod.float()[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    eps = (noise + 0.3 * torch.randn(shape, generator=g)).to(dtype)
    v = (torch.rand(shape, generator=g) * 2 - 1).to(dtype) if learned else None
    table = vb_table(schedule, "learned_range" if learned else variance, device)
    return dict(x_start=lay(x0), x_t=lay(x_t), eps=lay(eps), noise=lay(noise), table=table, t=t.to(device),
                v=None if v is None else lay(v))


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(5, 3, 8, 8), (3, 1, 16, 16), (2, 3, 40, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("learned, clip", [(False, True), (True, False), (True, True)])
def test_kernel_matches_ref(backend, device, shape, dtype, channels_last, learned, clip):
    if not _available(device, backend):
        pytest.skip(f"{backend} backend not available on {device} here")
    kw = _inputs(shape, dtype, channels_last, learned, device)
    want = vb_terms_ref(clip_denoised=clip, **kw)
    with ops.use_backend(backend):
        got = vb_terms(clip_denoised=clip, **kw)
    assert got.shape == (shape[0], 3) and got.dtype == torch.float32
    # fp32 arithmetic on the same (exactly widened) inputs; the sums differ in their order only.
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)
    assert bool((want[:, 0] > 0).all()), "every term is positive on these inputs: the test compares real values"


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_fixed_variances_on_the_native_kernel(variance):
    if not _available("cpu", "native"):
        pytest.skip("native backend not available here")
    kw = _inputs((4, 3, 8, 8), torch.float32, False, False, "cpu", variance)
    with ops.use_backend("native"):
        torch.testing.assert_close(vb_terms(**kw), vb_terms_ref(**kw), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", ["native", "triton", "torch"])
@pytest.mark.parametrize("bad", [-1, 40, 10**6])
def test_t_outside_the_table_is_an_error_on_every_backend(backend, bad):
    if not _available("cpu", backend):
        pytest.skip(f"{backend} backend not available here")
    kw = _inputs((2, 3, 4, 4), torch.float32, False, False, "cpu")
    kw["t"] = torch.tensor([0, bad])
    with ops.use_backend(backend), pytest.raises(RuntimeError, match="t outside the table of 40 rows"):
        vb_terms(**kw)


def test_bad_input_is_named():
    kw = _inputs((2, 3, 4, 4), torch.float32, False, True, "cpu")
    cases = [
        (dict(x_t=kw["x_t"].half()), "x_t must be a float32"),
        (dict(eps=kw["eps"][:1]), r"eps shape \(1, 3, 4, 4\) != x_t shape"),
        (dict(noise=kw["noise"].double()), "noise must be float32"),
        (dict(v=kw["v"].double()), "v must be float32/float16/bfloat16"),
        (dict(table=kw["table"][:, :5]), r"table must be \(T, 8\)"),
        (dict(t=kw["t"].int()), r"t must be int64 of shape \(2,\)"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            vb_terms(**{**kw, **change})


def test_autograd_takes_the_reference():
    """The hybrid loss differentiates the term through v: the op must not cut the graph."""
    kw = _inputs((2, 3, 4, 4), torch.float32, False, True, "cpu")
    v = kw.pop("v").requires_grad_()
    vb_terms(v=v, **kw)[:, 0].sum().backward()
    assert v.grad is not None and bool(v.grad.abs().sum() > 0)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_bits_per_dim_is_the_same_on_every_backend(backend):
    """The whole bound through the fused op equals the bound through the reference (same noise, same model)."""
    if not _available("cpu", backend):
        pytest.skip(f"{backend} backend not available here")
    from conftest import randomize_

    from ddpm_fast import UNet, UNetConfig

    model = randomize_(UNet(UNetConfig.from_name("tiny", learn_sigma=True)).eval(), 0.05)
    schedule = NoiseSchedule.linear(12)
    x = torch.randint(0, 256, (3, 3, 8, 8), generator=torch.Generator().manual_seed(1)).float() / 127.5 - 1
    with ops.use_backend("torch"):
        want = bits_per_dim(model, schedule, x, seed=3, batch_size=7)
    with ops.use_backend(backend):
        got = bits_per_dim(model, schedule, x, seed=3, batch_size=7)
    for name in ("total_bpd", "vb", "mse", "xstart_mse"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=2e-5, atol=2e-6, msg=name)


# ---- the graph engine's form of the bound --------------------------------------------------------------


def _bound_model(learn_sigma):
    from conftest import randomize_

    from ddpm_fast import UNet, UNetConfig

    cfg = UNetConfig.from_name("tiny", learn_sigma=learn_sigma, num_classes=3)
    return randomize_(UNet(cfg).eval(), 0.05)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_graph_rows_give_the_eager_bound(learn_sigma):
    """engine="graph": static row buffers, a short last batch padded (on a GPU each batch is one graph replay; on
    a CPU the same buffers run eagerly): the eager loop's numbers."""
    model = _bound_model(learn_sigma).to_fast(torch.float32)
    schedule = NoiseSchedule.linear(10)
    x = torch.randint(0, 256, (3, 3, 8, 8), generator=torch.Generator().manual_seed(2)).float() / 127.5 - 1
    labels = torch.tensor([0, 2, 1])
    want = bits_per_dim(model, schedule, x, seed=5, class_labels=labels, batch_size=7)  # 30 rows: 4 + 2 padded
    got = bits_per_dim(model, schedule, x, seed=5, class_labels=labels, batch_size=7, engine="graph")
    for name in ("total_bpd", "vb", "mse", "xstart_mse"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="engine must be 'eager' or 'graph'"):
        bits_per_dim(model, schedule, x, engine="cuda")


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_the_captured_bound_step_makes_no_host_read(learn_sigma):
    """What a CUDA graph captures (GraphRows.step: noise, x_t, the fast-path forward, vb_terms) reads nothing
    back to the host."""
    from host_sync import no_host_sync

    from ddpm_fast.likelihood import BoundRows, GraphRows

    model = _bound_model(learn_sigma).to_fast(torch.float32)
    schedule = NoiseSchedule.linear(10)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    rows = BoundRows(model, schedule, x, torch.arange(2), torch.tensor([1, 3]), 0, True,
                     "learned_range" if learn_sigma else "fixed_large")
    graph = GraphRows(rows, 4)
    graph(torch.tensor([0, 1, 1]), torch.tensor([0, 4, 9]))  # loads the buffers (a host->device copy)
    with no_host_sync():
        graph.step()
    assert bool(torch.isfinite(graph.out).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_engine_bound_on_gpu():
    model = _bound_model(True).cuda().to_fast(torch.float16)
    schedule = NoiseSchedule.linear(50)
    x = (torch.randint(0, 256, (5, 3, 8, 8)).float() / 127.5 - 1).cuda()
    want = bits_per_dim(model, schedule, x, seed=1, batch_size=32)
    got = bits_per_dim(model, schedule, x, seed=1, batch_size=32, engine="graph")
    torch.testing.assert_close(got.total_bpd, want.total_bpd, rtol=1e-4, atol=1e-4)
