"""The model-family table: each family declares, once, its config class, its model class, its training presets,
the ``_class_name`` its model folders and training checkpoints carry, how its config.json reads and writes, and
how its checkpoints are sampled. checkpoint.py, the loaders, the trainer, the sampler defaults and the bound ask
the table; nothing outside a family's own module asks isinstance of it.

A family's model is a Denoiser and its config a DenoiserConfig (plan.py); ``to_fast(dtype)`` where it has a
fast form. Adding a family is its module and one ``register_family`` call (README, "Layout").
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ddpm_fast.adm import TRAIN_PRESETS, ADMConfig, ADMUNet
from ddpm_fast.base import CheckpointError
from ddpm_fast.classifier import ClassifierConfig, EncoderUNet
from ddpm_fast.config import PRESETS, UNetConfig, from_diffusers_config, to_diffusers_config
from ddpm_fast.unet import UNet

__all__ = ["FAMILIES", "ModelFamily", "build_model", "config_from_dict", "config_to_dict",
           "family_of", "from_diffusers_keys", "model_config_json", "model_preset", "register_family", "train_presets"]


@dataclass(frozen=True)
class ModelFamily:
    """One family. ``class_name``: the ``_class_name`` of its config.json and of a training checkpoint's
    config; ``config_json`` / ``config_from_json`` write and read its model folder's config.json (the latter
    raising CheckpointError naming ``source``); ``presets``: the configs ``ddpm_fast.train --config`` offers;
    ``openai_sampling``: its checkpoints are sampled as openai samples them (DDIM's eps from the clipped x_0,
    fixed variance beta unless ``config.sigma_small``); ``folder_keys``: maps a folder's state-dict keys to the
    model's (diffusers' layout for the DDPM U-Net)."""

    name: str
    config_class: type
    model_class: type
    class_name: str
    config_json: Callable[[Any], dict]
    config_from_json: Callable[[dict, str], Any]
    presets: Mapping[str, Any] = field(default_factory=dict)
    openai_sampling: bool = False
    folder_keys: Callable[[dict], dict] | None = None
    denoiser: bool = True  # False: a model that guides sampling (the classifier), not one that samples

    def sampled_variance(self, config) -> str:
        """The reverse variance its checkpoints mean when they do not learn it (None: the scheduler's own)."""
        if config.learn_sigma:
            return "learned_range"
        if self.openai_sampling:
            return "fixed_small" if getattr(config, "sigma_small", False) else "fixed_large"
        return None


FAMILIES: dict[str, ModelFamily] = {}
_BY_CLASS_NAME: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add a family to the table (its name and class_name must be new)."""
    for key, table in ((family.name, FAMILIES), (family.class_name, _BY_CLASS_NAME)):
        if key in table and table[key] != family:
            raise ValueError(f"model family {key!r} is registered already")
    FAMILIES[family.name] = family
    _BY_CLASS_NAME[family.class_name] = family
    return family


def unregister_family(name: str) -> None:
    family = FAMILIES.pop(name)
    _BY_CLASS_NAME.pop(family.class_name, None)


def family_of(obj) -> ModelFamily:
    """The family of a config or a model (fast forms included: they subclass their family's model)."""
    config = getattr(obj, "config", obj)
    for family in FAMILIES.values():
        if isinstance(config, family.config_class):
            return family
    raise TypeError(f"{type(config).__name__} is not the config of a registered model family "
                    f"({', '.join(FAMILIES)})")


def family_named(class_name: str | None, source: str) -> ModelFamily:
    """The family whose folders carry ``_class_name`` (none: diffusers' UNet2DModel, the DDPM U-Net)."""
    family = _BY_CLASS_NAME.get(class_name or DDPM.class_name)
    if family is None:
        raise CheckpointError(f"{source}: _class_name is {class_name!r}; supported: {', '.join(_BY_CLASS_NAME)}")
    return family


def train_presets() -> list[str]:
    """Every family's presets: what ``ddpm_fast.train --config`` takes."""
    return [name for family in FAMILIES.values() for name in sorted(family.presets)]


def model_preset(name: str, learn_sigma: bool = False):
    """A training preset of any family, with learned variance if asked."""
    for family in FAMILIES.values():
        if name in family.presets:
            return dataclasses.replace(family.presets[name], learn_sigma=bool(learn_sigma))
    raise ValueError(f"unknown model preset {name!r}; choose one of {train_presets()}")


def build_model(config):
    return family_of(config).model_class(config)


def config_to_dict(config) -> dict:
    """A model config as a training checkpoint stores it (marked by _class_name; the DDPM U-Net's, written
    before the table existed, carries none)."""
    family = family_of(config)
    return config.to_dict() if family is DDPM else {"_class_name": family.class_name, **config.to_dict()}


def config_from_dict(d: dict):
    family = family_named(d.get("_class_name"), "unet_config")
    return family.config_class.from_dict({k: v for k, v in d.items() if k != "_class_name"})


def model_config_json(config) -> dict:
    """config.json of a model folder."""
    return family_of(config).config_json(config)


def _own_config_json(class_name: str):
    return lambda config: {"_class_name": class_name, **config.to_dict()}


def _own_config_from_json(config_class: type):
    def read(raw: dict, source: str):
        try:
            return config_class.from_dict({k: v for k, v in raw.items() if not k.startswith("_")})
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{source}: {exc}") from None

    return read


_OLD_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def from_diffusers_keys(sd: dict) -> dict:
    """Old diffusers attention naming (query/key/value/proj_attn) -> to_q/to_k/to_v/to_out.0."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$", k)
        if m:
            k = f"{m.group(1)}.{_OLD_ATTN[m.group(2)]}.{m.group(3)}"
        out[k] = v
    return out


DDPM = register_family(ModelFamily(
    name="ddpm", config_class=UNetConfig, model_class=UNet, class_name="UNet2DModel",
    config_json=to_diffusers_config, config_from_json=from_diffusers_config, presets=PRESETS,
    folder_keys=from_diffusers_keys))
ADM = register_family(ModelFamily(
    name="adm", config_class=ADMConfig, model_class=ADMUNet, class_name="ADMUNet",
    config_json=_own_config_json("ADMUNet"), config_from_json=_own_config_from_json(ADMConfig),
    presets=TRAIN_PRESETS, openai_sampling=True))
CLASSIFIER = register_family(ModelFamily(
    name="classifier", config_class=ClassifierConfig, model_class=EncoderUNet, class_name="EncoderUNetModel",
    config_json=_own_config_json("EncoderUNetModel"), config_from_json=_own_config_from_json(ClassifierConfig),
    denoiser=False))
