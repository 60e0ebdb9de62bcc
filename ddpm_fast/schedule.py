"""Noise schedules: betas and every derived table, in float64 on the host.

A NoiseSchedule owns the forward process q(x_t | x_0) and the closed-form posterior q(x_{t-1} | x_t, x_0)
(Ho et al. 2020, eq. 4, 6, 7). Tables stay float64 here; samplers cast what they need to fp32 on the
device once. Respacing keeps a subsequence of timesteps and recomputes betas from alphas_cumprod, as
improved-diffusion does, so DDIM and shortened DDPM run on the same tables.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SPACINGS = ("leading", "trailing", "linspace")
# diffusers schedulers whose config describes the same forward process (betas over discrete timesteps).
SCHEDULER_CLASSES = ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                     "PNDMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                     "HeunDiscreteScheduler", "LMSDiscreteScheduler", "UniPCMultistepScheduler",
                     "DEISMultistepScheduler", "KDPM2DiscreteScheduler")
# What the model's output is (diffusers' prediction_type): the noise eps, the velocity v = alpha eps - sigma x_0
# (Salimans & Ho 2022), or x_0 itself. Every sampler turns its eps-form table into the model's form
# (samplers.reparameterize), so each prediction runs on the same fused step.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
UNSUPPORTED_SCHEDULER_OPTIONS = {"rescale_betas_zero_snr": "zero-terminal-SNR rescaling of the betas",
                                 "thresholding": "dynamic thresholding"}


class NoiseSchedule:
    """Betas plus derived float64 tables.

    ``timestep_map[i]`` is the model timestep of schedule index i: the identity for a full schedule,
    the kept timesteps for a respaced one (the model is always called with original timesteps).
    """

    def __init__(self, betas, *, timestep_map=None, name: str = "custom", params: dict | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().clone()
        if betas.dim() != 1 or betas.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
        if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas > 1).any():
            raise ValueError("betas must be finite and in (0, 1]")
        self.name = name
        self.params = dict(params or {})  # how a named schedule was made (to_config / from_config)
        # The reverse variance a scheduler config declares (diffusers' variance_type), when it names one.
        self.variance_type: str | None = None
        self.prediction_type = "epsilon"  # see PREDICTION_TYPES; a config's, or set by whoever trains the model
        # A distilled student's record (ddpm_fast.distill): how it was made and what it samples with, e.g.
        # {"method": "progressive", "sampler": "ddim", "spacing": "trailing", "steps": [2]}; None for a model
        # that any sampler runs at any step count.
        self.student: dict | None = None
        self.num_timesteps = betas.numel()
        if timestep_map is None:
            timestep_map = torch.arange(self.num_timesteps, dtype=torch.int64)
        self.timestep_map = torch.as_tensor(timestep_map, dtype=torch.int64).cpu()
        self._device_tables: dict[tuple[str, str], torch.Tensor] = {}
        if self.timestep_map.shape != betas.shape:
            raise ValueError("timestep_map must have one entry per beta")

        b = betas
        self.betas = b
        self.alphas = 1.0 - b
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.alphas_cumprod_prev = torch.cat([b.new_ones(1), self.alphas_cumprod[:-1]])
        acp, acp_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        self.sqrt_alphas_cumprod = acp.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - acp).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / acp).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / acp - 1.0).sqrt()
        self.posterior_variance = b * (1.0 - acp_prev) / (1.0 - acp)
        # posterior_variance[0] is 0: the log is clipped by reusing index 1 (improved-diffusion).
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2], pv[1:]])) if pv.numel() > 1 else (
            torch.log(b)
        )
        self.log_betas = torch.log(b)
        # fixed_large's log variance: beta_t, but the posterior variance at t = 0 (improved-diffusion's choice).
        self.log_betas_large = torch.log(torch.cat([pv[1:2], b[1:]])) if pv.numel() > 1 else self.log_betas
        self.posterior_mean_coef1 = b * acp_prev.sqrt() / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - acp_prev) * self.alphas.sqrt() / (1.0 - acp)

    # ---- constructors -------------------------------------------------------------------------

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        _check_steps(num_timesteps)
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        return cls(betas, name="linear", params=dict(beta_start=beta_start, beta_end=beta_end))

    @classmethod
    def scaled_linear(cls, num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
        _check_steps(num_timesteps)
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
        return cls(betas, name="scaled_linear", params=dict(beta_start=beta_start, beta_end=beta_end))

    @classmethod
    def sigmoid(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        _check_steps(num_timesteps)
        x = torch.linspace(-6.0, 6.0, num_timesteps, dtype=torch.float64)
        return cls(torch.sigmoid(x) * (beta_end - beta_start) + beta_start, name="sigmoid",
                   params=dict(beta_start=beta_start, beta_end=beta_end))

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999):
        """Nichol & Dhariwal 2021: alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2), betas clipped."""
        _check_steps(num_timesteps)
        if not (0 <= s < 1 and math.isfinite(s)):
            raise ValueError(f"cosine schedule: s must lie in [0, 1), got {s}")
        if not 0 < max_beta <= 1:
            raise ValueError(f"cosine schedule: max_beta must lie in (0, 1], got {max_beta}")

        def alpha_bar(u):
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        betas = [
            min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
            for i in range(num_timesteps)
        ]
        return cls(torch.tensor(betas, dtype=torch.float64), name="cosine", params=dict(s=s, max_beta=max_beta))

    @classmethod
    def from_name(cls, name: str, num_timesteps: int = 1000, **kwargs) -> NoiseSchedule:
        makers = {
            "linear": cls.linear,
            "cosine": cls.cosine,
            "squaredcos_cap_v2": cls.cosine,
            "scaled_linear": cls.scaled_linear,
            "sigmoid": cls.sigmoid,
        }
        if name not in makers:
            raise ValueError(f"unknown beta schedule {name!r}; choose one of {sorted(makers)}")
        return makers[name](num_timesteps, **kwargs)

    def to_config(self) -> dict:
        """A diffusers-style scheduler config (DDPMScheduler's keys) that from_config reads back."""
        if self.name == "trained" and bool(torch.equal(self.timestep_map, torch.arange(self.num_timesteps))):
            return self._with_student({"_class_name": "DDPMScheduler", "num_train_timesteps": self.num_timesteps,
                                       "trained_betas": self.betas.tolist(), "prediction_type": self.prediction_type})
        if self.name not in ("linear", "cosine", "scaled_linear", "sigmoid"):
            raise ValueError(f"a {self.name!r} schedule has no config; only named and trained schedules do")
        cfg = {"_class_name": "DDPMScheduler", "num_train_timesteps": self.num_timesteps,
               "beta_schedule": "squaredcos_cap_v2" if self.name == "cosine" else self.name,
               "prediction_type": self.prediction_type}
        cfg.update({k: v for k, v in self.params.items() if k in ("beta_start", "beta_end")})
        return self._with_student(cfg)

    def _with_student(self, cfg: dict) -> dict:
        """A student's config: diffusers' DDIMScheduler on the student's spacing (so its folder samples there as
        here), and the record under ``ddpm_fast_student``."""
        if self.student is None:
            return cfg
        if self.student.get("sampler") == "ddim":
            cfg.update({"_class_name": "DDIMScheduler", "timestep_spacing": self.student["spacing"],
                        "set_alpha_to_one": True, "clip_sample": True})
        cfg["ddpm_fast_student"] = dict(self.student)
        return cfg

    @classmethod
    def from_config(cls, cfg: dict) -> NoiseSchedule:
        """A diffusers scheduler config (see _from_config), with the variance_type it declares, if any."""
        sched = cls._from_config(cfg)
        pred = cfg.get("prediction_type", "epsilon")
        if pred not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {pred!r} is not supported; this engine samples {PREDICTION_TYPES}")
        sched.prediction_type = pred
        student = cfg.get("ddpm_fast_student")
        if student is not None:
            sched.student = check_student(student)
        kind = cfg.get("variance_type")
        sched.variance_type = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
                               "fixed_large": "fixed_large", "fixed_large_log": "fixed_large",
                               "learned_range": "learned_range"}.get(kind) if isinstance(kind, str) else None
        return sched

    @classmethod
    def _from_config(cls, cfg: dict) -> NoiseSchedule:
        """A diffusers scheduler config: its betas (named schedule or ``trained_betas``); what changes the
        process in ways this engine does not implement is refused, naming it, never silently dropped."""
        kind = cfg.get("_class_name")
        if kind is not None and kind not in SCHEDULER_CLASSES:
            raise ValueError(f"_class_name {kind!r} is not a diffusers noise scheduler this engine reads "
                             f"({', '.join(SCHEDULER_CLASSES)})")
        for key, what in UNSUPPORTED_SCHEDULER_OPTIONS.items():
            if cfg.get(key):
                raise ValueError(f"{key}: {what} is not implemented")
        name = cfg.get("beta_schedule", "linear")
        if cfg.get("trained_betas") is not None:
            sched = cls(cfg["trained_betas"], name="trained")
            steps = cfg.get("num_train_timesteps", sched.num_timesteps)
            if steps != sched.num_timesteps:
                raise ValueError(f"trained_betas holds {sched.num_timesteps} betas, num_train_timesteps is {steps}")
            return sched
        kwargs = {k: cfg[k] for k in ("beta_start", "beta_end") if k in cfg and name != "squaredcos_cap_v2"}
        return cls.from_name(name, int(cfg.get("num_train_timesteps", 1000)), **kwargs)

    # ---- respacing ----------------------------------------------------------------------------

    def respace(self, timesteps) -> NoiseSchedule:
        """Keep only ``timesteps`` (original indices); betas recomputed so alphas_cumprod is preserved."""
        ts = sorted({int(t) for t in timesteps})
        if not ts:
            raise ValueError("respace needs at least one timestep")
        if ts[0] < 0 or ts[-1] >= self.num_timesteps:
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps - 1}], got {ts[0]}..{ts[-1]}")
        acp = self.alphas_cumprod[ts]
        prev = torch.cat([acp.new_ones(1), acp[:-1]])
        kept = NoiseSchedule(1.0 - acp / prev, timestep_map=self.timestep_map[ts], name=f"{self.name}-respaced")
        kept.prediction_type, kept.student = self.prediction_type, self.student
        return kept

    def space_timesteps(self, num_steps: int, spacing: str = "leading") -> list[int]:
        """Ascending indices of ``num_steps`` kept timesteps (diffusers' spacing conventions)."""
        return space_timesteps(self.num_timesteps, num_steps, spacing)

    # ---- forward process ----------------------------------------------------------------------

    def device_table(self, name: str, device) -> torch.Tensor:
        """Table ``name`` as fp32 on ``device``, copied once per device (hot loops reuse it)."""
        key = (name, str(torch.device(device)))
        if key not in self._device_tables:
            self._device_tables[key] = getattr(self, name).to(device=device, dtype=torch.float32)
        return self._device_tables[key]

    def __len__(self) -> int:
        return self.num_timesteps

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.name!r}, num_timesteps={self.num_timesteps})"


def space_timesteps(num_timesteps: int, num_steps: int, spacing: str = "leading") -> list[int]:
    _check_steps(num_steps)
    if num_steps > num_timesteps:
        raise ValueError(f"cannot take {num_steps} steps from a {num_timesteps}-step schedule")
    if spacing == "leading":
        ratio = num_timesteps // num_steps
        ts = [i * ratio for i in range(num_steps)]
    elif spacing == "trailing":
        ratio = num_timesteps / num_steps
        ts = sorted(round(num_timesteps - i * ratio) - 1 for i in range(num_steps))
    elif spacing == "linspace":
        ts = [round(v) for v in torch.linspace(0, num_timesteps - 1, num_steps, dtype=torch.float64).tolist()]
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {list(SPACINGS)}")
    if len(set(ts)) != num_steps:
        raise ValueError(f"spacing {spacing!r} gives repeated timesteps for {num_steps} of {num_timesteps}")
    if max(ts) == 0 and num_timesteps > 1:
        # The run's only step would be the last one, t = 0: it starts from pure noise and denoises nothing.
        raise ValueError(f"{num_steps} step with spacing {spacing!r} lands on t=0 only (it would return the "
                         "noise it starts from); use spacing 'trailing' (its one step starts at t=T-1, as "
                         "diffusers' trailing does) or more steps")
    return ts


def dpm_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "linspace") -> list[int]:
    """Descending model timesteps of a ``num_steps`` DPM-Solver run, as diffusers' DPMSolverMultistepScheduler
    spaces them (its own conventions, not DDIM's: 'leading' divides by num_steps + 1)."""
    _check_spacing(spacing)
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


def plms_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "leading") -> list[int]:
    """The model timesteps of a ``num_steps`` PLMS run, as diffusers' PNDMScheduler(skip_prk_steps=True) lays
    them out: num_steps + 1 evaluations, the second at the first one's successor (its Heun-like warm-up)."""
    _check_spacing(spacing)
    big_t, n = int(num_train_timesteps), num_steps
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= big_t:
        raise ValueError(f"num_steps must be an int in [1, {big_t}], got {n!r}")
    if spacing == "linspace":
        base = np.linspace(0, big_t - 1, n).round().astype(np.int64)
    elif spacing == "leading":
        base = (np.arange(0, n) * (big_t // n)).round().astype(np.int64)
    else:
        base = np.round(np.arange(big_t, 0, -big_t / n))[::-1].astype(np.int64) - 1
    ts = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
    if len(set(base.tolist())) != len(base) or int(base.min()) < 0:
        raise ValueError(f"{n} steps with spacing {spacing!r} repeat a timestep of a {big_t}-step schedule")
    return [int(t) for t in ts]


def heun_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "linspace") -> np.ndarray:
    """The (float) timesteps of a ``num_steps`` Heun run before its stages are laid out, as diffusers'
    HeunDiscreteScheduler spaces them."""
    _check_spacing(spacing)
    big_t, n = int(num_train_timesteps), num_steps
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= big_t:
        raise ValueError(f"num_steps must be an int in [1, {big_t}], got {n!r}")
    if spacing == "linspace":
        return np.linspace(0, big_t - 1, n, dtype=np.float64)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (big_t // n)).round()[::-1].astype(np.float64)
    return np.arange(big_t, 0, -big_t / n).round().astype(np.float64) - 1


def openai_timesteps(num_timesteps: int, section_counts) -> list[int]:
    """The timesteps openai's space_timesteps keeps, ascending: ``"ddimN"`` (a stride that gives exactly N),
    ``"250"`` or ``"10,15,20"`` (the schedule cut into equal sections, each given that many evenly
    strided steps, first and last included). An int or a list of ints means the same as the string."""
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            try:
                desired = int(text[len("ddim"):])
            except ValueError:
                raise ValueError(f"respacing {section_counts!r}: expected ddimN, N an integer") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"respacing {section_counts!r}: no integer stride gives exactly {desired} of "
                             f"{num_timesteps} steps")
        try:
            counts = [int(x) for x in text.split(",")]
        except ValueError:
            raise ValueError(f"respacing {section_counts!r}: expected ddimN or comma-separated integers") from None
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(x) for x in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"respacing {section_counts!r}: each section needs at least one step")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"respacing {section_counts!r}: cannot take {count} steps from a section of {size}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        steps += [start + round(j * stride) for j in range(count)]
        start += size
    return sorted(set(steps))


def check_student(record) -> dict:
    """A distilled student's record as a scheduler config holds it (see NoiseSchedule.student), checked."""
    if not isinstance(record, dict):
        raise ValueError(f"ddpm_fast_student must be a dict, got {type(record).__name__}")
    steps = record.get("steps")
    if (not isinstance(steps, list) or not steps
            or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in steps)):
        raise ValueError(f"ddpm_fast_student: steps must be a non-empty list of positive ints, got {steps!r}")
    if not isinstance(record.get("sampler"), str):
        raise ValueError(f"ddpm_fast_student: sampler must be a sampler name, got {record.get('sampler')!r}")
    if record.get("spacing") not in SPACINGS:
        raise ValueError(f"ddpm_fast_student: spacing must be one of {SPACINGS}, got {record.get('spacing')!r}")
    return dict(record)


def _check_spacing(spacing) -> None:
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")


MAX_TIMESTEPS = 1_000_000  # diffusion processes use 1000 to 4000; each table costs 8 bytes a step


def _check_steps(n) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_TIMESTEPS:
        raise ValueError(f"num_train_timesteps must be a positive int of at most {MAX_TIMESTEPS:,}, got {n!r}")
