"""Samplers: DDPM ancestral (Ho et al. 2020), DDIM (Song et al. 2021) and multistep DPM-Solver++ (Lu et al.
2022), with classifier-free guidance.

Each sampler reduces to a float64 coefficient table, one row per kept timestep, in the column
order of ops.COEF_COLUMNS; a step is then ops.reverse_step on that table (reference, Triton or
CUDA by backend). The table is cast to fp32 and moved to a device once, and the state x_t stays fp32.
A run is a SamplingPlan (``sampler.plan``): built once, stepped in place by every loop.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

from ddpm_fast import ops
from ddpm_fast.noise import MAX_SEED, NoiseKey, check_seed, initial_noise
from ddpm_fast.ops.reverse_step import SIGMA
from ddpm_fast.schedule import SPACINGS, NoiseSchedule

VARIANCES = ("fixed_small", "fixed_large")
# Images per U-Net call in a batch-invariant run: part of what the bits depend on, so one fixed default.
INVARIANT_CHUNK = 16


class _Sampler:
    def __init__(self, schedule: NoiseSchedule, coefs: torch.Tensor, clip_denoised: bool):
        self.schedule = schedule
        self.clip_denoised = bool(clip_denoised)
        if coefs.shape[1] == len(ops.COEF_COLUMNS) - 2:  # no history terms (DDPM, DDIM): zero columns
            coefs = torch.cat([coefs, coefs.new_zeros(coefs.shape[0], 2)], dim=1)
        self.coefs = coefs  # float64 (S, len(COEF_COLUMNS)) on the host
        self.timesteps = schedule.timestep_map.flip(0).clone()  # model timesteps, descending
        lookup = torch.full((int(schedule.timestep_map.max()) + 1,), -1, dtype=torch.int64)
        lookup[schedule.timestep_map] = torch.arange(len(schedule), dtype=torch.int64)
        self._index_of = lookup
        self._device_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def device_tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp32 coefficient table, timestep -> row lookup) on ``device``, made once per device."""
        device = torch.device(device)
        if device not in self._device_cache:
            self._device_cache[device] = (self.coefs.to(device, torch.float32).contiguous(),
                                          self._index_of.to(device))
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
        if noise is None and bool((self.coefs[index.cpu(), SIGMA] > 0).any()):
            noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=torch.float32)
            noise = noise.contiguous(memory_format=ops.memory_format(x_t))
        return ops.reverse_step(x_t, model_output, coefs, index, noise, self.clip_denoised, model_output_uncond,
                                guidance_scale)

    def plan(self, model, shape, *, seed: int | None = None, generator: torch.Generator | None = None,
             x_T: torch.Tensor | None = None, guidance_scale: float | None = None, class_labels=None,
             image_index=0, device=None, batch_invariant: bool = False,
             invariant_chunk: int = INVARIANT_CHUNK) -> SamplingPlan:
        """Everything one run needs, built once (see SamplingPlan); ``plan.run()`` samples."""
        return SamplingPlan(self, model, shape, seed=seed, generator=generator, x_T=x_T,
                            guidance_scale=guidance_scale, class_labels=class_labels, image_index=image_index,
                            device=device, batch_invariant=batch_invariant, invariant_chunk=invariant_chunk)

    @torch.no_grad()
    def sample(self, model, shape, seed: int | None = None, guidance_scale: float | None = None,
               class_labels=None, progress: bool = True, device=None, generator: torch.Generator | None = None,
               x_T: torch.Tensor | None = None, image_index=0, batch_invariant: bool = False,
               invariant_chunk: int = INVARIANT_CHUNK) -> torch.Tensor:
        """Run the whole chain; returns x_0 (fp32, roughly in [-1, 1]), laid out as the path keeps x_t.

        Image k of a run (k = image_index + position in the batch) draws from (seed, k) alone: the same
        x_T and noise whatever the batch size, the process count or the loop (eager, graph engine). With
        ``batch_invariant`` image k is the same bits too (see SamplingPlan).
        """
        plan = self.plan(model, shape, seed=seed, generator=generator, x_T=x_T, guidance_scale=guidance_scale,
                         class_labels=class_labels, image_index=image_index, device=device,
                         batch_invariant=batch_invariant, invariant_chunk=invariant_chunk)
        start = time.perf_counter()
        x = plan.run(progress=progress)
        self.last_run_seconds = time.perf_counter() - start
        return x


class SamplingPlan:
    """One sampling run, built once; every loop (Python, C++, CUDA-graph replay) runs ``step()``.

    Holds the run's draws (x_T, labels and null labels, the noise key [seed, step] and each image's global
    index), the per-step device tables (model timestep and coefficient row of step i), the state buffers
    (``x``: fp32 x_t; for a fast fp16/bf16 model also the half copy the U-Net reads; for a multistep solver
    the ``history`` of previous data predictions) and the step counter.
    ``step()`` reads the step index from the device counter and updates the buffers in place: it makes no
    host read, so a CUDA graph can capture it once and replay it. ``start()`` loads new draws into the same
    buffers (the graph engine reuses a captured plan that way).

    Noise is the project's Philox stream (ddpm_fast.noise): x_T of image k is a function of (seed, k), the
    noise of step i of image k a function of (seed, k, i).

    ``batch_invariant``: the U-Net always sees a batch of exactly ``invariant_chunk`` images (the batch in
    chunks, the last one padded with zeros; guided, the cond/uncond pair of such a chunk), read from the same
    buffer every time, and on a CPU computes on one thread. GEMM and convolution libraries pick their kernels
    and blocking (so their rounding) by shape and, on a CPU, by thread count, not by an image's place in the
    batch; with shape and threads fixed, image k is the same bits for any batch size, process count or loop
    (tests/test_plan.py holds this, each half failing without its part). Bits depend on the chunk size, so
    compare runs made with the same one. The price: padding (a batch under the chunk size pays for a whole
    chunk) and, on a CPU, one core per process (torchrun processes use more cores, with the same images).
    """

    def __init__(self, sampler: _Sampler, model, shape, *, seed=None, generator=None, x_T=None,
                 guidance_scale=None, class_labels=None, image_index=0, device=None, batch_invariant=False,
                 invariant_chunk=INVARIANT_CHUNK):
        shape = tuple(int(s) for s in shape)
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError(f"shape must be (N, C, H, W) with positive sizes, got {shape}")
        if guidance_scale is not None and not math.isfinite(float(guidance_scale)):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
        if isinstance(invariant_chunk, bool) or not isinstance(invariant_chunk, int) or invariant_chunk < 1:
            raise ValueError(f"invariant_chunk must be a positive int, got {invariant_chunk!r}")
        param = next(model.parameters())
        self.device = torch.device(device) if device is not None else param.device
        self.sampler, self.model, self.shape, self.n = sampler, model, shape, shape[0]
        self.guidance_scale = None if guidance_scale is None else float(guidance_scale)
        self.fast_dtype = getattr(model, "compute_dtype", None)
        fmt = torch.channels_last if self.fast_dtype is not None else torch.contiguous_format
        self.x = torch.empty(shape, device=self.device, dtype=torch.float32, memory_format=fmt)
        half = self.fast_dtype not in (None, torch.float32)
        self.x_half = torch.empty_like(self.x, dtype=self.fast_dtype) if half else None
        self.coefs, lookup = sampler.device_tables(self.device)
        self.steps_t = sampler.timesteps.to(self.device)  # model timestep of step i
        self.steps_row = lookup[self.steps_t]  # coefficient row of step i
        self.counter = torch.zeros(2, dtype=torch.int64, device=self.device)  # [seed, step]
        self.images = torch.zeros(self.n, dtype=torch.int64, device=self.device)
        self.key = NoiseKey(self.counter, self.images) if bool((sampler.coefs[:, SIGMA] > 0).any()) else None
        # A multistep solver's memory: the previous steps' data predictions (zeroed by start()).
        self.history = tuple(torch.zeros_like(self.x) for _ in range(getattr(sampler, "history_depth", 0)))
        self.labels = self.null = None
        self.num_steps = sampler.num_steps
        self.start(seed=seed, generator=generator, x_T=x_T, class_labels=class_labels, image_index=image_index)
        self.batch_invariant, self.chunk = bool(batch_invariant), invariant_chunk
        if self.batch_invariant:
            # What the U-Net reads in a batch-invariant step: always this buffer, this shape (padding stays zero).
            inp = self.model_input
            self._chunk_x = torch.empty((self.chunk, *shape[1:]), dtype=inp.dtype, device=self.device,
                                        memory_format=fmt).zero_()
            self._chunk_labels = (None if self.labels is None else
                                  torch.zeros(self.chunk, dtype=torch.int64, device=self.device))
            self._chunk_null = None if self.null is None else self.null[:1].repeat(self.chunk)

    @property
    def model_input(self) -> torch.Tensor:
        """The buffer the U-Net reads: the half copy on an fp16/bf16 fast model, else x itself."""
        return self.x if self.x_half is None else self.x_half

    def start(self, *, seed=None, generator=None, x_T=None, class_labels=None, image_index=0) -> SamplingPlan:
        """Load a run's draws into the buffers (in place) and rewind the step counter to 0."""
        if seed is None:
            # No seed: one from the generator, or from torch's global RNG (so torch.manual_seed applies).
            seed = int(torch.randint(0, MAX_SEED, (), generator=generator, device=generator.device
                                     if generator is not None else "cpu").item())
        seed = check_seed(seed)
        images = _image_indices(image_index, self.n)
        labels, null = _prepare_labels(self.model, class_labels, self.guidance_scale, self.n, self.device)
        if self.labels is None or labels is None:
            self.labels, self.null = labels, null
        else:
            self.labels.copy_(labels)
        if x_T is None:
            x_T = initial_noise(self.shape, seed, images, self.device, ops.memory_format(self.x))
        elif not torch.is_tensor(x_T) or tuple(x_T.shape) != self.shape or not x_T.is_floating_point():
            desc = f"{tuple(x_T.shape)} {x_T.dtype}" if torch.is_tensor(x_T) else type(x_T).__name__
            raise ValueError(f"x_T must be a floating tensor of shape {self.shape}, got {desc}")
        self.x.copy_(x_T)
        for h in self.history:
            h.zero_()  # early steps weigh them by 0, and 0 * (garbage or NaN) must not appear
        if self.x_half is not None:
            self.x_half.copy_(self.x)
        self.images.copy_(images)
        self.counter.copy_(torch.tensor([seed, 0], dtype=torch.int64))
        self.seed, self.done = seed, 0
        return self

    @torch.no_grad()
    def step(self) -> None:
        """One reverse step, in place; the step index comes from the device counter (no host read)."""
        i = self.counter[1:]
        t = self.steps_t[i].expand(self.n)
        row = self.steps_row[i].expand(self.n)
        if self.batch_invariant:
            eps_c, eps_u = self._eps_in_chunks(t[:1])
        else:
            eps_c, eps_u = model_eps(self.model, self.model_input, t, self.labels, self.null)
        ops.reverse_step(self.x, eps_c, self.coefs, row, self.key, self.sampler.clip_denoised, eps_u,
                         1.0 if self.guidance_scale is None else self.guidance_scale, out=self.x,
                         half_out=self.x_half, history=self.history)
        self.counter[1:] += 1
        self.done += 1

    def _eps_in_chunks(self, t1: torch.Tensor):
        """model_eps over fixed-size chunks of the batch (see batch_invariant), into buffers laid out as x."""
        x, buf, m = self.model_input, self._chunk_x, self.chunk
        labels = self._chunk_labels
        t = t1.expand(m)
        eps_c = eps_u = None
        with _one_cpu_thread(self.device):
            for start in range(0, self.n, m):
                k = min(m, self.n - start)
                buf[:k].copy_(x[start:start + k])
                if k < m:
                    buf[k:].zero_()
                if labels is not None:
                    labels[:k].copy_(self.labels[start:start + k])
                c, u = model_eps(self.model, buf, t, labels, self._chunk_null)
                if eps_c is None:
                    eps_c = torch.empty_like(self.x, dtype=c.dtype)
                    eps_u = None if u is None else torch.empty_like(self.x, dtype=u.dtype)
                eps_c[start:start + k].copy_(c[:k])
                if u is not None:
                    eps_u[start:start + k].copy_(u[:k])
        return eps_c, eps_u

    @torch.no_grad()
    def run(self, progress: bool = False) -> torch.Tensor:
        """Take the remaining steps (Python loop); returns a copy of the final state x_0."""
        from tqdm.auto import tqdm

        left = self.num_steps - self.done
        with tqdm(total=left * self.n, unit="img-step", unit_scale=True, disable=not progress,
                  desc=type(self.sampler).__name__, leave=False) as bar:
            for _ in range(left):
                self.step()
                bar.update(self.n)
        return self.x.clone()


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """On a CPU, torch's intra-op threads set to one for the block: oneDNN/MKL split some convolutions and
    GEMMs by thread count, which changes their rounding (a 1x1 convolution of the digits model does)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _image_indices(image_index, n: int) -> torch.Tensor:
    """Global image indices of a batch: ``image_index`` is the first one (an int) or all n of them."""
    if isinstance(image_index, int) and not isinstance(image_index, bool):
        images = torch.arange(image_index, image_index + n, dtype=torch.int64)
    else:
        images = torch.as_tensor(image_index)
        if images.shape != (n,) or images.is_floating_point() or images.dtype == torch.bool:
            raise ValueError(f"image_index must be an int or {n} integer indices, got {tuple(images.shape)}")
        images = images.to("cpu", torch.int64)
    if n and (int(images.min()) < 0 or int(images.max()) >= 2**31):
        raise ValueError("image indices must lie in [0, 2**31)")
    return images


def model_eps(model, x_in, t, labels, null):
    """(eps_cond, eps_uncond): with a null label, both halves of guidance in one batched forward;
    without one, (eps, None)."""
    if null is None:
        return model(x_in, t, labels), None
    eps = model(torch.cat([x_in, x_in]), torch.cat([t, t]), torch.cat([labels, null]))
    eps_c, eps_u = eps.chunk(2)
    return eps_c, eps_u


def _prepare_labels(model, class_labels, guidance_scale, n, device):
    num_classes = getattr(getattr(model, "config", None), "num_classes", None)
    if guidance_scale is not None and not num_classes:
        raise ValueError("guidance_scale needs a class-conditional model (config.num_classes)")
    if class_labels is None:
        if guidance_scale is not None:
            raise ValueError("guidance_scale needs class_labels")
        if num_classes:
            # A conditional model without labels samples unconditionally: the null label.
            return torch.full((n,), num_classes, dtype=torch.int64, device=device), None
        return None, None
    if not num_classes:
        raise ValueError("class_labels given, but the model is unconditional")
    labels = torch.as_tensor(class_labels, dtype=torch.int64, device=device)
    if labels.dim() == 0:
        labels = labels.expand(n)
    if labels.shape != (n,):
        raise ValueError(f"class_labels must be an int or have shape ({n},), got {tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"class_labels must lie in [0, {num_classes - 1}]")
    null = torch.full_like(labels, num_classes) if guidance_scale is not None else None
    return labels, null


class DDPMSampler(_Sampler):
    """Ancestral sampling with sigma_t^2 = posterior variance (fixed_small) or beta_t (fixed_large).

    Runs on any schedule, full or respaced (NoiseSchedule.respace) for shortened DDPM.
    """

    def __init__(self, schedule: NoiseSchedule, variance: str = "fixed_small", clip_denoised: bool = True):
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}")
        s = schedule
        var = s.posterior_variance if variance == "fixed_small" else s.betas
        sigma = var.clamp(min=0).sqrt()
        sigma[0] = 0.0  # no noise on the last step
        coefs = torch.stack([s.sqrt_recip_alphas_cumprod, s.sqrt_recipm1_alphas_cumprod, s.posterior_mean_coef1,
                             s.posterior_mean_coef2, torch.zeros_like(sigma), sigma], dim=1)
        self.variance = variance
        super().__init__(schedule, coefs, clip_denoised)


class DDIMSampler(_Sampler):
    """DDIM with eta (0: deterministic; 1: DDPM-like noise) on ``num_steps`` respaced timesteps."""

    def __init__(self, schedule: NoiseSchedule, num_steps: int, eta: float = 0.0, spacing: str = "leading",
                 clip_denoised: bool = True):
        if spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")
        if not 0.0 <= eta <= 1.0:  # beyond 1 the noise outgrows the posterior (c_eps clamps to 0): not DDIM
            raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta}")
        s = schedule.respace(schedule.space_timesteps(num_steps, spacing))
        acp, acp_prev = s.alphas_cumprod, s.alphas_cumprod_prev
        var = (1 - acp_prev) / (1 - acp) * (1 - acp / acp_prev)
        sigma = eta * var.clamp(min=0).sqrt()
        c_eps = (1 - acp_prev - sigma**2).clamp(min=0).sqrt()
        coefs = torch.stack([s.sqrt_recip_alphas_cumprod, s.sqrt_recipm1_alphas_cumprod, acp_prev.sqrt(),
                             torch.zeros_like(acp), c_eps, sigma], dim=1)
        self.eta, self.spacing = float(eta), spacing
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
    prediction and the previous one or two (the plan's history buffers): the update is the one fused
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
        rows = self._rows(schedule.alphas_cumprod, ts)
        self.history_depth = max(self.step_orders) - 1
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
        """float64 (n, len(COEF_COLUMNS)) rows in step order: x0_hat = a x - b eps, then
        x_next = c_xt x + c_x0 x0_hat + c_hist1 h1 + c_hist2 h2 + sigma z."""
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


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] NCHW floats -> uint8 NHWC images (the layout image and FID tools read)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
