"""Weights in and out: diffusers UNet2DModel folders, pytorch_diffusion .ckpt files, our own format.

Our own format *is* the diffusers one (config.json + diffusion_pytorch_model.safetensors), so what
save_pretrained writes, diffusers reads, and the reverse. Every load is strict: a missing, extra or
mis-shaped key, an unsupported config option or an unreadable file raises CheckpointError naming it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickletools
import re
import warnings
import zipfile

import torch

from ddpm_fast.base import CheckpointError
from ddpm_fast.config import UNetConfig
from ddpm_fast.families import (
    DDPM,
    build_model,
    config_from_dict,
    family_named,
    from_diffusers_keys,
    model_config_json,
)
from ddpm_fast.fileio import RUN_CHECKPOINT, RUN_MODEL_FOLDER, atomic_write, atomic_write_json
from ddpm_fast.schedule import NoiseSchedule

CONFIG_NAME = "config.json"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_NAME_BIN = "diffusion_pytorch_model.bin"


# ---- key layouts --------------------------------------------------------------------------------

def _from_pytorch_diffusion_keys(sd: dict, levels: int) -> dict:
    """pytorch_diffusion (pesser) layout -> ours. Its up.i is level i, i.e. our up_blocks.(L-1-i)."""
    prefixes = [
        (r"temb\.dense\.0\.", lambda m: "time_embedding.linear_1."),
        (r"temb\.dense\.1\.", lambda m: "time_embedding.linear_2."),
        (r"norm_out\.", lambda m: "conv_norm_out."),
        (r"mid\.block_(\d)\.", lambda m: f"mid_block.resnets.{int(m.group(1)) - 1}."),
        (r"mid\.attn_1\.", lambda m: "mid_block.attentions.0."),
        (r"down\.(\d+)\.block\.(\d+)\.", lambda m: f"down_blocks.{m.group(1)}.resnets.{m.group(2)}."),
        (r"down\.(\d+)\.attn\.(\d+)\.", lambda m: f"down_blocks.{m.group(1)}.attentions.{m.group(2)}."),
        (r"down\.(\d+)\.downsample\.", lambda m: f"down_blocks.{m.group(1)}.downsamplers.0."),
        (r"up\.(\d+)\.block\.(\d+)\.",
         lambda m: f"up_blocks.{levels - 1 - int(m.group(1))}.resnets.{m.group(2)}."),
        (r"up\.(\d+)\.attn\.(\d+)\.",
         lambda m: f"up_blocks.{levels - 1 - int(m.group(1))}.attentions.{m.group(2)}."),
        (r"up\.(\d+)\.upsample\.", lambda m: f"up_blocks.{levels - 1 - int(m.group(1))}.upsamplers.0."),
    ]
    leaf = {
        "resnets": {"nin_shortcut": "conv_shortcut", "temb_proj": "time_emb_proj"},
        "attentions": {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"},
    }
    out = {}
    for k, v in sd.items():
        new = k
        for pattern, rep in prefixes:
            m = re.match(pattern, k)
            if m:
                new = rep(m) + k[m.end():]
                break
        m = re.match(r"(.*\.(resnets|attentions)\.\d+)\.(\w+)\.(weight|bias)$", new)
        if m:
            new = f"{m.group(1)}.{leaf[m.group(2)].get(m.group(3), m.group(3))}.{m.group(4)}"
        out[new] = v
    return out


def _infer_pytorch_diffusion_config(sd: dict, source: str) -> UNetConfig:
    try:
        ch, in_ch = sd["conv_in.weight"].shape[:2]
        out_ch = sd["conv_out.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"{source}: missing key {exc.args[0]!r}") from None
    levels = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("down."))
    ch_mult = tuple(sd[f"down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
    n_res = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("down.0.block."))
    sample = {4: 32, 6: 256}.get(levels)
    if sample is None:
        raise CheckpointError(f"{source}: cannot tell the image size of a {levels}-level pytorch_diffusion "
                              "model; pass config=UNetConfig(...)")
    attn_res = tuple(sample // 2**i for i in range(levels) if f"down.{i}.attn.0.q.weight" in sd)
    return UNetConfig(sample_size=sample, in_channels=in_ch, out_channels=out_ch, ch=ch, ch_mult=ch_mult,
                      num_res_blocks=n_res, attn_resolutions=attn_res, dropout=0.0)


# ---- reading files ------------------------------------------------------------------------------


def _read_safetensors(path: str) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


# What torch.save itself pickles around tensors: everything else a checkpoint names is an object whose loading
# would run code (os.system, a class's __reduce__, ...).
_TORCH_PICKLE_NAMES = ("torch.", "collections.OrderedDict", "_codecs.encode")


def pickled_names(path: str) -> list[str] | None:
    """The globals (module.name) a pickle names, read without unpickling it (pickletools): of the file, or of a
    torch zip checkpoint's data.pkl; None if it is not a readable pickle."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                member = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                if member is None:
                    return None
                data = z.read(member)
        else:
            with open(path, "rb") as f:
                data = f.read()
        names, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(".".join(strings[-2:]))
            elif isinstance(arg, str):
                strings.append(arg)
        return names
    except Exception:  # not a pickle (or a truncated one): nothing to classify
        return None


def read_torch_file(path: str):
    """torch.load with weights_only=True (no code runs from the file), errors naming the file. A refusal is
    classified from the pickle's contents, not from torch's wording: a file naming objects besides tensors is
    said to hold code that loading would run."""
    try:
        with warnings.catch_warnings():  # torch's own notes on unusual pickles: the outcome below says it all
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        names = pickled_names(path)
        foreign = [n for n in names or () if not n.startswith(_TORCH_PICKLE_NAMES)]
        if foreign:
            more = f" and {len(set(foreign)) - 1} more" if len(set(foreign)) > 1 else ""
            raise CheckpointError(f"{path}: holds pickled Python objects besides tensors ({foreign[0]}{more}); it "
                                  "was not loaded (loading them would run code from the file); save a plain state "
                                  "dict or safetensors instead") from None
        if names is not None and not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path}: a Python pickle, not a torch checkpoint (torch.save writes a zip "
                                  "archive); save it with torch.save or as safetensors") from None
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if "weights_only" in str(exc):
            detail = ""  # torch's advice is to load with weights_only=False, i.e. to run the file's code
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}"
                              + (f": {detail}" if detail else "") + ")") from None


def _read_torch(path: str, obj=None) -> dict:
    obj = read_torch_file(path) if obj is None else obj
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return obj


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON config ({exc})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: config must be a JSON object")
    return d


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
                   "kaiming_normal_", "xavier_uniform_", "xavier_normal_")


@contextlib.contextmanager
def _initialization_skipped():
    """Module constructors allocate their parameters but leave them unset: torch.nn.init's functions return their
    tensor untouched for the block. (Building on the meta device instead would import torch._dynamo, over a
    second of every CLI start, the first time an nn.Embedding draws its meta weights.) Not for use while another
    thread builds modules."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    for name in _INIT_FUNCTIONS:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def build_loaded(config, sd: dict, source: str):
    """A model of ``config`` (in eval mode) holding the state dict ``sd``: built without its random
    initialization (for a 550M-parameter ADM model that alone takes seconds; the cifar10 preset's 0.8 s on a
    2-core CPU), then given the checkpoint's tensors by assignment (no second copy). The strict load leaves no
    parameter unset: a missing key raises, and the half-built model is dropped."""
    with _initialization_skipped():
        model = build_model(config)
    load_state_dict_strict(model, sd, source, assign=True)
    return model.eval()


def load_state_dict_strict(model, sd: dict, source: str, assign: bool = False) -> None:
    """Load strictly; a mismatch is one line naming the first missing key, extra key and wrong shape (with how
    many more there are). 1x1-conv attention weights are squeezed to 2-D. ``assign``: the model's parameters
    become the (dense) checkpoint tensors, as ``load_state_dict(assign=True)`` does."""
    own = model.state_dict()
    fixed = {}
    for k, v in sd.items():
        if k in own and v.dim() == 4 and own[k].dim() == 2 and v.shape[2:] == (1, 1):
            v = v[:, :, 0, 0]
        fixed[k] = v
    missing = sorted(set(own) - set(fixed))
    extra = sorted(set(fixed) - set(own))
    shapes = [f"{k}: checkpoint {tuple(fixed[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(fixed)) if fixed[k].shape != own[k].shape]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", extra), ("shape mismatches", shapes)):
        if items:
            shown = items[0] + (f" (and {len(items) - 1} more)" if len(items) > 1 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{source}: does not match the model config; " + "; ".join(problems))
    model.load_state_dict({k: v.to(own[k].dtype).contiguous() if assign else v.to(own[k].dtype)
                           for k, v in fixed.items()}, strict=True, assign=assign)




def resolve_model_path(path) -> str:
    """``path`` itself, or for a ddpm_fast.train --out folder its newest state: the exported model/, unless
    checkpoint.pt was written after it (a run resumed after its export, then stopped), else checkpoint.pt."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or folder")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        exported = os.path.join(path, RUN_MODEL_FOLDER)
        ckpt = os.path.join(path, RUN_CHECKPOINT)
        weights = os.path.join(exported, WEIGHTS_NAME)
        if os.path.isfile(os.path.join(exported, CONFIG_NAME)):
            newer = (os.path.isfile(ckpt) and os.path.isfile(weights)
                     and os.path.getmtime(ckpt) > os.path.getmtime(weights))
            return ckpt if newer else exported
        if os.path.isfile(ckpt):
            return ckpt
        raise CheckpointError(f"{path}: no {CONFIG_NAME} (not a diffusers/ddpm_fast model folder), and not a "
                              f"ddpm_fast.train run folder ({RUN_MODEL_FOLDER}/{CONFIG_NAME} or {RUN_CHECKPOINT})")
    return path


def load_pretrained(path, config=None, device=None):
    """Load a U-Net from a diffusers/ddpm_fast folder, a pytorch_diffusion .ckpt, or a .safetensors file.

    ``config`` overrides what the checkpoint says (needed for .ckpt files of unusual sizes).
    """
    path = resolve_model_path(path)
    if os.path.isdir(path):
        cfg_path = os.path.join(path, CONFIG_NAME)
        raw = _read_json(cfg_path)
        family = family_named(raw.get("_class_name"), cfg_path)
        if config is not None and not isinstance(config, family.config_class):
            raise CheckpointError(f"{cfg_path}: a {family.model_class.__name__} model folder; config= must be a "
                                  f"{family.config_class.__name__}")
        cfg = config or family.config_from_json(raw, cfg_path)
        st, binf = os.path.join(path, WEIGHTS_NAME), os.path.join(path, WEIGHTS_NAME_BIN)
        if os.path.isfile(st):
            sd, source = _read_safetensors(st), st
        elif os.path.isfile(binf) and family is DDPM:
            sd, source = _read_torch(binf), binf
        else:
            raise CheckpointError(f"{path}: {WEIGHTS_NAME} is missing" if family is not DDPM else
                                  f"{path}: neither {WEIGHTS_NAME} nor {WEIGHTS_NAME_BIN} is there")
        if family.folder_keys is not None:
            sd = family.folder_keys(sd)
    elif path.endswith(".safetensors"):
        if config is None:
            raise CheckpointError(f"{path}: a bare .safetensors file holds no model config; pass config= "
                                  "(or load the folder it came in)")
        sd, source, cfg = _read_safetensors(path), path, config
        sd = from_diffusers_keys(sd)
    else:
        obj, source = read_torch_file(path), path
        if isinstance(obj, dict) and {"ema", "unet_config"} <= set(obj):
            # A ddpm_fast.train checkpoint: sample from its EMA weights.
            try:
                cfg = config or config_from_dict(obj["unet_config"])
            except (ValueError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{path}: bad unet_config ({exc})") from None
            model = build_loaded(cfg, obj["ema"], f"{path} (ema)")
            return model if device is None else model.to(device)
        sd = _read_torch(path, obj)
        if "temb.dense.0.weight" in sd:
            cfg = config or _infer_pytorch_diffusion_config(sd, path)
            sd = _from_pytorch_diffusion_keys(sd, len(cfg.ch_mult))
        elif config is not None:
            cfg = config
            sd = from_diffusers_keys(sd)
        else:
            raise CheckpointError(f"{path}: not a pytorch_diffusion checkpoint and no config given")
    model = build_loaded(cfg, sd, source)
    return model if device is None else model.to(device)


def load_schedule(path):
    """The NoiseSchedule saved beside a model (scheduler_config.json), or None if there is none."""
    path = resolve_model_path(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    candidates = [os.path.join(folder, SCHEDULER_CONFIG_NAME), os.path.join(folder, "scheduler", SCHEDULER_CONFIG_NAME)]
    if not os.path.isdir(path) and path.endswith((".pt", ".pth")):
        obj = read_torch_file(path)
        if isinstance(obj, dict) and isinstance(obj.get("scheduler_config"), dict):
            return NoiseSchedule.from_config(obj["scheduler_config"])
    for cand in candidates:
        if os.path.isfile(cand):
            try:
                return NoiseSchedule.from_config(_read_json(cand))
            except ValueError as exc:
                raise CheckpointError(f"{cand}: {exc}") from None
    return None


def save_pretrained(model, path, schedule=None, dtype: torch.dtype | None = None) -> None:
    """Write config.json + diffusion_pytorch_model.safetensors (readable by load_pretrained, and for a
    UNet by diffusers), and scheduler_config.json when ``schedule`` is given. ``dtype`` stores float weights
    in that dtype. An ADM model keeps openai's key layout."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    sd = {k: (v.detach().to("cpu", dtype) if dtype is not None and v.is_floating_point() else v.detach().cpu())
          .contiguous() for k, v in model.state_dict().items()}
    atomic_write(os.path.join(path, WEIGHTS_NAME), lambda p: save_file(sd, p, metadata={"format": "pt"}))
    atomic_write_json(os.path.join(path, CONFIG_NAME), model_config_json(model.config))
    if schedule is not None:
        atomic_write_json(os.path.join(path, SCHEDULER_CONFIG_NAME), schedule.to_config())
