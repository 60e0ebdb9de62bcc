"""The graph engine: a whole DDPM/DDIM run that never returns to Python between steps.

On a GPU one step (fast-path U-Net forward, reverse step with in-kernel noise, step-counter advance) is
captured once into a CUDA graph over static buffers, and ddpm_fast._C replays it num_steps times. The
coefficient row and model timestep of step i are gathered on the device from per-step tables, and the
noise key [seed, step] lives on the device, so nothing in the graph changes between replays. Graphs are
cached by (shape, dtype, model, sampler settings, guidance) and share one memory pool; a second call
with the same settings re-uses the graph, unless a parameter of the model changed since the capture
(storage or version counter: an optimizer step, load_state_dict), which re-captures it, since the graph
also reads weights the fast blocks derived from them. The eager fast path draws the same noise from the same
(seed, step) keys, so with the same kernels the two agree bit for bit.

On the CPU (or without CUDA) the same API runs the chain in C++ without graphs (sample_loop_cpu),
with one notice; without the extension it falls back to the Python loop.
"""

from __future__ import annotations

import warnings

import torch

from ddpm_fast import ops
from ddpm_fast.samplers import _prepare_labels, model_eps

_notices: set[str] = set()


def _notice(key: str, msg: str) -> None:
    if key not in _notices:
        _notices.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def unavailable_reason(device) -> str | None:
    """None if the graph engine (or its C++ CPU loop) can run on ``device``, else why not."""
    device = torch.device(device)
    if device.type == "cuda":
        return ops.backend_unavailable_reason("triton", device)
    if ops.extension() is None:
        return "the extension ddpm_fast._C is not built"
    return None


def weights_fingerprint(model: torch.nn.Module) -> tuple:
    """Changes whenever any parameter is replaced or updated in place."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


class _Captured:
    """Static buffers and the captured graph of one (shape, model, sampler, guidance) setting."""

    def __init__(self, sampler, model, shape, labels, null, guidance_scale, pool):
        device = next(model.parameters()).device
        self.device, self.n = device, shape[0]
        dtype = model.compute_dtype
        self.x = torch.zeros(shape, device=device).contiguous(memory_format=torch.channels_last)
        self.x_half = self.x if dtype == torch.float32 else torch.zeros_like(self.x, dtype=dtype)
        self.noise_key = torch.zeros(2, dtype=torch.int64, device=device)  # [seed, step]
        coefs, lookup = sampler.device_tables(device)
        self.coefs = coefs
        self.steps_t = sampler.timesteps.to(device)  # model timestep of step i
        self.steps_row = lookup[self.steps_t]  # coefficient row of step i
        self.labels = None if labels is None else labels.clone()
        self.null = None if null is None else null.clone()
        self.w = float(guidance_scale) if guidance_scale is not None else 1.0
        self.clip = sampler.clip_denoised
        self.model = model
        self.num_steps = sampler.num_steps

        # Warm up on a side stream (Triton compiles, cuDNN picks algorithms), then capture.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self._step()

    def _step(self):
        i = self.noise_key[1:]
        t = self.steps_t[i].expand(self.n)
        row = self.steps_row[i].expand(self.n)
        eps_c, eps_u = model_eps(self.model, self.x_half, t, self.labels, self.null)
        ops.reverse_step(self.x, eps_c, self.coefs, row, clip_denoised=self.clip, model_output_uncond=eps_u,
                         guidance_scale=self.w, noise_seed=self.noise_key[:1], step=self.noise_key[1:],
                         half_out=None if self.x_half is self.x else self.x_half, out=self.x)
        self.noise_key[1:] += 1

    def run(self, x_T: torch.Tensor, noise_seed: int, labels) -> torch.Tensor:
        self.x.copy_(x_T)
        self.x_half.copy_(x_T)
        if labels is not None:
            self.labels.copy_(labels)
        self.noise_key.copy_(torch.tensor([noise_seed, 0]))
        ext = ops.extension()
        if ext is not None and hasattr(ext, "replay_graph"):
            try:
                ext.replay_graph(self.graph, self.num_steps)
                return self.x.clone()
            except TypeError:
                _notice("replay", "ddpm_fast: the C++ graph loop could not take torch's CUDAGraph object; "
                                  "replaying from Python instead")
        for _ in range(self.num_steps):
            self.graph.replay()
        return self.x.clone()


class GraphEngine:
    """Caches captured graphs; ``sample`` has the samplers' signature and result."""

    def __init__(self):
        self._cache: dict[tuple, _Captured] = {}
        self._pool = None
        self.captures = 0  # how many graphs this engine has captured (tests check the cache with it)

    def _key(self, sampler, model, shape, conditional, guided, w):
        # Identity of model and sampler: a new object is a new setting (the cache holds both alive).
        return (id(model), id(sampler), tuple(shape), model.compute_dtype, conditional, guided, w,
                sampler.clip_denoised, tuple(sampler.timesteps.tolist()))

    @torch.no_grad()
    def sample(self, sampler, model, shape, seed: int | None = None, guidance_scale: float | None = None,
               class_labels=None, generator: torch.Generator | None = None) -> torch.Tensor:
        param = next(model.parameters())
        device = param.device
        shape = tuple(int(s) for s in shape)
        if device.type != "cuda":
            return self._sample_cpu(sampler, model, shape, seed, guidance_scale, class_labels, generator)
        if not getattr(model, "is_fast", False):
            raise ValueError("the graph engine runs the fast path: pass model.to_fast(torch.float16) (or bf16)")
        why = unavailable_reason(device)
        if why:
            raise RuntimeError(f"graph engine: {why}")
        if generator is None and seed is not None:
            generator = torch.Generator(device).manual_seed(int(seed))
        labels, null = _prepare_labels(model, class_labels, guidance_scale, shape[0], device)
        # The same draws, in the same order, as the eager fast path (Sampler.sample).
        x_T = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        noise_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=device).item())
        key = self._key(sampler, model, shape, labels is not None, null is not None, guidance_scale)
        weights = weights_fingerprint(model)
        captured = self._cache.get(key)
        if captured is None or captured.weights != weights:
            self._cache.pop(key, None)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            captured = _Captured(sampler, model, shape, labels, null, guidance_scale, self._pool)
            captured.weights = weights
            self._cache[key] = captured
            self.captures += 1
        return captured.run(x_T, noise_seed, labels)

    def clear(self) -> None:
        """Drop every captured graph (and the models and buffers they hold)."""
        self._cache.clear()

    def _sample_cpu(self, sampler, model, shape, seed, guidance_scale, class_labels, generator):
        ext = ops.extension()
        if ext is None:
            _notice("cpu-python", "ddpm_fast: no extension; the graph engine runs the Python loop")
            return sampler.sample(model, shape, seed=seed, guidance_scale=guidance_scale,
                                  class_labels=class_labels, progress=False, generator=generator)
        _notice("cpu-loop", "ddpm_fast: no CUDA device; the graph engine runs its C++ loop without graphs")
        device = next(model.parameters()).device
        if generator is None and seed is not None:
            generator = torch.Generator(device).manual_seed(int(seed))
        labels, null = _prepare_labels(model, class_labels, guidance_scale, shape[0], device)
        dtype = next(model.parameters()).dtype
        x = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        steps_t = sampler.timesteps.tolist()
        n = shape[0]

        def model_fn(x_t, i):
            t = torch.full((n,), steps_t[i], dtype=torch.int64)
            eps_c, eps_u = model_eps(model, x_t.to(dtype), t, labels, null)
            return eps_c if eps_u is None else (eps_c, eps_u)

        coefs, lookup = sampler.device_tables(device)
        rows = lookup[sampler.timesteps]
        w = float(guidance_scale) if guidance_scale is not None else 1.0
        return ext.sample_loop_cpu(model_fn, x, coefs, rows, w, sampler.clip_denoised, generator)


_default_engine = GraphEngine()


def sample(sampler, model, shape, seed=None, guidance_scale=None, class_labels=None, generator=None):
    """Run ``sampler`` on ``model`` with the process-wide graph engine (see GraphEngine.sample)."""
    return _default_engine.sample(sampler, model, shape, seed=seed, guidance_scale=guidance_scale,
                                  class_labels=class_labels, generator=generator)
