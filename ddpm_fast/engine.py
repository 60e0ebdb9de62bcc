"""The graph engine: a whole sampling run that never returns to Python between steps.

On a GPU, one ``plan.step()`` of a SamplingPlan (fast-path U-Net forward, fused reverse step with
in-kernel noise, step-counter advance) is captured once into a CUDA graph over the plan's buffers, and
ddpm_fast._C replays it. The step reads its index from the plan's device counter (timestep, coefficient
row and noise key follow from it on the device), so nothing in the graph changes between replays.
Graphs are cached by (shape, dtype, model, sampler settings, guidance) and share one memory pool; a
second call with the same settings loads its draws into the captured plan (``plan.start``) and replays,
unless a parameter of the model changed since the capture (storage or version counter: an optimizer
step, load_state_dict), which re-captures, since the graph also reads weights the fast blocks derived.
The eager loop runs the same plan step, so the two agree bit for bit.

On the CPU the same API loops over the plan's steps in C++ (no graphs), with one notice; without the
extension it runs the plan's Python loop.
"""

from __future__ import annotations

import warnings

import torch

from ddpm_fast import ops
from ddpm_fast.samplers import INVARIANT_CHUNK

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
    """A sampling plan and the CUDA graph of one ``plan.step()`` (one shape, model, sampler, guidance)."""

    def __init__(self, plan, pool):
        self.plan = plan
        device = plan.device
        # Warm up on a side stream (Triton compiles, cuDNN picks algorithms), then capture one step.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                plan.step()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            plan.step()

    def run(self) -> torch.Tensor:
        plan = self.plan
        steps = plan.num_steps - plan.done
        ext = ops.extension()
        if ext is not None and hasattr(ext, "replay_graph"):
            try:
                ext.replay_graph(self.graph, steps)
                plan.done += steps
                return plan.x.clone()
            except TypeError:
                _notice("replay", "ddpm_fast: the C++ graph loop could not take torch's CUDAGraph object; "
                                  "replaying from Python instead")
        for _ in range(steps):
            self.graph.replay()
        plan.done += steps
        return plan.x.clone()


class GraphEngine:
    """Caches captured graphs; ``sample`` has the samplers' signature and result."""

    def __init__(self):
        self._cache: dict[tuple, _Captured] = {}
        self._pool = None
        self.captures = 0  # how many graphs this engine has captured (tests check the cache with it)

    def _key(self, sampler, model, shape, conditional, w, invariant):
        # Identity of model and sampler: a new object is a new setting (the cache holds both alive).
        return (id(model), id(sampler), tuple(shape), model.compute_dtype, conditional, w,
                sampler.clip_denoised, tuple(sampler.timesteps.tolist()), invariant)

    @torch.no_grad()
    def sample(self, sampler, model, shape, seed: int | None = None, guidance_scale: float | None = None,
               class_labels=None, generator: torch.Generator | None = None, x_T: torch.Tensor | None = None,
               image_index=0, batch_invariant: bool = False, invariant_chunk: int = INVARIANT_CHUNK) -> torch.Tensor:
        """The same images as ``sampler.sample`` (same plan, same noise stream), looped without Python."""
        device = next(model.parameters()).device
        draws = dict(seed=seed, generator=generator, x_T=x_T, class_labels=class_labels, image_index=image_index)
        setting = dict(guidance_scale=guidance_scale, batch_invariant=bool(batch_invariant),
                       invariant_chunk=invariant_chunk)
        if device.type != "cuda":
            return self._sample_cpu(sampler.plan(model, shape, **setting, **draws))
        if not getattr(model, "is_fast", False):
            raise ValueError("the graph engine runs the fast path: pass model.to_fast(torch.float16) (or bf16)")
        why = unavailable_reason(device)
        if why:
            raise RuntimeError(f"graph engine: {why}")
        shape = tuple(int(s) for s in shape)
        conditional = getattr(model.config, "num_classes", None) is not None
        invariant = invariant_chunk if batch_invariant else None
        key = self._key(sampler, model, shape, conditional, guidance_scale, invariant)
        weights = weights_fingerprint(model)
        captured = self._cache.get(key)
        if captured is None or captured.weights != weights:
            self._cache.pop(key, None)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            captured = _Captured(sampler.plan(model, shape, **setting, **draws), self._pool)
            captured.weights = weights
            self._cache[key] = captured
            self.captures += 1
        captured.plan.start(**draws)
        return captured.run()

    def clear(self) -> None:
        """Drop every captured graph (and the models and buffers they hold)."""
        self._cache.clear()

    @staticmethod
    def _sample_cpu(plan) -> torch.Tensor:
        ext = ops.extension()
        if ext is None:
            _notice("cpu-python", "ddpm_fast: no extension; the graph engine runs the plan's Python loop")
            return plan.run()
        _notice("cpu-loop", "ddpm_fast: no CUDA device; the graph engine loops over the plan's steps in C++ "
                            "without graphs")
        ext.run_steps(plan.step, plan.num_steps - plan.done)
        return plan.x.clone()


_default_engine = GraphEngine()


def sample(sampler, model, shape, seed=None, guidance_scale=None, class_labels=None, generator=None, x_T=None,
           image_index=0, batch_invariant=False, invariant_chunk=INVARIANT_CHUNK):
    """Run ``sampler`` on ``model`` with the process-wide graph engine (see GraphEngine.sample)."""
    return _default_engine.sample(sampler, model, shape, seed=seed, guidance_scale=guidance_scale,
                                  class_labels=class_labels, generator=generator, x_T=x_T, image_index=image_index,
                                  batch_invariant=batch_invariant, invariant_chunk=invariant_chunk)
