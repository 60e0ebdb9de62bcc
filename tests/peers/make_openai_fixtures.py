"""Record openai's UNetModel outputs, and guided-diffusion's classifier's logits and guidance gradients, for the
cases in openai_cases.py (tests/data/openai/*.safetensors).

Needs checkouts of openai/guided-diffusion and openai/improved-diffusion on PYTHONPATH (neither is on a
package registry; nothing of theirs is stored here):

    PYTHONPATH=/path/to/guided-diffusion:/path/to/improved-diffusion python tests/peers/make_openai_fixtures.py

Each case's model is built by that repository's own script_util.create_model from its own flag defaults,
given random weights (openai_cases.random_state_dict), and run in fp32 on the case's inputs with the
timesteps its diffusion feeds the model (improved-diffusion: t * 1000 / T, guided-diffusion: t).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.peers.openai_cases import (  # noqa: E402
    CASES,
    CLASSIFIER_CASES,
    DATA,
    classifier_inputs,
    fixture_path,
    inputs,
    random_state_dict,
)

DEFAULTS = {
    "guided-diffusion": dict(image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
                             num_head_channels=-1, attention_resolutions="16,8", channel_mult="", dropout=0.0,
                             class_cond=False, use_checkpoint=False, use_scale_shift_norm=True,
                             resblock_updown=False, use_fp16=False, use_new_attention_order=False,
                             learn_sigma=False, diffusion_steps=1000, noise_schedule="linear",
                             rescale_timesteps=False),
    "improved-diffusion": dict(image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
                               attention_resolutions="16,8", dropout=0.0, learn_sigma=False, class_cond=False,
                               use_checkpoint=False, use_scale_shift_norm=True, diffusion_steps=1000,
                               noise_schedule="linear", rescale_timesteps=True),
}


def _parse(flags: str, defaults: dict) -> dict:
    tokens, values = flags.split(), dict(defaults)
    for name, raw in zip(tokens[::2], tokens[1::2], strict=True):
        name = name[2:]
        d = defaults[name]
        values[name] = (raw.lower() == "true") if isinstance(d, bool) else type(d)(raw)
    return values


def record(name: str, seed: int) -> None:
    repo, flags, _, _ = CASES[name]
    if repo == "guided-diffusion":
        from guided_diffusion.script_util import create_model
    else:
        from improved_diffusion.script_util import create_model
    values = _parse(flags, DEFAULTS[repo])
    accepted = inspect.signature(create_model).parameters
    model = create_model(**{k: v for k, v in values.items() if k in accepted})
    model.float().eval()  # fp32 throughout (use_fp16 only changes the torso's dtype)
    model.dtype = torch.float32
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(random_state_dict(shapes, seed))
    steps = values["diffusion_steps"]
    x, t, y = inputs(name, steps, seed)
    fed = t.float() * (1000.0 / steps) if values["rescale_timesteps"] else t
    with torch.no_grad():
        out = model(x, fed, y if values["class_cond"] else None)
    meta = {"repo": repo, "flags": flags, "seed": str(seed), "num_timesteps": str(steps),
            "shapes": json.dumps({k: list(v) for k, v in shapes.items()})}
    from safetensors.torch import save_file

    os.makedirs(DATA, exist_ok=True)
    save_file({"x": x, "t": t, "y": y, "out": out.contiguous()}, fixture_path(name), metadata=meta)
    print(f"{name}: {sum(v.numel() for v in model.state_dict().values()) / 1e6:.1f}M parameters, "
          f"out {tuple(out.shape)} max |out| {out.abs().max():.3g}")


CLASSIFIER_DEFAULTS = dict(image_size=64, classifier_use_fp16=False, classifier_width=128, classifier_depth=2,
                           classifier_attention_resolutions="32,16,8", classifier_use_scale_shift_norm=True,
                           classifier_resblock_updown=True, classifier_pool="attention")


def record_classifier(name: str, seed: int) -> None:
    """A classifier case: its logits, and the gradient of log_softmax(logits)[y] with respect to x as
    guided-diffusion's classifier_sample.py cond_fn computes it (classifier_scale 1)."""
    import torch.nn.functional as F
    from guided_diffusion.script_util import create_classifier

    flags, _ = CLASSIFIER_CASES[name]
    values = _parse(flags, CLASSIFIER_DEFAULTS)
    model = create_classifier(**values)
    model.float().eval()
    model.dtype = torch.float32
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(random_state_dict(shapes, seed))
    x, t, y = classifier_inputs(name, seed)
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        logits = model(x_in, t)
        selected = F.log_softmax(logits, dim=-1)[range(len(logits)), y.view(-1)]
        grad = torch.autograd.grad(selected.sum(), x_in)[0]
    meta = {"repo": "guided-diffusion", "flags": flags, "seed": str(seed), "num_timesteps": "1000",
            "shapes": json.dumps({k: list(v) for k, v in shapes.items()})}
    from safetensors.torch import save_file

    save_file({"x": x, "t": t, "y": y, "logits": logits.detach().contiguous(), "grad": grad.contiguous()},
              fixture_path(name), metadata=meta)
    print(f"{name}: {sum(math.prod(v) for v in shapes.values()) / 1e6:.2f}M parameters, logits "
          f"{tuple(logits.shape)}, max |grad| {grad.abs().max():.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("cases", nargs="*", default=sorted(CASES) + sorted(CLASSIFIER_CASES))
    args = parser.parse_args()
    for name in args.cases:
        if name in CLASSIFIER_CASES:
            record_classifier(name, args.seed + 1000 + 100 * sorted(CLASSIFIER_CASES).index(name))
        else:
            record(name, args.seed + 100 * sorted(CASES).index(name))


if __name__ == "__main__":
    main()
