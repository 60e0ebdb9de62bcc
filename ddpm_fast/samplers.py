"""Samplers: the Sampler base and its registry, DDPM ancestral (Ho et al. 2020) and DDIM (Song et al. 2021),
with classifier-free guidance. The multistep solvers (DPM-Solver++, UniPC, ...) are in solvers.py.

Each sampler reduces to a float64 coefficient table, one row per kept timestep, in the column
order of ops.COEF_COLUMNS; a step is then ops.reverse_step on that table (the torch reference, Triton, or
the native C++/CUDA kernel, as the ops registry chose). The table is cast to fp32 and moved to a device
once, and the state x_t stays fp32. A run is a SamplingPlan (plan.py; ``sampler.plan``) with its
RunOptions: built once, stepped in place by every loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddpm_fast import ops
from ddpm_fast.ops.reverse_step import COEF_COLUMNS, LOG_VAR_MIN, NUM_COEFS, PUSH_EPS, SIGMA
from ddpm_fast.plan import INVARIANT_CHUNK, RunOptions, SamplingPlan, model_eps
from ddpm_fast.schedule import SPACINGS, NoiseSchedule

__all__ = ["INVARIANT_CHUNK", "SAMPLERS", "DDIMSampler", "DDPMSampler", "RunOptions", "Sampler", "SamplerRequest",
           "SamplingPlan", "model_eps", "reparameterize", "to_uint8"]

VARIANCES = ("fixed_small", "fixed_large", "learned_range")
# CLI name -> sampler class, filled by every class that declares a ``cli_name`` (see Sampler): the sample
# command builds --sampler, --order, the defaults and the help from it, so a new solver is its class alone.
SAMPLERS: dict[str, type[Sampler]] = {}


_COL = {name: i for i, name in enumerate(COEF_COLUMNS)}


def reparameterize(coefs: torch.Tensor, prediction_type: str, who: str = "this sampler") -> torch.Tensor:
    """An eps-form coefficient table (float64) rewritten for a model that outputs ``prediction_type``.

    Each row reads the output o as eps: x0 = a x - b o with a = 1/alpha, b = sigma/alpha at the row's timestep,
    and the update weighs x0 (clipped where the step clips), x and o. With o = v (x0 = alpha x - sigma v,
    eps = sigma x + alpha v) or o = x0 (eps = (x - alpha x0) / sigma), x0 and eps are again linear in (x, o), so
    the same fused step runs the row with a, b replaced and eps's share of x moved into coef_xt; eps stays the
    unclipped one (diffusers' DDIM does the same). A row that keeps eps-form history (a ring of earlier eps)
    cannot: those solvers take epsilon models only."""
    if prediction_type == "epsilon":
        return coefs
    if prediction_type not in ("v_prediction", "sample"):
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of epsilon, v_prediction, sample")
    if bool((coefs[:, PUSH_EPS] != 0).any()):
        raise ValueError(f"{who} keeps earlier eps outputs (eps-form history): it samples epsilon-prediction models "
                         f"only, this one predicts {prediction_type}; use ddim, ddpm, dpm++ or unipc")
    out = coefs.clone()
    a, b = coefs[:, _COL["sqrt_recip_alphas_cumprod"]], coefs[:, _COL["sqrt_recipm1_alphas_cumprod"]]
    alpha, sigma = 1.0 / a, b / a
    c_eps = coefs[:, _COL["coef_eps"]]
    if prediction_type == "v_prediction":
        out[:, _COL["sqrt_recip_alphas_cumprod"]], out[:, _COL["sqrt_recipm1_alphas_cumprod"]] = alpha, sigma
        out[:, _COL["coef_xt"]] += c_eps * sigma
        out[:, _COL["coef_eps"]] = c_eps * alpha
    else:
        out[:, _COL["sqrt_recip_alphas_cumprod"]], out[:, _COL["sqrt_recipm1_alphas_cumprod"]] = 0.0, -1.0
        out[:, _COL["coef_xt"]] += c_eps / sigma
        out[:, _COL["coef_eps"]] = -c_eps * alpha / sigma
    return out


@dataclass(frozen=True)
class SamplerRequest:
    """What a command asks of a sampler, before any sampler is built: ``steps`` None means the sampler's own
    default (every timestep for ddpm); ``timesteps`` are kept timesteps of an openai respacing string;
    ``openai`` says the model follows openai's sampling conventions (DDIM's eps from the clipped x_0);
    ``model_variance`` is the reverse variance the model's family samples it with (families.ModelFamily), and
    ``learn_sigma`` whether it outputs one."""

    steps: int | None = None
    spacing: str | None = None
    order: int | None = None
    eta: float | None = None
    variance: str | None = None
    timesteps: list[int] | None = None
    openai: bool = False
    model_variance: str = "fixed_small"
    learn_sigma: bool = False


class Sampler:
    """The base of every sampler: a coefficient table and the steps that read it.

    A subclass that sets ``cli_name`` registers itself in SAMPLERS, and declares there what the CLI shows:
    ``default_steps`` (None: every timestep of the schedule), the ``orders`` it takes (with
    ``default_order``), its ``default_spacing``, ``min_steps`` (its useful minimum), a one-line ``cli_help``, and
    ``cli_options``, the further
    flags it reads ("eta", "variance", "timestep_respacing"). ``from_request`` builds it from a
    SamplerRequest; the default passes steps, spacing and order to the constructor.
    """

    history_depth = 0  # ring slots of earlier model outputs a step reads (multistep solvers: 1 to 3)
    learned_variance = False  # whether a step reads the model's variance value v (learned_range)
    cli_name: str | None = None
    cli_help = ""
    default_steps: int | None = 10
    # The fewest --steps the CLI runs without --allow-few-steps: below it the result is far from the converged
    # sample (measured on the embedded model: benchmarks/RESULTS.md, "Few steps").
    min_steps = 1
    orders: tuple[int, ...] = ()
    default_order: int | None = None
    default_spacing = "linspace"
    cli_options: frozenset[str] = frozenset()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("cli_name")
        if name is None:
            return
        taken = SAMPLERS.get(name)
        if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"sampler name {name!r} is taken by {taken.__module__}.{taken.__qualname__}")
        if cls.orders and cls.default_order not in cls.orders:
            raise ValueError(f"{cls.__qualname__}: default_order {cls.default_order!r} is not one of {cls.orders}")
        SAMPLERS[name] = cls

    @classmethod
    def from_request(cls, schedule: NoiseSchedule, request: SamplerRequest) -> Sampler:
        """The sampler a command asked for (steps already resolved to a number, see resolve_steps)."""
        kw = {} if request.order is None else {"order": request.order}
        return cls(schedule, request.steps, spacing=request.spacing or cls.default_spacing, **kw)

    @classmethod
    def resolve_steps(cls, steps: int | None, num_timesteps: int) -> int | None:
        """--steps, else the sampler's default, at most the schedule's length (None: every timestep)."""
        if steps is not None:
            return steps
        return None if cls.default_steps is None else min(cls.default_steps, num_timesteps)

    def __init__(self, schedule: NoiseSchedule, coefs: torch.Tensor, clip_denoised: bool, timesteps=None):
        """``coefs``: one row per timestep of ``schedule`` (ascending), or, with ``timesteps`` (one per model
        evaluation, in run order; float where the model is evaluated between training timesteps), one row per
        evaluation in run order (ddpm_fast.solvers)."""
        self.schedule = schedule
        self.clip_denoised = bool(clip_denoised)
        if coefs.shape[1] < NUM_COEFS:  # the columns a solver leaves out (history, log-variance, push) are 0
            coefs = torch.cat([coefs, coefs.new_zeros(coefs.shape[0], NUM_COEFS - coefs.shape[1])], dim=1)
        # What the model outputs (the schedule's, from its config): the table is rewritten for it once here.
        self.prediction_type = getattr(schedule, "prediction_type", "epsilon")
        coefs = reparameterize(coefs.double(), self.prediction_type, type(self).__name__)
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
        self._device_cache: dict = {}  # device -> (coefs, rows); ("guidance", device) -> guidance table

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
             guidance_scale: float = 1.0, cond_grad: torch.Tensor | None = None) -> torch.Tensor:
        """x_{t-1} from x_t and the model output at timestep t (a pure function of its inputs).

        One step outside a plan (diffusers-style stepping; tests compare against diffusers with it): noise
        comes from ``noise`` if given, else from ``generator`` where the step needs it. With
        ``model_output_uncond``, eps = eps_uncond + guidance_scale * (model_output - eps_uncond).
        ``cond_grad``: classifier guidance's gradient at x_t (classifier.classifier_grad, its scale included),
        applied as openai applies it (``guide``). Whole runs go through ``plan`` (or ``sample``), whose steps
        draw the run's Philox stream.
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
        if cond_grad is None:
            return ops.reverse_step(x_t, model_output, coefs, index, noise, self.clip_denoised, model_output_uncond,
                                    guidance_scale, model_var_values=var)
        if tuple(cond_grad.shape) != tuple(x_t.shape):
            raise ValueError(f"cond_grad must have x_t's shape {tuple(x_t.shape)}, got {tuple(cond_grad.shape)}")
        out = torch.empty_like(x_t)
        self.guide(x_t, model_output, model_output_uncond, guidance_scale, var, cond_grad, coefs, index,
                   lambda eps, clip: ops.reverse_step(x_t, eps, coefs, index, noise, clip, model_var_values=var,
                                                      out=out))
        return out

    # ---- classifier guidance (guided-diffusion) ------------------------------------------------------

    guidance = "score"  # openai's condition_score; DDPMSampler: "mean" (condition_mean)

    def guidance_table(self) -> torch.Tensor:
        """Per coefficient row (float64, (rows, 3)): sqrt(alpha_bar) and sqrt(1 - alpha_bar) at the row's model
        timestep (fractional ones on the sigma interpolation the solver uses), and the variance that
        condition_mean moves the mean by (NaN: per element, from a learned variance)."""
        if self._index_of is not None:
            acp = self.schedule.alphas_cumprod.double()
        else:
            base = self.schedule.alphas_cumprod.double()
            sig = ((1 - base) / base).sqrt()
            t = self.timesteps.double()
            lo = t.floor().long().clamp(0, len(base) - 1)
            hi = (lo + 1).clamp(max=len(base) - 1)
            s = sig[lo] + (t - lo.double()) * (sig[hi] - sig[lo])
            acp = 1.0 / (1.0 + s**2)
        return torch.stack([acp.sqrt(), (1 - acp).sqrt(), self.mean_shift_variance()], dim=1)

    def mean_shift_variance(self) -> torch.Tensor:
        """Per row, the variance condition_mean uses (only DDPMSampler guides by the mean)."""
        return torch.zeros(self.coefs.shape[0], dtype=torch.float64)

    def guidance_device_table(self, device) -> torch.Tensor:
        device = torch.device(device)
        key = ("guidance", device)
        if key not in self._device_cache:
            self._device_cache[key] = self.guidance_table().to(device, torch.float32).contiguous()
        return self._device_cache[key]

    def guide(self, x, eps, eps_uncond, guidance_scale, var_values, grad, coefs, row, step):
        """One classifier-guided step: ``step(eps, clip)`` runs the fused update on the eps it is given.

        Classifier-free guidance, when asked as well, is combined first. condition_score (every sampler but
        DDPM): eps from the clipped x_0 when the step clips (openai conditions its clipped prediction), minus
        sqrt(1 - alpha_bar) times the gradient, then the step without a second clip. condition_mean (DDPM):
        the step as it is, then the mean moved by the step's variance times the gradient (openai's
        p_mean_var["variance"]: beta-tilde or beta, or the learned one). No host read."""
        if eps_uncond is not None:
            eps = eps_uncond + guidance_scale * (eps.float() - eps_uncond.float())
        g = self.guidance_device_table(x.device)[row]
        if self.guidance == "score":
            a, s = g[:, 0].view(-1, 1, 1, 1), g[:, 1].view(-1, 1, 1, 1)
            eps = eps.float()
            if self.clip_denoised:
                x0 = ((x - s * eps) / a).clamp(-1.0, 1.0)
                eps = (x - a * x0) / s
            step(eps - s * grad, False)
            return
        out = step(eps, self.clip_denoised)
        var = g[:, 2].view(-1, 1, 1, 1)
        if var_values is not None:  # learned: log var = frac log beta + (1 - frac) log beta-tilde (clipped)
            lo, hi = (coefs[row, LOG_VAR_MIN + k].view(-1, 1, 1, 1) for k in (0, 1))
            frac = (var_values.float() + 1) / 2
            var = torch.exp(frac * hi + (1 - frac) * lo)
        out.add_(var * grad)

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


class DDPMSampler(Sampler):
    """Ancestral sampling with sigma_t^2 = posterior variance (fixed_small), beta_t (fixed_large), or learned
    (learned_range, Improved DDPM: log sigma^2 = frac log beta_t + (1 - frac) log beta-tilde_t (clipped), with
    frac = (v + 1) / 2 from the model's second output half, as improved-diffusion computes it).

    Runs on any schedule, full or respaced (NoiseSchedule.respace, or openai_timesteps) for shortened DDPM:
    a respaced schedule's betas and posterior variances are those of the kept steps.
    """

    cli_name = "ddpm"
    cli_help = "ancestral"
    default_steps = None
    default_spacing = "leading"
    cli_options = frozenset({"variance", "timestep_respacing"})

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

    guidance = "mean"

    def mean_shift_variance(self) -> torch.Tensor:
        """openai's p_mean_var["variance"] per row: beta-tilde (0 at t = 0) for fixed_small, beta with the first
        row's replaced by beta-tilde_1 for fixed_large, NaN (per element) for learned_range."""
        s = self.schedule
        if self.variance == "learned_range":
            return torch.full_like(s.betas, float("nan"), dtype=torch.float64)
        if self.variance == "fixed_small":
            return s.posterior_variance.double().clamp(min=0)
        var = s.betas.double().clone()
        if len(var) > 1:
            var[0] = s.posterior_variance.double()[1]
        return var

    @classmethod
    def from_request(cls, schedule: NoiseSchedule, request: SamplerRequest) -> DDPMSampler:
        """Shortened DDPM runs on the respaced schedule; the variance defaults to the model's own (learned
        sigma), else to what its family samples with (openai: beta unless sigma_small; others the posterior's)."""
        if request.timesteps is not None:
            schedule = schedule.respace(request.timesteps)
        elif request.steps and request.steps != schedule.num_timesteps:
            schedule = schedule.respace(schedule.space_timesteps(request.steps, request.spacing or cls.default_spacing))
        variance = request.variance or request.model_variance
        if variance == "learned_range" and not request.learn_sigma:
            raise ValueError("--variance learned_range needs a learned-sigma model (this one outputs eps only)")
        return cls(schedule, variance=variance)


class DDIMSampler(Sampler):
    """DDIM with eta (0: deterministic; 1: DDPM-like noise) on ``num_steps`` respaced timesteps, or on the
    given ``timesteps`` (e.g. ``openai_timesteps(T, "ddim25")``).

    ``use_clipped_model_output`` (diffusers' name): eps recomputed from the clipped x_0 before the update, as
    openai's ddim_sample does (x_prev = sqrt(abar_prev) x0c + c_eps (a x_t - x0c) / b): still linear in x_t and
    x0c, so the same fused step with other weights. The last step always lands on alpha_bar_prev = 1.
    """

    cli_name = "ddim"
    cli_help = "DDIM"
    default_steps = 100
    min_steps = 2  # one step is the clipped x0 prediction at t = T-1: RMS 78 of 255, 69% of pixels saturated
    default_spacing = "leading"
    cli_options = frozenset({"eta", "timestep_respacing"})

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

    @classmethod
    def from_request(cls, schedule: NoiseSchedule, request: SamplerRequest) -> DDIMSampler:
        """openai's DDIM recomputes eps from the clipped x_0: their checkpoints are sampled that way."""
        steps = None if request.timesteps is not None else request.steps
        return cls(schedule, steps, eta=request.eta or 0.0, spacing=request.spacing or cls.default_spacing,
                   use_clipped_model_output=request.openai, timesteps=request.timesteps)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] NCHW floats -> uint8 NHWC images (the layout image and FID tools read)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
