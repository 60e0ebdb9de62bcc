"""Samplers: DDPM ancestral (Ho et al. 2020), DDIM (Song et al. 2021) and multistep DPM-Solver++ (Lu et al.
2022), with classifier-free guidance.

Each sampler reduces to a float64 coefficient table, one row per kept timestep, in the column
order of ops.COEF_COLUMNS; a step is then ops.reverse_step on that table (the torch reference, Triton, or
the native C++/CUDA kernel, as the ops registry chose). The table is cast to fp32 and moved to a device
once, and the state x_t stays fp32. A run is a SamplingPlan (plan.py; ``sampler.plan``) with its
RunOptions: built once, stepped in place by every loop.
"""

from __future__ import annotations

import torch

from ddpm_fast import ops
from ddpm_fast.ops.reverse_step import NUM_COEFS, PUSH_SLOT, PUSH_X0, SIGMA, SLOT0
from ddpm_fast.plan import INVARIANT_CHUNK, RunOptions, SamplingPlan, model_eps
from ddpm_fast.schedule import SPACINGS, NoiseSchedule

__all__ = ["INVARIANT_CHUNK", "DDIMSampler", "DDPMSampler", "DPMSolverSampler", "RunOptions", "SamplingPlan",
           "model_eps", "to_uint8"]

VARIANCES = ("fixed_small", "fixed_large", "learned_range")


class _Sampler:
    history_depth = 0  # ring slots of earlier model outputs a step reads (multistep solvers: 1 to 3)
    learned_variance = False  # whether a step reads the model's variance value v (learned_range)

    def __init__(self, schedule: NoiseSchedule, coefs: torch.Tensor, clip_denoised: bool, timesteps=None):
        """``coefs``: one row per timestep of ``schedule`` (ascending), or, with ``timesteps`` (one per model
        evaluation, in run order; float where the model is evaluated between training timesteps), one row per
        evaluation in run order (ddpm_fast.solvers)."""
        self.schedule = schedule
        self.clip_denoised = bool(clip_denoised)
        if coefs.shape[1] < NUM_COEFS:  # the columns a solver leaves out (history, log-variance, push) are 0
            coefs = torch.cat([coefs, coefs.new_zeros(coefs.shape[0], NUM_COEFS - coefs.shape[1])], dim=1)
        self.coefs = coefs  # float64 (S, len(COEF_COLUMNS)) on the host
        if timesteps is not None:
            self.timesteps = timesteps
            self._index_of = None
            self._step_rows = torch.arange(len(timesteps), dtype=torch.int64)
        else:
            self.timesteps = schedule.timestep_map.flip(0).clone()  # model timesteps, descending
            lookup = torch.full((int(schedule.timestep_map.max()) + 1,), -1, dtype=torch.int64)
            lookup[schedule.timestep_map] = torch.arange(len(schedule), dtype=torch.int64)
            self._index_of = lookup
            self._step_rows = lookup[self.timesteps]
        self._device_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def split_output(self, model_output: torch.Tensor, channels: int):
        """(eps, v): a learned-sigma model's output (2C channels) is eps then v; v is kept only by a
        learned-variance step (None otherwise). A C-channel output is eps alone."""
        if model_output.shape[1] == 2 * channels:
            eps, var = model_output[:, :channels], model_output[:, channels:]
            return eps, (var if self.learned_variance else None)
        if model_output.shape[1] != channels:
            raise ValueError(f"model output has {model_output.shape[1]} channels; the state has {channels} "
                             f"(eps) or {2 * channels} (eps and v) expected")
        if self.learned_variance:
            raise ValueError(f"{type(self).__name__}(variance='learned_range') needs the model's v: pass its "
                             f"full {2 * channels}-channel output")
        return model_output, None

    def device_tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp32 coefficient table, row of each step in run order) on ``device``, made once per device."""
        device = torch.device(device)
        if device not in self._device_cache:
            self._device_cache[device] = (self.coefs.to(device, torch.float32).contiguous(),
                                          self._step_rows.to(device))
        return self._device_cache[device]

    def index_for(self, t, n: int, device) -> torch.Tensor:
        """Rows of the coefficient table for model timestep(s) t, as an int64 (n,) tensor on device."""
        t = torch.as_tensor(t)
        if t.is_floating_point() or t.dim() > 1 or (t.dim() == 1 and t.shape[0] != n):
            raise ValueError(f"t must be an integer or an integer tensor of shape ({n},), got {tuple(t.shape)}")
        t = t.to(torch.int64).cpu().expand(n)
        bad = (t < 0) | (t >= len(self._index_of))
        if not bad.any():
            bad = self._index_of[t] < 0
        if bad.any():
            raise ValueError(f"timestep {int(t[bad][0])} is not one of this sampler's {self.num_steps} timesteps")
        return self._index_of[t].to(device)

    def step(self, model_output: torch.Tensor, t, x_t: torch.Tensor, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None, model_output_uncond: torch.Tensor | None = None,
             guidance_scale: float = 1.0) -> torch.Tensor:
        """x_{t-1} from x_t and the model output at timestep t (a pure function of its inputs).

        One step outside a plan (diffusers-style stepping; tests compare against diffusers with it): noise
        comes from ``noise`` if given, else from ``generator`` where the step needs it. With
        ``model_output_uncond``, eps = eps_uncond + guidance_scale * (model_output - eps_uncond).
        Whole runs go through ``plan`` (or ``sample``), whose steps draw the run's Philox stream.
        """
        if not torch.is_tensor(x_t) or x_t.dtype != torch.float32 or x_t.dim() != 4:
            desc = f"{tuple(x_t.shape)} {x_t.dtype}" if torch.is_tensor(x_t) else type(x_t).__name__
            raise ValueError(f"x_t must be the float32 (N, C, H, W) sampler state, got {desc}")
        coefs, _ = self.device_tables(x_t.device)
        index = self.index_for(t, x_t.shape[0], x_t.device)
        model_output, var = self.split_output(model_output, x_t.shape[1])
        if model_output_uncond is not None:
            model_output_uncond, _ = self.split_output(model_output_uncond, x_t.shape[1])
        if noise is None and bool((self.coefs[index.cpu(), SIGMA] > 0).any()):
            noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=torch.float32)
            noise = noise.contiguous(memory_format=ops.memory_format(x_t))
        return ops.reverse_step(x_t, model_output, coefs, index, noise, self.clip_denoised, model_output_uncond,
                                guidance_scale, model_var_values=var)

    def plan(self, model, shape, run: RunOptions | None = None, *, device=None, **options) -> SamplingPlan:
        """Everything one run needs, built once (see SamplingPlan); ``plan.run()`` samples. The run's options
        come as a RunOptions, or as its fields by keyword (seed=, class_labels=, ...)."""
        return SamplingPlan(self, model, shape, RunOptions.of(run, **options), device=device)

    @torch.no_grad()
    def sample(self, model, shape, run: RunOptions | None = None, *, progress: bool = True, device=None,
               **options) -> torch.Tensor:
        """Run the whole chain; returns x_0 (fp32, roughly in [-1, 1]), laid out as the path keeps x_t.

        Image k of a run (k = image_index + position in the batch) draws from (seed, k) alone: the same
        x_T and noise whatever the batch size, the process count or the loop (eager, graph engine). With
        ``batch_invariant`` image k is the same bits too (see SamplingPlan). Options as for ``plan``.
        """
        return self.plan(model, shape, run, device=device, **options).run(progress=progress)


class DDPMSampler(_Sampler):
    """Ancestral sampling with sigma_t^2 = posterior variance (fixed_small), beta_t (fixed_large), or learned
    (learned_range, Improved DDPM: log sigma^2 = frac log beta_t + (1 - frac) log beta-tilde_t (clipped), with
    frac = (v + 1) / 2 from the model's second output half, as improved-diffusion computes it).

    Runs on any schedule, full or respaced (NoiseSchedule.respace, or openai_timesteps) for shortened DDPM:
    a respaced schedule's betas and posterior variances are those of the kept steps.
    """

    def __init__(self, schedule: NoiseSchedule, variance: str = "fixed_small", clip_denoised: bool = True):
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}")
        s = schedule
        zeros = torch.zeros_like(s.betas)
        if variance == "learned_range":
            sigma = torch.ones_like(s.betas)  # the mask: the kernel computes sigma per element from v
            log_var = [s.posterior_log_variance_clipped, s.betas.log()]
        else:
            sigma = (s.posterior_variance if variance == "fixed_small" else s.betas).clamp(min=0).sqrt()
            log_var = [zeros, zeros]
        sigma[0] = 0.0  # no noise on the last step
        coefs = torch.stack([s.sqrt_recip_alphas_cumprod, s.sqrt_recipm1_alphas_cumprod, s.posterior_mean_coef1,
                             s.posterior_mean_coef2, zeros, sigma, zeros, zeros, zeros, *log_var], dim=1)
        self.variance = variance
        self.learned_variance = variance == "learned_range"
        super().__init__(schedule, coefs, clip_denoised)


class DDIMSampler(_Sampler):
    """DDIM with eta (0: deterministic; 1: DDPM-like noise) on ``num_steps`` respaced timesteps, or on the
    given ``timesteps`` (e.g. ``openai_timesteps(T, "ddim25")``).

    ``use_clipped_model_output`` (diffusers' name): eps recomputed from the clipped x_0 before the update, as
    openai's ddim_sample does (x_prev = sqrt(abar_prev) x0c + c_eps (a x_t - x0c) / b): still linear in x_t and
    x0c, so the same fused step with other weights. The last step always lands on alpha_bar_prev = 1.
    """

    def __init__(self, schedule: NoiseSchedule, num_steps: int | None = None, eta: float = 0.0,
                 spacing: str = "leading", clip_denoised: bool = True, use_clipped_model_output: bool = False,
                 timesteps=None):
        if spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")
        if not 0.0 <= eta <= 1.0:  # beyond 1 the noise outgrows the posterior (c_eps clamps to 0): not DDIM
            raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta}")
        if (num_steps is None) == (timesteps is None):
            raise ValueError("DDIMSampler: give num_steps or timesteps (one of them)")
        if timesteps is None:
            timesteps = schedule.space_timesteps(num_steps, spacing)
        s = schedule.respace(timesteps)
        acp, acp_prev = s.alphas_cumprod, s.alphas_cumprod_prev
        var = (1 - acp_prev) / (1 - acp) * (1 - acp / acp_prev)
        sigma = eta * var.clamp(min=0).sqrt()
        c_eps = (1 - acp_prev - sigma**2).clamp(min=0).sqrt()
        a, b = s.sqrt_recip_alphas_cumprod, s.sqrt_recipm1_alphas_cumprod
        zeros = torch.zeros_like(acp)
        if use_clipped_model_output:
            coefs = torch.stack([a, b, acp_prev.sqrt() - c_eps / b, c_eps * a / b, zeros, sigma], dim=1)
        else:
            coefs = torch.stack([a, b, acp_prev.sqrt(), zeros, c_eps, sigma], dim=1)
        self.eta, self.spacing = float(eta), spacing
        self.use_clipped_model_output = bool(use_clipped_model_output)
        super().__init__(s, coefs, clip_denoised)


DPM_ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")
DPM_SOLVER_TYPES = ("midpoint", "heun")


def dpm_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "linspace") -> list[int]:
    """Descending model timesteps of a ``num_steps`` DPM-Solver run, as diffusers' DPMSolverMultistepScheduler
    spaces them (its own conventions, not DDIM's: 'leading' divides by num_steps + 1)."""
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")
    big_t = int(num_train_timesteps)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= big_t:
        raise ValueError(f"num_steps must be an int in [1, {big_t}], got {num_steps!r}")
    if spacing == "linspace":
        ts = torch.linspace(0, big_t - 1, num_steps + 1, dtype=torch.float64).round().flip(0)[:-1]
    elif spacing == "leading":
        ts = (torch.arange(0, num_steps + 1, dtype=torch.float64) * (big_t // (num_steps + 1))).flip(0)[:-1]
    else:
        ts = torch.arange(big_t, 0, -big_t / num_steps, dtype=torch.float64).round() - 1
    ts = [int(t) for t in ts]
    if len(set(ts)) != len(ts) or min(ts) < 0:
        raise ValueError(f"{num_steps} steps with spacing {spacing!r} repeat a timestep of a {big_t}-step schedule; "
                         "take fewer steps or another spacing")
    return ts


class DPMSolverSampler(_Sampler):
    """Multistep DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095): data prediction, order 1, 2 or 3;
    ``algorithm="sde-dpmsolver++"`` is its SDE variant (fresh noise each step).

    The same timesteps and updates as diffusers' DPMSolverMultistepScheduler with final_sigmas_type="zero"
    (its default): the first steps warm up at lower order, the last step is first order (it lands on the
    data prediction), and with ``lower_order_final`` runs under 15 steps also take their second-to-last
    step at order <= 2. Every step is one ``ops.reverse_step`` whose table row weighs x_t, this step's data
    prediction and the previous one or two (the plan's ring slots): the update is the one fused
    kernel, and the graph engine captures it like any other step. ``clip_denoised`` clamps each data
    prediction to [-1, 1] (off by default, as in diffusers).
    """

    def __init__(self, schedule: NoiseSchedule, num_steps: int = 20, order: int = 2, algorithm: str = "dpmsolver++",
                 solver_type: str = "midpoint", lower_order_final: bool = True, spacing: str = "linspace",
                 clip_denoised: bool = False):
        if order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
        if algorithm not in DPM_ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {DPM_ALGORITHMS}")
        if solver_type not in DPM_SOLVER_TYPES:
            raise ValueError(f"unknown solver_type {solver_type!r}; choose one of {DPM_SOLVER_TYPES}")
        if not bool(torch.equal(schedule.timestep_map, torch.arange(schedule.num_timesteps))):
            raise ValueError("DPMSolverSampler takes the full training schedule (it picks its own timesteps)")
        ts = dpm_timesteps(schedule.num_timesteps, num_steps, spacing)
        self.order, self.algorithm, self.solver_type = int(order), algorithm, solver_type
        self.lower_order_final, self.spacing = bool(lower_order_final), spacing
        self.step_orders = self._orders(len(ts))
        self.history_depth = max(self.step_orders) - 1
        rows = ring_rows(self._rows(schedule.alphas_cumprod, ts), self.history_depth, push=PUSH_X0)
        # _Sampler keeps rows in ascending timestep order (row j <-> timestep_map[j]): steps run descending.
        super().__init__(schedule.respace(ts), rows.flip(0), clip_denoised)

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

    def _rows(self, alphas_cumprod: torch.Tensor, ts: list[int]) -> torch.Tensor:
        """float64 (n, 8) rows in step order: x0_hat = a x - b eps, then x_next = c_xt x + c_x0 x0_hat + w_1 h1 +
        w_2 h2 + sigma z, where h1, h2 are the data predictions of the previous two steps (lags; see ring_rows)."""
        acp = alphas_cumprod.double()[ts]
        # diffusers' variables: sigma = sqrt((1 - abar) / abar), alpha_t = 1/sqrt(1 + sigma^2) = sqrt(abar),
        # sigma_t = sqrt(1 - abar), lambda = log(alpha_t / sigma_t); the end point has sigma_t = 0.
        alpha = torch.cat([acp.sqrt(), acp.new_ones(1)])
        sig = torch.cat([(1 - acp).sqrt(), acp.new_zeros(1)])
        lam = alpha.log() - sig.log()  # +inf at the end point
        sde = self.algorithm == "sde-dpmsolver++"
        rows = []
        for i, k in enumerate(self.step_orders):
            a_t, s_t, s_0 = alpha[i + 1], sig[i + 1], sig[i]
            h = lam[i + 1] - lam[i]
            em = torch.exp(-h)  # 0 at the end point
            m = torch.zeros(3, dtype=torch.float64)  # weights of (x0_hat, h1, h2)
            if sde:
                c_xt, phi, noise = s_t / s_0 * em, a_t * (1 - em * em), s_t * (1 - em * em).sqrt()
            else:
                c_xt, phi, noise = s_t / s_0, a_t * (1 - em), torch.zeros((), dtype=torch.float64)
            m[0] = phi  # the D0 term
            if k >= 2:
                r0 = (lam[i] - lam[i - 1]) / h
                d1_0 = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64) / r0
                if k == 2:
                    d1, d2 = d1_0, None
                else:
                    r1 = (lam[i - 1] - lam[i - 2]) / h
                    d1_1 = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64) / r1
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
            a0, s0_ = alpha[i], sig[i]
            rows.append(torch.stack([1 / a0, s0_ / a0, m[0], c_xt, torch.zeros((), dtype=torch.float64),
                                     noise, m[1], m[2]]))
        return torch.stack(rows)

    def step(self, *args, **kwargs):
        raise TypeError("DPMSolverSampler is a multistep solver: a step needs the previous steps' data predictions; "
                        "run it through plan() / sample()")


def ring_rows(rows: torch.Tensor, depth: int, push: int, kept=None) -> torch.Tensor:
    """Rows in step order whose columns 6.. weigh earlier kept outputs by lag (6: the newest kept before this
    step, 7: the one before, ...) -> rows of the full table, whose coef_slot columns weigh ring slots. Each kept
    output (``kept[i]``, default every step; ``push``: the PUSH_X0 or PUSH_EPS column) goes into the next slot
    in turn, i.e. the oldest one. Lags beyond ``depth`` must weigh 0 (the ring holds ``depth`` outputs). The one
    place that lays out the ring: DPM-Solver++'s rows and every compiled solver's (solvers.compile_rows)."""
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


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] NCHW floats -> uint8 NHWC images (the layout image and FID tools read)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
