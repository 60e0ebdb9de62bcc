"""openai ADM equivalence cases: flag sets, deterministic random weights and inputs, recorded outputs.

openai's guided-diffusion and improved-diffusion are not installable, so their UNetModel's outputs were
recorded once with ``tests/peers/make_openai_fixtures.py`` (run against checkouts of both repositories)
into tests/data/openai/<case>.safetensors: the state-dict key list and shapes, the inputs and the output.
The weights are not stored: ``random_state_dict`` regenerates them from the case's seed, so a test
rebuilds the same model from our own key layout and compares. Every parameter is random (openai
zero-initializes output convolutions, which would hide whole branches).
"""

from __future__ import annotations

import json
import math
import os

import torch

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "openai")

# name -> (repository, flags, batch, input size). The "width" cases are published configurations at their
# full width with fewer blocks (the network is convolutional: a smaller input than image_size is fine).
CASES = {
    "guided_small_all_features": (
        "guided-diffusion",
        "--image_size 32 --num_channels 64 --num_res_blocks 1 --attention_resolutions 16,8 --channel_mult 1,2,2 "
        "--num_head_channels 32 --learn_sigma True --resblock_updown True --use_new_attention_order True "
        "--use_scale_shift_norm True --class_cond True --dropout 0.1",
        2, 32),
    "guided_small_legacy_plain": (
        "guided-diffusion",
        "--image_size 32 --num_channels 32 --num_res_blocks 2 --attention_resolutions 16 --channel_mult 1,2 "
        "--num_heads 2 --num_heads_upsample 1 --use_scale_shift_norm False",
        2, 32),
    "guided_256_uncond_width": (
        "guided-diffusion",
        "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --image_size 256 "
        "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 1 "
        "--resblock_updown True --use_fp16 True --use_scale_shift_norm True",
        1, 64),
    "guided_64_cond_width": (
        "guided-diffusion",
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 --image_size 64 "
        "--learn_sigma True --noise_schedule cosine --num_channels 192 --num_head_channels 64 --num_res_blocks 1 "
        "--resblock_updown True --use_new_attention_order True --use_fp16 True --use_scale_shift_norm True",
        1, 32),
    "guided_512_half_mult": (
        "guided-diffusion",
        "--image_size 512 --num_channels 64 --num_res_blocks 1 --attention_resolutions 32,16,8 "
        "--num_head_channels 32 --class_cond True --learn_sigma True --resblock_updown True "
        "--use_scale_shift_norm True",
        1, 64),
    "improved_cifar10_width": (
        "improved-diffusion",
        "--image_size 32 --num_channels 128 --num_res_blocks 1 --learn_sigma True --dropout 0.3 "
        "--diffusion_steps 4000 --noise_schedule cosine",
        2, 32),
    "improved_small_plain_cond": (
        "improved-diffusion",
        "--image_size 64 --num_channels 32 --num_res_blocks 1 --num_heads 2 --attention_resolutions 16 "
        "--use_scale_shift_norm False --class_cond True --diffusion_steps 100",
        2, 32),
}


# guided-diffusion's noise-aware classifier (EncoderUNetModel via its script_util.create_classifier): name ->
# (CLASSIFIER_FLAGS, batch). Inputs are image_size square (the attention pool's positional embedding fixes it).
CLASSIFIER_CASES = {
    "classifier_64_attention": ("--image_size 64 --classifier_width 64 --classifier_depth 1", 2),
    "classifier_64_adaptive_plain": (
        "--image_size 64 --classifier_width 64 --classifier_depth 1 --classifier_attention_resolutions 16 "
        "--classifier_use_scale_shift_norm False --classifier_resblock_updown False --classifier_pool adaptive", 2),
    "classifier_64_spatial": (
        "--image_size 64 --classifier_width 64 --classifier_depth 1 --classifier_attention_resolutions 8 "
        "--classifier_pool spatial", 2),
    "classifier_64_spatial_v2": (
        "--image_size 64 --classifier_width 64 --classifier_depth 2 --classifier_attention_resolutions 16,8 "
        "--classifier_pool spatial_v2", 1),
}


def classifier_inputs(name: str, seed: int):
    """(x, t, y) of a classifier case: x ~ N(0, 1) at image_size, t integer steps in [0, 1000), y in [0, 1000)."""
    flags, batch = CLASSIFIER_CASES[name]
    size = int(flags.split("--image_size ")[1].split()[0])
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, 1000, (batch,), generator=g)
    return x, t, y


def fixture_path(name: str) -> str:
    return os.path.join(DATA, f"{name}.safetensors")


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Every parameter random, in sorted key order from one generator: matrices and kernels scaled by
    1/sqrt(fan-in), vectors around 1 (norm gains and biases alike)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        w = torch.randn(shape, generator=g, dtype=torch.float32)
        if len(shape) >= 2:
            w = w / math.sqrt(math.prod(shape[1:]))
        else:
            w = 1.0 + 0.3 * w
        out[name] = w
    return out


def inputs(name: str, num_timesteps: int, seed: int):
    """(x, t, y) of a case: x ~ N(0, 1), t integer steps in [0, T), y labels in [0, 1000)."""
    _, _, batch, size = CASES[name]
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, size, size, generator=g)
    t = torch.randint(0, num_timesteps, (batch,), generator=g)
    y = torch.randint(0, 1000, (batch,), generator=g)
    return x, t, y


def read_fixture(name: str):
    """(meta, tensors) of a recorded case; meta holds the flags, repo, seed and openai's key shapes."""
    from safetensors import safe_open

    with safe_open(fixture_path(name), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = dict(meta)
    meta["shapes"] = {k: tuple(v) for k, v in json.loads(meta["shapes"]).items()}
    meta["seed"] = int(meta["seed"])
    meta["num_timesteps"] = int(meta["num_timesteps"])
    return meta, tensors
