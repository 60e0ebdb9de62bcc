"""The graph engine: a whole sampling run that never returns to Python between steps.

On a GPU, one ``plan.device_step()`` of a SamplingPlan (fast-path U-Net forward, fused reverse step with
in-kernel noise, step-counter advance) is captured once into a CUDA graph over the plan's buffers, and
ddpm_fast.ops._C replays it. The step reads its index from the plan's device counter (timestep, coefficient
row and noise key follow from it on the device), so nothing in the graph changes between replays.
With feature caching (cache_interval) the whole and the shallow step are captured as two graphs, replayed
in the plan's order. Graphs are cached by (shape, dtype, model, sampler settings, guidance) and share one memory pool; a
second call with the same settings loads its draws into the captured plan (``plan.start``) and replays,
unless a parameter of the model changed since the capture (storage or version counter: an optimizer
step, load_state_dict), which re-captures, since the graph also reads weights the fast blocks derived.
The eager loop runs the same plan step, so the two agree bit for bit.

On the CPU the same API loops over the plan's steps in C++ (no graphs), with one notice; without the
extension it runs the plan's Python loop.
"""

from __future__ import annotations

import torch

from ddpm_fast import ops
from ddpm_fast.base import warn_once
from ddpm_fast.plan import RunOptions


def unavailable_reason(device) -> str | None:
    """None if the graph engine (or its C++ CPU loop) can run on ``device``, else why not."""
    device = torch.device(device)
    if device.type == "cuda":
        return ops.backend_unavailable_reason("triton", device)
    if ops.extension() is None:
        return "the extension ddpm_fast.ops._C is not built"
    return None


def capture_graphs(steps: dict, device, pool=None) -> dict:
    """A CUDA graph of each step of ``steps`` (key -> function over static buffers), sharing ``pool``: all warmed
    up twice on a side stream (Triton compiles, cuDNN picks its algorithms), then each captured once. The one
    capture helper: the sampling plan's steps and the bound's batches go through it."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            for step in steps.values():
                step()
    torch.cuda.current_stream(device).wait_stream(side)
    graphs = {}
    for key, step in steps.items():
        graphs[key] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[key], pool=pool):
            step()
    return graphs


def weights_fingerprint(model: torch.nn.Module) -> tuple:
    """Changes whenever any parameter is replaced or updated in place."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


class _Captured:
    """A sampling plan and the CUDA graph of one ``plan.device_step()`` (one shape, model, sampler, guidance)."""

    def __init__(self, plan, pool):
        self.plan = plan
        device = plan.device
        # With feature caching, two kinds of step (whole, shallow), a graph each; they share the plan's buffers
        # (the cached deep features among them), so replaying them in the plan's order is the eager loop.
        kinds = (True, False) if plan.cache_interval else (True,)
        self.graphs = capture_graphs({whole: (lambda whole=whole: plan.device_step(whole)) for whole in kinds},
                                     device, pool)
        self.graph = self.graphs[True]

    def run(self) -> torch.Tensor:
        plan = self.plan
        steps = plan.num_steps - plan.done
        if plan.cache_interval:  # the two graphs in the plan's order, from Python
            for i in range(plan.done, plan.num_steps):
                self.graphs[plan.whole_step(i)].replay()
            plan.done += steps
            return plan.x.clone()
        ext = ops.extension()
        if ext is not None and hasattr(ext, "replay_graph"):
            try:
                ext.replay_graph(self.graph, steps)
                plan.done += steps
                return plan.x.clone()
            except TypeError:
                warn_once("replay", "ddpm_fast: the C++ graph loop could not take torch's CUDAGraph object; "
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

    def _key(self, sampler, model, shape, run: RunOptions):
        # Identity of model and sampler: a new object is a new setting (the cache holds both alive).
        return (id(model), id(sampler), tuple(shape), model.compute_dtype, model.config.num_classes, run.setting,
                sampler.clip_denoised, tuple(sampler.timesteps.tolist()))

    @torch.no_grad()
    def sample(self, sampler, model, shape, run: RunOptions | None = None, **options) -> torch.Tensor:
        """The same images as ``sampler.sample`` (same plan, same noise stream), looped without Python. The
        run's options come as a RunOptions or as its fields by keyword, as for ``sampler.plan``."""
        run = RunOptions.of(run, **options)
        if run.classifier is not None:
            raise ValueError(CLASSIFIER_NOT_CAPTURED)
        device = next(model.parameters()).device
        if device.type != "cuda":
            return self._sample_cpu(sampler.plan(model, shape, run))
        if not model.is_fast:
            raise ValueError("the graph engine runs the fast path: pass model.to_fast(torch.float16) (or bf16)")
        why = unavailable_reason(device)
        if why:
            raise RuntimeError(f"graph engine: {why}")
        shape = tuple(int(s) for s in shape)
        key = self._key(sampler, model, shape, run)
        weights = weights_fingerprint(model)
        captured = self._cache.get(key)
        if captured is None or captured.weights != weights:
            self._cache.pop(key, None)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            captured = _Captured(sampler.plan(model, shape, run), self._pool)
            captured.weights = weights
            self._cache[key] = captured
            self.captures += 1
        captured.plan.start(run)
        return captured.run()

    def clear(self) -> None:
        """Drop every captured graph (and the models and buffers they hold)."""
        self._cache.clear()

    @staticmethod
    def _sample_cpu(plan) -> torch.Tensor:
        ext = ops.extension()
        if ext is None:
            warn_once("cpu-python", "ddpm_fast: no extension; the graph engine runs the plan's Python loop")
            return plan.run()
        warn_once("cpu-loop", "ddpm_fast: no CUDA device; the graph engine loops over the plan's steps in C++ "
                            "without graphs")
        ext.run_steps(plan.step, plan.num_steps - plan.done)
        return plan.x.clone()


# Why classifier guidance keeps the eager loop: its step runs a backward through the classifier, and a backward
# under CUDA-graph capture (autograd's own streams and allocations) has not been verified on a GPU yet; the eager
# loop runs the same plan step.
CLASSIFIER_NOT_CAPTURED = ("the graph engine does not capture classifier guidance yet (its step runs a backward "
                           "through the classifier, not yet verified under CUDA-graph capture); use the eager "
                           "loop (--engine eager)")

_default_engine = GraphEngine()


def sample(sampler, model, shape, run: RunOptions | None = None, **options):
    """Run ``sampler`` on ``model`` with the process-wide graph engine (see GraphEngine.sample)."""
    return _default_engine.sample(sampler, model, shape, run, **options)
