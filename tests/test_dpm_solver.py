"""DPMSolverSampler: the same timesteps and samples as diffusers' DPMSolverMultistepScheduler."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import diffusers_peer

from ddpm_fast import DPMSolverSampler, NoiseSchedule
from ddpm_fast.noise import NoiseKey, randn_like_key
from ddpm_fast.ops.reverse_step import PUSH_X0
from ddpm_fast.schedule import dpm_timesteps
from ddpm_fast.solvers import ring_rows

# diffusers' scheduler trips a numpy-2 deprecation in its own set_timesteps: not ours to act on.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
DIFFUSERS_BETAS = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


class SmoothEps(nn.Module):
    """A cheap, x- and t-dependent stand-in for a U-Net: a multistep solver must see eps change along the path."""

    compute_dtype = None  # a Denoiser: computes in x's dtype, unconditional
    config = SimpleNamespace(num_classes=None)

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(3, 3, 1, 1, generator=g) * 0.5)

    def forward(self, x, t, class_labels=None):
        t = torch.as_tensor(t, device=x.device).to(x.dtype).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
        return torch.tanh(F.conv2d(x, self.w.to(x.dtype)) + t / 1000.0)


def _diffusers(schedule, steps, *, float64, **cfg):
    sch = diffusers_peer().DPMSolverMultistepScheduler(num_train_timesteps=1000,
                                                         beta_schedule=DIFFUSERS_BETAS[schedule], **cfg)
    sch.set_timesteps(steps)
    if float64:
        # diffusers keeps its sigmas in fp32 (1 - abar loses ~1e-3 relative near t = 0 on the cosine schedule);
        # the same algorithm on float64 sigmas is the truth our float64 tables are held to.
        acp = torch.cumprod(1.0 - sch.betas.double(), 0)
        sigma = ((1 - acp) / acp).sqrt()[sch.timesteps]
        sch.sigmas = torch.cat([sigma, sigma.new_zeros(1)])
    return sch


def _diffusers_chain(sch, model, x_T, seed, sde, float64):
    x = x_T.double() if float64 else x_T.clone()
    images = torch.arange(x.shape[0])
    for i, t in enumerate(sch.timesteps):
        # The SDE's noise: the draws our plan makes at step i (the project's Philox stream), handed over.
        z = randn_like_key(x_T, NoiseKey(torch.tensor([seed, i]), images)).to(x.dtype) if sde else None
        x = sch.step(model(x, t), t, x, variance_noise=z).prev_sample
    return x


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_chain_matches_diffusers(schedule, order, algorithm, spacing):
    model = SmoothEps()
    x_T = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    for steps, lower_order_final, solver_type in ((7, True, "midpoint"), (20, True, "heun"), (10, False, "midpoint"),
                                                  (25, True, "midpoint")):
        cfg = dict(solver_order=order, algorithm_type=algorithm, timestep_spacing=spacing,
                   lower_order_final=lower_order_final, solver_type=solver_type)
        ours = DPMSolverSampler(NoiseSchedule.from_name(schedule, 1000), steps, order=order, algorithm=algorithm,
                                spacing=spacing, lower_order_final=lower_order_final, solver_type=solver_type)
        sch = _diffusers(schedule, steps, float64=True, **cfg)
        assert ours.timesteps.tolist() == sch.timesteps.tolist()
        want = _diffusers_chain(sch, model, x_T, 5, algorithm.startswith("sde"), float64=True)
        got = ours.sample(model, x_T.shape, seed=5, x_T=x_T, progress=False)
        assert got.dtype == torch.float32
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert err < 1e-4, f"{steps} steps, lower_order_final={lower_order_final}, {solver_type}: {err:.2e}"


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("order", [2, 3])
def test_chain_matches_stock_diffusers_in_fp32(schedule, order):
    """diffusers as users run it (its fp32 sigmas): still 1e-4 relative (measured: < 1e-5)."""
    model = SmoothEps(1)
    x_T = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    sch = _diffusers(schedule, 9, float64=False, solver_order=order)
    want = _diffusers_chain(sch, model, x_T, 0, False, float64=False)
    got = DPMSolverSampler(NoiseSchedule.from_name(schedule, 1000), 9, order=order).sample(
        model, x_T.shape, x_T=x_T, progress=False)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4


def test_step_orders_follow_diffusers():
    sched = NoiseSchedule.linear(1000)
    assert DPMSolverSampler(sched, 7, order=3).step_orders == [1, 2, 3, 3, 3, 2, 1]
    assert DPMSolverSampler(sched, 7, order=3, lower_order_final=False).step_orders == [1, 2, 3, 3, 3, 3, 1]
    assert DPMSolverSampler(sched, 20, order=3).step_orders == [1, 2] + [3] * 17 + [1]
    assert DPMSolverSampler(sched, 5, order=2).step_orders == [1, 2, 2, 2, 1]
    assert DPMSolverSampler(sched, 5, order=1).history_depth == 0
    assert DPMSolverSampler(sched, 5, order=3).history_depth == 2
    assert DPMSolverSampler(sched, 2, order=3).history_depth == 0  # orders 1, 1: no history needed
    assert dpm_timesteps(1000, 5, "leading") == [830, 664, 498, 332, 166]
    assert dpm_timesteps(1000, 5, "trailing") == [999, 799, 599, 399, 199]
    assert dpm_timesteps(1000, 5, "linspace") == [999, 799, 599, 400, 200]


def test_restart_gives_the_same_run_and_history_starts_empty():
    model = SmoothEps()
    sampler = DPMSolverSampler(NoiseSchedule.linear(1000), 6, order=3, algorithm="sde-dpmsolver++")
    plan = sampler.plan(model, (2, 3, 6, 6), seed=4)
    a = plan.run()
    assert len(plan.history) == 2 and all(h.abs().sum() > 0 for h in plan.history)
    b = plan.start(seed=4).run()
    assert torch.equal(a, b)
    c = plan.start(seed=5).run()
    assert not torch.equal(a, c)


def test_bad_arguments_name_the_problem():
    sched = NoiseSchedule.linear(1000)
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        DPMSolverSampler(sched, 10, order=4)
    with pytest.raises(ValueError, match="unknown algorithm 'dpmsolver'"):
        DPMSolverSampler(sched, 10, algorithm="dpmsolver")
    with pytest.raises(ValueError, match="unknown solver_type"):
        DPMSolverSampler(sched, 10, solver_type="euler")
    with pytest.raises(ValueError, match="unknown spacing"):
        DPMSolverSampler(sched, 10, spacing="karras")
    with pytest.raises(ValueError, match=r"num_steps must be an int in \[1, 1000\]"):
        DPMSolverSampler(sched, 0)
    with pytest.raises(ValueError, match="repeat a timestep"):
        DPMSolverSampler(sched, 1000, spacing="linspace")
    with pytest.raises(ValueError, match="full training schedule"):
        DPMSolverSampler(sched.respace(range(0, 1000, 10)), 10)
    with pytest.raises(TypeError, match="multistep solver"):
        DPMSolverSampler(sched, 10).step(torch.zeros(1, 3, 4, 4), 999, torch.zeros(1, 3, 4, 4))


def _hand_written_rows(sampler, alphas_cumprod, ts):
    """DPM-Solver++'s table as it was first written, by hand from diffusers' update formulas (rows in step order,
    earlier data predictions weighed by lag): the trace-compiled sampler must give the same rows."""
    acp = alphas_cumprod.double()[ts]
    alpha = torch.cat([acp.sqrt(), acp.new_ones(1)])
    sig = torch.cat([(1 - acp).sqrt(), acp.new_zeros(1)])
    lam = alpha.log() - sig.log()
    sde = sampler.algorithm == "sde-dpmsolver++"
    rows = []
    for i, k in enumerate(sampler.step_orders):
        a_t, s_t, s_0 = alpha[i + 1], sig[i + 1], sig[i]
        h = lam[i + 1] - lam[i]
        em = torch.exp(-h)
        if sde:
            c_xt, phi, noise = s_t / s_0 * em, a_t * (1 - em * em), s_t * (1 - em * em).sqrt()
        else:
            c_xt, phi, noise = s_t / s_0, a_t * (1 - em), torch.zeros((), dtype=torch.float64)
        m = torch.zeros(3, dtype=torch.float64)
        m[0] = phi
        if k >= 2:
            r0 = (lam[i] - lam[i - 1]) / h
            d1_0 = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64) / r0
            d2 = None
            if k == 2:
                d1 = d1_0
            else:
                r1 = (lam[i - 1] - lam[i - 2]) / h
                d1_1 = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
            if k == 2 and sampler.solver_type == "midpoint":
                w1 = 0.5 * phi
            elif sde:
                w1 = a_t * ((1 - em * em) / (-2 * h) + 1)
            else:
                w1 = a_t * ((em - 1) / h + 1)
            m = m + w1 * d1
            if d2 is not None and sde:
                m = m + a_t * ((1 - em * em - 2 * h) / (2 * h) ** 2 - 0.5) * d2
            elif d2 is not None:
                m = m - a_t * ((em - 1 + h) / h**2 - 0.5) * d2
        zero = torch.zeros((), dtype=torch.float64)
        rows.append(torch.stack([1 / alpha[i], sig[i] / alpha[i], m[0], c_xt, zero, noise, m[1], m[2]]))
    return ring_rows(torch.stack(rows), sampler.history_depth, push=PUSH_X0)


@pytest.mark.parametrize("algorithm,solver_type", [("dpmsolver++", "midpoint"), ("dpmsolver++", "heun"),
                                                   ("sde-dpmsolver++", "midpoint"), ("sde-dpmsolver++", "heun")])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps,spacing", [(1, "trailing"), (2, "linspace"), (7, "leading"), (20, "linspace")])
def test_the_traced_solver_has_the_hand_written_rows(algorithm, solver_type, order, steps, spacing):
    """DPM-Solver++ is a trace like every other solver; its compiled rows are the hand-derived ones."""
    schedule = NoiseSchedule.cosine(1000)
    s = DPMSolverSampler(schedule, steps, order=order, algorithm=algorithm, solver_type=solver_type, spacing=spacing)
    ts = dpm_timesteps(1000, steps, spacing)
    want = _hand_written_rows(s, schedule.alphas_cumprod, ts)
    assert s.timesteps.tolist() == ts and s.coefs.dtype == torch.float64
    assert torch.allclose(s.coefs, want, rtol=1e-11, atol=1e-12), (s.coefs - want).abs().max()
