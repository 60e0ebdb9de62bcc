"""The fast path (UNet.to_fast: fp16/bf16, channels_last, fused ops, SDPA) held to the fp32 reference.

Rule (STYLE.md): err(fast vs fp32 ref) <= 2 * err(same-dtype plain torch vs fp32 ref) + atol.
On a CPU the fused ops run in the Triton interpreter on the tiny presets; the GPU cases run the real
presets with weights that went through save_pretrained / load_pretrained.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_

from ddpm_fast import (
    DDIMSampler,
    DDPMSampler,
    NoiseSchedule,
    UNet,
    UNetConfig,
    engine,
    load_pretrained,
    ops,
    save_pretrained,
)
from ddpm_fast.fast import FastUpsample, upsampled_conv
from ddpm_fast.ops import derived
from ddpm_fast.unet import AttentionBlock, FastAttentionBlock, FastResnetBlock, ResnetBlock, Upsample

needs_triton = pytest.mark.skipif(
    ops.backend_unavailable_reason("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    is not None, reason="triton cannot run here")
ATOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _errors(ref_model, x, t, labels, dtype):
    fast = ref_model.to_fast(dtype)
    with torch.no_grad():
        with ops.use_backend("torch"):
            want = ref_model(x, t, labels).double()
            plain = ref_model.to_fast(dtype, fold=False)(x, t, labels).double()  # plain torch in this dtype
        with ops.use_backend("triton"):
            got = fast(x, t, labels)
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    err_fast = (got.double() - want).abs().max().item()
    err_plain = (plain - want).abs().max().item()
    print(f"{dtype}: max |fast - ref| = {err_fast:.3e}, max |plain {dtype} - ref| = {err_plain:.3e}, "
          f"scale {want.abs().max().item():.3e}")
    return err_fast, err_plain


@needs_triton
@pytest.mark.parametrize("preset", ["tiny", "digits"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fast_matches_reference_by_relative_rule(preset, dtype):
    cfg = UNetConfig.from_name(preset)
    model = randomize_(UNet(cfg).eval(), 0.05)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    n = 3
    x = torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device)
    t = torch.tensor([0, 400, 999], device=device)
    labels = torch.tensor([1, 5, cfg.num_classes], device=device) if cfg.num_classes else None
    err_fast, err_plain = _errors(model, x, t, labels, dtype)
    assert err_fast <= 2 * err_plain + ATOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("preset, batch", [("cifar10", 8), ("celebahq256", 2)])
def test_fast_matches_reference_gpu_presets(tmp_path, preset, batch):
    cfg = UNetConfig.from_name(preset, dropout=0.0)
    save_pretrained(randomize_(UNet(cfg), 0.02), tmp_path / preset)
    model = load_pretrained(tmp_path / preset, device="cuda")
    x = torch.randn(batch, 3, cfg.sample_size, cfg.sample_size, device="cuda")
    t = torch.randint(0, 1000, (batch,), device="cuda")
    err_fast, err_plain = _errors(model, x, t, None, torch.float16)
    assert err_fast <= 2 * err_plain + ATOL[torch.float16]


def test_to_fast_casts_once_and_leaves_the_reference_alone():
    model = randomize_(UNet(UNetConfig.from_name("tiny")))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = model.to_fast(torch.float16)
    assert fast.is_fast and not model.is_fast
    for name, p in fast.named_parameters():
        assert p.dtype == torch.float16, name
        if p.dim() == 4:
            assert p.is_contiguous(memory_format=torch.channels_last), name
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="to_fast: dtype"):
        model.to_fast(torch.float64)


@needs_triton
def test_to_fast_without_a_copy_uses_the_reference_up():
    """copy=False builds the fast model from the reference's own modules (the CLIs' way: no second copy of the
    weights): the same outputs as with a copy, and the used-up reference refuses to run."""
    model = randomize_(UNet(UNetConfig.from_name("tiny")).eval(), 0.05)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 900])
    with torch.no_grad():
        want = model.to_fast(torch.float32)(x, t)
        fast = model.to_fast(torch.float32, copy=False)
        assert {id(p) for p in fast.parameters()} == {id(p) for p in model.parameters()}
        torch.testing.assert_close(fast(x, t), want, atol=0, rtol=0)
        with pytest.raises(RuntimeError, match=r"converted by to_fast\(copy=False\)"):
            model(x, t)


def test_activations_stay_channels_last():
    cfg = UNetConfig.from_name("tiny")
    fast = randomize_(UNet(cfg)).to_fast(torch.float16)
    offenders = []

    def hook(module, args, out):
        # The caller's input may be in any layout; everything the model makes must be channels_last.
        for tensor in [out] + (list(args) if module is not fast else []):
            if torch.is_tensor(tensor) and tensor.dim() == 4 and tensor.shape[1] > 1 and tensor.shape[2] > 1:
                if not tensor.is_contiguous(memory_format=torch.channels_last):
                    offenders.append(type(module).__name__)

    for m in fast.modules():
        m.register_forward_hook(hook)
    with torch.no_grad(), ops.use_backend("triton"):
        fast(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    assert not offenders, f"non-channels_last activations in {sorted(set(offenders))}"


@needs_triton
def test_sampler_fast_path_follows_reference():
    cfg = UNetConfig.from_name("tiny")
    model = randomize_(UNet(cfg).eval(), 0.05)
    sampler = DDIMSampler(NoiseSchedule.linear(100), 5, eta=0.0)
    shape = (2, 3, 8, 8)
    want = sampler.sample(model, shape, seed=1, progress=False).double()
    fast = model.to_fast(torch.float16)
    with ops.use_backend("torch"):
        plain = sampler.sample(model.to_fast(torch.float16, fold=False), shape, seed=1, progress=False).double()
    with ops.use_backend("triton"):
        got = sampler.sample(fast, shape, seed=1, progress=False)
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
    err_fast, err_plain = (got.double() - want).abs().max().item(), (plain - want).abs().max().item()
    print(f"DDIM sample: fast {err_fast:.3e}, plain fp16 {err_plain:.3e}")
    assert err_fast <= 2 * err_plain + 2e-3


@needs_triton
def test_fast_ddpm_sampling_is_deterministic_by_seed():
    model = randomize_(UNet(UNetConfig.from_name("tiny", num_classes=3)).eval(), 0.02).to_fast(torch.float16)
    sampler = DDPMSampler(NoiseSchedule.linear(2))
    kw = dict(class_labels=torch.tensor([2, 0]), guidance_scale=1.5, progress=False)
    with ops.use_backend("triton"):
        a = sampler.sample(model, (2, 3, 8, 8), seed=9, **kw)
        b = sampler.sample(model, (2, 3, 8, 8), seed=9, **kw)
        c = sampler.sample(model, (2, 3, 8, 8), seed=10, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


@needs_triton
def test_training_gradients_through_fused_ops_match_reference():
    """A training step's gradients on the fused ops (channels_last, Triton backward) equal the reference's."""
    from ddpm_fast import NoiseSchedule, training_loss

    model = randomize_(UNet(UNetConfig.from_name("tiny", num_classes=3)), 0.05)
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    labels = torch.tensor([0, 2])

    def grads(backend, fast):
        m = model.to_fast(torch.float32) if fast else model  # the training form: fp32 masters, fused blocks
        x = x0.contiguous(memory_format=torch.channels_last) if fast else x0
        m.zero_grad()
        with ops.use_backend(backend):
            loss = training_loss(m, NoiseSchedule.linear(100), x, labels, generator=torch.Generator().manual_seed(0))
        loss.backward()
        return loss.item(), {k: p.grad.clone() for k, p in m.named_parameters()}

    loss_ref, want = grads("torch", False)
    loss_fast, got = grads("triton", True)
    assert abs(loss_ref - loss_fast) < 1e-5
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-3, msg=k)


@needs_triton
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("block", ["resnet", "resnet_shortcut", "attention", "attention_2_heads", "upsample"])
def test_fused_blocks_compute_the_plain_blocks(backend, block):
    """Folded biases, the one-pass residual, the single q/k/v GEMM and the upsampling folded into its conv
    (one transposed convolution) change no value and no gradient."""
    cin = 16 if block == "resnet_shortcut" else 32
    takes_temb = block.startswith("resnet")
    if block.startswith("attention"):
        plain, fast_block = AttentionBlock(32, 8, 1e-6, head_dim=16 if block.endswith("heads") else None), \
            FastAttentionBlock
    elif block == "upsample":
        plain, fast_block = Upsample(32), FastUpsample
    else:
        plain, fast_block = ResnetBlock(cin, 32, 24, 8, 1e-6, 0.0), FastResnetBlock
    randomize_(plain, 0.1)
    plain = plain.to(memory_format=torch.channels_last)
    fused = fast_block(copy.deepcopy(plain))
    x = torch.randn(2, cin, 6, 5).contiguous(memory_format=torch.channels_last)
    temb = torch.randn(2, 24)

    def run(m):
        m.zero_grad()
        xi, ti = x.clone().requires_grad_(), temb.clone().requires_grad_()
        with ops.use_backend(backend):
            out = m(xi, ti) if takes_temb else m(xi)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        grads = {k: p.grad for k, p in m.named_parameters()}
        return out, xi.grad, (ti.grad if ti.grad is not None else torch.zeros(())), grads

    out_p, dx_p, dt_p, g_p = run(plain)
    out_f, dx_f, dt_f, g_f = run(fused)
    assert out_f.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_f, out_p, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx_f, dx_p, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dt_f, dt_p, atol=1e-5, rtol=1e-4)
    for k in g_p:
        torch.testing.assert_close(g_f[k], g_p[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (8, 8)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_upsampled_conv_is_upsample_then_conv(size, with_bias):
    """The transposed convolution FastUpsample (and ADM's upsampling blocks) run is the nearest 2x upsampling
    followed by the 3x3 convolution, to float64 round-off, borders included."""
    conv = torch.nn.Conv2d(4, 6, 3, padding=1).double()
    x = torch.randn(2, 4, *size, dtype=torch.float64)
    bias = conv.bias if with_bias else None
    want = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), conv.weight, bias, padding=1)
    with torch.no_grad():
        got = upsampled_conv(torch.nn.Module(), x, conv, bias)
    assert got.shape == want.shape == (2, 6, 2 * size[0], 2 * size[1])
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_fast_model_built_under_inference_mode():
    """Parameters made under torch.inference_mode have no version counter: the folds are remade per call, and
    the outputs equal those of the same model built normally."""
    model = randomize_(UNet(UNetConfig.from_name("tiny")).eval(), 0.05)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 700])
    with torch.no_grad():
        want = model.to_fast(torch.float32)(x, t)
    with torch.inference_mode():
        fast = copy.deepcopy(model).to_fast(torch.float32)
        assert all(p.is_inference() for p in fast.parameters())
        torch.testing.assert_close(fast(x, t), want, atol=1e-5, rtol=1e-5)


def test_folded_parameters_follow_weight_updates():
    """The cached folds (summed biases, stacked q/k/v) are rebuilt when a source parameter changes."""
    model = randomize_(UNet(UNetConfig.from_name("tiny")).eval(), 0.05)
    fast = model.to_fast(torch.float32)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 700])

    def unfused(m):
        plain = model.to_fast(torch.float32, fold=False)
        plain.load_state_dict(m.state_dict())
        return plain

    with torch.no_grad(), ops.use_backend("torch"):
        before = fast(x, t)
        print_before = engine.weights_fingerprint(fast)
        for name, p in fast.named_parameters():
            if name.endswith(("conv1.bias", "to_k.weight", "to_v.bias", "conv_shortcut.bias", "conv2.bias")):
                p.add_(0.3)
        assert engine.weights_fingerprint(fast) != print_before
        after = fast(x, t)
        torch.testing.assert_close(after, unfused(fast)(x, t), atol=1e-5, rtol=1e-5)
        assert (after - before).abs().max() > 1e-2
        fast.load_state_dict(model.state_dict())
        torch.testing.assert_close(fast(x, t), before, atol=0, rtol=0)
        assert any(derived.holds(p) for p in fast.parameters())
        fast.to(torch.float16)
        cached = [name for name, p in fast.named_parameters() if derived.holds(p)]
        assert not cached, f"casting must drop folds derived from the old tensors: {cached[:3]}"


@needs_triton
def test_fp32_fast_form_samples_like_the_reference():
    """to_fast(torch.float32), the training form (its EMA draws preview grids), samples in place with no half copy."""
    model = randomize_(UNet(UNetConfig.from_name("tiny")).eval(), 0.05)
    sampler = DDIMSampler(NoiseSchedule.linear(100), 4, eta=0.0)
    want = sampler.sample(model, (2, 3, 8, 8), seed=2, progress=False)
    fast = model.to_fast(torch.float32)
    with ops.use_backend("triton"):
        got = sampler.sample(fast, (2, 3, 8, 8), seed=2, progress=False)
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_fast_forward_folds_biases_and_batches_projections():
    """The folds stay in place: convolutions inside ResBlocks run without bias (it rides in a neighbouring
    kernel), every ResBlock's time projection is one GEMM, q/k/v one GEMM per attention block."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.conv_bias = self.conv_nobias = self.gemms = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket == torch.ops.aten.convolution:
                if args[2] is None:
                    self.conv_nobias += 1
                else:
                    self.conv_bias += 1
            elif func.overloadpacket in (torch.ops.aten.addmm, torch.ops.aten.mm):  # linear layers
                self.gemms += 1
            return func(*args, **(kwargs or {}))

    model = UNet(UNetConfig.from_name("tiny")).eval()
    fast = model.to_fast(torch.float32)
    blocks = [m for m in fast.modules() if isinstance(m, ResnetBlock)]
    attentions = [m for m in fast.modules() if isinstance(m, AttentionBlock)]
    resamplers = sum(len(lvl.downsamplers) for lvl in fast.down_blocks) + sum(len(lvl.upsamplers)
                                                                             for lvl in fast.up_blocks)
    shortcuts = sum(b.conv_shortcut is not None for b in blocks)

    def count(m):
        with torch.no_grad(), ops.use_backend("torch"):
            m(torch.randn(1, 3, 8, 8), torch.tensor([1]))
            counter = Count()
            with counter:
                m(torch.randn(1, 3, 8, 8), torch.tensor([1]))
        return counter

    folded = count(fast)
    assert folded.conv_nobias == 2 * len(blocks) + shortcuts
    assert folded.conv_bias == 2 + resamplers  # conv_in, conv_out, down/up-samplers keep theirs
    # time MLP, all time projections, per attention block one GEMM (q, k and v with the output projection
    # folded in) with one head, qkv + out with several
    assert folded.gemms == 2 + 1 + sum(1 if a.heads == 1 else 2 for a in attentions)
    plain = count(model.to_fast(torch.float32, fold=False))
    assert plain.conv_nobias == 0 and plain.conv_bias == folded.conv_bias + folded.conv_nobias
    assert plain.gemms == 2 + len(blocks) + 4 * len(attentions)


def test_folds_cached_under_inference_mode_serve_autograd_later():
    """A frozen fast model sampled under inference_mode, then differentiated w.r.t. its input (guidance
    by gradients, attribution): the cached folds must be ordinary tensors."""
    model = randomize_(UNet(UNetConfig.from_name("tiny")).eval(), 0.05)
    fast = model.to_fast(torch.float32).requires_grad_(False)
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([10])
    with torch.inference_mode(), ops.use_backend("torch"):
        fast(x, t)
    xi = x.clone().requires_grad_()
    with ops.use_backend("torch"):
        fast(xi, t).square().sum().backward()
    xr = x.clone().requires_grad_()
    model(xr, t).square().sum().backward()
    torch.testing.assert_close(xi.grad, xr.grad, atol=1e-5, rtol=1e-4)
