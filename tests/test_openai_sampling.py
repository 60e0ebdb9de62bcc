"""Sampling openai checkpoints as openai does: learned variance in the fused step, respacing strings, DDIM with
eps recomputed from the clipped x_0.

The reference here is a direct float64 restatement of openai's published formulas (gaussian_diffusion.py /
respace.py): their betas, the respaced process (betas recomputed from the kept alphas_cumprod), p_sample's
mean and learned_range variance, ddim_sample's update. It shares no code with the package.
"""

import math

import numpy as np
import pytest
import torch
from peers.openai_cases import random_state_dict

from ddpm_fast import DDIMSampler, DDPMSampler, engine, ops
from ddpm_fast.adm import ADMUNet
from ddpm_fast.openai import config_from_flags
from ddpm_fast.schedule import openai_timesteps


class OpenAIProcess:
    """openai's GaussianDiffusion tables for a (respaced) linear or cosine schedule, float64 numpy."""

    def __init__(self, schedule: str, steps: int, keep):
        if schedule == "linear":
            scale = 1000 / steps
            betas = np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)
        else:
            f = [math.cos((i / steps + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(steps + 1)]
            betas = np.array([min(1 - f[i + 1] / f[i], 0.999) for i in range(steps)], dtype=np.float64)
        acp_full = np.cumprod(1.0 - betas)
        last, new_betas = 1.0, []
        for i, a in enumerate(acp_full):
            if i in set(keep):
                new_betas.append(1 - a / last)
                last = a
        self.timestep_map = sorted(set(keep))
        b = np.array(new_betas)
        acp = np.cumprod(1.0 - b)
        acp_prev = np.append(1.0, acp[:-1])
        self.betas, self.acp, self.acp_prev = b, acp, acp_prev
        self.sqrt_recip_acp, self.sqrt_recipm1_acp = np.sqrt(1 / acp), np.sqrt(1 / acp - 1)
        self.post_var = b * (1 - acp_prev) / (1 - acp)
        self.post_log_var_clipped = np.log(np.append(self.post_var[1], self.post_var[1:]))
        self.coef1 = b * np.sqrt(acp_prev) / (1 - acp)
        self.coef2 = (1 - acp_prev) * np.sqrt(1 - b) / (1 - acp)

    def pred_xstart(self, x, eps, i):
        return np.clip(self.sqrt_recip_acp[i] * x - self.sqrt_recipm1_acp[i] * eps, -1, 1)

    def p_sample(self, out, x, i, noise, variance):
        c = x.shape[1]
        eps, v = out[:, :c], out[:, c:]
        if variance == "learned_range":
            frac = (v + 1) / 2
            log_var = frac * np.log(self.betas[i]) + (1 - frac) * self.post_log_var_clipped[i]
        elif variance == "fixed_large":
            log_var = np.log(np.append(self.post_var[1], self.betas[1:]))[i]
        else:
            log_var = self.post_log_var_clipped[i]
        mean = self.coef1[i] * self.pred_xstart(x, eps, i) + self.coef2[i] * x
        return mean + (i != 0) * np.exp(0.5 * log_var) * noise

    def model_variance(self, out, i, variance):
        """p_mean_variance's "variance": what condition_mean scales the gradient by."""
        c = out.shape[1] // 2 if variance == "learned_range" else out.shape[1]
        if variance == "learned_range":
            frac = (out[:, c:] + 1) / 2
            return np.exp(frac * np.log(self.betas[i]) + (1 - frac) * self.post_log_var_clipped[i])
        if variance == "fixed_large":
            return np.append(self.post_var[1], self.betas[1:])[i]
        return self.post_var[i]

    def p_sample_guided(self, out, x, i, noise, variance, grad):
        """p_sample with cond_fn: condition_mean moves the mean by variance * gradient (the noise as before)."""
        return self.p_sample(out, x, i, noise, variance) + self.model_variance(out, i, variance) * grad

    def condition_score_eps(self, eps_out, x, i, grad):
        """condition_score: eps from the (clipped) pred_xstart, minus sqrt(1 - alpha_bar) times the gradient."""
        x0 = self.pred_xstart(x, eps_out, i)
        eps = (self.sqrt_recip_acp[i] * x - x0) / self.sqrt_recipm1_acp[i]
        return eps - np.sqrt(1 - self.acp[i]) * grad

    def ddim_sample_guided(self, eps_out, x, i, grad, eta=0.0, noise=None):
        """ddim_sample with cond_fn: pred_xstart recomputed from the conditioned eps (not clipped again)."""
        eps = self.condition_score_eps(eps_out, x, i, grad)
        x0 = self.sqrt_recip_acp[i] * x - self.sqrt_recipm1_acp[i] * eps
        ab, abp = self.acp[i], self.acp_prev[i]
        sigma = eta * np.sqrt((1 - abp) / (1 - ab)) * np.sqrt(1 - ab / abp)
        out = x0 * np.sqrt(abp) + np.sqrt(1 - abp - sigma**2) * eps
        return out if noise is None or i == 0 else out + sigma * noise

    def ddim_sample(self, eps_out, x, i, eta=0.0, noise=None):
        x0 = self.pred_xstart(x, eps_out, i)
        eps = (self.sqrt_recip_acp[i] * x - x0) / self.sqrt_recipm1_acp[i]
        ab, abp = self.acp[i], self.acp_prev[i]
        sigma = eta * np.sqrt((1 - abp) / (1 - ab)) * np.sqrt(1 - ab / abp)
        out = x0 * np.sqrt(abp) + np.sqrt(1 - abp - sigma**2) * eps
        return out if noise is None or i == 0 else out + sigma * noise


def _adm(flags, seed=3, repo="improved-diffusion"):
    config, schedule = config_from_flags(flags, repo)
    model = ADMUNet(config).eval()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(random_state_dict(shapes, seed))
    return model, schedule


FLAGS = ("--image_size 32 --num_channels 32 --num_res_blocks 1 --attention_resolutions 16 --learn_sigma True "
         "--diffusion_steps 100 --noise_schedule cosine")


@pytest.mark.parametrize("respacing", ["", "25", "10,5"])
@pytest.mark.parametrize("variance", ["learned_range", "fixed_large", "fixed_small"])
@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
def test_one_ancestral_step_equals_openai_p_sample(respacing, variance, backend):
    if ops.backend_unavailable_reason(backend, torch.device("cpu")) is not None:
        pytest.skip(f"{backend} backend not available here")
    _, schedule = config_from_flags(FLAGS, "improved-diffusion")
    keep = openai_timesteps(100, respacing) if respacing else list(range(100))
    spaced = schedule.respace(keep)
    openai = OpenAIProcess("cosine", 100, keep)
    sampler = DDPMSampler(spaced, variance=variance)
    g = torch.Generator().manual_seed(len(keep))
    n = len(keep)
    for i in (n - 1, n // 2, 1, 0):
        x = torch.randn(2, 3, 8, 8, generator=g) * 1.5
        out = torch.cat([torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g) * 2 - 1], 1)
        z = torch.randn(2, 3, 8, 8, generator=g)
        with ops.use_backend(backend):
            got = sampler.step(out if variance == "learned_range" else out, keep[i], x, noise=z)
        want = openai.p_sample(out.double().numpy(), x.double().numpy(), i, z.double().numpy(), variance)
        np.testing.assert_allclose(got.double().numpy(), want, atol=2e-5, rtol=1e-5)


def test_learned_range_needs_v_and_a_learned_sigma_model():
    _, schedule = config_from_flags(FLAGS, "improved-diffusion")
    sampler = DDPMSampler(schedule, variance="learned_range")
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="needs the model's v"):
        sampler.step(torch.randn(1, 3, 8, 8), 5, x, noise=torch.randn_like(x))
    with pytest.raises(ValueError, match="model output has 4 channels"):
        sampler.step(torch.randn(1, 4, 8, 8), 5, x, noise=torch.randn_like(x))
    plain, _ = _adm(FLAGS.replace("--learn_sigma True", "--learn_sigma False"))
    with pytest.raises(ValueError, match="needs a learned-sigma model"):
        sampler.plan(plain, (1, 3, 32, 32), seed=0)


@pytest.mark.parametrize("spec", ["ddim10", "5,5"])
def test_ddim_run_equals_openai_ddim_sample_loop(spec):
    model, schedule = _adm(FLAGS)
    keep = openai_timesteps(100, spec)
    sampler = DDIMSampler(schedule, timesteps=keep, use_clipped_model_output=True)
    openai = OpenAIProcess("cosine", 100, keep)
    x_T = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with ops.use_backend("torch"):
        got = sampler.sample(model, x_T.shape, x_T=x_T, seed=0, progress=False)
        x = x_T.double()
        with torch.no_grad():
            for i in reversed(range(len(keep))):
                eps = model(x.float(), torch.full((2,), keep[i]))[:, :3].double()
                x = torch.from_numpy(openai.ddim_sample(eps.numpy(), x.numpy(), i))
    err = (got.double() - x).abs().max().item()
    print(f"{spec}: max |ours - openai ddim loop| = {err:.2e}")
    assert err <= 1e-4
    # Without the recomputed eps (diffusers' default DDIM) the run differs: the option is what makes it equal.
    with ops.use_backend("torch"):
        plain = DDIMSampler(schedule, timesteps=keep).sample(model, x_T.shape, x_T=x_T, seed=0, progress=False)
    assert (plain.double() - x).abs().max().item() > 100 * max(err, 1e-6)


def test_learned_variance_run_on_every_backend_and_the_engine():
    """The whole run on the torch reference, the C++ backend and the engine; the Triton interpreter (seconds per
    ADM forward on a CPU) takes the run's first two steps. At 16x16 (the model is convolutional)."""
    model, schedule = _adm(FLAGS)
    shape = (2, 3, 16, 16)
    sampler = DDPMSampler(schedule.respace(openai_timesteps(100, "6")), variance="learned_range")
    with ops.use_backend("torch"):
        want = sampler.sample(model, shape, seed=4, progress=False)
        first = sampler.plan(model, shape, seed=4)
        first.step()
        first.step()
    assert torch.isfinite(want).all()
    for backend in ("native", "triton"):
        if ops.backend_unavailable_reason(backend, torch.device("cpu")) is not None:
            continue
        with ops.use_backend(backend):
            if backend == "triton":
                plan = sampler.plan(model, shape, seed=4)
                plan.step()
                plan.step()
                torch.testing.assert_close(plan.x, first.x, atol=1e-4, rtol=1e-4)
            else:
                torch.testing.assert_close(sampler.sample(model, shape, seed=4, progress=False), want,
                                           atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(engine.GraphEngine().sample(sampler, model, shape, seed=4), want,
                               atol=1e-4, rtol=1e-4)
    # The v half matters: the same run with beta's variance differs.
    other = DDPMSampler(sampler.schedule, variance="fixed_large").sample(model, shape, seed=4, progress=False)
    assert (other - want).abs().max() > 1e-3


def test_class_conditional_openai_model_needs_labels():
    model, schedule = _adm(FLAGS + " --class_cond True")
    sampler = DDIMSampler(schedule, timesteps=openai_timesteps(100, "ddim5"), use_clipped_model_output=True)
    with pytest.raises(ValueError, match="no null label; give each image a class"):
        sampler.plan(model, (2, 3, 32, 32), seed=0)
    with pytest.raises(ValueError, match="guidance_scale: this model has no null label"):
        sampler.plan(model, (2, 3, 32, 32), seed=0, class_labels=[1, 2], guidance_scale=3.0)
    x = sampler.sample(model, (2, 3, 32, 32), seed=0, class_labels=[1, 999], progress=False)
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("batch_invariant", [False, True])
def test_adm_learned_variance_plan_step_makes_no_host_read(backend, batch_invariant):
    """The fast ADM (scale-shift norm op, SDPA, folds) and the learned-variance step read nothing back: a CUDA
    graph can capture the step. (Its Triton launches are recorded here for the AOT compile too.)"""
    from host_sync import no_host_sync

    if ops.backend_unavailable_reason(backend, torch.device("cpu")):
        pytest.skip(f"{backend} backend not available here")
    flags = FLAGS + " --class_cond True --num_head_channels 16 --resblock_updown True --channel_mult 1,2"
    model, schedule = _adm(flags, repo="guided-diffusion")
    fast = model.to_fast(torch.bfloat16)
    sampler = DDPMSampler(schedule.respace(openai_timesteps(100, "6")), variance="learned_range")
    with ops.use_backend(backend):
        plan = sampler.plan(fast, (2, 3, 16, 16), seed=7, class_labels=[3, 999], batch_invariant=batch_invariant,
                            invariant_chunk=2)
        before = plan.x.clone()
        with no_host_sync():
            plan.step()
            plan.step()
    assert plan.done == 2 and torch.isfinite(plan.x).all() and not torch.equal(plan.x, before)


@pytest.mark.gpu
def test_graph_engine_replays_the_fast_adm_on_gpu():
    model, schedule = _adm(FLAGS + " --use_new_attention_order True --num_head_channels 16 --channel_mult 1,2",
                           repo="guided-diffusion")
    fast = model.cuda().to_fast(torch.float16)
    sampler = DDPMSampler(schedule.respace(openai_timesteps(100, "10")), variance="learned_range")
    eager = sampler.sample(fast, (4, 3, 32, 32), seed=2, progress=False)
    graph = engine.GraphEngine().sample(sampler, fast, (4, 3, 32, 32), seed=2)
    assert torch.equal(graph, eager)
