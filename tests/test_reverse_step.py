"""ops.reverse_step on each backend vs reverse_step_ref, on fresh random inputs."""

import os
import zlib

import pytest
import torch
from conftest import DEVICES

from ddpm_fast import DDIMSampler, DDPMSampler, NoiseSchedule, ops
from ddpm_fast.noise import NoiseKey, normal
from ddpm_fast.ops import reverse_step, reverse_step_ref
from ddpm_fast.ops.reverse_step import LOG_VAR_MIN, MAX_HISTORY, NUM_COEFS, PUSH_SLOT, SLOT0

# x_prev: every backend computes in fp32 from the same (exactly widened) half inputs, so the fp32 result
# agrees to fp32 rounding whatever the model-output dtype. The half copy carries the dtype's own rounding.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-5, 1e-5), torch.bfloat16: (1e-5, 1e-5)}
HALF_TOL = {torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}


def test_extension_is_built_when_required():
    # CI sets DDPM_FAST_REQUIRE_EXT=1 so a broken build cannot hide behind the torch fallback.
    if os.environ.get("DDPM_FAST_REQUIRE_EXT") != "1":
        pytest.skip("DDPM_FAST_REQUIRE_EXT is not set")
    ext = ops.extension()
    assert ext is not None, "ddpm_fast.ops._C did not import"
    if os.environ.get("DDPM_FAST_REQUIRE_CUDA_EXT") == "1":
        assert ext.with_cuda(), "ddpm_fast.ops._C was built without its CUDA sources"


def _table(rows, generator=None, history=0):
    """A random coefficient table whose rows weigh ``history`` ring slots (the others' columns 0) and keep their
    output (a random mix of x0_hat and eps) in a random one of them, or in none."""
    coefs = torch.rand(rows, NUM_COEFS, generator=generator)
    coefs[:, SLOT0 + history:SLOT0 + MAX_HISTORY] = 0
    coefs[:, PUSH_SLOT] = torch.randint(0, history + 1, (rows,), generator=generator).float()
    return coefs


def _inputs(shape, dtype, channels_last, guided, with_noise, device, rows=7, history=0):
    # A stable seed per case (hash() is salted per process: inputs would change from run to run).
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype, channels_last, guided, with_noise)).encode()))

    def r(dt=torch.float32, scale=1.0):
        t = (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dt)
        return t.contiguous(memory_format=torch.channels_last) if channels_last else t

    coefs = _table(rows, g, history)
    coefs[:, :PUSH_SLOT] *= 2
    coefs = coefs.to(device)
    index = torch.randint(0, rows, (shape[0],), generator=g).to(device)
    return dict(
        x_t=r(scale=2.0), model_output=r(dtype), coefs=coefs, index=index,
        noise=r() if with_noise else None,
        model_output_uncond=r(dtype) if guided else None,
        guidance_scale=3.5 if guided else 1.0,
    )


def _native_available(device, backend="native"):
    return ops.backend_unavailable_reason(backend, torch.device(device)) is None


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (3, 384, 17, 17), (2, 4, 32, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("guided, with_noise, clip", [(False, True, True), (True, False, False), (True, True, True)])
def test_kernel_matches_ref(backend, device, shape, dtype, channels_last, guided, with_noise, clip):
    if not _native_available(device, backend):
        pytest.skip(f"{backend} backend not available here")
    if backend == "triton" and device == "cpu" and shape == (3, 384, 17, 17):
        # The interpreter takes seconds on the wide case; 40 channels keep its odd size, a partial last block
        # and channels-last strides that are not the width's.
        shape = (3, 40, 17, 17)
    kw = _inputs(shape, dtype, channels_last, guided, with_noise, device)
    want = reverse_step_ref(clip_denoised=clip, **kw)
    with ops.use_backend(backend):
        got = reverse_step(clip_denoised=clip, **kw)
    assert got.dtype == torch.float32
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    # In place (out is x_t itself) with the half copy the next fast-path U-Net call reads.
    half = torch.float16 if dtype == torch.float32 else dtype
    state = kw.pop("x_t").clone()
    half_out = torch.empty_like(state, dtype=half)
    with ops.use_backend(backend):
        res = reverse_step(state, clip_denoised=clip, out=state, half_out=half_out, **kw)
    assert res is state
    torch.testing.assert_close(state, want, atol=atol, rtol=rtol)
    torch.testing.assert_close(half_out.float(), want, atol=HALF_TOL[half][0], rtol=HALF_TOL[half][1])


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype, guided, clip, noisy", [(torch.float32, False, False, False),
                                                        (torch.bfloat16, True, True, True)])
def test_history_matches_ref(backend, device, depth, channels_last, dtype, guided, clip, noisy):
    """The multistep form: sum_k coef_slot_k H_k added, then each sample's row writes one slot (or none), in
    place; the samples of one call pick different rows, so different slots."""
    if not _native_available(device, backend):
        pytest.skip(f"{backend} backend not available here")
    kw = _inputs((3, 5, 6, 6), dtype, channels_last, guided, noisy, device, history=depth)
    g = torch.Generator().manual_seed(depth)
    hist = [torch.randn(kw["x_t"].shape, generator=g).to(device).contiguous(
        memory_format=ops.memory_format(kw["x_t"])) for _ in range(depth)]
    want_hist = [h.clone() for h in hist]
    want = reverse_step_ref(clip_denoised=clip, history=want_hist, **kw)
    state = kw.pop("x_t").clone()
    with ops.use_backend(backend):
        got = reverse_step(state, clip_denoised=clip, out=state, history=hist, **kw)
    assert got is state
    torch.testing.assert_close(state, want, atol=1e-5, rtol=1e-5)
    for h, w in zip(hist, want_hist, strict=True):
        torch.testing.assert_close(h, w, atol=1e-5, rtol=1e-5)


def test_ref_history_formula():
    x, eps = torch.full((1, 1, 1, 1), 0.5), torch.full((1, 1, 1, 1), 0.25)
    h1, h2 = torch.full_like(x, 0.3), torch.full_like(x, -0.7)
    # columns: a, b, c_x0, c_xt, c_eps, sigma, slot0, slot1, slot2, lv_min, lv_max, push_x0, push_eps, push_slot
    coefs = torch.tensor([[2.0, 1.0, 0.3, 0.2, 0.1, 0.0, 0.4, 0.6, 0.0, 0.0, 0.0, 0.5, 2.0, 2.0],
                          [2.0, 1.0, 0.3, 0.2, 0.1, 0.0, 0.4, 0.6, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]])
    x0 = 2.0 * 0.5 - 0.25
    got = reverse_step_ref(x, eps, coefs, torch.tensor([0]), None, False, history=(h1, h2))
    assert got.item() == pytest.approx(0.3 * x0 + 0.2 * 0.5 + 0.1 * 0.25 + 0.4 * 0.3 + 0.6 * -0.7)
    # push_slot 2: slot 1 receives 0.5 x0 + 2 eps; slot 0 is untouched
    assert h1.item() == pytest.approx(0.3) and h2.item() == pytest.approx(0.5 * x0 + 2.0 * 0.25)
    reverse_step_ref(x, eps, coefs, torch.tensor([1]), None, False, history=(h1, h2))  # push_slot 0: keeps nothing
    assert h1.item() == pytest.approx(0.3) and h2.item() == pytest.approx(0.5 * x0 + 2.0 * 0.25)
    with pytest.raises(ValueError, match="history holds at most 3 ring slots"):
        reverse_step(x, eps, coefs, torch.tensor([0]), history=(h1, h2, h1, h2))
    with pytest.raises(ValueError, match=r"history\[0\] must be a float32 tensor laid out like x_t"):
        reverse_step(x, eps, coefs, torch.tensor([0]), history=(h1.half(),))


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("noise_kind", ["tensor", "key"])
def test_learned_variance_matches_ref(backend, device, dtype, channels_last, noise_kind):
    """sigma per element from v and the table's log-variance columns (learned_range), on every backend."""
    if not _native_available(device, backend):
        pytest.skip(f"{backend} backend not available here")
    kw = _inputs((3, 5, 7, 6), dtype, channels_last, False, noise_kind == "tensor", device)
    g = torch.Generator().manual_seed(5)
    v = (torch.rand(kw["x_t"].shape, generator=g) * 2 - 1).to(device=device, dtype=dtype)
    v = v.contiguous(memory_format=ops.memory_format(kw["x_t"]))
    log_vars = -torch.rand(kw["coefs"].shape[0], 2, generator=g).to(device) * 6  # log variances < 0
    kw["coefs"][:, LOG_VAR_MIN:LOG_VAR_MIN + 2] = log_vars
    kw["coefs"][0, 5] = 0.0  # a row without noise (the last step)
    kw["index"][0] = 0
    kw["index"][1:] = torch.tensor([3, 5], device=device)  # noisy rows
    if noise_kind == "key":
        kw["noise"] = NoiseKey(torch.tensor([7, 3], device=device), torch.tensor([0, 4, 9], device=device))
    want_kw = dict(kw)
    if noise_kind == "key":
        from ddpm_fast.noise import randn_like_key
        want_kw["noise"] = randn_like_key(kw["x_t"], kw["noise"])
    want = reverse_step_ref(model_var_values=v, **want_kw)
    with ops.use_backend(backend):
        got = reverse_step(model_var_values=v, **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    without = reverse_step_ref(**want_kw)
    assert not torch.allclose(without[1:], want[1:], atol=1e-3)  # v changed the noisy rows
    torch.testing.assert_close(without[0], want[0])  # and not the noise-free one


def test_ref_learned_variance_formula():
    x, eps, z = torch.full((1, 1, 1, 2), 0.5), torch.full((1, 1, 1, 2), 0.25), torch.full((1, 1, 1, 2), 2.0)
    v = torch.tensor([[[[1.0, -0.5]]]])
    coefs = torch.tensor([[2.0, 1.0, 0.3, 0.2, 0.1, 1.0, 0.0, 0.0, 0.0, -4.0, -2.0, 0.0, 0.0, 0.0]])
    got = reverse_step_ref(x, eps, coefs, torch.tensor([0]), z, False, model_var_values=v)
    mean = 0.3 * (2.0 * 0.5 - 0.25) + 0.2 * 0.5 + 0.1 * 0.25
    frac = torch.tensor([1.0, 0.25])
    sigma = torch.exp(0.5 * (frac * -2.0 + (1 - frac) * -4.0))
    torch.testing.assert_close(got.flatten(), mean + sigma * 2.0)
    with pytest.raises(ValueError, match="model_var_values shape"):
        reverse_step(x, eps, coefs, torch.tensor([0]), z, model_var_values=v[..., :1])
    with pytest.raises(ValueError, match="two halves of one model output"):
        reverse_step(x, eps, coefs, torch.tensor([0]), z, model_var_values=v.bfloat16())


def test_ref_clips_x0_and_uses_all_coefficients():
    x = torch.tensor([[[[3.0]]]])
    eps = torch.tensor([[[[0.5]]]])
    z = torch.tensor([[[[2.0]]]])
    coefs = torch.tensor([[2.0, 1.0, 0.3, 0.2, 0.1, 0.05] + [0.0] * 8])
    idx = torch.zeros(1, dtype=torch.int64)
    # x0 = 2*3 - 0.5 = 5.5 -> clipped to 1
    want = 0.3 * 1.0 + 0.2 * 3.0 + 0.1 * 0.5 + 0.05 * 2.0
    assert reverse_step_ref(x, eps, coefs, idx, z).item() == pytest.approx(want)
    assert reverse_step_ref(x, eps, coefs, idx, z, clip_denoised=False).item() == pytest.approx(
        0.3 * 5.5 + 0.2 * 3.0 + 0.1 * 0.5 + 0.05 * 2.0)


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("sampler", [
    DDPMSampler(NoiseSchedule.linear(50)),
    DDPMSampler(NoiseSchedule.cosine(50), variance="fixed_large", clip_denoised=False),
    DDIMSampler(NoiseSchedule.linear(100), 10, eta=0.5),
])
def test_sampler_fast_path_matches_reference_step_by_step(sampler, backend):
    if not _native_available("cpu", backend):
        pytest.skip(f"{backend} backend not available here")
    x = torch.randn(2, 3, 8, 8)
    for t in sampler.timesteps.tolist():
        eps, noise = torch.randn_like(x), torch.randn_like(x)
        with ops.use_backend("torch"):
            want = sampler.step(eps, t, x, noise=noise)
        with ops.use_backend(backend):
            got = sampler.step(eps, t, x, noise=noise)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        x = want


def _key(seed, step, images, device):
    return NoiseKey(torch.tensor([seed, step], device=device), torch.as_tensor(images, device=device))


def _in_kernel_noise(backend, device, shape, seed, step, images=None, channels_last=False):
    """With every coefficient 0 but sigma = 1, the step returns its noise z."""
    x = torch.randn(shape, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    coefs = torch.zeros(1, NUM_COEFS, device=device)
    coefs[0, 5] = 1.0  # sigma alone: the step returns its noise
    index = torch.zeros(shape[0], dtype=torch.int64, device=device)
    images = list(range(shape[0])) if images is None else images
    with ops.use_backend(backend):
        return reverse_step(x, torch.randn_like(x), coefs, index, _key(seed, step, images, device))


@pytest.mark.parametrize("backend", ["native", "triton", "torch"])
@pytest.mark.parametrize("device", DEVICES)
def test_in_kernel_noise_statistics(backend, device):
    if not _native_available(device, backend):
        pytest.skip(f"{backend} backend not available here")
    shape = (4, 4, 32, 32)
    z = _in_kernel_noise(backend, device, shape, 42, 7)
    assert torch.equal(z, _in_kernel_noise(backend, device, shape, 42, 7)), "deterministic by (seed, step)"
    z_next = _in_kernel_noise(backend, device, shape, 42, 8)
    z_seed = _in_kernel_noise(backend, device, shape, 43, 7)
    flat = z.flatten().double()
    n = flat.numel()
    assert abs(flat.mean().item()) < 5 / n**0.5
    assert abs(flat.var().item() - 1) < 5 * (2 / n) ** 0.5
    assert abs((flat**4).mean().item() - 3) < 5 * (96 / n) ** 0.5
    pairs = {"neighbouring elements": (flat[:-1], flat[1:]), "consecutive steps": (flat, z_next.flatten().double()),
             "seeds": (flat, z_seed.flatten().double()), "images": (z[0].flatten().double(), z[1].flatten().double())}
    for what, (a, b) in pairs.items():
        corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
        assert abs(corr) < 5 / a.numel() ** 0.5, f"noise correlated across {what}: {corr}"


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_in_kernel_noise_is_the_project_stream(backend, device, channels_last):
    """Every backend draws ddpm_fast.noise's values: element e of image k at step i, whatever the layout,
    the batch it sits in or its place in that batch."""
    if not _native_available(device, backend):
        pytest.skip(f"{backend} backend not available here")
    shape, seed, images = (3, 5, 6, 7), 2**40 + 12345, [9, 0, 2**31 - 1]
    got = _in_kernel_noise(backend, device, shape, seed, 11, images, channels_last)
    want = normal(torch.tensor([seed, 11], device=device), torch.tensor(images, device=device), 5 * 6 * 7)
    torch.testing.assert_close(got.contiguous().view(3, -1), want, atol=2e-6, rtol=2e-6)
    alone = _in_kernel_noise(backend, device, (1, 5, 6, 7), seed, 11, [0], channels_last)
    assert torch.equal(alone, got[1:2]), "image 0's noise must not depend on its batch"


@pytest.mark.parametrize("backend", ["native", "triton", "torch"])
@pytest.mark.parametrize("bad", [-1, 7, 10**6])
def test_out_of_range_index_is_an_error_on_every_backend(backend, bad):
    if not _native_available("cpu", backend):
        pytest.skip(f"{backend} backend not available here")
    x = torch.randn(2, 3, 4, 4)
    coefs = _table(7)
    with ops.use_backend(backend), pytest.raises(RuntimeError, match="outside the coefficient table of 7 rows"):
        reverse_step(x, x, coefs, torch.tensor([0, bad]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_out_is_the_result_cast(device, half):
    if not _native_available(device, "triton"):
        pytest.skip("triton backend not available here")
    kw = _inputs((2, 8, 8, 8), half, True, True, False, device)
    kw.pop("noise")
    out_half = torch.empty_like(kw["x_t"], dtype=half)
    key = _key(1, 3, [0, 1], device)
    with ops.use_backend("triton"):
        out = reverse_step(noise=key, half_out=out_half, **kw)
    if half == torch.float16:
        assert torch.equal(out_half, out.to(half))
    else:  # the Triton interpreter rounds fp32 -> bf16 toward zero: allow one bf16 ulp
        torch.testing.assert_close(out_half.float(), out.to(half).float(), atol=0, rtol=2**-7)
    with pytest.raises(ValueError, match="half_out must be"):
        reverse_step(half_out=out_half.float(), **kw)


def test_native_rejects_bad_input():
    if not _native_available("cpu"):
        pytest.skip("ddpm_fast.ops._C not available here")
    ext = ops.extension()
    x = torch.randn(2, 3, 4, 4)
    coefs = _table(5)
    idx = torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="outside the coefficient table"):
        ext.reverse_step(x, x, None, coefs, torch.tensor([0, 5]), None, 1.0, True)
    with pytest.raises(RuntimeError, match="must be float32"):
        ext.reverse_step(x.double(), x, None, coefs, idx, None, 1.0, True)
    with pytest.raises(RuntimeError, match="same memory format"):
        ext.reverse_step(x, x.contiguous(memory_format=torch.channels_last), None, coefs, idx, None, 1.0, True)
    with pytest.raises(RuntimeError, match=rf"coefs must be a contiguous float32 \(S, {NUM_COEFS}\)"):
        ext.reverse_step(x, x, None, torch.rand(5, 4), idx, None, 1.0, True)
    with pytest.raises(RuntimeError, match="index must be int64"):
        ext.reverse_step(x, x, None, coefs, idx.int(), None, 1.0, True)


def test_python_entry_rejects_bad_input():
    x = torch.randn(2, 3, 4, 4)
    coefs, idx = _table(5), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="x_t must be a float32"):
        reverse_step(x.half(), x, coefs, idx)
    with pytest.raises(ValueError, match="noise shape"):
        reverse_step(x, x, coefs, idx, noise=torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="model_output must be float32/float16/bfloat16"):
        reverse_step(x, x.double(), coefs, idx)
    with pytest.raises(ValueError, match=r"index must be int64 of shape \(2,\)"):
        reverse_step(x, x, coefs, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"counter must be an int64 \[seed, step\]"):
        reverse_step(x, x, coefs, idx, NoiseKey(torch.tensor([1, 2, 3]), idx))
    with pytest.raises(ValueError, match=r"images must be int64 of shape \(2,\)"):
        reverse_step(x, x, coefs, idx, NoiseKey(torch.tensor([1, 2]), idx[:1]))
    with pytest.raises(ValueError, match="out must be a float32 tensor laid out like x_t"):
        reverse_step(x, x, coefs, idx, out=x.contiguous(memory_format=torch.channels_last))
    h1 = torch.zeros_like(x)
    with pytest.raises(ValueError, match="out must not be one of the history buffers"):
        reverse_step(x, x, _table(5, history=1), idx, out=h1, history=(h1,))
    with pytest.raises(ValueError, match=r"history\[0\] and history\[1\] are one buffer"):
        reverse_step(x, x, _table(5, history=2), idx, history=(h1, h1.view_as(h1)))


@pytest.mark.parametrize("backend", ["native", "triton", "torch"])
def test_rows_that_weigh_history_need_its_buffers(backend):
    """A multistep row (coef_slot columns != 0) without the slots it weighs, or one that keeps its output in a
    slot not given, is an error on every backend, not a silently dropped term or a stray write; rows that weigh
    and keep nothing need no slots (and rows not picked are not looked at)."""
    if not _native_available("cpu", backend):
        pytest.skip(f"{backend} backend not available here")
    x = torch.randn(2, 3, 4, 4)
    h0, h1 = torch.randn_like(x), torch.randn_like(x)
    coefs = _table(5, history=2)
    coefs[:3, PUSH_SLOT] = 0
    coefs[3, SLOT0:SLOT0 + MAX_HISTORY] = 0  # a first step: nothing earlier yet, nothing kept
    coefs[3, PUSH_SLOT] = 0
    coefs[4] = coefs[3]
    coefs[4, PUSH_SLOT] = 2  # keeps its output in slot 1
    with ops.use_backend(backend):
        with pytest.raises(RuntimeError, match=r"weighs? history slot.*pass them"):
            reverse_step(x, x, coefs, torch.tensor([3, 1]))
        with pytest.raises(RuntimeError, match=r"weighs? history slot.*pass them"):
            reverse_step(x, x, coefs, torch.tensor([0, 3]), history=(h0,))
        with pytest.raises(RuntimeError, match=r"keeps? (its )?outputs? in history slot"):
            reverse_step(x, x, coefs, torch.tensor([4, 3]), history=(h0,))
        reverse_step(x, x, coefs, torch.tensor([3, 3]))
        reverse_step(x, x, coefs, torch.tensor([0, 4]), history=(h0, h1))


def test_backend_switch(monkeypatch):
    with pytest.raises(ValueError, match="not one of"):
        with ops.use_backend("fastest"):
            pass
    # auto on the CPU: the extension's C++ kernel where the op has one, else the reference.
    native = "native" if ops.extension() is not None else "torch"
    with ops.use_backend("auto"):
        assert ops.backend_for("reverse_step", "cpu") == native
        assert ops.backend_for("q_sample", "cpu") == "torch"
    # The old name of the native backend still works, with one warning.
    with ops.use_backend("cuda"):
        assert ops.requested_backend() == "native"
    # An explicit backend that cannot run raises (the tests otherwise run Triton through its interpreter).
    monkeypatch.setattr(ops.registry, "_TRITON_INTERPRET", False)
    x = torch.randn(1, 3, 4, 4)
    with ops.use_backend("triton"), pytest.raises(RuntimeError, match="DDPM_FAST_BACKEND=triton cannot run"):
        reverse_step(x, x, _table(2), torch.tensor([0]))
    monkeypatch.setattr(ops.registry, "_C", None)
    with ops.use_backend("auto"):
        assert ops.backend_for("reverse_step", "cpu") == "torch"
    with ops.use_backend("native"), pytest.raises(RuntimeError, match="DDPM_FAST_BACKEND=native cannot run"):
        reverse_step(x, x, _table(2), torch.tensor([0]))


def test_backend_is_chosen_once_per_device_type(monkeypatch):
    """The environment is read when the package is imported, not per call: changing it later does nothing
    until the user switches (set_backend)."""
    with ops.use_backend("torch"):
        assert ops.backend_for("residual_add", "cpu") == "torch"
        monkeypatch.setenv("DDPM_FAST_BACKEND", "triton")
        assert ops.backend_for("residual_add", "cpu") == "torch"
        ops.set_backend("triton")
        assert ops.backend_for("residual_add", "cpu") == "triton"


@pytest.mark.gpu
def test_cuda_extension_built_with_cuda():
    assert ops.extension() is not None and ops.extension().with_cuda()


def test_package_works_without_the_extension():
    import subprocess
    import sys

    code = (
        "import sys, warnings\n"
        "sys.modules['ddpm_fast.ops._C'] = None  # as if the extension had not been built\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, ddpm_fast\n"
        "    from ddpm_fast import ops\n"
        "assert ops.extension() is None\n"
        "msgs = [str(w.message) for w in caught if 'ddpm_fast.ops._C' in str(w.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "s = ddpm_fast.DDPMSampler(ddpm_fast.NoiseSchedule.linear(10))\n"
        "x = torch.randn(1, 3, 4, 4)\n"
        "print(s.step(torch.randn_like(x), 5, x, noise=torch.randn_like(x)).shape)\n"
        "m = ddpm_fast.UNet(ddpm_fast.UNetConfig.from_name('tiny'))\n"
        "print(s.sample(m, (1, 3, 8, 8), seed=0, progress=False).shape)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "torch.Size([1, 3, 4, 4])" in res.stdout and "torch.Size([1, 3, 8, 8])" in res.stdout
