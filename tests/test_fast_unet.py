"""The fast path (UNet.to_fast: fp16/bf16, channels_last, fused ops, SDPA) held to the fp32 reference.

Rule (STYLE.md): err(fast vs fp32 ref) <= 2 * err(same-dtype plain torch vs fp32 ref) + atol.
On a CPU the fused ops run in the Triton interpreter on the tiny presets; the GPU cases run the real
presets with weights that went through save_pretrained / load_pretrained.
"""

import pytest
import torch
from conftest import randomize_

from ddpm_fast import DDIMSampler, DDPMSampler, NoiseSchedule, UNet, UNetConfig, load_pretrained, ops, save_pretrained

needs_triton = pytest.mark.skipif(
    ops.backend_unavailable_reason("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    is not None, reason="triton cannot run here")
ATOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _errors(ref_model, x, t, labels, dtype):
    fast = ref_model.to_fast(dtype)
    with torch.no_grad():
        with ops.use_backend("torch"):
            want = ref_model(x, t, labels).double()
            plain = fast(x, t, labels).double()
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
        plain = sampler.sample(fast, shape, seed=1, progress=False).double()
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

    def grads(backend, channels_last):
        m = model.to(memory_format=torch.channels_last) if channels_last else model
        x = x0.contiguous(memory_format=torch.channels_last) if channels_last else x0
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
