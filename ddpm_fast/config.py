"""UNetConfig: the DDPM U-Net's hyper-parameters, with named presets, and its diffusers config.json form.

The presets follow Ho et al. 2020 (cifar10: 35.7M parameters; celebahq256 / lsun256: 113.7M). The
remaining knobs exist to reproduce diffusers UNet2DModel DDPM checkpoints exactly: time-embedding
layout (flip_sin_to_cos, freq_shift), downsample padding, norm eps and groups, class conditioning.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ddpm_fast.base import CheckpointError, unet_budget_problem, unet_cost


class ConfigDict:
    """to_dict / from_dict of a frozen dataclass config (the training checkpoint's and the model folder's form):
    tuples as lists, and unknown keys refused by name."""

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}")
        return cls(**d)


@dataclass(frozen=True)
class UNetConfig(ConfigDict):
    sample_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_groups: int = 32
    norm_eps: float = 1e-6
    # Sinusoidal embedding: half = ch // 2 frequencies exp(-ln(10000) * i / (half - freq_shift));
    # [sin, cos] order unless flip_sin_to_cos. The DDPM original is freq_shift=1, no flip.
    flip_sin_to_cos: bool = False
    freq_shift: int = 1
    # 0: pad (0, 1, 0, 1) then a stride-2 3x3 conv (the original checkpoints); 1: conv with padding 1.
    downsample_padding: int = 0
    attention_head_dim: int | None = None  # None: one head over all channels, as in DDPM
    # Class conditioning: an embedding of num_classes + 1 rows; the last row is the null label
    # that classifier-free guidance uses for the unconditional half.
    num_classes: int | None = None
    # Learned variance (Improved DDPM): the output has twice out_channels, eps then v (trained on L_hybrid).
    learn_sigma: bool = False

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        errors = []

        def positive_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                errors.append(f"{name} must be a positive integer, got {v!r}")
                return False
            return True

        sizes_ok = all([positive_int(n) for n in ("sample_size", "in_channels", "out_channels", "ch",
                                                  "num_res_blocks", "num_groups")])
        if not self.ch_mult:
            errors.append("ch_mult must not be empty")
        elif any(m < 1 for m in self.ch_mult):
            errors.append(f"ch_mult entries must be positive, got {self.ch_mult}")
        elif sizes_ok:
            if self.sample_size % (2 ** (len(self.ch_mult) - 1)):
                errors.append(f"sample_size {self.sample_size} must be divisible by 2**(levels-1) = "
                              f"{2 ** (len(self.ch_mult) - 1)}")
            for m in sorted(set(self.ch_mult)):
                if (self.ch * m) % self.num_groups:
                    errors.append(f"channels {self.ch * m} not divisible by num_groups {self.num_groups}")
            missing = [r for r in self.attn_resolutions if r not in self.resolutions]
            if missing:
                errors.append(f"attn_resolutions {missing} match no level (the levels are at {self.resolutions})")
            if self.attention_head_dim is not None:
                if isinstance(self.attention_head_dim, bool) or not isinstance(self.attention_head_dim, int) \
                        or self.attention_head_dim < 1:
                    errors.append(f"attention_head_dim must be a positive integer or None, "
                                  f"got {self.attention_head_dim!r}")
                else:
                    for r, m in zip(self.resolutions, self.ch_mult, strict=True):
                        if r in self.attn_resolutions and (self.ch * m) % self.attention_head_dim:
                            errors.append(f"attention at {r}x{r} has {self.ch * m} channels, not divisible by "
                                          f"attention_head_dim {self.attention_head_dim}")
        if sizes_ok and self.ch % 2:
            errors.append(f"ch must be even for the sinusoidal embedding, got {self.ch}")
        if sizes_ok and self.ch // 2 - self.freq_shift == 0:
            errors.append(f"freq_shift {self.freq_shift} equals ch/2: the embedding frequencies divide by zero")
        if not 0.0 <= self.dropout < 1.0:
            errors.append(f"dropout must be in [0, 1), got {self.dropout}")
        if not (isinstance(self.norm_eps, (int, float)) and 0.0 < self.norm_eps < float("inf")):
            errors.append(f"norm_eps must be positive and finite, got {self.norm_eps!r}")
        if self.downsample_padding not in (0, 1):
            errors.append(f"downsample_padding must be 0 or 1, got {self.downsample_padding}")
        if not isinstance(self.learn_sigma, bool):
            errors.append(f"learn_sigma must be a bool, got {self.learn_sigma!r}")
        if self.num_classes is not None and self.num_classes < 1:
            errors.append(f"num_classes must be positive or None, got {self.num_classes}")
        if errors:
            raise ValueError("invalid UNetConfig: " + "; ".join(errors))

    def levels(self) -> tuple:
        """(resolutions, channels, num_res_blocks, attention per level, temb_dim): what base.unet_cost reads."""
        return (self.resolutions, [self.ch * m for m in self.ch_mult], self.num_res_blocks,
                [r in self.attn_resolutions for r in self.resolutions], self.temb_dim)

    def cost(self) -> tuple[float, float]:
        """(parameters, fp32 activation bytes of one image's forward), estimated (base.unet_cost)."""
        return unet_cost(*self.levels())

    def budget_problem(self, fields: dict[str, object] | None = None) -> str | None:
        """Why this U-Net cannot be built on this machine (see base.unet_budget_problem), naming ``fields``
        (default: this config's own ch, ch_mult, num_res_blocks, sample_size), or None."""
        fields = fields or {"ch": self.ch, "ch_mult": list(self.ch_mult), "num_res_blocks": self.num_res_blocks,
                            "sample_size": self.sample_size}
        return unet_budget_problem(*self.levels(), fields)

    @property
    def resolutions(self) -> tuple[int, ...]:
        return tuple(self.sample_size // 2**i for i in range(len(self.ch_mult)))

    @property
    def temb_dim(self) -> int:
        return self.ch * 4

    @property
    def null_label(self) -> int | None:
        """The label of the unconditional half of classifier-free guidance (the embedding's last row)."""
        return self.num_classes if self.num_classes else None

    @property
    def output_channels(self) -> int:
        """What the network outputs: eps, or eps and v with learned variance."""
        return self.out_channels * (2 if self.learn_sigma else 1)

    @classmethod
    def from_name(cls, name: str, **overrides) -> UNetConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown UNet preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, UNetConfig] = {
    "cifar10": UNetConfig(),
    "celebahq256": UNetConfig(sample_size=256, ch_mult=(1, 1, 2, 2, 4, 4), dropout=0.0),
    "lsun256": UNetConfig(sample_size=256, ch_mult=(1, 1, 2, 2, 4, 4), dropout=0.0),
    # The embedded default model: 1-channel digits at 16x16, 10 classes for guidance.
    "digits": UNetConfig(
        sample_size=16, in_channels=1, out_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
        attn_resolutions=(8,), dropout=0.0, num_groups=8, num_classes=10,
    ),
    # Small enough for CPU tests, yet every block kind appears (attention, up/down, shortcut convs).
    "tiny": UNetConfig(
        sample_size=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
        num_groups=4,
    ),
}


# ---- diffusers config <-> UNetConfig ----------------------------------------------------------

_DIFFUSERS_FIXED = {
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "act_fn": "silu",
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "mid_block_scale_factor": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
}


def to_diffusers_config(cfg: UNetConfig) -> dict:
    levels = len(cfg.ch_mult)
    attn = [r in cfg.attn_resolutions for r in cfg.resolutions]
    return {
        "_class_name": "UNet2DModel",
        "sample_size": cfg.sample_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.output_channels,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if attn[levels - 1 - i] else "UpBlock2D" for i in range(levels)],
        "freq_shift": cfg.freq_shift,
        "flip_sin_to_cos": cfg.flip_sin_to_cos,
        "downsample_padding": cfg.downsample_padding,
        "dropout": cfg.dropout,
        "attention_head_dim": cfg.attention_head_dim,
        "norm_num_groups": cfg.num_groups,
        "attn_norm_num_groups": None,
        "norm_eps": cfg.norm_eps,
        "num_class_embeds": None if cfg.num_classes is None else cfg.num_classes + 1,
        **_DIFFUSERS_FIXED,
    }


def from_diffusers_config(d: dict, source: str = "config") -> UNetConfig:
    def fail(msg):
        raise CheckpointError(f"{source}: {msg}")

    if d.get("_class_name", "UNet2DModel") != "UNet2DModel":
        fail(f"_class_name is {d['_class_name']!r}; only UNet2DModel is supported")
    for key, want in _DIFFUSERS_FIXED.items():
        if key in d and d[key] != want and not (key == "mid_block_scale_factor" and float(d[key]) == 1.0):
            fail(f"unsupported {key}={d[key]!r} (supported: {want!r})")
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        if key not in d:
            fail(f"missing key {key!r}")
    chans = d["block_out_channels"]
    if not isinstance(chans, (list, tuple)) or not chans or any(
            isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in chans):
        fail(f"block_out_channels must be a non-empty list of positive integers, got {chans!r}")
    chans = list(chans)
    ch = chans[0]
    if any(c % ch for c in chans):
        fail(f"block_out_channels {chans} are not multiples of the first")
    down, up = list(d["down_block_types"]), list(d["up_block_types"])
    levels = len(chans)
    if len(down) != levels or len(up) != levels:
        fail("down_block_types / up_block_types must have one entry per block_out_channels entry")
    for kind in down:
        if kind not in ("DownBlock2D", "AttnDownBlock2D"):
            fail(f"unsupported down block type {kind!r}")
    for i, kind in enumerate(up):
        if kind not in ("UpBlock2D", "AttnUpBlock2D"):
            fail(f"unsupported up block type {kind!r}")
        if (kind == "AttnUpBlock2D") != (down[levels - 1 - i] == "AttnDownBlock2D"):
            fail("attention must sit at the same resolutions on the down and up paths")
    attn_groups = d.get("attn_norm_num_groups")
    groups = d.get("norm_num_groups", 32)
    if attn_groups not in (None, groups):
        fail(f"attn_norm_num_groups={attn_groups} differs from norm_num_groups={groups}")
    sample = d.get("sample_size", 32)
    if isinstance(sample, (list, tuple)):
        if len(set(sample)) != 1:
            fail(f"non-square sample_size {sample} is not supported")
        sample = sample[0]
    if isinstance(sample, bool) or not isinstance(sample, int):
        fail(f"sample_size must be an integer, got {sample!r}")
    n_cls = d.get("num_class_embeds")
    # Learned variance: eps and v, twice the input's channels (diffusers' learned_range models are shaped so).
    in_ch, out_ch = d.get("in_channels", 3), d.get("out_channels", 3)
    learn_sigma = isinstance(in_ch, int) and isinstance(out_ch, int) and out_ch == 2 * in_ch
    try:
        cfg = UNetConfig(
            sample_size=int(sample),
            in_channels=in_ch,
            out_channels=in_ch if learn_sigma else out_ch,
            learn_sigma=learn_sigma,
            ch=ch,
            ch_mult=tuple(c // ch for c in chans),
            num_res_blocks=d.get("layers_per_block", 2),
            attn_resolutions=tuple(int(sample) // 2**i for i, k in enumerate(down) if k == "AttnDownBlock2D"),
            dropout=d.get("dropout", 0.0),
            num_groups=groups,
            norm_eps=d.get("norm_eps", 1e-5),
            flip_sin_to_cos=d.get("flip_sin_to_cos", True),
            freq_shift=d.get("freq_shift", 0),
            downsample_padding=d.get("downsample_padding", 1),
            attention_head_dim=d.get("attention_head_dim"),
            num_classes=None if n_cls is None else n_cls - 1,
        )
    except (ValueError, TypeError) as exc:
        fail(str(exc))
    problem = cfg.budget_problem({"block_out_channels": chans, "layers_per_block": cfg.num_res_blocks,
                                  "sample_size": cfg.sample_size})
    if problem:
        fail(problem)
    return cfg


def conditioning_labels(num_classes: int | None, class_labels, n: int, device,
                        host_check: bool = True) -> torch.Tensor | None:
    """The labels a model with ``num_classes`` classes is fed for n images: None for an unconditional model;
    for a conditional one ``class_labels`` (an int, or n ints in [0, num_classes)) as int64 (n,) on
    ``device``, or the null label ``num_classes`` for every image when None. ``host_check=False`` checks
    the range without reading a value on the host (hot paths: an immediate error on the CPU, a device
    assert on a GPU)."""
    if class_labels is None:
        return None if not num_classes else torch.full((n,), num_classes, dtype=torch.int64, device=device)
    if not num_classes:
        raise ValueError("class_labels given, but the model is unconditional")
    labels = torch.as_tensor(class_labels, device=device)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"class_labels must be integers, got {labels.dtype}")
    labels = labels.to(torch.int64)
    if labels.dim() == 0:
        labels = labels.expand(n).contiguous()
    if labels.shape != (n,):
        raise ValueError(f"class_labels must be an int or have shape ({n},), got {tuple(labels.shape)}")
    message = f"class_labels must lie in [0, {num_classes - 1}]"
    if not host_check:
        torch._assert_async(((labels >= 0) & (labels < num_classes)).all(), message)
    elif n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(message)
    return labels
