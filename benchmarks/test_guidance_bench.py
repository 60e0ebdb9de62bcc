"""Classifier guidance: one guided ancestral step (the U-Net's forward, the classifier's forward and backward, the
mean shifted by the step's variance times the gradient), per provider, interleaved in one run.

Providers: openai (guided-diffusion's own UNetModel, EncoderUNetModel and ``p_sample(cond_fn=...)`` as its
classifier_sample.py runs them, fp32; where guided_diffusion is importable: ``pip install .[peers]``),
reference (our ADMUNet and EncoderUNet, fp32 NCHW, the torch ops) and ddpm_fast (what ``sample --fp16
--classifier`` runs: both models ``to_fast`` in this device's --fp16 dtype, the classifier's weights fixed, so its
3x3 convolutions run Winograd forward and backward on a CPU). All three on the same random weights (every
parameter N(0, 0.02)), learned sigma, class-conditional, ``classifier_scale`` 1.

Shapes: tiny (CI) a narrow 64x64 model and classifier (32 channels, one block a level) at batch 2; full
guided-diffusion's ImageNet 64x64 ADM-G pair (the 296M-parameter model, the depth-4 width-128 classifier with
attention pooling) at batch 2 on a CPU, 8 on a GPU.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from harness import DEVICE, SIZE, record, sync

from ddpm_fast import DDPMSampler, ops
from ddpm_fast.adm import ADMUNet
from ddpm_fast.classifier import EncoderUNet
from ddpm_fast.openai import classifier_config_from_flags, config_from_flags

MODEL_FLAGS = {
    "tiny": ("--image_size 64 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2,2,2 --attention_resolutions 8 "
             "--num_head_channels 32 --learn_sigma True --class_cond True --resblock_updown True "
             "--use_scale_shift_norm True --noise_schedule cosine"),
    "full": ("--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 64 "
             "--learn_sigma True --noise_schedule cosine --num_channels 192 --num_head_channels 64 --num_res_blocks 3 "
             "--resblock_updown True --use_new_attention_order True --use_scale_shift_norm True"),
}[SIZE]
CLASSIFIER_FLAGS = {
    "tiny": ("--image_size 64 --classifier_attention_resolutions 8 --classifier_depth 1 --classifier_width 32 "
             "--classifier_pool attention --classifier_resblock_updown True --classifier_use_scale_shift_norm True"),
    "full": ("--image_size 64 --classifier_attention_resolutions 32,16,8 --classifier_depth 4 --classifier_width 128 "
             "--classifier_pool attention --classifier_resblock_updown True --classifier_use_scale_shift_norm True"),
}[SIZE]
BATCH = 2 if SIZE == "tiny" or DEVICE.type == "cpu" else 8
ROUNDS = 5 if SIZE == "full" else 2


def _random(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02)
    return module.eval()


def _their_args(defaults: dict, flags: str, **fixed) -> dict:
    """guided-diffusion's keyword arguments: its defaults, overridden by a flag string (each value typed as its
    default is), then by ``fixed``."""
    args = dict(defaults)
    words = flags.split()
    for key, value in zip(words[::2], words[1::2], strict=True):
        name = key.lstrip("-")
        args[name] = value == "True" if isinstance(args[name], bool) else type(args[name])(value)
    return {**args, **fixed}


def _openai_units(model, classifier, x, t, y):
    """guided-diffusion's own step on the same weights, or None where it is not installed."""
    try:
        from guided_diffusion import script_util
    except ImportError:
        return None
    flags = _their_args(script_util.model_and_diffusion_defaults(), MODEL_FLAGS, use_fp16=False)
    theirs, diffusion = script_util.create_model_and_diffusion(**flags)
    theirs.load_state_dict(model.state_dict())
    clf_flags = _their_args(script_util.classifier_defaults(), CLASSIFIER_FLAGS, classifier_use_fp16=False)
    their_clf = script_util.create_classifier(**clf_flags)
    their_clf.load_state_dict(classifier.state_dict())
    theirs, their_clf = theirs.to(DEVICE).eval(), their_clf.to(DEVICE).eval()

    def cond_fn(x_t, t_t, y=None):  # classifier_sample.py's
        with torch.enable_grad():
            x_in = x_t.detach().requires_grad_(True)
            log_probs = F.log_softmax(their_clf(x_in, t_t), dim=-1)
            selected = log_probs[range(len(log_probs)), y.view(-1)]
            return torch.autograd.grad(selected.sum(), x_in)[0]

    def step():
        return diffusion.p_sample(theirs, x, t, clip_denoised=True, cond_fn=cond_fn, model_kwargs={"y": y})["sample"]

    return step


def _our_unit(model, classifier, schedule, fast: bool):
    if fast:
        dtype = torch.float16 if DEVICE.type == "cuda" else ops.cpu_half_dtype()
        model, classifier = model.to_fast(dtype), classifier.to_fast(dtype)
    sampler = DDPMSampler(schedule, "learned_range")
    shape = (BATCH, 3, model.config.image_size, model.config.image_size)
    labels = list(range(BATCH))
    state = {}

    def step():
        plan = state.get("plan")
        if plan is None or plan.done >= plan.num_steps:
            plan = state["plan"] = sampler.plan(model, shape, seed=0, class_labels=labels, classifier=classifier,
                                                classifier_scale=1.0, device=DEVICE)
        plan.step()

    return step, ("torch" if not fast else "auto")


def test_guided_step(benchmark):
    torch.manual_seed(0)
    config, schedule = config_from_flags(MODEL_FLAGS)
    model = _random(ADMUNet(config)).to(DEVICE)
    classifier = _random(EncoderUNet(classifier_config_from_flags(CLASSIFIER_FLAGS))).to(DEVICE)
    classifier.requires_grad_(False)  # as load_classifier returns it
    size = config.image_size
    x = torch.randn(BATCH, 3, size, size, device=DEVICE)
    t = torch.full((BATCH,), 500, device=DEVICE)
    y = torch.arange(BATCH, device=DEVICE)
    units = {}
    openai = _openai_units(model, classifier, x, t, y)
    if openai is not None:
        units["openai"] = (openai, "torch")
    units["reference"] = _our_unit(model, classifier, schedule, fast=False)
    units["ddpm_fast"] = _our_unit(model, classifier, schedule, fast=True)
    times = {name: [] for name in units}
    with torch.no_grad():
        for fn, backend in units.values():  # warm-up
            with ops.use_backend(backend):
                fn()
        order = list(units.items())
        for r in range(ROUNDS):
            for name, (fn, backend) in order if r % 2 == 0 else order[::-1]:
                with ops.use_backend(backend):
                    sync()
                    start = time.perf_counter()
                    fn()
                    sync()
                times[name].append(time.perf_counter() - start)
    base = "openai" if "openai" in times else "reference"
    lines = [f"\nguided DDPM step, {size}x{size}, batch {BATCH} ({SIZE}; {DEVICE.type}, "
             f"{torch.get_num_threads()} threads)",
             "| provider | ms / img-step (best) | median | spread | vs " + base + " |", "|---|---|---|---|---|"]
    rows = []
    for name, ts in times.items():
        best = min(ts)
        rows.append(dict(provider=name, ms_per_img_step=round(best * 1e3 / BATCH, 2),
                         median_ms=round(statistics.median(ts) * 1e3 / BATCH, 2), spread=round(max(ts) / best, 2),
                         speedup=round(min(times[base]) / best, 2)))
        lines.append(f"| {name} | {best * 1e3 / BATCH:.2f} | {statistics.median(ts) * 1e3 / BATCH:.2f} | "
                     f"{max(ts) / best:.2f} | {min(times[base]) / best:.2f}x |")
    print("\n".join(lines))
    fn, backend = units["ddpm_fast"]
    with torch.no_grad(), ops.use_backend(backend):
        benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
    record(benchmark, kind="guided_step", image_size=size, batch=BATCH, rows=rows, openai=openai is not None)


if __name__ == "__main__":
    pytest.main([__file__, "--benchmark-only", "-s"])
