"""The sampling plan: one run, built once, stepped in place by every loop; and its run contract.

``RunOptions`` is what a run draws and how it runs (seed or generator, x_T, labels, guidance, image
indices, batch invariance): one frozen value that ``sampler.plan``, ``sampler.sample``, the graph engine
and the CLI pass whole. ``SamplingPlan`` holds the buffers and device tables of one run; its ``step()``
is what the Python loop, the C++ loop and a captured CUDA graph all run.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from ddpm_fast import ops
from ddpm_fast.classifier import classifier_grad
from ddpm_fast.config import conditioning_labels
from ddpm_fast.noise import MAX_SEED, NoiseKey, check_seed, image_indices, initial_noise
from ddpm_fast.ops.reverse_step import SIGMA

# Images per U-Net call in a batch-invariant run: part of what the bits depend on, so one fixed default.
INVARIANT_CHUNK = 16
# Classifier-free guidance beyond this weight extrapolates eps by orders of magnitude past the data: nonsense,
# not a setting (published runs use 1-20).
MAX_GUIDANCE_SCALE = 100.0
# Cap on the invariant chunk: past it the padded forward costs more than any batch it makes invariant.
MAX_INVARIANT_CHUNK = 1024
MAX_CACHE_INTERVAL = 1000


@runtime_checkable
class DenoiserConfig(Protocol):
    """What every model family's config offers the rest of the package (families.py): a Denoiser's ``config``."""

    sample_size: int
    in_channels: int
    learn_sigma: bool
    num_classes: int | None

    def to_dict(self) -> dict: ...


@runtime_checkable
class Denoiser(Protocol):
    """What a plan samples: ``model(x, t, class_labels) -> eps`` that declares ``compute_dtype`` (the dtype it
    casts its input to, fp16/bf16/fp32 fast forms; None: it computes in x's dtype) and ``config.num_classes``
    (None: unconditional). UNet and FastUNet are Denoisers."""

    compute_dtype: torch.dtype | None
    config: Any

    def __call__(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        ...


@dataclass(frozen=True)
class RunOptions:
    """One sampling run's draws and settings.

    ``seed`` (or, without it, ``generator``, else torch's global RNG) keys the run's Philox stream: image k
    (k = ``image_index`` + its place in the batch, or ``image_index[i]``) draws x_T and every step's noise
    from (seed, k) alone. ``x_T`` replaces the drawn start. ``class_labels``: an int or one per image, for
    conditional models (None: the null label). ``guidance_scale``: classifier-free guidance weight w
    (eps = eps_u + w (eps_c - eps_u)). ``batch_invariant``/``invariant_chunk``: see SamplingPlan.
    ``cache_interval`` N (DeepCache): the whole U-Net every N steps, only its shallow branch in between on
    the deep features cached at the last whole step (1: every step whole, through the same split; None: no
    split at all). ``classifier`` (with ``class_labels``, its classes): classifier guidance as guided-diffusion
    does it, the gradient of log p(y | x_t) times ``classifier_scale`` at every step (Sampler.guide); the
    diffusion model gets the labels too when it is class-conditional.
    """

    seed: int | None = None
    generator: torch.Generator | None = None
    x_T: torch.Tensor | None = None
    guidance_scale: float | None = None
    class_labels: Any = None
    image_index: Any = 0
    batch_invariant: bool = False
    invariant_chunk: int = INVARIANT_CHUNK
    cache_interval: int | None = None
    classifier: Any = None
    classifier_scale: float = 1.0

    def __post_init__(self):
        if self.guidance_scale is not None:
            if not abs(float(self.guidance_scale)) <= MAX_GUIDANCE_SCALE:
                raise ValueError(f"guidance_scale must be finite, within +-{MAX_GUIDANCE_SCALE:g}, got "
                                 f"{self.guidance_scale}")
            object.__setattr__(self, "guidance_scale", float(self.guidance_scale))
        chunk = self.invariant_chunk
        if isinstance(chunk, bool) or not isinstance(chunk, int) or not 1 <= chunk <= MAX_INVARIANT_CHUNK:
            raise ValueError(f"invariant_chunk must be a positive int, at most {MAX_INVARIANT_CHUNK}, got {chunk!r}")
        object.__setattr__(self, "batch_invariant", bool(self.batch_invariant))
        n = self.cache_interval
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CACHE_INTERVAL):
            raise ValueError(f"cache_interval must be an int in [1, {MAX_CACHE_INTERVAL}] or None, got {n!r}")
        if n is not None and self.batch_invariant:
            raise ValueError("cache_interval and batch_invariant cannot be combined yet (the cached features "
                             "would have to follow each chunk)")
        if self.classifier is not None:
            num = getattr(getattr(self.classifier, "config", None), "num_classes", None)
            if not callable(self.classifier) or not isinstance(num, int):
                raise TypeError("classifier must be a classifier module (clf(x, t) -> logits, with "
                                "config.num_classes), such as load_openai_classifier's")
            if self.batch_invariant or n is not None:
                raise ValueError("classifier guidance cannot be combined with batch_invariant or cache_interval "
                                 "yet")
        if not abs(float(self.classifier_scale)) <= MAX_GUIDANCE_SCALE:
            raise ValueError(f"classifier_scale must be finite, within +-{MAX_GUIDANCE_SCALE:g}, got "
                             f"{self.classifier_scale}")
        object.__setattr__(self, "classifier_scale", float(self.classifier_scale))

    @classmethod
    def of(cls, run: RunOptions | None = None, **options) -> RunOptions:
        """``run`` with ``options`` replaced (a new RunOptions from ``options`` when ``run`` is None)."""
        if run is None:
            return cls(**options)
        if not isinstance(run, RunOptions):
            raise TypeError(f"run must be a RunOptions, got {type(run).__name__}")
        return dataclasses.replace(run, **options) if options else run

    @property
    def setting(self) -> tuple:
        """What a captured graph depends on (draws aside): the graph engine's cache key part."""
        return (self.guidance_scale, self.invariant_chunk if self.batch_invariant else None, self.cache_interval)


class SamplingPlan:
    """One sampling run, built once; every loop (Python, C++, CUDA-graph replay) runs ``step()``.

    Holds the run's draws (x_T, labels and null labels, the noise key [seed, step] and each image's global
    index), the per-step device tables (model timestep and coefficient row of step i), the state buffers
    (``x``: fp32 x_t; for a fast fp16/bf16 model also the half copy the U-Net reads; for a multistep solver
    the ``history``: ring slots of earlier model outputs) and the step counter.
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

    def __init__(self, sampler, model, shape, run: RunOptions | None = None, device=None):
        run = RunOptions() if run is None else run
        shape = tuple(int(s) for s in shape)
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError(f"shape must be (N, C, H, W) with positive sizes, got {shape}")
        if not isinstance(model, Denoiser):
            raise TypeError(f"sampling needs a Denoiser (model(x, t, class_labels) with compute_dtype and "
                            f"config.num_classes, like UNet), got {type(model).__name__}")
        if bool((sampler.timesteps == 0).all()):  # every sampler, every way of choosing its timesteps
            raise ValueError(f"{type(sampler).__name__}: its only model evaluation is at t = 0, so the run would "
                             "return the noise it starts from; take more steps, another spacing ('trailing' starts "
                             "a one-step run at t = T-1) or a respacing that keeps a later timestep")
        if sampler.learned_variance and not model.config.learn_sigma:
            raise ValueError(f"{type(sampler).__name__}(variance='learned_range') needs a learned-sigma model "
                             "(one that outputs eps and v)")
        param = next(model.parameters())
        self.device = torch.device(device) if device is not None else param.device
        self.sampler, self.model, self.shape, self.n = sampler, model, shape, shape[0]
        self.guidance_scale = run.guidance_scale
        self.classifier, self.classifier_scale = run.classifier, run.classifier_scale
        pred = getattr(sampler, "prediction_type", "epsilon")
        if run.classifier is not None and pred != "epsilon":  # openai's guidance shifts eps (condition_score)
            raise ValueError(f"classifier guidance needs an epsilon-prediction model; this one predicts {pred}")
        self.classifier_labels = None
        self.fast_dtype = model.compute_dtype
        fmt = torch.channels_last if self.fast_dtype is not None else torch.contiguous_format
        self.x = torch.empty(shape, device=self.device, dtype=torch.float32, memory_format=fmt)
        half = self.fast_dtype not in (None, torch.float32)
        self.x_half = torch.empty_like(self.x, dtype=self.fast_dtype) if half else None
        self.coefs, self.steps_row = sampler.device_tables(self.device)  # the table; the row of step i
        self.steps_t = sampler.timesteps.to(self.device)  # model timestep of step i (float: between timesteps)
        self.counter = torch.zeros(2, dtype=torch.int64, device=self.device)  # [seed, step]
        self.images = torch.zeros(self.n, dtype=torch.int64, device=self.device)
        self.key = NoiseKey(self.counter, self.images) if bool((sampler.coefs[:, SIGMA] > 0).any()) else None
        # A multistep solver's memory: the previous steps' data predictions (zeroed by start()).
        self.history = tuple(torch.zeros_like(self.x) for _ in range(sampler.history_depth))
        self.labels = self.null = None
        self.num_steps = sampler.num_steps
        self.cache_interval = run.cache_interval
        if self.cache_interval and 1 < self.num_steps <= self.cache_interval:
            raise ValueError(f"cache_interval {self.cache_interval} is not below the run's {self.num_steps} model "
                             "evaluations: every step after the first would reuse the first step's deep features "
                             f"and the images come out as blobs; take it below {self.num_steps} (1: no caching)")
        if self.cache_interval and not callable(getattr(model, "encode_shallow", None)):
            raise ValueError(f"cache_interval: {type(model).__name__} has no shallow/deep boundary (encode_shallow, "
                             "deep, decode_shallow); the DDPM UNet and its fast form have one")
        self.deep_features = None  # what the last whole step's deep branch gave (feature caching)
        self.start(run)
        self.batch_invariant, self.chunk = run.batch_invariant, run.invariant_chunk
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

    def start(self, run: RunOptions | None = None, **draws) -> SamplingPlan:
        """Load a run's draws (``run``'s seed, generator, x_T, class_labels, image_index, or those given as
        keywords) into the buffers, in place, and rewind the step counter to 0."""
        run = RunOptions.of(run, **draws)
        seed, generator, x_T = run.seed, run.generator, run.x_T
        if seed is None:
            # No seed: one from the generator, or from torch's global RNG (so torch.manual_seed applies).
            seed = int(torch.randint(0, MAX_SEED, (), generator=generator, device=generator.device
                                     if generator is not None else "cpu").item())
        seed = check_seed(seed)
        images = image_indices(run.image_index, self.n)
        model_labels = run.class_labels
        if self.classifier is not None:
            if run.class_labels is None:
                raise ValueError("classifier guidance needs class_labels (the classes to steer towards)")
            clf_labels = conditioning_labels(self.classifier.config.num_classes, run.class_labels, self.n,
                                             self.device)
            if self.classifier_labels is None:
                self.classifier_labels = clf_labels
            else:
                self.classifier_labels.copy_(clf_labels)
            if not self.model.config.num_classes:
                model_labels = None  # an unconditional model: the labels are the classifier's alone
        labels, null = _prepare_labels(self.model, model_labels, self.guidance_scale, self.n, self.device)
        if self.labels is None or labels is None:
            self.labels, self.null = labels, null
        else:
            self.labels.copy_(labels)
        if x_T is None:
            x_T = initial_noise(self.shape, seed, images, self.device, ops.memory_format(self.x))
        elif not torch.is_tensor(x_T) or tuple(x_T.shape) != self.shape or not x_T.is_floating_point():
            desc = f"{tuple(x_T.shape)} {x_T.dtype}" if torch.is_tensor(x_T) else type(x_T).__name__
            raise ValueError(f"x_T must be a floating tensor of shape {self.shape}, got {desc}")
        elif not bool(torch.isfinite(x_T).all()):  # start() runs outside any capture: a host read is fine
            raise ValueError("x_T holds non-finite values")
        self.x.copy_(x_T)
        for h in self.history:
            h.zero_()  # early steps weigh them by 0, and 0 * (garbage or NaN) must not appear
        if self.x_half is not None:
            self.x_half.copy_(self.x)
        self.images.copy_(images)
        self.counter.copy_(torch.tensor([seed, 0], dtype=torch.int64))
        self.seed, self.done = seed, 0
        return self

    def step(self) -> None:
        """One reverse step, in place (``device_step``), counted on the host; with feature caching, a whole
        step every cache_interval steps (the first included), the shallow branch in between."""
        self.device_step(whole=self.whole_step(self.done))
        self.done += 1

    def whole_step(self, i: int) -> bool:
        """Whether step i runs the whole U-Net (always, without feature caching)."""
        return not self.cache_interval or i % self.cache_interval == 0

    @torch.no_grad()
    def device_step(self, whole: bool = True) -> None:
        """One reverse step on the device alone: the step index comes from the device counter, nothing is
        read back or kept on the host. What a CUDA graph captures and torch.compile compiles (with feature
        caching, one graph per kind: ``whole`` refreshes the cached deep features, else they are reused)."""
        i = self.counter[1:]
        t = self.steps_t[i].expand(self.n)
        row = self.steps_row[i].expand(self.n)
        if self.batch_invariant:
            eps_c, eps_u = self._eps_in_chunks(t[:1])
        elif self.cache_interval:
            eps_c, eps_u = self._eps_cached(t, whole)
        else:
            eps_c, eps_u = model_eps(self.model, self.model_input, t, self.labels, self.null)
        eps_c, var = self.sampler.split_output(eps_c, self.shape[1])
        if eps_u is not None:
            eps_u, _ = self.sampler.split_output(eps_u, self.shape[1])
        scale = 1.0 if self.guidance_scale is None else self.guidance_scale
        if self.classifier is None:
            ops.reverse_step(self.x, eps_c, self.coefs, row, self.key, self.sampler.clip_denoised, eps_u, scale,
                             out=self.x, half_out=self.x_half, history=self.history, model_var_values=var)
        else:
            self._guided_step(t, row, eps_c, eps_u, scale, var)
        self.counter[1:] += 1

    def _guided_step(self, t, row, eps_c, eps_u, scale, var) -> None:
        """The step with classifier guidance (Sampler.guide): the classifier's gradient at x_t, then the fused
        update in place."""
        grad = classifier_grad(self.classifier, self.x, t, self.classifier_labels, self.classifier_scale)

        def step(eps, clip):  # in place, as the unguided step
            return ops.reverse_step(self.x, eps, self.coefs, row, self.key, clip, out=self.x, history=self.history,
                                    model_var_values=var)

        self.sampler.guide(self.x, eps_c, eps_u, scale, var, grad, self.coefs, row, step)
        if self.x_half is not None:
            self.x_half.copy_(self.x)

    def _eps_cached(self, t: torch.Tensor, whole: bool):
        """model_eps through the U-Net's shallow/deep boundary: a whole step stores the deep branch's output
        (in one buffer, so captured graphs share it); another step runs the shallow branch on it."""
        model, x, labels = self.model, self.model_input, self.labels
        if self.null is not None:  # both halves of guidance in one batch, as model_eps does
            x, t, labels = torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, self.null])
        h, temb = model.prepare(x, t, labels)
        h, skips = model.encode_shallow(h, temb)
        if whole or self.deep_features is None:
            deep = model.deep(h, temb)
            if self.deep_features is None:
                self.deep_features = torch.empty_like(deep)
            self.deep_features.copy_(deep)
        else:
            deep = self.deep_features
        eps = model.decode_shallow(deep, skips, temb)
        return (eps, None) if self.null is None else eps.chunk(2)

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
                if eps_c is None:  # laid out as x; a learned-sigma model's output has twice its channels
                    fmt = ops.memory_format(self.x)
                    eps_c = torch.empty((self.n, *c.shape[1:]), dtype=c.dtype, device=self.device, memory_format=fmt)
                    eps_u = None if u is None else torch.empty_like(eps_c, dtype=u.dtype)
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


def model_eps(model, x_in, t, labels, null):
    """(eps_cond, eps_uncond): with a null label, both halves of guidance in one batched forward;
    without one, (eps, None)."""
    if null is None:
        return model(x_in, t, labels), None
    eps = model(torch.cat([x_in, x_in]), torch.cat([t, t]), torch.cat([labels, null]))
    eps_c, eps_u = eps.chunk(2)
    return eps_c, eps_u


def _prepare_labels(model, class_labels, guidance_scale, n, device):
    """(labels, null labels for guidance): what a plan feeds the model."""
    config = model.config
    num_classes = config.num_classes
    if guidance_scale is not None and not num_classes:
        raise ValueError("guidance_scale needs a class-conditional model (config.num_classes)")
    if class_labels is None and guidance_scale is not None:
        raise ValueError("guidance_scale needs class_labels")
    if num_classes and config.null_label is None:
        if guidance_scale is not None:
            raise ValueError("guidance_scale: this model has no null label (it was not trained for "
                             "classifier-free guidance)")
        if class_labels is None:
            raise ValueError(f"class_labels: this class-conditional model has no null label; give each image a "
                             f"class in [0, {num_classes - 1}]")
    labels = conditioning_labels(num_classes, class_labels, n, device)
    null = torch.full_like(labels, config.null_label) if guidance_scale is not None else None
    return labels, null
