"""The open solver set: DPM-Solver++, UniPC, DEIS, PLMS, iPNDM and Heun, each compiled into rows of the one fused
step.

A solver is written once, as its own update, on symbols: ``Trace`` hands it float64 vectors that stand for
x_T and for each model evaluation's output (in the solver's form, x0 or eps), and every quantity the
solver computes is a linear combination of them. ``compile_rows`` then writes one table row per model
evaluation: the next model input as a combination of what the fused step has at hand (x_t, this
evaluation's output and the ring slots of earlier outputs; ops.reverse_step). Earlier states a solver
keeps (UniPC's state before the corrector, Heun's state before its Euler stage) need no buffer of their
own: they are combinations of x_t and earlier outputs, which the solve finds. A step the ring cannot
express is an error at construction, not a wrong sample.

So adding a solver is one class and its test: a CompiledSampler subclass that traces its update and declares
its CLI name, default steps, orders and spacing (samplers.Sampler); the sample command, the kernels (torch
reference, Triton, C++, CUDA), the plan, the graph engine, guidance and the fast path are the ones every
sampler uses.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ddpm_fast.ops.reverse_step import COEF_COLUMNS, MAX_HISTORY, NUM_COEFS, PUSH_EPS, PUSH_SLOT, PUSH_X0, SLOT0
from ddpm_fast.samplers import SAMPLERS, Sampler
from ddpm_fast.schedule import SPACINGS, NoiseSchedule, dpm_timesteps, heun_timesteps, plms_timesteps

__all__ = ["SAMPLERS", "CompiledSampler", "DEISSampler", "DPMSolverSampler", "DPMSolverSDESampler", "HeunSampler",
           "IPNDMSampler", "PLMSSampler", "Trace", "UniPCSampler", "compile_rows", "ring_rows"]

FORMS = ("x0", "eps")
COL = {name: i for i, name in enumerate(COEF_COLUMNS)}


class Trace:
    """A solver run on symbols. Vectors have one entry per symbol: x_T, then each evaluation's output, then (a
    ``noisy`` trace: SDE solvers) the fresh noise each step draws after its evaluation."""

    def __init__(self, evals: int, form: str, noisy: bool = False):
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        self.form, self.evals, self.noisy = form, int(evals), bool(noisy)
        self.inputs: list[np.ndarray] = []  # the model input of evaluation j
        self.scales: list[tuple[float, float]] = []  # its (alpha, sigma): x_t = alpha x0 + sigma eps
        self.timesteps: list[float] = []  # the model timestep of evaluation j
        self.kept: list[bool] = []  # whether its output is kept for later evaluations
        self.final: np.ndarray | None = None

    def symbol(self, k: int) -> np.ndarray:
        v = np.zeros(1 + self.evals * (2 if self.noisy else 1))
        v[k] = 1.0
        return v

    def noise(self) -> np.ndarray:
        """The N(0, I) noise of the step after the latest evaluation (the fused step's sigma column weighs it)."""
        if not self.noisy or not self.inputs:
            raise RuntimeError("noise() needs a Trace(noisy=True) and an evaluation before it")
        return self.symbol(self.evals + len(self.inputs))

    def start(self) -> np.ndarray:
        """x_T, the first model input."""
        return self.symbol(0)

    def evaluate(self, x: np.ndarray, t: float, alpha: float, sigma: float, keep: bool = True):
        """The model at input x, timestep t, where x = alpha x0 + sigma eps: returns (x0, eps), one of them the
        new output symbol (the solver's form) and the other derived from it."""
        j = len(self.inputs)
        if j >= self.evals:
            raise RuntimeError(f"the solver evaluated the model more than the {self.evals} times it declared")
        self.inputs.append(np.asarray(x, dtype=np.float64))
        self.scales.append((float(alpha), float(sigma)))
        self.timesteps.append(float(t))
        self.kept.append(bool(keep))
        out = self.symbol(j + 1)
        if self.form == "x0":
            return out, (x - alpha * out) / sigma
        return (x - sigma * out) / alpha, out

    def finish(self, x: np.ndarray) -> None:
        """The run's result (what the last step writes)."""
        self.final = np.asarray(x, dtype=np.float64)


def ring_rows(rows: torch.Tensor, depth: int, push: int, kept=None) -> torch.Tensor:
    """Rows in step order whose columns 6.. weigh earlier kept outputs by lag (6: the newest kept before this
    step, 7: the one before, ...) -> rows of the full table, whose coef_slot columns weigh ring slots. Each kept
    output (``kept[i]``, default every step; ``push``: the PUSH_X0 or PUSH_EPS column) goes into the next slot
    in turn, i.e. the oldest one. Lags beyond ``depth`` must weigh 0 (the ring holds ``depth`` outputs). The one
    place that lays out the ring."""
    n = rows.shape[0]
    kept = [True] * n if kept is None else list(kept)
    lags = rows[:, SLOT0:]
    if lags.shape[1] > depth and bool((lags[:, depth:] != 0).any()):
        raise ValueError(f"a row weighs an output older than the ring's {depth} slots")
    out = torch.zeros(n, NUM_COEFS, dtype=rows.dtype)
    out[:, :SLOT0] = rows[:, :SLOT0]
    slots: list[int] = []  # the slot of each output kept so far, oldest first
    for i in range(n):
        for lag in range(1, min(depth, lags.shape[1]) + 1):
            if lag <= len(slots):
                out[i, SLOT0 + slots[-lag]] += lags[i, lag - 1]
            elif lags[i, lag - 1] != 0:
                raise ValueError(f"step {i} weighs the output kept {lag} back, but only {len(slots)} are kept")
        if depth and kept[i]:
            slot = len(slots) % depth
            out[i, push] = 1.0
            out[i, PUSH_SLOT] = slot + 1
            slots.append(slot)
    return out


def compile_rows(trace: Trace, depth: int) -> torch.Tensor:
    """One float64 row of ops.COEF_COLUMNS per evaluation: the next input (or the result) as c_xt x_t +
    c_out out_j + sum_k coef_slot_k H_k (+ sigma z_j, a noisy trace), with out_j pushed into the oldest of
    ``depth`` ring slots when kept (ring_rows lays out the ring)."""
    n = len(trace.inputs)
    if n != trace.evals or trace.final is None:
        raise RuntimeError(f"the solver made {n} of its {trace.evals} evaluations or did not finish")
    if not 0 <= depth <= MAX_HISTORY:
        raise ValueError(f"a step reads at most {MAX_HISTORY} earlier outputs, the solver asks for {depth}")
    out_col = COL["coef_x0"] if trace.form == "x0" else COL["coef_eps"]
    rows = torch.zeros(n, SLOT0 + MAX_HISTORY, dtype=torch.float64)  # earlier outputs weighed by lag
    for j in range(n):
        x, target = trace.inputs[j], trace.inputs[j + 1] if j + 1 < n else trace.final
        held = [k for k in range(j) if trace.kept[k]][::-1][:depth]  # what the ring holds, newest first
        noise = [trace.symbol(trace.evals + j + 1)] if trace.noisy else []
        basis = np.stack([x, trace.symbol(j + 1)] + [trace.symbol(k + 1) for k in held] + noise, axis=1)
        coef, *_ = np.linalg.lstsq(basis, target, rcond=None)
        miss = np.abs(basis @ coef - target).max()
        if not miss <= 1e-9 * max(1.0, np.abs(target).max()):
            raise ValueError(f"evaluation {j}: the solver's next state is not a combination of x_t, this output and "
                             f"the {depth} kept earlier outputs (off by {miss:.2e}); it needs a deeper ring")
        alpha, sigma = trace.scales[j]
        rows[j, COL["sqrt_recip_alphas_cumprod"]] = 1.0 / alpha
        rows[j, COL["sqrt_recipm1_alphas_cumprod"]] = sigma / alpha
        rows[j, COL["coef_xt"]] = coef[0]
        rows[j, out_col] = coef[1]
        rows[j, SLOT0:SLOT0 + len(held)] = torch.from_numpy(coef[2:2 + len(held)])
        if trace.noisy:
            rows[j, COL["sigma"]] = coef[-1]
    return ring_rows(rows, depth, PUSH_X0 if trace.form == "x0" else PUSH_EPS, trace.kept)


class CompiledSampler(Sampler):
    """A solver whose table has one row per model evaluation, in run order (see the module docstring): a
    subclass traces its run in __init__ and calls ``_compile``."""

    form = "x0"
    # The fewest steps within RMS 32 of 255 (1/8 of the range) of DDIM-200 on the embedded model: one or two
    # evaluations of an unclipped solver land far off (UniPC at 1, 2, 3 steps: RMS 78, 40, 20; 69%, 30%, 7% of
    # pixels saturated).
    min_steps = 3

    def _compile(self, schedule: NoiseSchedule, trace: Trace, depth: int, clip_denoised: bool) -> None:
        if not bool(torch.equal(schedule.timestep_map, torch.arange(schedule.num_timesteps))):
            raise ValueError(f"{type(self).__name__} takes the full training schedule (it picks its own timesteps)")
        self.history_depth = depth
        rows = compile_rows(trace, depth)
        ts = torch.tensor(trace.timesteps, dtype=torch.float64)
        whole = bool((ts == ts.round()).all())
        super().__init__(schedule, rows, clip_denoised, timesteps=ts.long() if whole else ts.float())

    def step(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is a multistep solver: a step needs the earlier outputs; run it "
                        "through plan() / sample()")


def _ve_sigmas(schedule: NoiseSchedule) -> np.ndarray:
    """sigma = sqrt((1 - abar) / abar) at each training timestep (float64): x_t / alpha = x0 + sigma eps."""
    acp = schedule.alphas_cumprod.double().numpy()
    return np.sqrt((1 - acp) / acp)


def _vp(sig: float) -> tuple[float, float]:
    """(alpha, sigma) of the VP state at VE sigma ``sig``."""
    alpha = 1.0 / math.sqrt(sig * sig + 1.0)
    return alpha, sig * alpha


def _lam(sig: float) -> float:
    """log(alpha / sigma) = -log(sig); +inf at sig = 0."""
    return math.inf if sig == 0 else -math.log(sig)


def _check(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {tuple(choices)}")


def _check_order(order, orders) -> int:
    if isinstance(order, bool) or order not in orders:
        raise ValueError(f"order must be one of {tuple(orders)}, got {order!r}")
    return int(order)


DPM_ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")
DPM_SOLVER_TYPES = ("midpoint", "heun")


class DPMSolverSampler(CompiledSampler):
    """Multistep DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095): data prediction, order 1, 2 or 3;
    ``algorithm="sde-dpmsolver++"`` is its SDE variant (fresh noise each step).

    The same timesteps and updates as diffusers' DPMSolverMultistepScheduler with final_sigmas_type="zero"
    (its default): the first steps warm up at lower order, the last step is first order (it lands on the
    data prediction), and with ``lower_order_final`` runs under 15 steps also take their second-to-last
    step at order <= 2. ``clip_denoised`` clamps each data prediction to [-1, 1] (off by default, as in
    diffusers).
    """

    cli_name = "dpm++"
    cli_help = "multistep DPM-Solver++ (ODE)"
    default_steps = 20
    orders = (1, 2, 3)
    default_order = 2

    def __init__(self, schedule: NoiseSchedule, num_steps: int = 20, order: int = 2, algorithm: str = "dpmsolver++",
                 solver_type: str = "midpoint", lower_order_final: bool = True, spacing: str = "linspace",
                 clip_denoised: bool = False):
        if isinstance(order, bool) or order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
        self.order = int(order)
        _check("algorithm", algorithm, DPM_ALGORITHMS)
        _check("solver_type", solver_type, DPM_SOLVER_TYPES)
        if not bool(torch.equal(schedule.timestep_map, torch.arange(schedule.num_timesteps))):
            raise ValueError("DPMSolverSampler takes the full training schedule (it picks its own timesteps)")
        ts = dpm_timesteps(schedule.num_timesteps, num_steps, spacing)
        self.algorithm, self.solver_type = algorithm, solver_type
        self.lower_order_final, self.spacing = bool(lower_order_final), spacing
        self.step_orders = self._orders(len(ts))
        acp = schedule.alphas_cumprod.double()[ts]
        # diffusers' variables: sigma = sqrt((1 - abar) / abar), alpha_t = 1/sqrt(1 + sigma^2) = sqrt(abar),
        # sigma_t = sqrt(1 - abar), lambda = log(alpha_t / sigma_t); the end point has sigma_t = 0.
        alpha = torch.cat([acp.sqrt(), acp.new_ones(1)])
        sig = torch.cat([(1 - acp).sqrt(), acp.new_zeros(1)])
        lam = (alpha.log() - sig.log()).tolist()  # +inf at the end point
        alpha, sig = alpha.tolist(), sig.tolist()
        sde = algorithm == "sde-dpmsolver++"
        tr = Trace(len(ts), "x0", noisy=sde)
        x, outs = tr.start(), []
        for i, k in enumerate(self.step_orders):
            m, _ = tr.evaluate(x, ts[i], alpha[i], sig[i])
            outs.append(m)
            c_xt, weights, noise = self._update(alpha, sig, lam, i, k, sde)
            x = c_xt * x + sum((w * outs[-(j + 1)] for j, w in enumerate(weights) if w), np.zeros_like(x))
            if sde:
                x = x + noise * tr.noise()
        tr.finish(x)
        self._compile(schedule, tr, max(self.step_orders) - 1, clip_denoised)

    def _orders(self, n: int) -> list[int]:
        """Each step's order, as diffusers chooses it (warm-up, lower_order_final, final_sigmas_type='zero')."""
        orders = []
        for i in range(n):
            final = i == n - 1  # the last step lands on sigma = 0: always first order
            second = i == n - 2 and self.lower_order_final and n < 15
            if self.order == 1 or i < 1 or final:
                orders.append(1)
            elif self.order == 2 or i < 2 or second:
                orders.append(2)
            else:
                orders.append(3)
        return orders

    def _update(self, alpha, sig, lam, i: int, k: int, sde: bool):
        """(weight of x_t, weights of this step's data prediction and the previous one or two, noise scale) of
        step i at order k: diffusers' multistep_dpm_solver_{first,second,third}_order_update."""
        a_t, s_t, s_0 = alpha[i + 1], sig[i + 1], sig[i]
        h = lam[i + 1] - lam[i]
        em = math.exp(-h)  # 0 at the end point
        if sde:
            c_xt, phi, noise = s_t / s_0 * em, a_t * (1 - em * em), s_t * math.sqrt(1 - em * em)
        else:
            c_xt, phi, noise = s_t / s_0, a_t * (1 - em), 0.0
        m = np.array([phi, 0.0, 0.0])  # the D0 term
        if k >= 2:
            r0 = (lam[i] - lam[i - 1]) / h
            d1_0 = np.array([1.0, -1.0, 0.0]) / r0
            d2 = None
            if k == 2:
                d1 = d1_0
            else:
                r1 = (lam[i - 1] - lam[i - 2]) / h
                d1_1 = np.array([0.0, 1.0, -1.0]) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
            if k == 2 and self.solver_type == "midpoint":
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
        return c_xt, m.tolist(), noise


class DPMSolverSDESampler(DPMSolverSampler):
    """DPM-Solver++'s SDE variant under its own CLI name: DPMSolverSampler(algorithm="sde-dpmsolver++")."""

    cli_name = "dpm++sde"
    cli_help = "its SDE variant"

    def __init__(self, schedule: NoiseSchedule, num_steps: int = 20, order: int = 2, **kwargs):
        super().__init__(schedule, num_steps, order, algorithm="sde-dpmsolver++", **kwargs)


class UniPCSampler(CompiledSampler):
    """UniPC (Zhao et al. 2023, arXiv 2302.04867): the unified predictor-corrector, data prediction, B(h) as
    ``solver_type`` bh1 or bh2, orders 1 to 3, the corrector after every evaluation but the first.

    The same timesteps and updates as diffusers' UniPCMultistepScheduler (predict_x0): warm-up at lower order,
    ``lower_order_final`` caps the order by the steps left. ``final_sigmas_type`` 'zero' lands on the data
    prediction; 'sigma_min' on the first training timestep's noise level. With bh1, 'zero' and an order-2 last
    step, B(h) is infinite at the last step (diffusers returns NaN there): that setting is refused; with
    lower_order_final (the default) the last step is first order and its limit, the data prediction, is taken.
    """

    cli_name = "unipc"
    cli_help = "UniPC (bh2)"
    orders = (1, 2, 3)
    default_order = 2

    def __init__(self, schedule: NoiseSchedule, num_steps: int = 10, order: int = 2, solver_type: str = "bh2",
                 lower_order_final: bool = True, final_sigmas_type: str = "zero", spacing: str = "linspace",
                 clip_denoised: bool = False):
        self.order = _check_order(order, (1, 2, 3))
        _check("solver_type", solver_type, ("bh1", "bh2"))
        _check("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        _check("spacing", spacing, SPACINGS)
        self.solver_type, self.lower_order_final = solver_type, bool(lower_order_final)
        self.final_sigmas_type, self.spacing = final_sigmas_type, spacing
        ts = dpm_timesteps(schedule.num_timesteps, num_steps, spacing)
        ve = _ve_sigmas(schedule)
        self.sigmas = [float(ve[t]) for t in ts] + [0.0 if final_sigmas_type == "zero" else float(ve[0])]
        trace = Trace(len(ts), "x0")
        self._trace(trace, ts)
        self._compile(schedule, trace, self.order, clip_denoised)

    def _coefficients(self, i_from: int, i_to: int, lags: list[int]):
        """(x coefficient, m0 coefficient, weights of the D1 terms and of the new difference) of one UniPC update
        from sigmas[i_from] to sigmas[i_to] whose earlier outputs sit at the indices ``lags`` (as B(h) rho)."""
        sig = self.sigmas
        a_t, s_t = _vp(sig[i_to])
        a_0, s_0 = _vp(sig[i_from])
        h = _lam(sig[i_to]) - _lam(sig[i_from])
        hh = -h
        h_phi_1 = math.expm1(hh)
        rks = [(_lam(sig[k]) - _lam(sig[i_from])) / h for k in lags] + [1.0]
        order = len(rks)
        b_h = hh if self.solver_type == "bh1" else math.expm1(hh)
        # g[q] = B(h) b[q] = h_phi_{q+1} (q+1)!: finite even where B(h) is not (bh1 at sigma = 0)
        g, h_phi_k, fact = [], h_phi_1 / hh - 1.0, 1
        for q in range(1, order + 1):
            g.append(h_phi_k * fact)
            fact *= q + 1
            h_phi_k = h_phi_k / hh - 1.0 / fact
        return s_t / s_0 if s_t else 0.0, -a_t * h_phi_1, a_t, b_h, np.array(rks), np.array(g)

    def _trace(self, tr: Trace, ts: list[int]) -> None:
        n, order = len(ts), self.order
        x, outs, last, this_order, warm = tr.start(), [], None, 1, 0
        for i in range(n):
            m, _ = tr.evaluate(x, ts[i], *_vp(self.sigmas[i]))
            if i > 0:  # the corrector: x from the state before the last predictor and this output
                k = this_order
                c_x, c_m0, a_t, b_h, rks, g = self._coefficients(i - 1, i, [i - 1 - j for j in range(1, k)])
                m0 = outs[-1]
                d1s = [(outs[-(j + 1)] - m0) / rks[j - 1] for j in range(1, k)]
                rr = np.vander(rks, k, increasing=True).T  # R[q, j] = rks[j] ** q
                rhos = np.array([0.5]) if k == 1 else np.linalg.solve(rr, g / b_h)
                res = sum((r * d for r, d in zip(rhos[:-1], d1s, strict=True)), np.zeros_like(x))
                x = c_x * last + c_m0 * m0 - a_t * b_h * (res + rhos[-1] * (m - m0))
            outs.append(m)
            k = min(order, n - i) if self.lower_order_final else order
            this_order = min(k, warm + 1)
            last = x
            x = self._predict(x, outs, i, this_order)
            warm = min(warm + 1, order)
        tr.finish(x)

    def _predict(self, x, outs, i, k):
        c_x, c_m0, a_t, b_h, rks, g = self._coefficients(i, i + 1, [i - j for j in range(1, k)])
        m0 = outs[-1]
        x_new = c_x * x + c_m0 * m0
        if k == 1:
            return x_new
        if self.sigmas[i + 1] == 0:
            raise ValueError(f"UniPC with final_sigmas_type='zero' and an order-{k} last step is unbounded (its "
                             "differences divide by lambda = inf at sigma = 0); use lower_order_final or 'sigma_min'")
        d1s = [(outs[-(j + 1)] - m0) / rks[j - 1] for j in range(1, k)]
        if k == 2:
            b_rho = b_h * np.array([0.5])
        else:
            rr = np.vander(rks, k, increasing=True).T
            b_rho = np.linalg.solve(rr[:-1, :-1], g[:-1])  # B(h) rho_p, finite at sigma = 0
        return x_new - a_t * sum((r * d for r, d in zip(b_rho, d1s, strict=True)), np.zeros_like(x))


class DEISSampler(CompiledSampler):
    """DEIS (Zhang & Chen 2023, arXiv 2204.13902), log-rho multistep, orders 1 to 3, on eps: the same timesteps and
    updates as diffusers' DEISMultistepScheduler (algorithm_type 'deis'; the last step lands on the first training
    timestep's noise level, as diffusers does; lower_order_final under 15 steps)."""

    form = "eps"
    cli_name = "deis"
    cli_help = "DEIS log-rho"
    orders = (1, 2, 3)
    default_order = 2

    def __init__(self, schedule: NoiseSchedule, num_steps: int = 10, order: int = 2, lower_order_final: bool = True,
                 spacing: str = "linspace"):
        self.order = _check_order(order, (1, 2, 3))
        _check("spacing", spacing, SPACINGS)
        self.lower_order_final, self.spacing = bool(lower_order_final), spacing
        ts = dpm_timesteps(schedule.num_timesteps, num_steps, spacing)
        ve = _ve_sigmas(schedule)
        sig = [float(ve[t]) for t in ts] + [float(ve[0])]
        n = len(ts)
        small = self.lower_order_final and n < 15
        tr = Trace(n, "eps")
        x, outs = tr.start(), []
        for i in range(n):
            _, e = tr.evaluate(x, ts[i], *_vp(sig[i]))
            outs.append(e)
            if self.order == 1 or i < 1 or (small and i == n - 1):
                k = 1
            elif self.order == 2 or i < 2 or (small and i == n - 2):
                k = 2
            else:
                k = 3
            x = self._update(x, outs, sig, i, k)
        tr.finish(x)
        self._compile(schedule, tr, self.order - 1, False)

    @staticmethod
    def _update(x, outs, sig, i, k):
        a_t, s_t = _vp(sig[i + 1])
        a_0, s_0 = _vp(sig[i])
        if k == 1:
            h = _lam(sig[i + 1]) - _lam(sig[i])
            return (a_t / a_0) * x - s_t * math.expm1(h) * outs[-1]
        # rho = sigma / alpha is the VE sigma itself; the weights integrate the Lagrange basis in log rho.
        lr = [math.log(sig[i + 1])] + [math.log(sig[i - j]) for j in range(k)]
        rho_t = sig[i + 1]

        def integral(t_log, nodes):
            """int_{-inf}^{t} L(rho) drho up to a constant, for the Lagrange basis over log-rho ``nodes`` (the
            first one is the basis point); closed forms for 2 and 3 nodes."""
            t = math.exp(t_log)
            if len(nodes) == 2:
                b, c = nodes
                return t * (-c + t_log - 1) / (b - c)
            b, c, d = nodes
            num = t * (c * (d - t_log + 1) - d * t_log + d + t_log**2 - 2 * t_log + 2)
            return num / ((b - c) * (b - d))

        nodes = lr[1:]
        total = x / a_0
        for j in range(k):
            order_nodes = [nodes[j]] + [nodes[q] for q in range(k) if q != j]
            w = integral(math.log(rho_t), order_nodes) - integral(nodes[0], order_nodes)
            total = total + w * outs[-(j + 1)]
        return a_t * total


class PLMSSampler(CompiledSampler):
    """PLMS (pseudo linear multistep, Liu et al. 2022, arXiv 2202.09778): fourth-order Adams-Bashforth on eps with
    the DDIM transfer, warmed up as diffusers' PNDMScheduler(skip_prk_steps=True) does (its second evaluation
    averages the first two outputs). ``num_steps`` steps make num_steps + 1 model evaluations; the last lands on
    the first training timestep's noise level (set_alpha_to_one=False), as diffusers'."""

    form = "eps"
    cli_name = "plms"
    cli_help = "PNDM's PLMS (steps + 1 model calls)"
    default_steps = 20
    default_spacing = "leading"

    def __init__(self, schedule: NoiseSchedule, num_steps: int = 50, spacing: str = "leading"):
        self.spacing = spacing
        ts = plms_timesteps(schedule.num_timesteps, num_steps, spacing)
        acp = schedule.alphas_cumprod.double().numpy()
        ratio = schedule.num_timesteps // num_steps
        tr = Trace(len(ts), "eps")
        x, ets, cur = tr.start(), [], None
        for c, t in enumerate(ts):
            _, e = tr.evaluate(x, t, math.sqrt(acp[t]), math.sqrt(1 - acp[t]), keep=c != 1)
            prev, at = t - ratio, t
            if c == 1:
                prev, at = t, t + ratio
            else:
                ets = ets[-3:] + [e]
            if len(ets) == 1 and c == 0:
                out, cur = e, x
            elif len(ets) == 1 and c == 1:
                out, x = (e + ets[-1]) / 2, cur
            elif len(ets) == 2:
                out = (3 * ets[-1] - ets[-2]) / 2
            elif len(ets) == 3:
                out = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
            else:
                out = (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24
            a_t = acp[at]
            a_p = acp[prev] if prev >= 0 else acp[0]
            denom = a_t * math.sqrt(1 - a_p) + math.sqrt(a_t * (1 - a_t) * a_p)
            x = math.sqrt(a_p / a_t) * x - (a_p - a_t) * out / denom
        tr.finish(x)
        self._compile(schedule, tr, min(3, len(ts) - 1), False)


class HeunSampler(CompiledSampler):
    """Heun's second-order method on the probability-flow ODE in sigma space (Karras et al. 2022, no churn): each
    step an Euler stage and a trapezoidal correction, so 2 num_steps - 1 model evaluations (the last step is Euler
    alone, landing on sigma = 0). The same timesteps (fractional ones included: the model is evaluated between
    training timesteps) and updates as diffusers' HeunDiscreteScheduler. The two stages are two rows of the same
    table: the correction reads the Euler stage's output from the ring."""

    form = "eps"
    cli_name = "heun"
    cli_help = "Heun (2 steps - 1 model calls)"
    min_steps = 6  # the embedded model: 2 and 3 steps blow up, 4 and 5 land at RMS 158 and 53 of 255

    def __init__(self, schedule: NoiseSchedule, num_steps: int = 10, spacing: str = "linspace"):
        self.spacing = spacing
        base = heun_timesteps(schedule.num_timesteps, num_steps, spacing)
        ve = _ve_sigmas(schedule)
        sig = np.interp(base, np.arange(len(ve)), ve).tolist() + [0.0]
        n = len(base)
        tr = Trace(2 * n - 1, "eps")
        s = tr.start() / _vp(sig[0])[0]  # the state in sigma space: x / alpha
        saved, d_prev, dt = s, s, 0.0  # the Euler stage's start, slope and step (set by each first stage)
        for k in range(n):
            if k > 0:  # the correction at sigma_k of the step from sigma_{k-1}
                alpha, sigma_vp = _vp(sig[k])
                _, e = tr.evaluate(s * alpha, base[k], alpha, sigma_vp, keep=False)
                s = saved + (d_prev + e) / 2 * dt
            alpha, sigma_vp = _vp(sig[k])
            _, e = tr.evaluate(s * alpha, base[k], alpha, sigma_vp)
            d_prev, dt, saved = e, sig[k + 1] - sig[k], s
            s = s + e * dt
        tr.finish(s)
        self._compile(schedule, tr, 1, False)


class IPNDMSampler(CompiledSampler):
    """Variable-step iPNDM (Zhang & Chen 2023; the improved PNDM of DEIS): Adams-Bashforth on the probability-flow
    ODE d(x / alpha) / d sigma = eps in VE sigma, of order min(order, step + 1), its weights the integrals of the
    Lagrange basis through the last ``order`` sigmas over the step (so they follow an uneven grid). Timesteps as
    DPM-Solver's (``spacing``); the last step lands on sigma = 0. No diffusers twin: tests hold it to a direct
    float64 implementation and measure its order of convergence."""

    form = "eps"
    cli_name = "ipndm"
    cli_help = "variable-step iPNDM"
    orders = (1, 2, 3, 4)
    default_order = 4

    def __init__(self, schedule: NoiseSchedule, num_steps: int = 10, order: int = 4, spacing: str = "linspace"):
        self.order = _check_order(order, (1, 2, 3, 4))
        _check("spacing", spacing, SPACINGS)
        self.spacing = spacing
        ts = dpm_timesteps(schedule.num_timesteps, num_steps, spacing)
        ve = _ve_sigmas(schedule)
        sig = [float(ve[t]) for t in ts] + [0.0]
        n = len(ts)
        tr = Trace(n, "eps")
        s = tr.start() / _vp(sig[0])[0]
        outs = []
        for i in range(n):
            alpha, sigma_vp = _vp(sig[i])
            _, e = tr.evaluate(s * alpha, ts[i], alpha, sigma_vp)
            outs.append(e)
            w = ab_weights(sig[i - min(self.order, i + 1) + 1:i + 1][::-1], sig[i + 1])
            s = s + sum((wj * outs[-(j + 1)] for j, wj in enumerate(w)), np.zeros_like(s))
        tr.finish(s)
        self._compile(schedule, tr, min(self.order, n) - 1, False)


def ab_weights(nodes, to: float) -> list[float]:
    """Adams-Bashforth weights over [nodes[0], to]: w_j = int L_j, the Lagrange basis of ``nodes`` (newest
    first), integrated on the unit interval in u = (s - nodes[0]) / (to - nodes[0]) and scaled by the step."""
    h = to - nodes[0]
    u = [(s - nodes[0]) / h for s in nodes]
    weights = []
    for j, uj in enumerate(u):
        poly = np.poly1d([1.0])
        for q, uq in enumerate(u):
            if q != j:
                poly = poly * np.poly1d([1.0, -uq]) / (uj - uq)
        antiderivative = poly.integ()
        weights.append(h * (antiderivative(1.0) - antiderivative(0.0)))
    return weights
