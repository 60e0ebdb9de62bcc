"""ops.packed_conv (oneDNN on a weight packed once, the residual add as a post-op) vs its definition: bf16 within
the fast path's contract, fp32 where it runs the same math, both layouts, batch 1, odd channels, stride 2; a weight
changed after packing repacks; where it runs; bad input."""

import pytest
import torch
import torch.nn.functional as F

from ddpm_fast import ops
from ddpm_fast.ops import conv3x3_residual_add, derived, packed_conv, packed_conv_ref, packed_weight, uses_packed_conv

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch was built without oneDNN")


def _inputs(shape, c_out, k=3, channels_last=True, dtype=torch.bfloat16, stride=1, padding=1):
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(c_out, shape[1], k, k) * (2.0 / (k * k * shape[1])) ** 0.5
    n, _, h, wd = shape
    out = (n, c_out, (h + 2 * padding - k) // stride + 1, (wd + 2 * padding - k) // stride + 1)
    r = torch.randn(out)
    if channels_last:
        r = r.contiguous(memory_format=torch.channels_last)
    return x.to(dtype), w.to(dtype), torch.randn(c_out).to(dtype), r.to(dtype)


def _exact(x, w, b, r, stride, padding):
    """The same convolution in float64 from the same (rounded) inputs."""
    y = F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride, padding)
    return y if r is None else y + r.double()


def _bf16_check(got, want):
    """bf16 contract: within 2e-2 of the output's scale (one bf16 rounding of the output is 2^-9 relative)."""
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item()
    print(f"max |packed - float64| = {err:.3g} (output scale {scale:.3g})")
    assert err <= 2e-2 * max(scale, 1.0), (err, scale)


@pytest.mark.parametrize("shape", [(2, 32, 16, 16), (1, 8, 5, 7), (3, 13, 9, 9), (1, 64, 4, 4)])
@pytest.mark.parametrize("c_out", [1, 24, 37])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("channels_last", [True, False])
def test_bf16_matches_the_float64_convolution(shape, c_out, with_residual, channels_last):
    x, w, b, r = _inputs(shape, c_out, channels_last=channels_last)
    r = r if with_residual else None
    assert uses_packed_conv(x, w, r) == channels_last  # NCHW: the reference (F.conv2d keeps the layout)
    got = packed_conv(x, w, b, r, padding=1)
    assert got.dtype == torch.bfloat16 and got.shape == (shape[0], c_out, *shape[2:])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert got.is_contiguous(memory_format=fmt)
    want = _exact(x, w, b, r, 1, 1)
    _bf16_check(got, want)
    # no worse than the unfused definition (its conv output is rounded to bf16 before the add)
    ref_err = (packed_conv_ref(x, w, b, r, 1, 1).double() - want).abs().max().item()
    assert (got.double() - want).abs().max().item() <= ref_err + 1e-6 * want.abs().max().item() or r is None


@pytest.mark.parametrize("k, stride, padding", [(3, 2, 1), (1, 1, 0), (3, 1, 0)])
def test_strides_and_kernel_sizes(k, stride, padding):
    x, w, b, r = _inputs((2, 16, 11, 11), 20, k=k, stride=stride, padding=padding)
    for res in (None, r):
        got = packed_conv(x, w, b, res, stride=stride, padding=padding)
        _bf16_check(got, _exact(x, w, b, res, stride, padding))


def test_bf16_plain_convolution_equals_torch_bit_for_bit():
    """Without a residual the math is oneDNN's own convolution either way: the packed call equals F.conv2d."""
    x, w, b, _ = _inputs((4, 48, 8, 8), 40)
    assert torch.equal(packed_conv(x, w, b, padding=1), F.conv2d(x, w, b, padding=1))


def test_a_batch_other_than_the_packed_one_runs_on_the_same_pack():
    x, w, b, _ = _inputs((16, 24, 8, 8), 24)
    packed_conv(x, w, b, padding=1)
    pack = packed_weight(w, 1, 1, list(x.shape))
    for batch in (1, 3, 16):
        assert torch.equal(packed_conv(x[:batch], w, b, padding=1), F.conv2d(x[:batch], w, b, padding=1))
    assert packed_weight(w, 1, 1, [1, 24, 8, 8]) is pack  # one pack per weight


def test_a_weight_changed_after_packing_is_repacked():
    x, w, b, r = _inputs((2, 16, 8, 8), 16)
    w = torch.nn.Parameter(w)
    with torch.no_grad():
        first = packed_conv(x, w, b, r, padding=1)
        assert derived.holds(w)
        w.mul_(-0.5)  # in place, as an optimizer step: same storage, new version
        second = packed_conv(x, w, b, r, padding=1)
        halved = w.detach().clone()
        w.data = torch.randn_like(w)  # new storage, as .to() or load_state_dict(assign=True) leave it
        third = packed_conv(x, w, b, r, padding=1)
    assert not torch.equal(first, second)
    _bf16_check(second, _exact(x, halved, b, r, 1, 1))
    _bf16_check(third, _exact(x, w.detach(), b, r, 1, 1))


def test_fp32_and_autograd_take_the_reference():
    x, w, b, r = _inputs((2, 16, 8, 8), 16, dtype=torch.float32)
    assert not uses_packed_conv(x, w, r)  # fp32 3x3: Winograd (ops.conv3x3) runs fewer multiply-adds
    torch.testing.assert_close(packed_conv(x, w, b, r, padding=1), packed_conv_ref(x, w, b, r, 1, 1), atol=0, rtol=0)
    xb, wb, bb, rb = _inputs((2, 16, 8, 8), 16)
    wb.requires_grad_(True)
    assert not uses_packed_conv(xb, wb)  # forward-only: autograd records the reference
    packed_conv(xb, wb, bb, rb, padding=1).float().sum().backward()
    assert wb.grad is not None and wb.grad.shape == wb.shape
    xm, wm, bm, rm = _inputs((2, 16, 8, 8), 16)
    assert not uses_packed_conv(xm, wm, rm.float())  # residual of another dtype: the reference (promotes)
    with ops.use_backend("torch"):
        assert not uses_packed_conv(xm, wm)


def test_conv3x3_routes_bf16_to_the_packed_weight_and_fuses_the_residual():
    x, w, b, r = _inputs((2, 32, 8, 8), 32)
    assert torch.equal(ops.conv3x3(x, w, b), packed_conv(x, w, b, padding=1))
    got = conv3x3_residual_add(x, w, r, b)
    assert torch.equal(got, packed_conv(x, w, b, r, padding=1))
    _bf16_check(got, _exact(x, w, b, r, 1, 1))
    xf, wf, bf, rf = (t.float() for t in (x, w, b, r))  # fp32: Winograd, then the fused add
    torch.testing.assert_close(conv3x3_residual_add(xf, wf, rf, bf), ops.residual_add(ops.conv3x3(xf, wf), rf, bf),
                               atol=0, rtol=0)


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.randn(2, 8, 4)), "x must be a floating"),
    (dict(w=torch.randn(4, 7, 3, 3)), "weight must be a square"),
    (dict(w=torch.randn(4, 8, 3, 2)), "weight must be a square"),
    (dict(b=torch.randn(5)), "bias must be"),
    (dict(r=torch.randn(2, 4, 5, 5)), "residual must be"),
    (dict(stride=0), "stride must be positive"),
    (dict(x=torch.randn(2, 8, 1, 1), padding=0), "leaves no output"),
])
def test_bad_input_is_one_clear_error(bad, match):
    args = dict(x=torch.randn(2, 8, 4, 4), w=torch.randn(4, 8, 3, 3), b=torch.randn(4), r=torch.randn(2, 4, 4, 4),
                stride=1, padding=1)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        packed_conv(args["x"].bfloat16(), args["w"].bfloat16(), args["b"].bfloat16(), args["r"].bfloat16(),
                    args["stride"], args["padding"])
