"""ops.group_norm_silu (Triton) vs group_norm_silu_ref on fresh random inputs, outputs and gradients.

On a CPU the Triton kernels run in the interpreter (shapes stay small); on a GPU the same tests run
on the device.
"""

import importlib

import pytest
import torch
from conftest import DEVICES

from ddpm_fast import ops
from ddpm_fast.ops import group_norm_silu, group_norm_silu_ref
from ddpm_fast.ops.group_norm_silu import _group_norm_silu_fwd

pytestmark = pytest.mark.skipif(
    ops.backend_unavailable_reason("triton", torch.device(DEVICES[-1])) is not None,
    reason="triton cannot run here",
)

TOLS = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-2, 1e-3), torch.bfloat16: (2e-2, 2e-2)}
gn_module = importlib.import_module("ddpm_fast.ops.group_norm_silu")  # the module; ops re-exports the function


@pytest.fixture(params=["single_pass", "two_pass"])
def fwd_path(request, monkeypatch):
    """Both kernel families, forward and backward: whole groups in one program, and groups split over programs."""
    if request.param == "two_pass":
        monkeypatch.setattr(gn_module, "SINGLE_PASS_MAX", 0)
    return request.param


def _make(shape, groups, dtype, channels_last, with_add, device, offset=0.0):
    n, c, h, w = shape
    x = (torch.randn(shape) * 2 + offset).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, device=device)
    bias = torch.randn(c, device=device)
    add = torch.randn(n, c, device=device).to(dtype) if with_add else None
    return x, weight, bias, add


def _check(x, weight, bias, groups, add, silu, dtype):
    with ops.use_backend("triton"):
        got = group_norm_silu(x, weight, bias, groups, 1e-6, add=add, silu=silu)
    want = group_norm_silu_ref(x, weight, bias, groups, 1e-6, add=add, silu=silu)
    assert got.dtype == x.dtype and got.shape == x.shape
    fmt = torch.channels_last if (x.is_contiguous(memory_format=torch.channels_last)
                                  and not x.is_contiguous()) else torch.contiguous_format
    assert got.is_contiguous(memory_format=fmt), "output must keep the input's memory format"
    atol, rtol = TOLS[dtype]
    print("max diff:", (got.float() - want.float()).abs().max().item())
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, groups", [((1, 32, 8, 8), 8), ((2, 64, 8, 8), 32), ((4, 16, 2, 2), 4),
                                           ((2, 12, 17, 17), 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_add, silu", [(True, True), (False, True), (False, False)])
def test_forward_matches_ref(device, shape, groups, dtype, channels_last, with_add, silu, fwd_path):
    x, weight, bias, add = _make(shape, groups, dtype, channels_last, with_add, device)
    _check(x, weight, bias, groups, add, silu, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, groups, dtype, channels_last", [
    ((1, 384, 17, 17), 32, torch.float16, True),
    ((1, 384, 17, 17), 32, torch.float32, False),
    ((2, 32, 32, 32), 8, torch.bfloat16, True),
    ((2, 32, 32, 32), 8, torch.float16, False),
])
def test_forward_matches_ref_unet_shapes(device, shape, groups, dtype, channels_last, fwd_path):
    x, weight, bias, add = _make(shape, groups, dtype, channels_last, True, device)
    _check(x, weight, bias, groups, add, True, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("shape, groups", [((1, 128, 256, 256), 32), ((512, 256, 16, 16), 32),
                                           ((16, 768, 8, 8), 32), ((256, 384, 4, 4), 32)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_full_size_gpu(shape, groups, dtype, fwd_path):
    x, weight, bias, add = _make(shape, groups, dtype, True, True, "cuda")
    _check(x, weight, bias, groups, add, True, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split", [1, 2, 3, 7])
def test_split_count_does_not_change_the_result(device, split):
    x, weight, bias, add = _make((1, 8, 16, 16), 2, torch.float32, False, True, device)
    want = group_norm_silu_ref(x, weight, bias, 2, 1e-6, add=add)
    got = _group_norm_silu_fwd(x, weight, bias, 2, 1e-6, add, True, split=split)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_add_may_be_a_column_slice(device, fwd_path):
    """The fast U-Net hands each block a column slice of one (N, sum C) GEMM: rows strided, no copy."""
    x, weight, bias, _ = _make((3, 16, 5, 5), 4, torch.float32, True, False, device)
    wide = torch.randn(3, 40, device=device, requires_grad=True)
    add = wide[:, 8:24]
    assert add.stride() == (40, 1)
    grad_y = torch.randn(x.shape, device=device)

    def run(backend):
        xi = x.detach().clone().requires_grad_()
        with ops.use_backend(backend):
            y = group_norm_silu(xi, weight, bias, 4, 1e-6, add=add)
        return (y, *torch.autograd.grad(y, (xi, wide), grad_y))

    for got, want in zip(run("triton"), run("torch"), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_statistics_survive_a_large_mean(device, fwd_path):
    # Sum-of-squares variance would cancel catastrophically here; the Welford merge does not.
    x, weight, bias, _ = _make((2, 8, 16, 16), 4, torch.float32, True, False, device, offset=3000.0)
    with ops.use_backend("triton"):
        got = group_norm_silu(x, weight, bias, 4, 1e-6, silu=False)
    xd = x.double().reshape(2, 4, -1)
    norm = (xd - xd.mean(-1, keepdim=True)) / (xd.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    want = norm.reshape(x.shape) * weight.double()[:, None, None] + bias.double()[:, None, None]
    torch.testing.assert_close(got.double(), want, atol=2e-3, rtol=1e-3)


GRAD_TOLS = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 1e-2), torch.bfloat16: (1e-1, 5e-2)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, groups", [((2, 16, 6, 6), 4), ((1, 24, 17, 17), 2), ((3, 12, 4, 4), 1)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_add, silu", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_ref(device, shape, groups, channels_last, with_add, silu, dtype, fwd_path):
    x, weight, bias, add = _make(shape, groups, dtype, channels_last, with_add, device)
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias) + ((add,) if with_add else ())]
    grad_y = torch.randn(x.shape, device=device).to(dtype)

    def grads(backend):
        with ops.use_backend(backend):
            y = group_norm_silu(leaves[0], leaves[1], leaves[2], groups, 1e-6, add=leaves[3] if with_add else None,
                                silu=silu)
        return torch.autograd.grad(y, leaves, grad_y)

    atol, rtol = GRAD_TOLS[dtype]
    for name, got, want in zip(("x", "weight", "bias", "add"), grads("triton"), grads("torch"), strict=False):
        assert got.dtype == want.dtype, name
        print(name, "max diff:", (got.float() - want.float()).abs().max().item())
        # weight/bias/add gradients are sums over many elements: compare relative to their size
        scale = 1.0 if name == "x" else max(1.0, want.float().abs().max().item())
        torch.testing.assert_close(got.float() / scale, want.float() / scale, atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split", [1, 3])
def test_backward_split_count_does_not_change_the_result(device, split):
    from ddpm_fast.ops.group_norm_silu import _group_norm_silu_bwd

    x, weight, bias, add = _make((1, 8, 16, 16), 2, torch.float32, True, True, device)
    y, mean, rstd = _group_norm_silu_fwd(x, weight, bias, 2, 1e-6, add, True)
    dy = torch.randn_like(y)
    one = _group_norm_silu_bwd(dy, x, weight, bias, add, mean, rstd, 2, True, split=1)
    many = _group_norm_silu_bwd(dy, x, weight, bias, add, mean, rstd, 2, True, split=split)
    for a, b in zip(one, many, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bad_input_names_the_problem():
    x = torch.randn(2, 12, 4, 4)
    w, b = torch.ones(12), torch.zeros(12)
    with pytest.raises(ValueError, match="12 channels are not divisible by num_groups=5"):
        group_norm_silu(x, w, b, 5)
    with pytest.raises(ValueError, match=r"add must have shape \(2, 12\)"):
        group_norm_silu(x, w, b, 4, add=torch.randn(2, 11))
    with pytest.raises(ValueError, match=r"weight must have shape \(12,\)"):
        group_norm_silu(x, torch.ones(11), b, 4)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        group_norm_silu(torch.randn(12, 4, 4), w, b, 4)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        group_norm_silu(x.double(), w, b, 4)


@pytest.mark.parametrize("backend", ["torch", "triton", "native"])
def test_empty_groups_get_one_answer_on_every_backend(backend):
    """H*W = 0 has no statistics: torch raised, the kernels wrote an empty tensor. Now one error everywhere;
    an empty batch (N = 0) is an empty result everywhere."""
    w, b = torch.ones(8), torch.zeros(8)
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match=r"C and H\*W must be positive"):
            group_norm_silu(torch.randn(2, 8, 0, 4), w, b, 4)
        with pytest.raises(ValueError, match="eps must be positive"):
            group_norm_silu(torch.randn(2, 8, 2, 2), w, b, 4, eps=-1.0)
        assert group_norm_silu(torch.randn(0, 8, 4, 4), w, b, 4).shape == (0, 8, 4, 4)


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("shape, groups", [((2, 64, 8, 8), 32), ((3, 96, 17, 17), 32), ((1, 32, 1, 1), 8)])
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 3e-2, 2e-2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_scale_shift_matches_ref(backend, shape, groups, dtype, atol, rtol, channels_last):
    """ADM's SiLU(GroupNorm(x) * (1 + scale) + shift): the kernels' per-sample affine against the formula."""
    from ddpm_fast.ops import group_norm_scale_shift_silu, group_norm_scale_shift_silu_ref

    if ops.backend_unavailable_reason(backend, torch.device("cpu")) is not None:
        pytest.skip(f"{backend} backend not available here")
    g = torch.Generator().manual_seed(sum(shape) + groups)
    n, c = shape[:2]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(c, generator=g), torch.randn(c, generator=g)
    scale, shift = torch.randn(n, c, generator=g).to(dtype), torch.randn(n, c, generator=g).to(dtype)
    want = group_norm_scale_shift_silu_ref(x, weight, bias, groups, 1e-5, scale, shift)
    with ops.use_backend(backend):
        got = group_norm_scale_shift_silu(x, weight, bias, groups, 1e-5, scale, shift)
    assert got.dtype == dtype and got.is_contiguous(memory_format=ops.memory_format(x))
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)
    plain = group_norm_silu_ref(x, weight, bias, groups, 1e-5)
    assert not torch.allclose(plain.float(), want.float(), atol=0.1)  # scale and shift did something


def test_scale_shift_gradients_take_the_reference():
    from ddpm_fast.ops import group_norm_scale_shift_silu, group_norm_scale_shift_silu_ref

    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    w, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    s, t = torch.randn(2, 8, requires_grad=True), torch.randn(2, 8, requires_grad=True)
    inputs = (x, w, b, s, t)
    got = torch.autograd.grad(group_norm_scale_shift_silu(x, w, b, 4, 1e-5, s, t).square().sum(), inputs)
    want = torch.autograd.grad(group_norm_scale_shift_silu_ref(x, w, b, 4, 1e-5, s, t).square().sum(), inputs)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"scale must have shape \(2, 8\)"):
        group_norm_scale_shift_silu(x, w, b, 4, 1e-5, s[:1], t)
