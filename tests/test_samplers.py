import pytest
import torch
from conftest import diffusers_peer, randomize_

from ddpm_fast import DDIMSampler, DDPMSampler, NoiseSchedule, UNet, UNetConfig, ops, to_uint8
from ddpm_fast.noise import NoiseKey, initial_noise, randn_like_key


def _fake_eps(t, shape, seed):
    g = torch.Generator().manual_seed(seed * 7919 + int(t))
    return torch.randn(shape, generator=g)


def _in_float64(scheduler):
    """Run a diffusers scheduler in float64 from its own betas: it computes 1 - abar in its table dtype,
    which in fp32 loses ~1e-3 relative near t=0 (cosine); we keep float64 tables and want the truth."""
    scheduler.alphas_cumprod = torch.cumprod(1.0 - scheduler.betas.double(), 0)
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_ddpm_step_matches_diffusers(variance, clip, schedule, monkeypatch):
    ddpm_module = diffusers_peer("diffusers.schedulers.scheduling_ddpm")
    DDPMScheduler = diffusers_peer().DDPMScheduler

    ref = _in_float64(DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule, variance_type=variance,
                                    clip_sample=clip))
    ours = DDPMSampler(NoiseSchedule.from_name(schedule, 1000), variance=variance, clip_denoised=clip)
    shape = (2, 3, 6, 6)
    for t in [999, 998, 700, 100, 3, 1, 0]:
        x_t = torch.randn(shape) * 1.5
        eps = torch.randn(shape)
        noise = torch.randn(shape)
        # DDPMScheduler.step draws its own noise: hand it ours.
        monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *a, dtype=None, _z=noise, **k: _z.to(dtype))
        want = ref.step(eps.double(), t, x_t.double()).prev_sample
        got = ours.step(eps, t, x_t, noise=noise)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5, msg=f"t={t}")


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_chain_matches_diffusers(eta, steps, spacing):
    DDIMScheduler = diffusers_peer().DDIMScheduler

    ref = _in_float64(DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, clip_sample=True))
    ref.set_timesteps(steps)
    ours = DDIMSampler(NoiseSchedule.linear(), steps, eta=eta, spacing=spacing)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    shape = (2, 3, 6, 6)
    x_ref = x_ours = torch.randn(shape)
    for t in ours.timesteps.tolist():
        eps = _fake_eps(t, shape, 1)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(t))
        x_ref = ref.step(eps.double(), t, x_ref.double(), eta=eta,
                         variance_noise=noise.double() if eta > 0 else None).prev_sample
        x_ours = ours.step(eps, t, x_ours, noise=noise)
        torch.testing.assert_close(x_ours.double(), x_ref, atol=2e-5, rtol=1e-5, msg=f"t={t}")
        x_ref = x_ours  # compare single steps from a shared state, so fp32 drift cannot mask an error


def test_ddim_eta0_is_deterministic_and_eta1_needs_noise():
    s = DDIMSampler(NoiseSchedule.linear(), 10, eta=0.0)
    x, eps = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    t = s.timesteps[0].item()
    assert torch.equal(s.step(eps, t, x), s.step(eps, t, x))
    s1 = DDIMSampler(NoiseSchedule.linear(), 10, eta=1.0)
    a = s1.step(eps, t, x, generator=torch.Generator().manual_seed(0))
    b = s1.step(eps, t, x, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, b)


def test_respaced_ddpm_runs_on_original_timesteps():
    base = NoiseSchedule.linear()
    s = DDPMSampler(base.respace(base.space_timesteps(25, "leading")))
    assert s.timesteps.tolist() == list(range(960, -1, -40))
    x, eps = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    out = s.step(eps, 960, x, noise=torch.zeros_like(x))
    r = s.schedule
    i = 24
    x0 = (r.sqrt_recip_alphas_cumprod[i] * x - r.sqrt_recipm1_alphas_cumprod[i] * eps).clamp(-1, 1)
    want = r.posterior_mean_coef1[i] * x0 + r.posterior_mean_coef2[i] * x
    torch.testing.assert_close(out, want.float(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not one of this sampler's 25 timesteps"):
        s.step(eps, 959, x)


def test_guidance_combines_eps():
    s = DDPMSampler(NoiseSchedule.linear(100))
    x, ec, eu, z = (torch.randn(2, 3, 4, 4) for _ in range(4))
    got = s.step(ec, 50, x, noise=z, model_output_uncond=eu, guidance_scale=3.0)
    want = s.step(eu + 3.0 * (ec - eu), 50, x, noise=z)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_step_bad_inputs():
    s = DDPMSampler(NoiseSchedule.linear(100))
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="float32"):
        s.step(torch.randn(2, 3, 4, 4), 5, x.double())
    with pytest.raises(ValueError, match="model_output shape"):
        s.step(torch.randn(2, 3, 4, 5), 5, x)
    with pytest.raises(ValueError, match="timestep 100 is not one"):
        s.step(torch.randn_like(x), 100, x)
    with pytest.raises(ValueError, match="unknown variance"):
        DDPMSampler(NoiseSchedule.linear(100), variance="learned")


def test_sample_is_deterministic_by_seed_and_guided():
    model = randomize_(UNet(UNetConfig.from_name("digits")), 0.02).eval()
    s = DDIMSampler(NoiseSchedule.linear(100), 4, eta=1.0)
    kw = dict(seed=3, class_labels=torch.tensor([1, 7]), progress=False)
    a = s.sample(model, (2, 1, 16, 16), **kw)
    b = s.sample(model, (2, 1, 16, 16), **kw)
    c = s.sample(model, (2, 1, 16, 16), guidance_scale=2.0, **kw)
    assert a.dtype == torch.float32 and a.shape == (2, 1, 16, 16)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    with pytest.raises(ValueError, match="needs class_labels"):
        s.sample(model, (2, 1, 16, 16), guidance_scale=2.0, progress=False)
    with pytest.raises(ValueError, match=r"lie in \[0, 9\]"):
        s.sample(model, (2, 1, 16, 16), class_labels=torch.tensor([1, 10]), progress=False)


def test_sample_matches_manual_loop():
    """sample() is the chain of single steps, with x_T and noise from the run's Philox stream: bit for bit on
    the reference ops; with the C++ kernels (auto on the CPU) the plan draws its noise in the kernel, whose
    Box-Muller transcendentals may differ from torch's in the last bit."""
    model = randomize_(UNet(UNetConfig.from_name("tiny")), 0.02).eval()
    s = DDPMSampler(NoiseSchedule.linear(20))
    for backend, tol in (("torch", 0.0), ("auto", 1e-6)):
        with ops.use_backend(backend):
            got = s.sample(model, (2, 3, 8, 8), seed=11, progress=False)
            images = torch.arange(2)
            x = initial_noise((2, 3, 8, 8), 11, images, "cpu")
            with torch.no_grad():
                for i, t in enumerate(range(19, -1, -1)):
                    eps = model(x, torch.full((2,), t))
                    x = s.step(eps, t, x, noise=randn_like_key(x, NoiseKey(torch.tensor([11, i]), images)))
        torch.testing.assert_close(got, x, atol=tol, rtol=0)


def test_to_uint8():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    assert to_uint8(x).flatten().tolist() == [0, 128, 255, 255]
