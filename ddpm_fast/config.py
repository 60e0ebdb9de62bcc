"""UNetConfig: the DDPM U-Net's hyper-parameters, with named presets.

The presets follow Ho et al. 2020 (cifar10: 35.7M parameters; celebahq256 / lsun256: 113.7M). The
remaining knobs exist to reproduce diffusers UNet2DModel DDPM checkpoints exactly: time-embedding
layout (flip_sin_to_cos, freq_shift), downsample padding, norm eps and groups, class conditioning.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class UNetConfig:
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

    def budget_problem(self, fields: dict[str, object] | None = None) -> str | None:
        """Why this U-Net cannot be built on this machine (see base.unet_budget_problem), naming ``fields``
        (default: this config's own ch, ch_mult, num_res_blocks, sample_size), or None."""
        from ddpm_fast.base import unet_budget_problem

        fields = fields or {"ch": self.ch, "ch_mult": list(self.ch_mult), "num_res_blocks": self.num_res_blocks,
                            "sample_size": self.sample_size}
        return unet_budget_problem(self.resolutions, [self.ch * m for m in self.ch_mult], self.num_res_blocks,
                                   [r in self.attn_resolutions for r in self.resolutions], self.temb_dim, fields)

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

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown UNetConfig keys {unknown}")
        return cls(**d)


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
