"""openai's guided-diffusion and improved-diffusion checkpoints: their flags, schedules and respacing strings.

``load_openai(path, flags, repo)`` reads a .pt state dict (weights_only: no code runs from the file) with
the ``MODEL_FLAGS`` / ``DIFFUSION_FLAGS`` string those READMEs print, and returns (ADMUNet, NoiseSchedule).
Omitted flags take the named repository's defaults, which differ (improved-diffusion rescales timesteps,
guided-diffusion does not; their default channel multipliers per image size differ too). Sampling and
training flags are accepted and reported as ignored; anything else is an error naming the flag.
"""

from __future__ import annotations

import numbers
import shlex
import warnings

from ddpm_fast.adm import ADMConfig, ADMUNet
from ddpm_fast.checkpoint import CheckpointError, build_loaded, read_torch_file
from ddpm_fast.classifier import ClassifierConfig, EncoderUNet
from ddpm_fast.schedule import NoiseSchedule

REPOS = ("guided-diffusion", "improved-diffusion")
NUM_CLASSES = 1000  # both repositories' class-conditional models are ImageNet's

# Model and diffusion flags with each repository's defaults (its script_util.model_and_diffusion_defaults).
_COMMON = dict(image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
               attention_resolutions="16,8", dropout=0.0, class_cond=False, learn_sigma=False, diffusion_steps=1000,
               noise_schedule="linear", use_kl=False, predict_xstart=False, rescale_learned_sigmas=False,
               use_checkpoint=False, use_scale_shift_norm=True, use_fp16=False)
DEFAULTS = {
    "guided-diffusion": dict(_COMMON, num_head_channels=-1, channel_mult="", resblock_updown=False,
                             use_new_attention_order=False, rescale_timesteps=False),
    "improved-diffusion": dict(_COMMON, sigma_small=False, rescale_timesteps=True, rescale_learned_sigmas=True),
}
# Channel multipliers when --channel_mult is empty (or absent), by image size.
_CHANNEL_MULT = {
    "guided-diffusion": {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4),
                         64: (1, 2, 3, 4)},
    "improved-diffusion": {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)},
}
# Flags of their sampling and training scripts: they do not describe the model, so the loader ignores them.
IGNORED_FLAGS = frozenset({
    "timestep_respacing", "use_ddim", "batch_size", "num_samples", "clip_denoised", "model_path", "data_dir", "lr",
    "weight_decay", "lr_anneal_steps", "microbatch", "ema_rate", "log_interval", "save_interval",
    "resume_checkpoint", "fp16_scale_growth", "schedule_sampler",
})

# The published checkpoints' flags (MODEL_FLAGS + DIFFUSION_FLAGS), as the repositories' READMEs print them:
# pass a name wherever flags are taken.
PRESETS = {
    # guided-diffusion 256x256_diffusion_uncond.pt (the base model of DPS and other inverse-problem methods)
    "adm-256-uncond": ("guided-diffusion",
                       "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --image_size 256 "
                       "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
                       "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True"),
    # guided-diffusion lsun_bedroom.pt (and lsun_cat.pt, lsun_horse.pt)
    "adm-lsun-256": ("guided-diffusion",
                     "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 "
                     "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 "
                     "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
                     "--use_scale_shift_norm True"),
    # guided-diffusion 64x64_diffusion.pt (class-conditional ImageNet 64)
    "adm-imagenet64-cond": ("guided-diffusion",
                            "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 "
                            "--image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 192 "
                            "--num_head_channels 64 --num_res_blocks 3 --resblock_updown True "
                            "--use_new_attention_order True --use_fp16 True --use_scale_shift_norm True"),
    # improved-diffusion cifar10_uncond_50M_500K.pt (L_hybrid, cosine, 4000 steps)
    "iddpm-cifar10": ("improved-diffusion",
                      "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3 "
                      "--diffusion_steps 4000 --noise_schedule cosine"),
}
_CLASSIFIER_FLAGS = ("classifier_path", "classifier_scale", "classifier_use_fp16", "classifier_width",
                     "classifier_depth", "classifier_attention_resolutions", "classifier_use_scale_shift_norm",
                     "classifier_resblock_updown", "classifier_pool")


def _bool(name: str, text: str) -> bool:
    low = text.lower()
    if low in ("yes", "true", "t", "y", "1"):
        return True
    if low in ("no", "false", "f", "n", "0"):
        return False
    raise ValueError(f"--{name}: expected a boolean (True/False), got {text!r}")


def parse_flags(flags, repo: str = "guided-diffusion") -> dict:
    """The model and diffusion settings a flag string (or a dict of flag values, or a PRESETS name, which
    also names its repository) describes: the repository's defaults, overridden by the flags. Raises
    ValueError naming an unknown, repeated or malformed flag."""
    flags, repo = resolve_preset(flags, repo)
    if repo not in REPOS:
        raise ValueError(f"repo must be one of {REPOS}, got {repo!r}")
    defaults = DEFAULTS[repo]
    if isinstance(flags, dict):
        given = {str(k).lstrip("-"): v for k, v in flags.items()}
    else:
        given = _split_flags(flags)
    values, ignored = dict(defaults), []
    for name, raw in given.items():
        if name in _CLASSIFIER_FLAGS:
            raise ValueError(f"--{name}: a classifier flag; the classifier's flags go with the classifier "
                             "(sample --classifier-flags, load_openai_classifier)")
        if name in IGNORED_FLAGS:
            ignored.append(name)
            continue
        if name not in defaults:
            known = ", ".join(sorted(defaults))
            raise ValueError(f"unknown {repo} flag --{name} (its model and diffusion flags: {known})")
        values[name] = _typed(name, raw, defaults[name])
    if ignored:
        warnings.warn(f"load_openai ignores the sampling/training flags {', '.join('--' + n for n in ignored)}",
                      stacklevel=3)
    return values


def resolve_preset(flags, repo: str):
    """(flags, repo): a PRESETS name stands for its flags and repository."""
    if isinstance(flags, str) and flags.strip() in PRESETS:
        repo, flags = PRESETS[flags.strip()]
    return flags, repo


def _split_flags(flags: str) -> dict:
    if not isinstance(flags, str):
        raise TypeError(f"flags must be a string (or a dict), got {type(flags).__name__}")
    try:
        tokens = shlex.split(flags)
    except ValueError as exc:  # shlex says only "No closing quotation"
        raise ValueError(f"openai flags {flags!r}: {str(exc).lower()} (an unbalanced quote)") from None
    given: dict = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise ValueError(f"openai flags: expected --name value, got {tok!r}")
        name, eq, value = tok[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise ValueError(f"--{name}: missing its value")
            value = tokens[i + 1]
            i += 1
        if name in given:
            raise ValueError(f"--{name} given twice")
        given[name] = value
        i += 1
    return given


def _typed(name: str, raw, default):
    if not isinstance(raw, str):
        return _checked_value(name, raw, default)
    if isinstance(default, bool):
        return _bool(name, raw)
    try:
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise ValueError(f"--{name}: expected a {type(default).__name__}, got {raw!r}") from None
    return raw


def _checked_value(name: str, raw, default):
    """A flags dict's value: of the flag's type (an int where a float is asked is fine; a bool is never a
    number), or, for the comma-separated flags, a list of numbers. Raises TypeError naming the flag."""
    if isinstance(default, bool):
        ok = isinstance(raw, bool)
    elif isinstance(default, int):
        ok = isinstance(raw, numbers.Integral) and not isinstance(raw, bool)
    elif isinstance(default, float):
        ok = isinstance(raw, numbers.Real) and not isinstance(raw, bool)
    elif isinstance(raw, (list, tuple)) and name in ("attention_resolutions", "channel_mult"):
        ok = all(isinstance(r, numbers.Real) and not isinstance(r, bool) for r in raw)
        if ok:
            return ",".join(str(r) for r in raw)
    else:
        ok = False
    if not ok:
        raise TypeError(f"--{name}: expected a {type(default).__name__}, got {raw!r} ({type(raw).__name__})")
    return type(default)(raw)


def openai_betas(noise_schedule: str, diffusion_steps: int) -> NoiseSchedule:
    """openai's get_named_beta_schedule: linear scaled so that T steps span the same process as 1000
    (beta_start = 1e-4 * 1000/T, beta_end = 0.02 * 1000/T); cosine with max_beta 0.999."""
    if noise_schedule == "linear":
        scale = 1000.0 / diffusion_steps
        return NoiseSchedule.linear(diffusion_steps, beta_start=scale * 1e-4, beta_end=scale * 0.02)
    if noise_schedule == "cosine":
        return NoiseSchedule.cosine(diffusion_steps, s=0.008, max_beta=0.999)
    raise ValueError(f"--noise_schedule: unknown schedule {noise_schedule!r} (linear or cosine)")


def config_from_flags(flags, repo: str = "guided-diffusion") -> tuple[ADMConfig, NoiseSchedule]:
    """(ADMConfig, NoiseSchedule) of a flag string, as that repository's create_model_and_diffusion builds them."""
    flags, repo = resolve_preset(flags, repo)
    v = parse_flags(flags, repo)
    if v["predict_xstart"]:
        raise ValueError("--predict_xstart True: x_0-predicting models are not supported (eps prediction only)")
    size = v["image_size"]
    mult = v.get("channel_mult", "")
    if mult:
        try:
            mult = tuple(float(m) if "." in m else int(m) for m in str(mult).split(","))
        except ValueError:
            raise ValueError(f"--channel_mult: expected comma-separated numbers, got {mult!r}") from None
    elif size in _CHANNEL_MULT[repo]:
        mult = _CHANNEL_MULT[repo][size]
    else:
        raise ValueError(f"--image_size {size}: {repo} has no default channel_mult for it "
                         f"(sizes {sorted(_CHANNEL_MULT[repo])}); pass --channel_mult")
    try:
        resolutions = [int(r) for r in str(v["attention_resolutions"]).split(",") if r.strip()]
    except ValueError:
        raise ValueError(f"--attention_resolutions: expected comma-separated integers, got "
                         f"{v['attention_resolutions']!r}") from None
    if any(r < 1 or size % r for r in resolutions):
        raise ValueError(f"--attention_resolutions {v['attention_resolutions']}: each must divide image_size {size}")
    rates = [2**i for i in range(len(mult))]
    unused = [r for r in resolutions if size // r not in rates]
    if unused:  # openai's UNetModel builds no attention there either; say so rather than drop it silently
        warnings.warn(f"--attention_resolutions {','.join(map(str, unused))}: no level of this model has that "
                      f"resolution (levels: {','.join(str(size // r) for r in rates)}); no attention there",
                      stacklevel=2)
        resolutions = [r for r in resolutions if r not in unused]
    steps = v["diffusion_steps"]
    if steps < 1:
        raise ValueError(f"--diffusion_steps must be positive, got {steps}")
    schedule = openai_betas(v["noise_schedule"], steps)
    try:
        config = ADMConfig(
            image_size=size, in_channels=3, model_channels=v["num_channels"], num_res_blocks=v["num_res_blocks"],
            attention_ds=tuple(size // r for r in resolutions), dropout=v["dropout"], channel_mult=mult,
            num_classes=NUM_CLASSES if v["class_cond"] else None, num_heads=v["num_heads"],
            num_head_channels=v.get("num_head_channels", -1), num_heads_upsample=v["num_heads_upsample"],
            use_scale_shift_norm=v["use_scale_shift_norm"], resblock_updown=v.get("resblock_updown", False),
            use_new_attention_order=v.get("use_new_attention_order", False), learn_sigma=v["learn_sigma"],
            sigma_small=v.get("sigma_small", False),
            timestep_scale=1000.0 / steps if v["rescale_timesteps"] else 1.0)
    except ValueError as exc:
        raise ValueError(f"{repo} flags: {exc}") from None
    problem = config.budget_problem({"--num_channels": v["num_channels"], "--channel_mult": list(mult),
                                     "--num_res_blocks": v["num_res_blocks"], "--image_size": size})
    if problem:
        raise ValueError(f"{repo} flags: {problem}")
    return config, schedule


# guided-diffusion's classifier_defaults(): the flags its CLASSIFIER_FLAGS strings override.
CLASSIFIER_DEFAULTS = dict(image_size=64, classifier_use_fp16=False, classifier_width=128, classifier_depth=2,
                           classifier_attention_resolutions="32,16,8", classifier_use_scale_shift_norm=True,
                           classifier_resblock_updown=True, classifier_pool="attention")
# create_classifier's channel multipliers: it knows these image sizes only.
_CLASSIFIER_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
_CLASSIFIER_IGNORED = frozenset({"classifier_path", "classifier_scale"}) | IGNORED_FLAGS | frozenset(
    n for n in DEFAULTS["guided-diffusion"] if n != "image_size")


def classifier_config_from_flags(flags) -> ClassifierConfig:
    """The ClassifierConfig of a guided-diffusion CLASSIFIER_FLAGS string (or dict), as its create_classifier
    builds it: width, depth, attention resolutions, scale-shift norm, resblock up/down and pool from the flags
    (each omitted one at classifier_defaults()), 1000 classes, heads of 64 channels. Diffusion-model and
    sampling flags in the string are ignored with a warning."""
    given = ({str(k).lstrip("-"): v for k, v in flags.items()} if isinstance(flags, dict) else _split_flags(flags))
    values, ignored = dict(CLASSIFIER_DEFAULTS), []
    for name, raw in given.items():
        if name in CLASSIFIER_DEFAULTS:
            values[name] = _typed(name, raw, CLASSIFIER_DEFAULTS[name])
        elif name in _CLASSIFIER_IGNORED:
            ignored.append(name)
        else:
            raise ValueError(f"unknown classifier flag --{name} (guided-diffusion's classifier flags: "
                             f"{', '.join(sorted(CLASSIFIER_DEFAULTS))})")
    if ignored:
        warnings.warn(f"load_openai_classifier ignores {', '.join('--' + n for n in ignored)} (not the "
                      "classifier's)", stacklevel=3)
    size = values["image_size"]
    if size not in _CLASSIFIER_MULT:
        raise ValueError(f"--image_size {size}: guided-diffusion's create_classifier knows sizes "
                         f"{sorted(_CLASSIFIER_MULT)} only")
    text = str(values["classifier_attention_resolutions"])
    try:
        resolutions = [int(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise ValueError(f"--classifier_attention_resolutions: expected comma-separated integers, got "
                         f"{text!r}") from None
    if any(r < 1 or size % r for r in resolutions):
        raise ValueError(f"--classifier_attention_resolutions {text}: each must divide image_size {size}")
    try:
        return ClassifierConfig(
            image_size=size, model_channels=values["classifier_width"], num_res_blocks=values["classifier_depth"],
            attention_ds=tuple(size // r for r in resolutions), channel_mult=_CLASSIFIER_MULT[size],
            num_classes=NUM_CLASSES, num_head_channels=64,
            use_scale_shift_norm=values["classifier_use_scale_shift_norm"],
            resblock_updown=values["classifier_resblock_updown"], pool=values["classifier_pool"])
    except ValueError as exc:
        raise ValueError(f"classifier flags: {exc}") from None


def load_openai_classifier(path, flags, device=None) -> EncoderUNet:
    """guided-diffusion's classifier from its .pt state dict (read with weights_only) and its CLASSIFIER_FLAGS.
    A state dict that does not fit the flags raises CheckpointError naming the first missing or extra key or
    the first wrong shape."""
    try:
        config = classifier_config_from_flags(flags)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(str(exc)) from None
    return _load_state_dict(path, config, "the classifier flags", device)


def _load_state_dict(path, config, flags_name: str, device):
    """A model of ``config`` holding the openai .pt state dict at ``path`` (read with weights_only)."""
    path = str(path)
    obj = read_torch_file(path)
    if not isinstance(obj, dict) or not obj or not all(hasattr(v, "shape") for v in obj.values()):
        raise CheckpointError(f"{path}: expected openai's state dict (a dict of tensors)")
    model = build_loaded(config, obj, f"{path} (with {flags_name})")
    return model if device is None else model.to(device)


def load_openai(path, flags, repo: str = "guided-diffusion", device=None) -> tuple[ADMUNet, NoiseSchedule]:
    """(model, schedule) from an openai .pt state dict and the flags it was trained with (see the module
    docstring). A state dict that does not fit the flags raises CheckpointError naming the first missing or
    extra key or the first wrong shape."""
    flags, repo = resolve_preset(flags, repo)
    try:
        config, schedule = config_from_flags(flags, repo)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    return _load_state_dict(path, config, f"{repo} flags", device), schedule
