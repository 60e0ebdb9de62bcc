"""ops.conv3x3 (Winograd F(4x4, 3x3), the extension's CPU kernel) vs the float64 convolution: outputs, borders,
the weight transform, where it runs, bad input."""

import gc
import importlib

import pytest
import torch
import torch.nn.functional as F

from ddpm_fast import ops
from ddpm_fast.ops import conv3x3, conv3x3_ref, derived, uses_winograd, winograd_weight

_CONV3X3_MODULE = importlib.import_module("ddpm_fast.ops.conv3x3")  # ops.conv3x3 is the function
pytestmark = pytest.mark.skipif(ops.extension() is None, reason="the extension is not built")


def _inputs(shape, c_out, channels_last=True, scale=1.0):
    x = torch.randn(shape) * scale
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(c_out, shape[1], 3, 3) * (2.0 / (9 * shape[1])) ** 0.5
    return x, w, torch.randn(c_out)


def _exact(x, w, b):
    return F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)


def _check(got, want):
    """fp32 reductions: within 1e-4 of the output's scale (the direct fp32 convolution is ~1e-6 here)."""
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= 1e-4 * max(scale, 1.0), (err, scale)


@pytest.mark.parametrize("shape", [(2, 32, 16, 16), (1, 8, 1, 1), (3, 12, 17, 17), (2, 16, 5, 9), (1, 64, 4, 4),
                                   (2, 384, 8, 8)])
@pytest.mark.parametrize("c_out", [8, 33, 80])  # C_out % 16: the AVX-512 GEMM takes 80 (64 + 16), bmm the others
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_float64_convolution(shape, c_out, with_bias, cpu_loops):
    x, w, b = _inputs(shape, c_out)
    b = b if with_bias else None
    assert uses_winograd(x, w)
    got = conv3x3(x, w, b)
    assert got.shape == (shape[0], c_out, *shape[2:]) and got.dtype == torch.float32
    assert got.is_contiguous(memory_format=torch.channels_last)
    _check(got, _exact(x, w, b))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_many_chunks_on_any_thread_count(threads):
    """Enough tiles for several chunks, rounded to a multiple of the threads with a short last one, each thread's
    scratch kept from a larger call before (stale values must never be read)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        big_x, big_w, _ = _inputs((2, 96, 24, 24), 48)
        _check(conv3x3(big_x, big_w), _exact(big_x, big_w, None))
        for shape, c_out in (((5, 16, 40, 36), 16), ((3, 24, 37, 29), 32), ((1, 16, 4, 4), 16)):
            x, w, b = _inputs(shape, c_out)
            _check(conv3x3(x, w, b), _exact(x, w, b))
            _check(conv3x3(x[:, :, ::2, ::2].contiguous(memory_format=torch.channels_last), w, b, upsample=True),
                   _exact(F.interpolate(x[:, :, ::2, ::2], scale_factor=2, mode="nearest"), w, b))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("shape", [(2, 32, 8, 8), (1, 8, 1, 1), (3, 12, 5, 7), (2, 64, 4, 4)])
@pytest.mark.parametrize("c_out", [16, 24])
def test_upsampled_input_matches_float64(shape, c_out, cpu_loops):
    """upsample=True: the convolution of x's 2x nearest upsampling, read in place (the U-Nets' upsamplers)."""
    x, w, b = _inputs(shape, c_out)
    got = conv3x3(x, w, b, upsample=True)
    assert got.shape == (shape[0], c_out, 2 * shape[2], 2 * shape[3])
    _check(got, _exact(F.interpolate(x, scale_factor=2, mode="nearest"), w, b))
    torch.testing.assert_close(conv3x3_ref(x, w, b, upsample=True),
                               _exact(F.interpolate(x, scale_factor=2, mode="nearest"), w, b).float())


def test_nchw_input_and_large_values():
    x, w, b = _inputs((2, 24, 11, 6), 16, channels_last=False, scale=1e3)
    _check(conv3x3(x, w, b), _exact(x, w, b))


def test_many_tiles_across_chunks_and_threads(cpu_loops):
    # 64 images of 16x16: 1024 tiles, several chunks per thread; the kernel's chunk boundaries cut through images.
    x, w, b = _inputs((64, 32, 16, 16), 32)
    got = conv3x3(x, w, b)
    _check(got, _exact(x, w, b))
    torch.testing.assert_close(got[17:18], conv3x3(x[17:18].contiguous(memory_format=torch.channels_last), w, b),
                               atol=1e-6, rtol=1e-6)


def test_weight_transform_is_g_g_gt():
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    u = winograd_weight(w)
    assert u.shape == (36, 3, 5) and u.dtype == torch.float32 and u.is_contiguous()
    # Lavin & Gray's G for F(4x4, 3x3): the kernel's Lagrange interpolation at 0, 1, -1, 2, -2, and its top
    # coefficient (infinity).
    g = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                      [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64)
    for o, c in [(0, 0), (4, 2), (2, 1)]:
        want = g @ w[o, c] @ g.T
        torch.testing.assert_close(u[:, c, o].double().view(6, 6), want, atol=1e-6, rtol=1e-6)


def test_where_it_runs():
    x, w, _ = _inputs((1, 8, 4, 4), 8)
    assert uses_winograd(x, w)
    assert not uses_winograd(x[:, :4].contiguous(), w[:, :4])  # too few channels: the direct convolution
    assert not uses_winograd(x.bfloat16(), w.bfloat16())
    with ops.use_backend("torch"):
        assert not uses_winograd(x, w)
        torch.testing.assert_close(conv3x3(x, w), conv3x3_ref(x, w), atol=0, rtol=0)
    with torch.enable_grad():
        wg = w.clone().requires_grad_(True)
        assert not uses_winograd(x, wg)
        conv3x3(x, wg).sum().backward()  # the reference runs, so gradients reach the weight
    torch.testing.assert_close(wg.grad, torch.autograd.grad(conv3x3_ref(x, w.requires_grad_()).sum(), w)[0])


def test_transform_is_cached_per_weight_and_version():
    x, w, b = _inputs((2, 16, 8, 8), 16)
    u = ops.transformed_weight(w)
    assert ops.transformed_weight(w) is u
    torch.testing.assert_close(u, winograd_weight(w), atol=0, rtol=0)
    with torch.no_grad():
        w.mul_(-0.5)  # an in-place update (an optimizer step): the next call sees the new weight
    assert ops.transformed_weight(w) is not u
    _check(conv3x3(x, w, b), _exact(x, w, b))
    other = w.clone()  # same values, another tensor: its own entry
    assert ops.transformed_weight(other) is not ops.transformed_weight(w)
    assert derived.holds(other)
    keys = [k for k, entry in derived._entries.items() if entry[0][0]() is other]
    del other
    gc.collect()
    assert len(keys) == 1 and keys[0] not in derived._entries  # an entry goes with its weight


def test_weight_made_under_inference_mode():
    """An inference tensor has no version counter: its transform is remade each call, so an in-place update
    (possible only inside inference mode) is seen."""
    with torch.inference_mode():
        x, w, b = _inputs((1, 16, 8, 8), 16)
        _check(conv3x3(x, w, b), _exact(x, w, b))
        w.mul_(2.0)
        _check(conv3x3(x, w, b), _exact(x, w, b))


@pytest.mark.parametrize("bad, match", [
    (lambda x, w, b: (x[0], w, b), "x must be a floating"),
    (lambda x, w, b: (x, w[:, :3], b), r"weight must be \(C_out, 8, 3, 3\)"),
    (lambda x, w, b: (x, w[..., :2], b), "weight must be"),
    (lambda x, w, b: (x, w, b[:3]), r"bias must be \(8,\)"),
])
def test_bad_input_is_named(bad, match):
    x, w, b = _inputs((1, 8, 4, 4), 8)
    with pytest.raises(ValueError, match=match):
        conv3x3(*bad(x, w, b))


def test_kernel_checks_its_arguments():
    x, w, b = _inputs((1, 8, 4, 4), 8)
    u = winograd_weight(w)
    native = ops.extension()
    with pytest.raises(RuntimeError, match="transformed weight"):
        native.conv3x3(x, u[:, :4].contiguous(), b)
    with pytest.raises(RuntimeError, match="float32"):
        native.conv3x3(x.double(), u, b)
    with pytest.raises(RuntimeError, match="channels_last"):
        native.conv3x3(x.contiguous(), u, b)
    with pytest.raises(RuntimeError, match="bias"):
        native.conv3x3(x, u, b[:2])


@pytest.mark.parametrize("shape, c_out", [((3, 32, 16, 16), 1), ((2, 128, 9, 7), 3), ((1, 8, 1, 1), 7),
                                          ((2, 16, 2, 5), 4)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_few_output_channels_by_one_gemm_over_the_taps(shape, c_out, with_bias):
    """A conv_out (fewer than MIN_CHANNELS outputs) on a CPU in fp32: the nine taps' partial sums from one GEMM,
    shifted and added, equal the float64 convolution; channels_last out; the torch backend and autograd keep
    F.conv2d."""
    x, w, b = _inputs(shape, c_out)
    b = b if with_bias else None
    assert not uses_winograd(x, w) and _CONV3X3_MODULE.uses_taps_gemm(x, w)
    got = conv3x3(x, w, b)
    assert got.shape == (shape[0], c_out, *shape[2:]) and got.is_contiguous(memory_format=torch.channels_last)
    _check(got, _exact(x, w, b))
    _check(conv3x3(x.contiguous(), w, b), _exact(x, w, b))  # an NCHW input too
    with ops.use_backend("torch"):
        assert not _CONV3X3_MODULE.uses_taps_gemm(x, w)
    with torch.enable_grad():
        assert not _CONV3X3_MODULE.uses_taps_gemm(x, w.clone().requires_grad_(True))
    assert not _CONV3X3_MODULE.uses_taps_gemm(x, w, upsample=True)


@pytest.mark.parametrize("shape, c_out, upsample", [((2, 16, 8, 8), 24, False), ((1, 8, 5, 7), 8, False),
                                                     ((2, 12, 4, 6), 16, True), ((3, 32, 9, 9), 33, False)])
def test_backward_through_a_frozen_weight_is_the_kernel_on_the_adjoint(shape, c_out, upsample):
    """x's gradient through a fixed weight (a guidance classifier's): the forward and the backward both run the
    Winograd kernel (the backward on the adjoint weight, summed over 2x2 blocks for an upsampling call), equal to
    the float64 convolution's gradient to fp32 round-off."""
    x, w, b = _inputs(shape, c_out)
    x.requires_grad_(True)
    g = torch.randn(shape[0], c_out, shape[2] * (2 if upsample else 1), shape[3] * (2 if upsample else 1))
    assert uses_winograd(x, w)
    out = conv3x3(x, w, b, upsample=upsample)
    assert out.grad_fn is not None
    (gx,) = torch.autograd.grad(out, x, g)
    x64 = x.detach().double().requires_grad_(True)
    want = conv3x3_ref(x64, w.double(), b.double(), upsample=upsample)
    (gx_want,) = torch.autograd.grad(want, x64, g.double())
    _check(out.detach(), want.detach())
    _check(gx, gx_want)
    assert derived.holds(w)  # the adjoint's transform is cached beside the forward's


def test_a_weight_that_trains_takes_the_reference_and_the_op_gives_every_gradient():
    """A weight that needs its gradient (training) runs the reference; the registered op itself still gives x's,
    the weight's and the bias's gradients (its autograd formula), equal to the reference's."""
    x, w, b = _inputs((2, 16, 6, 6), 16)
    x.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    assert not uses_winograd(x, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not uses_winograd(x, w.detach())  # autocast: training's mixed precision
    out = torch.ops.ddpm_fast.conv3x3_winograd(x, w, b, False)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w, b), g)
    want = torch.autograd.grad(conv3x3_ref(x, w, b), (x, w, b), g)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)
