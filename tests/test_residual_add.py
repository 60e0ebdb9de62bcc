"""ops.residual_add (Triton) vs residual_add_ref: outputs, gradients, dtype promotion, bad input."""

import pytest
import torch
from conftest import DEVICES

from ddpm_fast import ops
from ddpm_fast.ops import residual_add, residual_add_ref

pytestmark = pytest.mark.skipif(
    ops.backend_unavailable_reason("triton", torch.device(DEVICES[-1])) is not None,
    reason="triton cannot run here",
)
TOLS = {torch.float32: (1e-6, 1e-5), torch.float16: (1e-2, 1e-3), torch.bfloat16: (2e-2, 2e-2)}


def _inputs(shape, dtype, device, channels_last, skip_dtype=None):
    y = torch.randn(shape, device=device).to(dtype)
    skip = torch.randn(shape, device=device).to(skip_dtype or dtype)
    if channels_last:
        y, skip = (t.contiguous(memory_format=torch.channels_last) for t in (y, skip))
    return y, skip, torch.randn(shape[1], device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (3, 384, 17, 17), (2, 64, 32, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_ref(device, shape, dtype, channels_last, with_bias):
    y, skip, bias = _inputs(shape, dtype, device, channels_last)
    bias = bias if with_bias else None
    with ops.use_backend("triton"):
        got = residual_add(y, skip, bias)
    want = residual_add_ref(y, skip, bias)
    assert got.dtype == dtype and got.shape == shape
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    atol, rtol = TOLS[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)
    # The definition itself: a bias per channel, not per position.
    plain = y.float() + skip.float() + (bias.float()[:, None, None] if with_bias else 0)
    torch.testing.assert_close(want.float(), plain.to(dtype).float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_promote_but_bias_does_not(device):
    y, skip, bias = _inputs((2, 16, 8, 8), torch.float16, device, True, skip_dtype=torch.float32)
    with ops.use_backend("triton"):
        assert residual_add(y, skip, bias).dtype == torch.float32
        half = residual_add(y, skip.half(), bias)
    assert half.dtype == torch.float16  # an fp32 bias (autocast master weights) keeps the fp16 stream
    torch.testing.assert_close(half, residual_add_ref(y, skip.half(), bias), atol=1e-2, rtol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradients_match_ref(device, dtype, channels_last):
    y, skip, bias = _inputs((2, 24, 9, 7), dtype, device, channels_last)
    grad = torch.randn(y.shape, device=device).to(dtype)

    def run(backend):
        leaves = [t.detach().clone().requires_grad_() for t in (y, skip, bias)]
        with ops.use_backend(backend):
            (residual_add(*leaves) * grad).sum().backward()
        return [t.grad for t in leaves]

    atol, rtol = TOLS[dtype]
    for got, want, name in zip(run("triton"), run("torch"), ("y", "skip", "bias"), strict=True):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got.float(), want.float(), atol=atol * 10, rtol=rtol, msg=name)


def test_bad_input_is_named():
    y = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="y .* and skip .* must match"):
        residual_add(y, torch.randn(2, 4, 3, 4))
    with pytest.raises(ValueError, match=r"bias must be a floating \(4,\)"):
        residual_add(y, y, torch.randn(5))
    with pytest.raises(ValueError, match="skip must be a floating"):
        residual_add(y, torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="y must be float32, float16 or bfloat16"):
        residual_add(y.double(), y.double())
