import pytest
import torch
from conftest import diffusers_peer, randomize_

from ddpm_fast import UNet, UNetConfig
from ddpm_fast.config import to_diffusers_config


@pytest.mark.parametrize("name, count", [("cifar10", 35_746_307), ("celebahq256", 113_673_219),
                                         ("lsun256", 113_673_219)])
def test_preset_parameter_counts(name, count):
    # Ho et al. 2020 report 35.7M (CIFAR10) and 114M (256x256) parameters.
    with torch.device("meta"):
        model = UNet(UNetConfig.from_name(name))
    assert model.num_parameters() == count


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown UNet preset 'imagenet'"):
        UNetConfig.from_name("imagenet")


def test_bad_config():
    with pytest.raises(ValueError, match="not divisible by num_groups"):
        UNetConfig(ch=48, num_groups=32)
    with pytest.raises(ValueError, match="divisible by 2\\*\\*"):
        UNetConfig(sample_size=30)



@pytest.mark.parametrize("kw, message", [
    (dict(num_groups=0), "num_groups must be a positive integer, got 0"),
    (dict(num_groups=-4), "num_groups must be a positive integer, got -4"),
    (dict(ch_mult=(1, 0)), r"ch_mult entries must be positive, got \(1, 0\)"),
    (dict(ch=0), "ch must be a positive integer"),
    (dict(norm_eps=-1.0), "norm_eps must be positive and finite"),
    (dict(norm_eps=float("nan")), "norm_eps must be positive and finite"),
    (dict(attn_resolutions=(16, 7)), r"attn_resolutions \[7\] match no level \(the levels are at \(32, 16, 8, 4\)\)"),
    (dict(attention_head_dim=7), "not divisible by attention_head_dim 7"),
    (dict(freq_shift=64), "freq_shift 64 equals ch/2"),
    (dict(in_channels=0), "in_channels must be a positive integer"),
])
def test_bad_config_values_name_the_field(kw, message):
    """Each used to be a ZeroDivisionError, or was accepted and gave NaN or a silently missing attention."""
    with pytest.raises(ValueError, match=message):
        UNetConfig(**kw)


def test_input_dtype_and_device_mismatch_is_a_clear_error():
    model = UNet(UNetConfig.from_name("tiny"))
    for dtype in (torch.float64, torch.float16):
        with pytest.raises(ValueError, match=f"x is {dtype}, the model's weights are torch.float32"):
            model(torch.randn(1, 3, 8, 8, dtype=dtype), 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides the compute dtype: allowed
        assert model(torch.randn(1, 3, 8, 8), 3).shape == (1, 3, 8, 8)
    fast = model.to_fast(torch.bfloat16)  # the fast form casts its input
    assert fast(torch.randn(1, 3, 8, 8, dtype=torch.float64), 3).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="x is on meta, the model on cpu"):
        model(torch.randn(1, 3, 8, 8, device="meta"), 3)


def _diffusers_twin(model: UNet):
    UNet2DModel = diffusers_peer().UNet2DModel

    cfg = {k: v for k, v in to_diffusers_config(model.config).items() if k != "_class_name"}
    twin = UNet2DModel(**cfg).eval()
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin


SMALL_256_STYLE = UNetConfig(sample_size=64, ch=32, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                             attn_resolutions=(16,), dropout=0.0)


@pytest.mark.parametrize(
    "cfg",
    [
        pytest.param(UNetConfig.from_name("cifar10", dropout=0.0), id="cifar10"),
        pytest.param(SMALL_256_STYLE, id="6-level-256-style"),
        pytest.param(UNetConfig.from_name("tiny", flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
                                          norm_eps=1e-5), id="tiny-diffusers-knobs"),
        pytest.param(UNetConfig.from_name("digits"), id="digits-class-conditional"),
        pytest.param(UNetConfig.from_name("tiny", attention_head_dim=8), id="tiny-multihead"),
    ],
)
def test_matches_diffusers_unet2dmodel(cfg):
    model = randomize_(UNet(cfg).eval())
    twin = _diffusers_twin(model)
    n = 2
    x = torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    t = torch.tensor([3, 917])
    labels = torch.tensor([1, cfg.num_classes]) if cfg.num_classes else None
    with torch.no_grad():
        ours = model(x, t, labels)
        theirs = twin(x, t, class_labels=labels).sample
    print("max |ours - diffusers|:", (ours - theirs).abs().max().item(), "scale:", theirs.abs().max().item())
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("fast", [False, True])
def test_float_timesteps_match_diffusers(fast):
    """Fractional t (HeunDiscreteScheduler evaluates the model between steps): the sinusoidal embedding is
    defined there; ours (fp32 reference and fast path) equals diffusers'; integer-valued floats equal ints."""
    cfg = UNetConfig.from_name("digits")
    model = randomize_(UNet(cfg).eval())
    twin = _diffusers_twin(model)
    x = torch.randn(3, 1, 16, 16)
    t = torch.tensor([0.25, 417.5, 998.9], dtype=torch.float64)
    labels = torch.tensor([1, 4, cfg.num_classes])
    run = model.to_fast(torch.float32) if fast else model
    with torch.no_grad():
        ours = run(x, t, labels)
        theirs = twin(x, t, class_labels=labels).sample
        torch.testing.assert_close(run(x, t.round(), labels), run(x, t.round().long(), labels), atol=0, rtol=0)
        assert not torch.allclose(ours, run(x, t.round(), labels)), "the fraction changes the output"
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def test_dropout_active_only_in_training():
    model = randomize_(UNet(UNetConfig.from_name("tiny", dropout=0.5)))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, t), model(x, t))
        model.train()
        assert not torch.equal(model(x, t), model(x, t))


def test_backward_reaches_every_parameter():
    model = randomize_(UNet(UNetConfig.from_name("tiny")))
    model(torch.randn(2, 3, 8, 8), torch.tensor([5, 6])).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_scalar_t_broadcasts():
    model = randomize_(UNet(UNetConfig.from_name("tiny"))).eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.tensor(7)), model(x, torch.full((3,), 7)))


def test_bad_inputs_name_the_problem():
    model = UNet(UNetConfig.from_name("tiny"))
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="4 channels, the model takes 3"):
        model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        model(torch.randn(3, 8, 8), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(2, 3, 7, 7), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        model(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="t must be a tensor of diffusion steps"):
        model(x, torch.tensor([True, False]))
    with pytest.raises(RuntimeError, match="t holds a non-finite step"):
        model(x, torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="unconditional"):
        model(x, torch.tensor([1, 2]), torch.tensor([0, 1]))
    cond = UNet(UNetConfig.from_name("digits"))
    xd = torch.randn(2, 1, 16, 16)
    with pytest.raises(ValueError, match="class-conditional; pass class_labels"):
        cond(xd, torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match=r"lie in \[0, 10\]"):
        cond(xd, torch.tensor([1, 2]), torch.tensor([0, 11]))
    with pytest.raises(TypeError, match="UNetConfig"):
        UNet("cifar10")
