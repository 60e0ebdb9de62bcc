"""Models that predict v or x_0 (diffusers' prediction_type): every sampler's eps-form table rewritten once
(samplers.reparameterize) and run by the same fused step. Against diffusers' DDIM and DDPM in float64, and
row by row against the eps model the output stands for."""

import copy

import pytest
import torch
from conftest import diffusers_peer
from test_samplers import _in_float64

from ddpm_fast import DDIMSampler, DDPMSampler, NoiseSchedule, ops
from ddpm_fast.samplers import SAMPLERS, SamplerRequest, reparameterize
from ddpm_fast.solvers import DPMSolverSampler, UniPCSampler


def _as(schedule, prediction_type):
    s = copy.copy(schedule)
    s.prediction_type = prediction_type
    return s


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing, steps", [("leading", 10), ("trailing", 4), ("trailing", 1)])
def test_ddim_chain_matches_diffusers(prediction_type, eta, spacing, steps):
    DDIMScheduler = diffusers_peer().DDIMScheduler
    ref = _in_float64(DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, clip_sample=True,
                                    prediction_type=prediction_type))
    ref.set_timesteps(steps)
    ours = DDIMSampler(_as(NoiseSchedule.linear(), prediction_type), steps, eta=eta, spacing=spacing)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    shape = (2, 3, 6, 6)
    gen = torch.Generator().manual_seed(steps)
    x = torch.randn(shape, generator=gen)
    for t in ours.timesteps.tolist():
        out = torch.randn(shape, generator=gen)
        noise = torch.randn(shape, generator=gen)
        want = ref.step(out.double(), t, x.double(), eta=eta,
                        variance_noise=noise.double() if eta > 0 else None).prev_sample
        got = ours.step(out, t, x, noise=noise)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4, msg=f"t={t}")
        x = got


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_step_matches_diffusers(prediction_type, variance, monkeypatch):
    ddpm_module = diffusers_peer("diffusers.schedulers.scheduling_ddpm")
    ref = _in_float64(diffusers_peer().DDPMScheduler(num_train_timesteps=1000, variance_type=variance,
                                                     prediction_type=prediction_type))
    ours = DDPMSampler(_as(NoiseSchedule.linear(), prediction_type), variance=variance)
    shape = (2, 3, 6, 6)
    for t in [999, 700, 100, 1, 0]:
        x, out, noise = torch.randn(shape) * 1.5, torch.randn(shape), torch.randn(shape)
        monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *a, dtype=None, _z=noise, **k: _z.to(dtype))
        want = ref.step(out.double(), t, x.double()).prev_sample
        torch.testing.assert_close(ours.step(out, t, x, noise=noise).double(), want, atol=1e-5, rtol=1e-5,
                                   msg=f"t={t}")


def _restated(eps_row: torch.Tensor, x: torch.Tensor, out: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The eps the output o of a ``prediction_type`` model stands for at this row's timestep (float64)."""
    alpha = 1.0 / eps_row[0]
    sigma = eps_row[1] * alpha
    if prediction_type == "v_prediction":
        return sigma * x + alpha * out
    return (x - alpha * out) / sigma


SOLVERS = [lambda s: DDIMSampler(s, 8, eta=0.5), lambda s: DDPMSampler(s), lambda s: DPMSolverSampler(s, 8, order=2),
           lambda s: DPMSolverSampler(s, 8, order=3), lambda s: UniPCSampler(s, 6, order=2)]


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("make", SOLVERS, ids=["ddim", "ddpm", "dpm++2", "dpm++3", "unipc2"])
def test_every_row_equals_the_eps_model_it_stands_for(prediction_type, make):
    """Unclipped, a row run on the v (or x_0) output gives the eps row's result on the eps that output means:
    the same x_prev and the same x0-form history, on fresh draws for every row."""
    base = NoiseSchedule.linear()
    eps_s, other = make(base), make(_as(base, prediction_type))
    assert other.prediction_type == prediction_type
    depth = eps_s.history_depth
    gen = torch.Generator().manual_seed(3)
    shape = (2, 3, 5, 5)
    for i in range(eps_s.coefs.shape[0]):
        x, out, z = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
        hist = [torch.randn(shape, generator=gen) for _ in range(depth)]
        eps = _restated(eps_s.coefs[i], x, out, prediction_type)
        index = torch.full((2,), i, dtype=torch.int64)
        h_eps, h_other = [h.clone() for h in hist], [h.clone() for h in hist]
        want = ops.reverse_step_ref(x.float(), eps.float(), eps_s.coefs.float(), index, z.float(), False,
                                    history=tuple(h_eps))
        got = ops.reverse_step_ref(x.float(), out.float(), other.coefs.float(), index, z.float(), False,
                                   history=tuple(h_other))
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4, msg=f"row {i}")
        for a, b in zip(h_other, h_eps, strict=True):
            torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4, msg=f"row {i} history")


def test_eps_history_solvers_refuse_other_predictions_by_name():
    refused = []
    for name, cls in SAMPLERS.items():
        req = SamplerRequest(steps=cls.resolve_steps(None, 1000) or 1000)
        try:
            cls.from_request(_as(NoiseSchedule.linear(), "v_prediction"), req)
        except ValueError as exc:
            assert "epsilon-prediction models only" in str(exc) and cls.__name__ in str(exc), str(exc)
            refused.append(name)
    assert "ddim" not in refused and "ddpm" not in refused and "dpm++" not in refused
    assert refused, "some solver keeps eps-form history (PLMS, iPNDM): it must refuse a v model"


def test_reparameterize_keeps_eps_tables_and_refuses_unknown_types():
    coefs = DDIMSampler(NoiseSchedule.linear(), 5).coefs
    assert reparameterize(coefs, "epsilon") is coefs
    with pytest.raises(ValueError, match="unknown prediction_type 'x0'"):
        reparameterize(coefs, "x0")


def test_schedule_config_carries_prediction_type():
    s = _as(NoiseSchedule.linear(), "v_prediction")
    cfg = s.to_config()
    assert cfg["prediction_type"] == "v_prediction"
    back = NoiseSchedule.from_config(cfg)
    assert back.prediction_type == "v_prediction"
    assert back.respace([0, 500, 999]).prediction_type == "v_prediction"
    assert NoiseSchedule.from_config({"beta_schedule": "linear"}).prediction_type == "epsilon"
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        NoiseSchedule.from_config({"beta_schedule": "linear", "prediction_type": "flow"})


def test_classifier_guidance_refuses_a_v_model():
    from ddpm_fast import UNet, UNetConfig
    from ddpm_fast.classifier import ClassifierConfig, EncoderUNet

    model = UNet(UNetConfig(in_channels=1, out_channels=1, sample_size=8, ch=8, ch_mult=(1,), num_res_blocks=1,
                            attn_resolutions=(), num_groups=4, num_classes=3)).eval()
    clf = EncoderUNet(ClassifierConfig(image_size=8, in_channels=1, model_channels=32, num_res_blocks=1,
                                       attention_ds=(), channel_mult=(1,), num_classes=3, num_head_channels=32,
                                       pool="adaptive")).eval()
    sampler = DDIMSampler(_as(NoiseSchedule.linear(), "v_prediction"), 2)
    with pytest.raises(ValueError, match="classifier guidance needs an epsilon-prediction model"):
        sampler.plan(model, (1, 1, 8, 8), classifier=clf, class_labels=[0])


def test_the_likelihood_bound_refuses_a_v_model():
    from ddpm_fast import UNet, UNetConfig
    from ddpm_fast.likelihood import bits_per_dim

    model = UNet(UNetConfig(in_channels=1, out_channels=1, sample_size=8, ch=8, ch_mult=(1,), num_res_blocks=1,
                            attn_resolutions=(), num_groups=4)).eval()
    with pytest.raises(ValueError, match="epsilon-prediction model; this one predicts v_prediction"):
        bits_per_dim(model, _as(NoiseSchedule.linear(10), "v_prediction"), torch.zeros(1, 1, 8, 8))
