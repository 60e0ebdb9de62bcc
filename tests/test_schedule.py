import math

import numpy as np
import pytest
import torch
from conftest import diffusers_peer

from ddpm_fast import NoiseSchedule, ops
from ddpm_fast.schedule import space_timesteps


def _independent_tables(betas: np.ndarray) -> dict:
    """Ho et al. 2020 / improved-diffusion formulas, written out in numpy float64."""
    alphas = 1.0 - betas
    acp = np.cumprod(alphas)
    acp_prev = np.append(1.0, acp[:-1])
    pv = betas * (1.0 - acp_prev) / (1.0 - acp)
    return {
        "alphas": alphas,
        "alphas_cumprod": acp,
        "alphas_cumprod_prev": acp_prev,
        "sqrt_alphas_cumprod": np.sqrt(acp),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - acp),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / acp),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / acp - 1),
        "posterior_variance": pv,
        "posterior_log_variance_clipped": np.log(np.append(pv[1], pv[1:])),
        "posterior_mean_coef1": betas * np.sqrt(acp_prev) / (1.0 - acp),
        "posterior_mean_coef2": (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp),
    }


def _cosine_betas(T, s=0.008):
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)])


@pytest.mark.parametrize(
    "schedule, betas",
    [
        (NoiseSchedule.linear(), np.linspace(1e-4, 0.02, 1000)),
        (NoiseSchedule.linear(200, 1e-3, 0.05), np.linspace(1e-3, 0.05, 200)),
        (NoiseSchedule.cosine(1000), _cosine_betas(1000)),
        (NoiseSchedule.cosine(50), _cosine_betas(50)),
        (NoiseSchedule.scaled_linear(), np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2),
        (NoiseSchedule.sigmoid(100), 1 / (1 + np.exp(-np.linspace(-6, 6, 100))) * (0.02 - 1e-4) + 1e-4),
    ],
)
def test_tables_match_independent_formulas(schedule, betas):
    assert schedule.betas.dtype == torch.float64
    np.testing.assert_allclose(schedule.betas.numpy(), betas, rtol=1e-12, atol=0)
    for name, want in _independent_tables(betas).items():
        got = getattr(schedule, name)
        assert got.dtype == torch.float64, name
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-14, err_msg=name)


def test_cosine_clips_betas():
    s = NoiseSchedule.cosine(1000)
    assert s.betas.max().item() == pytest.approx(0.999)
    assert (s.betas > 0).all()


def test_tables_match_diffusers():
    DDPMScheduler = diffusers_peer().DDPMScheduler

    for name, ours in (("linear", NoiseSchedule.linear()), ("squaredcos_cap_v2", NoiseSchedule.cosine(1000))):
        theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule=name)
        # diffusers keeps fp32 betas and accumulates abar in fp32: agreement to fp32 precision.
        np.testing.assert_allclose(ours.betas.numpy(), theirs.betas.double().numpy(), rtol=1e-6)
        np.testing.assert_allclose(ours.alphas_cumprod.numpy(), theirs.alphas_cumprod.double().numpy(),
                                   rtol=1e-4)


def test_from_name():
    assert torch.equal(NoiseSchedule.from_name("linear", 100).betas, NoiseSchedule.linear(100).betas)
    assert torch.equal(NoiseSchedule.from_name("cosine", 100).betas, NoiseSchedule.cosine(100).betas)
    with pytest.raises(ValueError, match="unknown beta schedule 'quadratic'"):
        NoiseSchedule.from_name("quadratic")
    with pytest.raises(ValueError, match="positive int"):
        NoiseSchedule.linear(0)


def test_bad_betas():
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        NoiseSchedule([0.1, 1.5])
    with pytest.raises(ValueError, match="1-D"):
        NoiseSchedule(torch.ones(2, 2) * 0.1)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [10, 50])
def test_spacing_matches_diffusers(spacing, steps):
    DDIMScheduler = diffusers_peer().DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
    sched.set_timesteps(steps)
    want = sorted(sched.timesteps.tolist())
    assert space_timesteps(1000, steps, spacing) == want


def test_spacing_errors():
    with pytest.raises(ValueError, match="unknown spacing"):
        space_timesteps(1000, 10, "random")
    with pytest.raises(ValueError, match="cannot take"):
        space_timesteps(10, 20)


def test_respace_preserves_alphas_cumprod():
    s = NoiseSchedule.linear()
    keep = [0, 5, 99, 400, 999]
    r = s.respace(keep)
    assert r.timestep_map.tolist() == keep
    np.testing.assert_allclose(r.alphas_cumprod.numpy(), s.alphas_cumprod[keep].numpy(), rtol=1e-12)
    # improved-diffusion: beta_i = 1 - abar_i / abar_{i-1} over the kept sequence
    acp = s.alphas_cumprod[keep].numpy()
    np.testing.assert_allclose(r.betas.numpy(), 1 - acp / np.append(1.0, acp[:-1]), rtol=1e-12)
    with pytest.raises(ValueError, match="must lie in"):
        s.respace([0, 1000])


def _q_sample(s, x0, t, noise):
    """The forward process on the schedule's tables (ops.q_sample, its torch reference)."""
    with ops.use_backend("torch"):
        return ops.q_sample(x0, t, s.sqrt_alphas_cumprod, s.sqrt_one_minus_alphas_cumprod, noise=noise)[0]


def test_q_sample_formula():
    s = NoiseSchedule.cosine(100)
    x0 = torch.randn(4, 3, 5, 5)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 10, 50, 99])
    got = _q_sample(s, x0, t, noise)
    acp = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    want = acp.sqrt() * x0.double() + (1 - acp).sqrt() * noise.double()
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)


def test_q_sample_bad_input():
    s = NoiseSchedule.linear(10)
    x0 = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        _q_sample(s, x0, torch.tensor([1, 2, 3]), torch.randn_like(x0))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        _q_sample(s, x0, torch.tensor([1.0, 2.0]), torch.randn_like(x0))
    with pytest.raises(RuntimeError, match=r"must lie in \[0, 9\]"):  # a device-side check, no host read
        _q_sample(s, x0, torch.tensor([1, 10]), torch.randn_like(x0))
    with pytest.raises(ValueError, match="noise shape"):
        _q_sample(s, x0, torch.tensor([1, 2]), torch.randn(2, 3, 4, 5))


@pytest.mark.parametrize("kw, message", [(dict(s=-1.0), "s must lie in"), (dict(s=float("nan")), "s must lie in"),
                                         (dict(max_beta=float("inf")), "max_beta must lie in"),
                                         (dict(max_beta=0.0), "max_beta must lie in")])
def test_cosine_parameters_are_checked(kw, message):
    with pytest.raises(ValueError, match=message):
        NoiseSchedule.cosine(100, **kw)
