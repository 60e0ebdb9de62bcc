"""The extension's C++ CPU kernels (group_norm_silu, residual_add) vs their torch references.

Fresh random inputs, both memory formats, fp32/bf16/fp16, odd shapes, blocks that split a sample
(channels_last), offset data (centred variance), non-finite input, the dispatch rules of ``auto``,
and invariance to the thread count and the batch size.
"""

import pytest
import torch
import torch.nn.functional as F

from ddpm_fast import ops
from ddpm_fast.ops import group_norm_silu, group_norm_silu_ref, residual_add, residual_add_ref

_C = ops.extension()
pytestmark = pytest.mark.skipif(_C is None or not hasattr(_C, "group_norm_silu"),
                                reason="the extension ddpm_fast.ops._C is not built")

TOLS = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-2, 1e-3), torch.bfloat16: (2e-2, 2e-2)}
DTYPES = list(TOLS)


def _fmt(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def _gn_inputs(shape, dtype, channels_last, with_add, affine=True, offset=0.0, scale=2.0):
    n, c, _, _ = shape
    x = (torch.randn(shape) * scale + offset).to(dtype).contiguous(memory_format=_fmt(channels_last))
    weight = torch.randn(c).to(dtype) if affine else None
    bias = torch.randn(c).to(dtype) if affine else None
    add = torch.randn(n, c) if with_add else None
    return x, weight, bias, add


def _assert_close(got, want, dtype, equal_nan=False):
    assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride()
    atol, rtol = TOLS[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol, equal_nan=equal_nan)


# (shape, groups): odd channel counts and sizes, batch 1, a 1x1 image, and channels_last samples that
# span several position blocks (about 16K values each), the last one partial.
GN_SHAPES = [((1, 32, 8, 8), 8), ((3, 384, 17, 17), 32), ((2, 12, 17, 17), 4), ((4, 16, 1, 1), 4),
             ((2, 8, 50, 50), 2), ((1, 4, 128, 96), 1)]


@pytest.mark.parametrize("shape, groups", GN_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_add, silu", [(True, True), (False, True), (True, False)])
def test_group_norm_silu_matches_ref(shape, groups, dtype, channels_last, with_add, silu, cpu_loops):
    x, weight, bias, add = _gn_inputs(shape, dtype, channels_last, with_add)
    got = _C.group_norm_silu(x, weight, bias, add, groups, 1e-6, silu)
    _assert_close(got, group_norm_silu_ref(x, weight, bias, groups, 1e-6, add, silu), dtype)


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_without_affine_and_with_offset_data(channels_last):
    """Data far from zero (mean 1000, std 1): the centred variance keeps fp32 precision. The expected values
    are computed in float64 (torch's own fp32 channels_last GroupNorm loses digits here)."""
    x, _, _, add = _gn_inputs((2, 16, 24, 24), torch.float32, channels_last, True, affine=False, offset=1000.0,
                              scale=1.0)
    got = _C.group_norm_silu(x, None, None, add, 4, 1e-6, True)
    h = x.double().contiguous() + add.double()[:, :, None, None]
    want = F.silu(F.group_norm(h, 4, None, None, 1e-6)).float()
    torch.testing.assert_close(got, want.contiguous(memory_format=_fmt(channels_last)), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True])
def test_silu_range_and_non_finite_input(channels_last, cpu_loops):
    """Large pre-activations (|y| up to ~400) use the exp's clamped ends; a NaN or inf poisons its group only,
    as in the reference (never a finite value made up for it)."""
    x, weight, bias, add = _gn_inputs((2, 8, 6, 6), torch.float32, channels_last, True)
    weight = weight * 100
    _assert_close(_C.group_norm_silu(x, weight, bias, add, 4, 1e-6, True),
                  group_norm_silu_ref(x, weight, bias, 4, 1e-6, add, True), torch.float32)
    x[0, 1, 2, 3] = float("nan")
    x[1, 6, 0, 0] = float("inf")
    got = _C.group_norm_silu(x, weight, bias, add, 4, 1e-6, True)
    _assert_close(got, group_norm_silu_ref(x, weight, bias, 4, 1e-6, add, True), torch.float32, equal_nan=True)
    assert got[0, :2].isnan().all() and got[1, 6:].isnan().all()
    assert got[0, 2:].isfinite().all() and got[1, :6].isfinite().all()


@pytest.mark.parametrize("channels_last", [False, True])
def test_silu_is_accurate_over_its_whole_range(channels_last, cpu_loops):
    """SiLU's exp and reciprocal (a polynomial, and on AVX-512 vrcp14ps + a Newton step instead of a division)
    against float64 on pre-activations from -100 to 100, both signs, tiny ones, channel counts that are and are
    not a multiple of the 16-lane vectors."""
    for c in (16, 24, 3):
        x = torch.randn(2, c, 40, 50, dtype=torch.float64)
        weight, bias = torch.full((c,), 30.0, dtype=torch.float64), torch.linspace(-5, 5, c, dtype=torch.float64)
        x32 = x.float().contiguous(memory_format=_fmt(channels_last))
        got = _C.group_norm_silu(x32, weight.float(), bias.float(), None, 1, 1e-6, True)
        want = group_norm_silu_ref(x32.double(), weight, bias, 1, 1e-6, None, True)
        assert want.abs().max() > 90 and (want < -1e-8).any()
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=2e-6)


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_is_invariant_to_threads_and_batch(channels_last, cpu_loops):
    """Blocking depends on the shape only: the same bits with 1 or 2 threads, and for a sample alone or in a batch."""
    x, weight, bias, add = _gn_inputs((5, 16, 40, 40), torch.float32, channels_last, True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _C.group_norm_silu(x, weight, bias, add, 4, 1e-6, True)
        torch.set_num_threads(max(2, threads))
        two = _C.group_norm_silu(x, weight, bias, add, 4, 1e-6, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    alone = _C.group_norm_silu(x[3:4].contiguous(memory_format=_fmt(channels_last)), weight, bias, add[3:4], 4,
                               1e-6, True)
    assert torch.equal(alone, two[3:4])


def test_group_norm_bad_input_is_named():
    x = torch.randn(2, 8, 4, 4)
    with pytest.raises(RuntimeError, match="not divisible by num_groups=3"):
        _C.group_norm_silu(x, None, None, None, 3, 1e-6, True)
    with pytest.raises(RuntimeError, match=r"add must be an \(2, 8\) CPU tensor"):
        _C.group_norm_silu(x, None, None, torch.randn(8), 2, 1e-6, True)
    with pytest.raises(RuntimeError, match="contiguous or channels_last"):
        _C.group_norm_silu(x[:, :, ::2], None, None, None, 2, 1e-6, True)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        _C.group_norm_silu(x.double(), None, None, None, 2, 1e-6, True)
    with pytest.raises(RuntimeError, match="give both weight and bias"):
        _C.group_norm_silu(x, torch.ones(8), None, None, 2, 1e-6, True)
    with pytest.raises(RuntimeError, match=r"weight must be a \(8,\) CPU tensor, or \(2, 8\) per sample"):
        _C.group_norm_silu(x, torch.ones(4), torch.ones(4), None, 2, 1e-6, True)
    with pytest.raises(RuntimeError, match=r"bias must be a \(8,\) CPU tensor, or \(2, 8\) per sample"):
        _C.group_norm_silu(x, torch.ones(2, 8), torch.ones(8), None, 2, 1e-6, True)
    with pytest.raises(RuntimeError, match="eps must be positive"):
        _C.group_norm_silu(x, None, None, None, 2, 0.0, True)


# (N, C1, C2, H, W, groups): groups that straddle the two inputs' boundary (5 + 7 in groups of 3), widths that
# are not a multiple of the 16-lane vectors, samples over several position blocks (the last one partial), fewer
# samples than threads, a U-Net decoder's shapes.
CAT_SHAPES = [(2, 5, 7, 3, 5, 4), (3, 64, 32, 33, 31, 8), (1, 96, 96, 20, 20, 32), (4, 16, 48, 1, 1, 8),
              (64, 64, 32, 16, 16, 8)]


@pytest.mark.parametrize("n, c1, c2, h, w, groups", CAT_SHAPES)
@pytest.mark.parametrize("with_add, silu", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("affine", ["channel", "sample", None])
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 2e-2, 2e-2)])
def test_group_norm_silu_cat_is_the_kernel_on_the_concatenation(n, c1, c2, h, w, groups, with_add, silu, affine,
                                                                dtype, atol, rtol, cpu_loops):
    """The two-input form (a decoder block's input and its skip, never concatenated) gives the same bits as the
    one-input kernel on torch.cat([x, x2], 1), in fp32 and bf16, and matches the reference."""
    c = c1 + c2
    x = torch.randn(n, c1, h, w).mul(2).add(0.5).to(dtype).contiguous(memory_format=torch.channels_last)
    x2 = torch.randn(n, c2, h, w).mul(3).to(dtype).contiguous(memory_format=torch.channels_last)
    shape = {"channel": (c,), "sample": (n, c), None: None}[affine]
    weight, bias = (None, None) if shape is None else (torch.randn(shape), torch.randn(shape))
    add = torch.randn(n, c) if with_add else None
    got = _C.group_norm_silu_cat(x, x2, weight, bias, add, groups, 1e-6, silu)
    joined = torch.cat([x, x2], 1)
    assert got.is_contiguous(memory_format=torch.channels_last) and got.shape == (n, c, h, w)
    one_input = _C.group_norm_silu(joined, weight, bias, add, groups, 1e-6, silu)
    assert got.dtype == dtype
    if joined.is_contiguous():  # 1x1 images: NCHW as well, where the one-input kernel takes its NCHW loops
        torch.testing.assert_close(got, one_input, atol=atol, rtol=rtol)
    else:
        assert torch.equal(got, one_input)
    if affine != "sample":
        want = group_norm_silu_ref(joined, weight, bias, groups, 1e-6, add, silu)
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def test_group_norm_silu_cat_bad_input_is_named():
    cl = torch.channels_last
    x, x2 = torch.randn(2, 8, 4, 4).contiguous(memory_format=cl), torch.randn(2, 4, 4, 4).contiguous(memory_format=cl)
    for a, b in ((x, x2.contiguous()), (x.double(), x2), (x, x2.bfloat16())):
        with pytest.raises(RuntimeError, match=r"float32 or bfloat16 \(one dtype\) channels_last"):
            _C.group_norm_silu_cat(a, b, None, None, None, 4, 1e-6, True)
    with pytest.raises(RuntimeError, match="differ beyond their channels"):
        _C.group_norm_silu_cat(x, torch.randn(2, 4, 2, 4).contiguous(memory_format=cl), None, None, None, 4, 1e-6, True)
    with pytest.raises(RuntimeError, match="12 channels are not divisible by num_groups=5"):
        _C.group_norm_silu_cat(x, x2, None, None, None, 5, 1e-6, True)
    with pytest.raises(RuntimeError, match=r"add must be an \(2, 12\) CPU tensor"):
        _C.group_norm_silu_cat(x, x2, None, None, torch.randn(2, 8), 4, 1e-6, True)
    with pytest.raises(ValueError, match="must differ only in their channels"):
        ops.group_norm_silu_cat(x, x2[:1], None, None, 4)
    with pytest.raises(ValueError, match=r"weight must have shape \(12,\)"):
        ops.group_norm_silu_cat(x, x2, torch.ones(8), torch.ones(8), 4)


def test_group_norm_silu_cat_takes_the_concatenation_where_the_kernel_does_not_run():
    """Under autograd and on the torch backend ops.group_norm_silu_cat is group_norm_silu of the concatenation
    (gradients reach both inputs); inference on the native backend reads the two in place, to round-off."""
    cl = torch.channels_last
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=cl).requires_grad_()
    x2 = torch.randn(2, 4, 5, 5).contiguous(memory_format=cl).requires_grad_()
    weight, bias = torch.randn(12), torch.randn(12)
    want = group_norm_silu_ref(torch.cat([x, x2], 1), weight, bias, 4, 1e-6)
    assert not ops.joins_in_place(x, x2)
    got = ops.group_norm_silu_cat(x, x2, weight, bias, 4)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert x.grad is not None and x2.grad is not None and x2.grad.abs().sum() > 0
    with torch.no_grad():
        assert ops.joins_in_place(x, x2)
        _assert_close(ops.group_norm_silu_cat(x, x2, weight, bias, 4), want.detach(), torch.float32)
        with ops.use_backend("torch"):
            assert not ops.joins_in_place(x, x2)
            torch.testing.assert_close(ops.group_norm_silu_cat(x, x2, weight, bias, 4), want.detach())


@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (3, 384, 17, 17), (2, 64, 32, 32), (2, 5, 1, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_residual_add_matches_ref(shape, dtype, channels_last, with_bias):
    y = torch.randn(shape).to(dtype).contiguous(memory_format=_fmt(channels_last))
    skip = torch.randn(shape).to(dtype).contiguous(memory_format=_fmt(channels_last))
    bias = torch.randn(shape[1]) if with_bias else None
    _assert_close(_C.residual_add(y, skip, bias), residual_add_ref(y, skip, bias), dtype)


@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_kernels_are_the_fp32_kernels_rounded(channels_last, cpu_loops):
    """bf16 blocks are converted in registers (no fp32 copy), with the fp32 path's arithmetic per value: the bf16
    kernels' output must be the fp32 kernels' output on the same values, rounded to bf16, bit for bit. Catches
    any indexing or conversion slip the 2e-2 tolerance against the reference would let through."""
    fmt = _fmt(channels_last)
    for i, (shape, groups) in enumerate(GN_SHAPES + [((64, 64, 16, 16), 8)]):
        silu = i % 2 == 0  # both kinds of normalize pass
        x, weight, bias, add = _gn_inputs(shape, torch.bfloat16, channels_last, with_add=True)
        got = _C.group_norm_silu(x, weight, bias, add, groups, 1e-6, silu)
        want = _C.group_norm_silu(x.float(), weight.float(), bias.float(), add, groups, 1e-6, silu).bfloat16()
        assert got.stride() == want.stride()
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (shape, silu)
    for shape in [(1, 3, 8, 8), (3, 384, 17, 17), (2, 64, 32, 32)]:
        y, skip = (torch.randn(shape).bfloat16().contiguous(memory_format=fmt) for _ in range(2))
        for bias in (torch.randn(shape[1]), None):
            got = _C.residual_add(y, skip, bias)
            want = _C.residual_add(y.float(), skip.float(), bias).bfloat16()
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (shape, bias is None)


def test_residual_add_bad_input_is_named():
    y = torch.randn(2, 4, 3, 3)
    with pytest.raises(RuntimeError, match="the kernel takes one dtype"):
        _C.residual_add(y, y.bfloat16(), None)
    with pytest.raises(RuntimeError, match="skip must have y's memory format"):
        _C.residual_add(y.contiguous(memory_format=torch.channels_last), y, None)
    with pytest.raises(RuntimeError, match="must have the same shape"):
        _C.residual_add(y, y[:1], None)
    with pytest.raises(RuntimeError, match=r"bias must be a \(4,\) CPU tensor"):
        _C.residual_add(y, y, torch.ones(3))


def _counting(monkeypatch):
    """Route the public ops' extension calls through counters."""
    calls = {"group_norm_silu": 0, "residual_add": 0}

    class Counting:
        def __getattr__(self, name):
            fn = getattr(_C, name)
            if name not in calls:
                return fn

            def counted(*args):
                calls[name] += 1
                return fn(*args)

            return counted

    monkeypatch.setattr(ops.registry, "_C", Counting())
    return calls


def test_auto_dispatch_on_the_cpu(monkeypatch):
    """auto runs the C++ kernels for calls autograd does not record; recorded calls (and mixed dtypes in
    residual_add) take the reference, whose gradients are torch's own."""
    calls = _counting(monkeypatch)
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    weight, bias, add = torch.randn(8), torch.randn(8), torch.randn(2, 8)
    with ops.use_backend("auto"):
        out = group_norm_silu(x, weight, bias, 4, add=add)
        assert calls["group_norm_silu"] == 1 and out.is_contiguous(memory_format=torch.channels_last)
        residual_add(x, x, bias)
        assert calls["residual_add"] == 1
        residual_add(x, x.bfloat16(), bias)  # mixed dtypes: the reference
        assert calls["residual_add"] == 1

        w = weight.clone().requires_grad_()
        group_norm_silu(x, w, bias, 4, add=add).square().sum().backward()
        assert calls["group_norm_silu"] == 1 and w.grad is not None
        expected = torch.func.grad(lambda p: group_norm_silu_ref(x, p, bias, 4, 1e-6, add).square().sum())(weight)
        torch.testing.assert_close(w.grad, expected)
        with torch.no_grad():
            group_norm_silu(x, w, bias, 4, add=add)
        assert calls["group_norm_silu"] == 2

    with ops.use_backend("torch"):
        group_norm_silu(x, weight, bias, 4, add=add)
        residual_add(x, x, bias)
    assert calls == {"group_norm_silu": 2, "residual_add": 1}


def test_fast_unet_on_the_cpu_matches_the_reference():
    """The fp32 and bf16 fast forms with the C++ kernels vs the fp32 reference, by the relative rule for
    bf16 (err <= 2 * err(bf16 torch ops) + atol)."""
    from ddpm_fast import UNet, UNetConfig

    torch.manual_seed(0)
    model = UNet(UNetConfig.from_name("tiny")).eval()
    for p in model.parameters():  # zero-initialized output layers would hide everything
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(3, 3, 8, 8)
    t = torch.tensor([10, 500, 999])
    with torch.no_grad():
        with ops.use_backend("torch"):
            want = model(x, t)
            bf16_torch = model.to_fast(torch.bfloat16)(x, t).float()
        with ops.use_backend("auto"):
            fp32_fast = model.to_fast(torch.float32)(x, t)
            bf16_fast = model.to_fast(torch.bfloat16)(x, t).float()
    base = (bf16_torch - want).abs().max().item()
    err = (bf16_fast - want).abs().max().item()
    print(f"fp32 fast {(fp32_fast - want).abs().max().item():.2e}, bf16 fast {err:.2e}, bf16 torch {base:.2e}")
    torch.testing.assert_close(fp32_fast, want, atol=1e-4, rtol=1e-4)
    assert err <= 2 * base + 1e-2


def test_group_norm_silu_cat_gives_the_affine_its_gradient():
    """Inputs without a gradient (a frozen encoder) but a trainable norm: the forward-only kernel must not run; the
    weight's and the bias's gradients are the reference's."""
    cl = torch.channels_last
    x, x2 = torch.randn(2, 8, 5, 5).contiguous(memory_format=cl), torch.randn(2, 4, 5, 5).contiguous(memory_format=cl)
    weight, bias = torch.randn(12, requires_grad=True), torch.randn(12, requires_grad=True)
    ops.group_norm_silu_cat(x, x2, weight, bias, 4).square().sum().backward()
    got = weight.grad.clone(), bias.grad.clone()
    weight.grad = bias.grad = None
    group_norm_silu_ref(torch.cat([x, x2], 1), weight, bias, 4, 1e-6).square().sum().backward()
    torch.testing.assert_close(got, (weight.grad, bias.grad))


@pytest.mark.parametrize("family", ["unet", "adm"])
def test_fast_decoder_blocks_join_their_skips_without_a_concatenation(family):
    """On a CPU in fp32 (native backend, inference) the fast U-Nets' decoder blocks read their input and skip in
    place (norm1 by group_norm_silu_cat, the shortcut as two GEMMs): no 4-D torch.cat runs in the forward. On the
    torch backend they concatenate. Both match the reference."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ddpm_fast import UNet, UNetConfig
    from ddpm_fast.adm import ADMConfig, ADMUNet

    class CountCats(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.cats = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket == torch.ops.aten.cat and out.dim() == 4:
                self.cats += 1
            return out

    torch.manual_seed(0)
    if family == "unet":
        model = UNet(UNetConfig.from_name("tiny")).eval()
        decoders = sum(len(lvl.resnets) for lvl in model.up_blocks)
    else:
        model = ADMUNet(ADMConfig(image_size=8, model_channels=32, channel_mult=(1, 2), attention_ds=(2,))).eval()
        decoders = len(model.output_blocks)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([10, 500, 999])
    fast = model.to_fast(torch.float32)
    with torch.no_grad():
        want = model(x, t)
        for backend in ("auto", "torch"):
            with ops.use_backend(backend):
                fast(x, t)  # the folds, made once
                counter = CountCats()
                with counter:
                    got = fast(x, t)
            assert counter.cats == (0 if backend == "auto" else decoders), backend
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_decoder_block_without_a_shortcut_concatenates():
    """A block whose input and skip together have its output's width has no 1x1 shortcut: the residual is the
    concatenation itself, so the fast block makes it."""
    from ddpm_fast.unet import FastResnetBlock, ResnetBlock

    torch.manual_seed(1)
    block = ResnetBlock(16, 16, 8, 4, 1e-6, 0.0).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    cl = torch.channels_last
    x = torch.randn(2, 10, 6, 6).contiguous(memory_format=cl)
    skip = torch.randn(2, 6, 6, 6).contiguous(memory_format=cl)
    temb = torch.randn(2, 8)
    with torch.no_grad():
        want = block(torch.cat([x, skip], 1), temb)
        got = FastResnetBlock(block)(x, temb, skip)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
