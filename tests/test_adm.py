"""The ADM U-Net (openai's guided-diffusion / improved-diffusion architecture), its flags and checkpoints.

Equivalence with openai's own UNetModel rests on outputs recorded from it (tests/peers/openai_cases.py):
each case rebuilds the model from our key layout and the recorded shapes, loads the same random weights
and must give the recorded output to 1e-5 relative.
"""

import argparse
import copy

import pytest
import torch
from peers.openai_cases import CASES, inputs, random_state_dict, read_fixture

from ddpm_fast import CheckpointError, load_pretrained, ops, save_pretrained
from ddpm_fast.adm import ADMConfig, ADMUNet, FastADMUNet
from ddpm_fast.openai import config_from_flags, load_openai, parse_flags
from ddpm_fast.schedule import openai_timesteps

needs_triton = pytest.mark.skipif(
    ops.backend_unavailable_reason("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    is not None, reason="triton cannot run here")


def _case_model(name):
    meta, data = read_fixture(name)
    config, schedule = config_from_flags(meta["flags"], meta["repo"])
    model = ADMUNet(config).eval()
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, extra = sorted(set(meta["shapes"]) - set(own)), sorted(set(own) - set(meta["shapes"]))
    assert not missing and not extra, f"keys: missing {missing[:5]}, extra {extra[:5]}"
    wrong = [k for k in own if own[k] != meta["shapes"][k]]
    assert not wrong, f"shapes differ: {wrong[:5]}"
    model.load_state_dict(random_state_dict(meta["shapes"], meta["seed"]))
    return model, config, schedule, meta, data


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_openai_unet(name):
    model, config, schedule, meta, data = _case_model(name)
    assert len(schedule) == meta["num_timesteps"]
    x, t, y = inputs(name, meta["num_timesteps"], meta["seed"])
    assert torch.equal(x, data["x"]) and torch.equal(t, data["t"])  # the inputs regenerate bit for bit
    with torch.no_grad(), ops.use_backend("torch"):
        out = model(x, t, y if config.num_classes else None)
    want = data["out"]
    err = ((out - want).abs().max() / want.abs().max()).item()
    print(f"{name}: max |ours - openai| / max |openai| = {err:.2e}")
    assert out.shape == want.shape
    assert err <= 1e-5


def test_repository_defaults_differ():
    guided, _ = config_from_flags("--image_size 64 --diffusion_steps 4000", "guided-diffusion")
    improved, _ = config_from_flags("--image_size 64 --diffusion_steps 4000", "improved-diffusion")
    assert guided.timestep_scale == 1.0 and improved.timestep_scale == 1000 / 4000
    assert guided.num_heads == improved.num_heads == 4 and guided.use_scale_shift_norm
    assert config_from_flags("--image_size 32", "improved-diffusion")[0].channel_mult == (1, 2, 2, 2)
    assert config_from_flags("--image_size 512", "guided-diffusion")[0].channel_mult == (0.5, 1, 1, 2, 2, 4, 4)
    with pytest.raises(ValueError, match="no default channel_mult"):
        config_from_flags("--image_size 32", "guided-diffusion")
    assert parse_flags("--sigma_small True", "improved-diffusion")["sigma_small"] is True
    with pytest.raises(ValueError, match="unknown guided-diffusion flag --sigma_small"):
        parse_flags("--sigma_small True", "guided-diffusion")


def test_linear_betas_scale_with_steps():
    _, s = config_from_flags("--image_size 32 --diffusion_steps 100", "improved-diffusion")
    assert s.betas[0].item() == pytest.approx(1e-3) and s.betas[-1].item() == pytest.approx(0.2)
    _, c = config_from_flags("--image_size 32 --diffusion_steps 50 --noise_schedule cosine", "improved-diffusion")
    assert c.betas.max().item() <= 0.999 and c.name == "cosine"


@pytest.mark.parametrize("flags, message", [
    ("--num_chanels 64", "unknown guided-diffusion flag --num_chanels"),
    ("--learn_sigma maybe", "--learn_sigma: expected a boolean"),
    ("--num_channels", "--num_channels: missing its value"),
    ("--num_channels 64 --num_channels 32", "--num_channels given twice"),
    ("--num_channels sixty", "--num_channels: expected a int"),
    ("image_size 64", "expected --name value"),
    ("--classifier_scale 1.0", "a classifier flag; the classifier.s flags go with the classifier"),
    ("--predict_xstart True", "predict_xstart"),
    ("--noise_schedule sqrt", "unknown schedule 'sqrt'"),
    ("--attention_resolutions 16,7", "must divide image_size"),
    ("--num_channels 48", "multiple of the 32 norm groups"),
])
def test_bad_flags_are_one_line(flags, message):
    with pytest.raises(ValueError, match=message) as info:
        config_from_flags(flags, "guided-diffusion")
    assert "\n" not in str(info.value)


def test_sampling_flags_are_accepted_and_reported():
    with pytest.warns(UserWarning, match="ignores the sampling/training flags --timestep_respacing, --use_ddim"):
        cfg, _ = config_from_flags("--image_size 64 --timestep_respacing ddim25 --use_ddim True", "guided-diffusion")
    assert cfg.image_size == 64


def _small(flags="--image_size 32 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 16 "
                 "--learn_sigma True --class_cond True", repo="guided-diffusion", seed=0):
    config, schedule = config_from_flags(flags, repo)
    model = ADMUNet(config).eval()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(random_state_dict(shapes, seed))
    return model, schedule


def test_load_openai_pt_and_round_trip(tmp_path):
    model, _ = _small()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    flags = ("--image_size 32 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 16 "
             "--learn_sigma True --class_cond True --diffusion_steps 200")
    loaded, schedule = load_openai(path, flags)
    assert len(schedule) == 200
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 150]), torch.tensor([5, 999])
    with torch.no_grad():
        want = model(x, t, y)
        assert torch.equal(loaded(x, t, y), want)
        # save_pretrained writes our folder format, which loads back without flags (the fast form too).
        save_pretrained(loaded, tmp_path / "folder", schedule=schedule)
        again = load_pretrained(tmp_path / "folder")
        assert isinstance(again, ADMUNet) and again.config == loaded.config
        assert torch.equal(again(x, t, y), want)
        save_pretrained(loaded.to_fast(torch.float32), tmp_path / "fast")
        assert torch.equal(load_pretrained(tmp_path / "fast")(x, t, y), want)


def test_mismatched_state_dict_names_the_key(tmp_path):
    model, _ = _small()
    flags = ("--image_size 32 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 16 "
             "--learn_sigma True --class_cond True")
    sd = model.state_dict()
    cases = {
        "missing keys: input_blocks.1.0.emb_layers.1.weight": {k: v for k, v in sd.items()
                                                               if k != "input_blocks.1.0.emb_layers.1.weight"},
        "unexpected keys: extra.weight": {**sd, "extra.weight": torch.zeros(1)},
        r"out.2.weight: checkpoint \(3, 32, 3, 3\) vs model \(6, 32, 3, 3\)": {**sd,
                                                                           "out.2.weight": sd["out.2.weight"][:3]},
    }
    for message, bad in cases.items():
        path = tmp_path / "bad.pt"
        torch.save(bad, path)
        with pytest.raises(CheckpointError, match=message) as info:
            load_openai(path, flags)
        assert "\n" not in str(info.value) and "bad.pt" in str(info.value)
    with pytest.raises(CheckpointError, match="unknown guided-diffusion flag --bogus"):
        load_openai(path, flags + " --bogus 1")


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": argparse.Namespace(a=1)}, path)  # an object only pickle code can rebuild
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_openai(path, "--image_size 32 --channel_mult 1,2 --attention_resolutions 16")


def test_openai_timesteps_string_forms():
    assert openai_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    assert openai_timesteps(10, "ddim3") == [0, 4, 8]
    assert openai_timesteps(100, "10") == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
    assert openai_timesteps(10, "3,2") == [0, 2, 4, 5, 9]  # sections of 5: strides 2 and 4
    assert openai_timesteps(1000, "250") == [round(i * 999 / 249) for i in range(250)]
    assert openai_timesteps(1000, 1000) == list(range(1000))
    for bad, message in [("ddim7", "no integer stride gives exactly 7"), ("ddimx", "expected ddimN"),
                         ("6", "cannot take 6 steps from a section of 5"), ("a,b", "comma-separated")]:
        with pytest.raises(ValueError, match=message):
            openai_timesteps(10, bad if bad != "6" else "6,1")


def test_config_validation():
    with pytest.raises(ValueError, match="not divisible into 3 heads"):
        ADMConfig(image_size=32, model_channels=32, channel_mult=(1, 2), attention_ds=(2,), num_heads=3)
    with pytest.raises(ValueError, match=r"attention at downsample rates \[4\] matches no level"):
        ADMConfig(image_size=32, model_channels=32, channel_mult=(1, 2), attention_ds=(4,))
    model = ADMUNet(ADMConfig(image_size=16, model_channels=32, channel_mult=(1, 2), attention_ds=(2,),
                              num_classes=10))
    with pytest.raises(ValueError, match="class-conditional; pass class_labels"):
        model(torch.randn(1, 3, 16, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match="t must be a tensor of diffusion steps"):
        model(torch.randn(1, 3, 16, 16), torch.tensor([True]), torch.tensor([1]))
    with pytest.raises(ValueError, match="x has 1 channels"):
        model(torch.randn(1, 1, 16, 16), torch.tensor([1]), torch.tensor([1]))


def _relative_rule(model, x, t, y, dtype, backend):
    with torch.no_grad():
        with ops.use_backend("torch"):
            want = model(x, t, y).double()
            plain = copy.deepcopy(model).to(dtype)(x.to(dtype), t, y).double()
        fast = model.to_fast(dtype)
        assert isinstance(fast, FastADMUNet)
        with ops.use_backend(backend):
            got = fast(x, t, y)
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    err_fast, err_plain = (got.double() - want).abs().max().item(), (plain - want).abs().max().item()
    print(f"{dtype} {backend}: max |fast - ref| = {err_fast:.3e}, max |plain - ref| = {err_plain:.3e}, "
          f"scale {want.abs().max().item():.3e}")
    assert err_fast <= 2 * err_plain + 1e-2


@pytest.mark.parametrize("name", ["guided_small_all_features", "guided_small_legacy_plain",
                                  "improved_small_plain_cond"])
@pytest.mark.parametrize("backend", ["native", pytest.param("triton", marks=needs_triton)])
def test_fast_matches_reference_by_relative_rule(name, backend):
    if ops.backend_unavailable_reason(backend, torch.device("cpu")) is not None:
        pytest.skip(f"{backend} backend not available here")
    model, config, _, meta, data = _case_model(name)
    x, t, y = data["x"][:, :, :16, :16].contiguous(), data["t"], data["y"] if config.num_classes else None
    _relative_rule(model, x, t, y, torch.bfloat16, backend)


@pytest.mark.parametrize("updown", ["False", "True"])  # upsampling: a conv resampler, or the ResBlock's own
def test_fast_float32_equals_reference_and_keeps_the_layout(updown):
    model, _ = _small("--image_size 32 --num_channels 64 --num_res_blocks 1 --channel_mult 1,2 "
                      f"--attention_resolutions 16 --num_heads 2 --learn_sigma True --resblock_updown {updown}")
    fast = model.to_fast(torch.float32)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 999])
    with torch.no_grad():
        torch.testing.assert_close(fast(x, t), model(x, t), atol=1e-4, rtol=1e-4)
    own = fast.state_dict()  # openai's legacy qkv order, though the fast form computes in the new order
    assert all(torch.equal(v, own[k]) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="already a FastADMUNet"):
        fast.to_fast()


@pytest.mark.parametrize("preset, millions, steps, scale", [
    ("adm-256-uncond", 552.8, 1000, 1.0),         # guided-diffusion's 256x256 uncond (the paper: 554M)
    ("adm-lsun-256", 552.8, 1000, 1.0),
    ("adm-imagenet64-cond", 295.9, 1000, 1.0),    # ImageNet 64 (the paper: 296M)
    ("iddpm-cifar10", 52.5, 4000, 0.25),          # improved-diffusion CIFAR-10 (L_hybrid, cosine)
])
def test_presets_have_the_published_sizes(preset, millions, steps, scale):
    config, schedule = config_from_flags(preset)
    with torch.device("meta"):  # the full published model, no memory
        model = ADMUNet(config)
    assert model.num_parameters() / 1e6 == pytest.approx(millions, abs=0.05)
    assert len(schedule) == steps and config.timestep_scale == scale and config.learn_sigma


@pytest.mark.parametrize("fast", [False, True])
def test_float_timesteps(fast):
    """openai's timestep_embedding is defined for fractional t: integer-valued floats give the int result exactly,
    a fraction moves the output, and the embedding at fractional t is the float64 formula's."""
    import math

    from ddpm_fast.fast import timestep_embedding

    cfg = ADMConfig(image_size=8, model_channels=32, channel_mult=(1, 2), attention_ds=(2,), num_classes=4,
                    learn_sigma=True, use_scale_shift_norm=True)
    model = ADMUNet(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    run = model.to_fast(torch.float32) if fast else model
    x, labels = torch.randn(2, 3, 8, 8), torch.tensor([0, 3])
    with torch.no_grad():
        whole = run(x, torch.tensor([7, 500]), labels)
        torch.testing.assert_close(run(x, torch.tensor([7.0, 500.0]), labels), whole, atol=0, rtol=0)
        assert not torch.allclose(run(x, torch.tensor([7.5, 500.25]), labels), whole)
    t = torch.tensor([0.5, 417.25, 998.75], dtype=torch.float64)
    half = 16
    freqs = torch.tensor([math.exp(-math.log(10000.0) * i / half) for i in range(half)], dtype=torch.float64)
    args = t[:, None] * freqs[None]
    want = torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # openai: [cos, sin]
    torch.testing.assert_close(timestep_embedding(t, 32, flip_sin_to_cos=True, freq_shift=0).double(), want,
                               atol=2e-4, rtol=0)
