"""The compiled solvers (ddpm_fast.solvers) against their references: diffusers' UniPC, DEIS, PNDM (PLMS) and
Heun schedulers, and for iPNDM a direct float64 implementation and its measured order of convergence.

The plan-level contract (guidance, labels, x_T, the fast path, the graph engine, no host reads) is held for
these solvers with every other one in test_plan.py."""

import math

import numpy as np
import pytest
import torch
from conftest import diffusers_peer
from test_dpm_solver import DIFFUSERS_BETAS, SmoothEps

from ddpm_fast import DEISSampler, HeunSampler, IPNDMSampler, NoiseSchedule, PLMSSampler, UniPCSampler
from ddpm_fast.solvers import Trace, compile_rows

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
LINEAR = dict(beta_start=1e-4, beta_end=0.02)  # ours; HeunDiscreteScheduler's own defaults differ


def _x_T(seed=1):
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def _chain(sch, model, x, scale=False):
    x = x.double()
    for t in sch.timesteps:
        x = sch.step(model(sch.scale_model_input(x, t) if scale else x, t), t, x).prev_sample
    return x


def _float64_sigmas(sch):
    """diffusers keeps its sigmas in fp32; the same algorithm on float64 sigmas is what our float64 tables match."""
    acp = torch.cumprod(1.0 - sch.betas.double(), 0)
    return acp, ((1 - acp) / acp).sqrt()


def _rel(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
def test_unipc_matches_diffusers(schedule, order, solver_type):
    model, x_T = SmoothEps(), _x_T()
    for steps, lower_order_final, spacing in ((6, True, "linspace"), (10, False, "leading"), (17, True, "trailing")):
        sch = diffusers_peer().UniPCMultistepScheduler(
            num_train_timesteps=1000, beta_schedule=DIFFUSERS_BETAS[schedule], solver_order=order,
            solver_type=solver_type, lower_order_final=lower_order_final, final_sigmas_type="sigma_min",
            timestep_spacing=spacing)
        sch.set_timesteps(steps)
        _, sig = _float64_sigmas(sch)
        sch.sigmas = torch.cat([sig[sch.timesteps], sig[:1]])
        ours = UniPCSampler(NoiseSchedule.from_name(schedule, 1000), steps, order=order, solver_type=solver_type,
                            lower_order_final=lower_order_final, final_sigmas_type="sigma_min", spacing=spacing)
        assert ours.timesteps.tolist() == sch.timesteps.tolist()
        got = ours.sample(model, x_T.shape, x_T=x_T, progress=False)
        err = _rel(got, _chain(sch, model, x_T))
        assert err < 1e-4, f"{steps} steps, lower_order_final={lower_order_final}, {spacing}: {err:.2e}"


@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_lands_on_zero_and_stays_finite_where_diffusers_does_not(order):
    """final_sigmas_type='zero': with bh2 equal to diffusers; with bh1 diffusers' last step is NaN (B(h) = -inf
    times 0), ours is its limit, the corrected data prediction (what diffusers holds as its last model output)."""
    model, x_T, sched = SmoothEps(2), _x_T(3), NoiseSchedule.linear(1000)
    for solver_type in ("bh2", "bh1"):
        sch = diffusers_peer().UniPCMultistepScheduler(num_train_timesteps=1000, solver_order=order,
                                                       solver_type=solver_type)
        sch.set_timesteps(8)
        _, sig = _float64_sigmas(sch)
        sch.sigmas = torch.cat([sig[sch.timesteps], sig.new_zeros(1)])
        want = _chain(sch, model, x_T)
        got = UniPCSampler(sched, 8, order=order, solver_type=solver_type).sample(model, x_T.shape, x_T=x_T,
                                                                                  progress=False)
        assert torch.isfinite(got).all()
        if solver_type == "bh1":
            assert torch.isnan(want).all()
            want = sch.model_outputs[-1]
        assert _rel(got, want) < 1e-4, solver_type


def test_unipc_refuses_an_unbounded_last_step():
    sched = NoiseSchedule.linear(1000)
    with pytest.raises(ValueError, match="order-2 last step is unbounded"):
        UniPCSampler(sched, 8, order=2, lower_order_final=False)
    UniPCSampler(sched, 8, order=2, lower_order_final=False, final_sigmas_type="sigma_min")
    UniPCSampler(sched, 8, order=1, lower_order_final=False)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_matches_diffusers(schedule, order):
    model, x_T = SmoothEps(1), _x_T(2)
    for steps, lower_order_final, spacing in ((6, True, "linspace"), (20, True, "leading"), (9, False, "trailing")):
        sch = diffusers_peer().DEISMultistepScheduler(
            num_train_timesteps=1000, beta_schedule=DIFFUSERS_BETAS[schedule], solver_order=order,
            lower_order_final=lower_order_final, timestep_spacing=spacing)
        sch.set_timesteps(steps)
        _, sig = _float64_sigmas(sch)
        sch.sigmas = torch.cat([sig[sch.timesteps], sig[:1]])
        ours = DEISSampler(NoiseSchedule.from_name(schedule, 1000), steps, order=order,
                           lower_order_final=lower_order_final, spacing=spacing)
        assert ours.timesteps.tolist() == sch.timesteps.tolist()
        err = _rel(ours.sample(model, x_T.shape, x_T=x_T, progress=False), _chain(sch, model, x_T))
        assert err < 1e-4, f"{steps} steps, {spacing}: {err:.2e}"


def _only_at_t0(sampler, model, x_T) -> bool:
    """A run whose only evaluation is at t = 0 (diffusers returns the noise it starts from): the plan refuses it."""
    if not bool((sampler.timesteps == 0).all()):
        return False
    with pytest.raises(ValueError, match="only model evaluation is at t = 0"):
        sampler.sample(model, x_T.shape, x_T=x_T, progress=False)
    return True


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_plms_matches_diffusers(schedule, spacing):
    model, x_T = SmoothEps(3), _x_T(4)
    for steps in (1, 2, 3, 4, 5, 12, 50):
        sch = diffusers_peer().PNDMScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_BETAS[schedule],
                                             skip_prk_steps=True, timestep_spacing=spacing)
        sch.set_timesteps(steps)
        sch.alphas_cumprod, _ = _float64_sigmas(sch)
        sch.final_alpha_cumprod = sch.alphas_cumprod[0]
        ours = PLMSSampler(NoiseSchedule.from_name(schedule, 1000), steps, spacing=spacing)
        assert ours.timesteps.tolist() == sch.timesteps.tolist() and ours.num_steps == len(sch.timesteps)
        if _only_at_t0(ours, model, x_T):
            continue
        err = _rel(ours.sample(model, x_T.shape, x_T=x_T, progress=False), _chain(sch, model, x_T))
        assert err < 1e-4, f"{steps} steps: {err:.2e}"


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_heun_matches_diffusers(schedule, spacing):
    """Two plan steps per Heun step (2n - 1 evaluations), the model evaluated at fractional timesteps."""
    model, x_T = SmoothEps(4), _x_T(5)
    for steps in (1, 2, 5, 11):
        extra = LINEAR if schedule == "linear" else {}
        sch = diffusers_peer().HeunDiscreteScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_BETAS[schedule],
                                                     timestep_spacing=spacing, **extra)
        sch.set_timesteps(steps)
        _, sig = _float64_sigmas(sch)
        sch.sigmas = torch.cat([torch.from_numpy(np.interp(sch.timesteps.double().numpy(), np.arange(1000),
                                                           sig.numpy())), sig.new_zeros(1)])
        ours = HeunSampler(NoiseSchedule.from_name(schedule, 1000), steps, spacing=spacing)
        assert ours.num_steps == 2 * steps - 1
        torch.testing.assert_close(ours.timesteps.double(), sch.timesteps.double(), rtol=1e-6, atol=1e-4)
        if spacing == "linspace" and steps > 2:
            assert ours.timesteps.is_floating_point() and (ours.timesteps != ours.timesteps.round()).any()
        if _only_at_t0(ours, model, x_T):
            continue
        want = _chain(sch, model, x_T * (sch.sigmas[0] ** 2 + 1).sqrt(), scale=True)  # diffusers' x is x / alpha
        err = _rel(ours.sample(model, x_T.shape, x_T=x_T, progress=False), want)
        assert err < 1e-4, f"{steps} steps: {err:.2e}"


@pytest.mark.parametrize("schedule,steps", [("cosine", 5), ("cosine", 6), ("linear", 7)])
def test_heun_on_a_class_conditional_unet_matches_an_exact_float64_run(schedule, steps):
    """A random class-conditional U-Net, fractional timesteps, cosine betas (sigma_max ~ 2e4): our float32 run
    against diffusers' HeunDiscreteScheduler run in float64 (its U-Net twin, state and sigmas). Ours keeps the
    state as x_t (of the sample's scale) with float64 step weights and lands ~6e-6 from the exact run. diffusers'
    own float32 run lands ~1.6e-4 from it: its state is x / alpha, ~sigma_max times larger, in float32 (the
    drift a float32-to-float32 comparison shows is that, not ours)."""
    from conftest import randomize_
    from test_unet import _diffusers_twin

    from ddpm_fast import UNet, UNetConfig

    torch.manual_seed(0)
    cfg = UNetConfig.from_name("digits")
    model = randomize_(UNet(cfg).eval())
    twin = _diffusers_twin(model).double()
    x_T = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(steps))
    labels = torch.tensor([0, 7, cfg.num_classes - 1])
    extra = LINEAR if schedule == "linear" else {}
    sch = diffusers_peer().HeunDiscreteScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_BETAS[schedule],
                                                 **extra)
    sch.set_timesteps(steps)
    _, sig = _float64_sigmas(sch)
    sch.sigmas = torch.cat([torch.from_numpy(np.interp(sch.timesteps.double().numpy(), np.arange(1000),
                                                       sig.numpy())), sig.new_zeros(1)])
    ours = HeunSampler(NoiseSchedule.from_name(schedule, 1000), steps)
    assert ours.timesteps.tolist() == sch.timesteps.tolist()  # the same float32 fractional timesteps
    x = x_T.double() * (sch.sigmas[0] ** 2 + 1).sqrt()
    with torch.no_grad():
        for t in sch.timesteps:
            x = sch.step(twin(sch.scale_model_input(x, t), t.double().expand(3), class_labels=labels).sample,
                         t, x).prev_sample
    err = _rel(ours.sample(model, x_T.shape, x_T=x_T, class_labels=labels, progress=False), x)
    assert err < 3e-5, f"{schedule}, {steps} steps: {err:.2e}"


def _ipndm_direct(sigmas, eps_fn, x, order, exact=None, start=0):
    """Variable-step iPNDM written out in float64: x / alpha integrated in VE sigma by Adams-Bashforth, its weights
    from the moment conditions sum_j w_j (s_j - s_0)^q = h^(q+1) / (q+1) (a Vandermonde solve, not the Lagrange
    integrals the sampler uses). With ``exact``, the state after each of the first ``start`` steps is reset to
    the exact x / alpha there: a multistep start from exact history."""
    s, history = x * math.sqrt(1 + sigmas[0] ** 2), []
    for i in range(len(sigmas) - 1):
        alpha = 1 / math.sqrt(1 + sigmas[i] ** 2)
        history.insert(0, eps_fn(s * alpha, i))
        k = min(order, i + 1)
        nodes = np.array(sigmas[i - k + 1:i + 1][::-1]) - sigmas[i]
        h = sigmas[i + 1] - sigmas[i]
        vander = np.vander(nodes, k, increasing=True).T
        w = np.linalg.solve(vander, np.array([h ** (q + 1) / (q + 1) for q in range(k)]))
        s = s + sum(wj * e for wj, e in zip(w, history, strict=False))
        if i < start:
            s = torch.full_like(s, exact(sigmas[i + 1]))
    return s


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_ipndm_matches_a_direct_float64_implementation(order):
    model, x_T, sched = SmoothEps(5), _x_T(6), NoiseSchedule.cosine(1000)
    sampler = IPNDMSampler(sched, 12, order=order)
    acp = sched.alphas_cumprod.double()
    ts = sampler.timesteps.tolist()
    sigmas = [math.sqrt((1 - acp[t]) / acp[t]) for t in ts] + [0.0]
    want = _ipndm_direct(sigmas, lambda x, i: model(x, ts[i]), x_T.double(), order)
    assert _rel(sampler.sample(model, x_T.shape, x_T=x_T, progress=False), want) < 1e-5


class GaussianDataEps(torch.nn.Module):
    """The exact eps of data N(0, s^2): on it the probability-flow ODE has the closed-form solution
    x_sigma(sigma) = x_sigma(sigma_T) sqrt((s^2 + sigma^2) / (s^2 + sigma_T^2)) in VE coordinates."""

    compute_dtype = None
    config = type("C", (), {"num_classes": None})()

    def __init__(self, schedule, s=0.5):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        acp = schedule.alphas_cumprod.double()
        self.sig = ((1 - acp) / acp).sqrt()
        self.s = s

    def forward(self, x, t, class_labels=None):
        sig = self.sig[torch.as_tensor(t).long()].reshape(-1, 1, 1, 1).to(x.dtype)
        x_ve = x * (1 + sig**2).sqrt()
        return x_ve * sig / (self.s**2 + sig**2)


def test_ipndm_converges_at_its_order():
    """Error against the exact ODE solution on Gaussian data, in float64: the observed rate of each order from 64
    to 256 steps on a grid uniform in log sigma (20 -> 0.05), started from exact history (the first order - 1
    steps reset to the solution), as a multistep method's order is measured. Measured rates: 1.00, 1.96, 2.91,
    3.85. With the sampler's own warm-up (lower-order first steps) order 4 reads 3.6 there."""
    s = 0.5
    sig_hi, sig_lo = 20.0, 0.05

    def exact(sig):
        return math.sqrt((s**2 + sig**2) / (s**2 + sig_hi**2))  # x_ve at sig, from x_ve = 1 at sig_hi

    def run(order, n):
        sigmas = list(np.exp(np.linspace(math.log(sig_hi), math.log(sig_lo), n + 1)))
        x0 = torch.ones(1, dtype=torch.float64) / math.sqrt(1 + sig_hi**2)  # VP state of x_ve = 1
        eps = lambda x, i: x * math.sqrt(1 + sigmas[i] ** 2) * sigmas[i] / (s**2 + sigmas[i] ** 2)  # noqa: E731
        return abs(_ipndm_direct(sigmas, eps, x0, order, exact, start=order - 1).item() - exact(sig_lo))

    for order in (1, 2, 3, 4):
        e64, e256 = run(order, 64), run(order, 256)
        rate = math.log(e64 / e256) / math.log(4)
        assert order - 0.2 < rate < order + 0.3, f"order {order}: observed rate {rate:.2f}"


def test_ipndm_sampler_converges_to_the_exact_solution():
    """The sampler itself (fp32 kernels) on Gaussian data: more steps, closer to the exact x_0, and at higher order
    closer still."""
    sched = NoiseSchedule.cosine(1000)
    model = GaussianDataEps(sched)
    x_T = _x_T(7)
    sig_T = model.sig[999].item()
    exact = x_T.double() * math.sqrt(1 + sig_T**2) * model.s / math.sqrt(model.s**2 + sig_T**2)
    errs = {(o, n): _rel(IPNDMSampler(sched, n, order=o).sample(model, x_T.shape, x_T=x_T, progress=False), exact)
            for o in (1, 4) for n in (10, 40)}
    assert errs[(1, 40)] < errs[(1, 10)] and errs[(4, 40)] < errs[(4, 10)]
    assert errs[(4, 40)] < errs[(1, 40)] / 5 and errs[(4, 40)] < 2e-3


def test_compile_rows_needs_a_deep_enough_ring():
    """A solver whose next state needs an output older than its ring is an error at construction."""
    tr = Trace(4, "x0")
    x, outs = tr.start(), []
    for j in range(4):
        m, _ = tr.evaluate(x, 900 - 100 * j, 0.5, math.sqrt(0.75))
        outs.append(m)
        x = 0.9 * x + 0.1 * m + (0.05 * outs[-3] if len(outs) >= 3 else 0)
    tr.finish(x)
    with pytest.raises(ValueError, match="needs a deeper ring"):
        compile_rows(tr, 1)
    rows = compile_rows(tr, 2)
    assert rows.shape[0] == 4


def test_bad_arguments_name_the_problem():
    sched = NoiseSchedule.linear(1000)
    with pytest.raises(ValueError, match=r"order must be one of \(1, 2, 3\)"):
        UniPCSampler(sched, 10, order=4)
    with pytest.raises(ValueError, match="unknown solver_type"):
        UniPCSampler(sched, 10, solver_type="bh3")
    with pytest.raises(ValueError, match="unknown final_sigmas_type"):
        UniPCSampler(sched, 10, final_sigmas_type="one")
    with pytest.raises(ValueError, match=r"order must be one of \(1, 2, 3, 4\)"):
        IPNDMSampler(sched, 10, order=5)
    with pytest.raises(ValueError, match="unknown spacing"):
        DEISSampler(sched, 10, spacing="karras")
    with pytest.raises(ValueError, match=r"num_steps must be an int in \[1, 1000\]"):
        HeunSampler(sched, 0)
    with pytest.raises(ValueError, match=r"num_steps must be an int"):
        PLMSSampler(sched, 1001)
    with pytest.raises(ValueError, match="full training schedule"):
        UniPCSampler(sched.respace(range(0, 1000, 10)), 10)
    with pytest.raises(TypeError, match="multistep solver"):
        HeunSampler(sched, 10).step(torch.zeros(1, 3, 4, 4), 999, torch.zeros(1, 3, 4, 4))
