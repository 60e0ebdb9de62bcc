"""The ADM U-Net (Dhariwal & Nichol 2021; Nichol & Dhariwal 2021): openai's guided-diffusion and
improved-diffusion architecture, a second family beside the DDPM U-Net (unet.py).

What sets it apart from the DDPM U-Net: scale-shift norm (the time embedding modulates the second norm of
each ResBlock, ``norm(h) * (1 + scale) + shift``), ResBlocks that resample (``resblock_updown``), multi-head
attention at several resolutions with two qkv channel orders, fractional channel multipliers, learned
variance (2C output channels: eps, then the variance value v in [-1, 1]) and improved-diffusion's timestep
rescaling (the model sees t * 1000 / T).

The module tree mirrors openai's state-dict layout (time_embed.0, input_blocks.3.0.in_layers.2, ...), so
their .pt files load key for key; the forward is written from the published formulas. Every norm goes
through the ops registry (ops.group_norm_silu; scale-shift norm as ops.group_norm_scale_shift_silu, one
fused pass), so one module runs the reference ops or the kernels. ADMUNet is the fp32 reference;
``to_fast(dtype)`` returns a FastADMUNet (channels_last, fp16/bf16, SDPA attention with the legacy qkv
order permuted once, at build time, into the new one) whose ResBlocks keep the folds that stay valid in
this family: every block's time projection in one GEMM, conv2's and the shortcut's biases with the residual
add in one ops.residual_add, (without scale-shift norm only) conv1's bias in the time add, and every nearest
2x upsampling with the 3x3 convolution after it as one transposed convolution (fast.upsampled_conv), and the
other 3x3 convolutions as ops.conv3x3 (Winograd on a CPU in fp32). Under scale-shift norm nothing is added
before the norm, so conv1's bias has no add to ride in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_fast import ops
from ddpm_fast.base import unet_budget_problem, unet_cost
from ddpm_fast.config import ConfigDict
from ddpm_fast.fast import (
    FastDenoiser,
    FastUpsample,
    Folding,
    ReferenceDenoiser,
    check_class_labels,
    check_x_and_t,
    decoder_block,
    fast_form,
    folded,
    group_norm,
    join,
    shortcut,
    tensor_sum,
    timestep_embedding,
    upsampled_conv,
)

ADM_GROUPS = 32  # openai's normalization(): GroupNorm32(32, channels), eps 1e-5, computed in fp32
ADM_EPS = 1e-5


def normalize_levels(config) -> None:
    """A frozen config's attention_ds as ints and channel_mult as ints where whole (JSON gives lists)."""
    object.__setattr__(config, "attention_ds", tuple(int(d) for d in config.attention_ds))
    object.__setattr__(config, "channel_mult", tuple(float(m) if float(m) != int(m) else int(m)
                                                     for m in config.channel_mult))


@dataclass(frozen=True)
class ADMConfig(ConfigDict):
    """The ADM U-Net's hyper-parameters, named as openai's UNetModel arguments.

    ``attention_ds``: the downsample rates (1, 2, 4, ...) whose levels have attention (openai's
    ``attention_resolutions`` after image_size // res). ``timestep_scale``: what the model multiplies t by
    (1000 / T for improved-diffusion's rescale_timesteps, else 1). ``sigma_small``: for a fixed-variance
    model, whether its checkpoint means the posterior variance (True) or beta (False, openai's default).
    """

    image_size: int = 64
    in_channels: int = 3
    model_channels: int = 128
    num_res_blocks: int = 2
    attention_ds: tuple[int, ...] = (4, 8)
    dropout: float = 0.0
    channel_mult: tuple[float, ...] = (1, 2, 3, 4)
    conv_resample: bool = True
    num_classes: int | None = None
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    learn_sigma: bool = False
    sigma_small: bool = False
    timestep_scale: float = 1.0

    def __post_init__(self):
        normalize_levels(self)
        errors = []
        for name in ("image_size", "in_channels", "model_channels", "num_res_blocks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                errors.append(f"{name} must be a positive integer, got {v!r}")
        if errors:
            raise ValueError("invalid ADMConfig: " + "; ".join(errors))
        if not self.channel_mult or any(not m > 0 for m in self.channel_mult):
            errors.append(f"channel_mult must be non-empty and positive, got {self.channel_mult}")
        else:
            levels = len(self.channel_mult)
            if self.image_size % 2 ** (levels - 1):
                errors.append(f"image_size {self.image_size} must be divisible by 2**(levels-1) = {2 ** (levels - 1)}")
            for c in sorted(set(self.level_channels)):
                if c < 1 or c % ADM_GROUPS:
                    errors.append(f"{c} channels (model_channels x channel_mult) are not a positive multiple of "
                                  f"the {ADM_GROUPS} norm groups")
            rates = [2**i for i in range(levels)]
            missing = [d for d in self.attention_ds if d not in rates]
            if missing:
                errors.append(f"attention at downsample rates {missing} matches no level (rates {rates}; "
                              f"resolutions {[self.image_size // r for r in rates]})")
            for c, rate in zip(self.level_channels, rates, strict=True):
                attn = rate in self.attention_ds or rate == rates[-1]  # the middle block always attends
                if attn and self.num_head_channels != -1 and c % self.num_head_channels:
                    errors.append(f"attention over {c} channels: not divisible by num_head_channels "
                                  f"{self.num_head_channels}")
                for heads in {self.heads(c, False), self.heads(c, True)}:
                    if attn and (heads < 1 or c % heads):
                        errors.append(f"attention over {c} channels: not divisible into {heads} heads")
        if self.num_head_channels != -1 and self.num_head_channels < 1:
            errors.append(f"num_head_channels must be positive or -1, got {self.num_head_channels}")
        if self.num_heads < 1 and self.num_head_channels == -1:
            errors.append(f"num_heads must be positive, got {self.num_heads}")
        if self.model_channels % 2:
            errors.append(f"model_channels must be even for the sinusoidal embedding, got {self.model_channels}")
        if not 0.0 <= self.dropout < 1.0:
            errors.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes is not None and (isinstance(self.num_classes, bool) or self.num_classes < 1):
            errors.append(f"num_classes must be positive or None, got {self.num_classes}")
        if not (math.isfinite(self.timestep_scale) and self.timestep_scale > 0):
            errors.append(f"timestep_scale must be positive and finite, got {self.timestep_scale}")
        if errors:
            raise ValueError("invalid ADMConfig: " + "; ".join(dict.fromkeys(errors)))

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def sample_size(self) -> int:
        return self.image_size

    @property
    def null_label(self) -> None:
        """openai's class-conditional models have no null label (no classifier-free guidance)."""
        return None

    def budget_problem(self, fields: dict[str, object] | None = None) -> str | None:
        """Why this U-Net cannot be built on this machine (see base.unet_budget_problem), naming ``fields``
        (default: this config's own model_channels, channel_mult, num_res_blocks, image_size), or None."""
        fields = fields or {"model_channels": self.model_channels, "channel_mult": list(self.channel_mult),
                            "num_res_blocks": self.num_res_blocks, "image_size": self.image_size}
        return unet_budget_problem(*self.levels(), fields)

    def levels(self) -> tuple:
        """(resolutions, channels, num_res_blocks, attention per level, temb_dim): what base.unet_cost reads."""
        rates = [2**i for i in range(len(self.channel_mult))]
        return ([self.image_size // r for r in rates], self.level_channels, self.num_res_blocks,
                [r in self.attention_ds for r in rates], self.temb_dim)

    def cost(self) -> tuple[float, float]:
        """(parameters, fp32 activation bytes of one image's forward), estimated (base.unet_cost)."""
        return unet_cost(*self.levels())

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(int(m * self.model_channels) for m in self.channel_mult)

    @property
    def temb_dim(self) -> int:
        return 4 * self.model_channels

    def heads(self, channels: int, upsample: bool) -> int:
        if self.num_head_channels != -1:
            return channels // self.num_head_channels
        if upsample and self.num_heads_upsample != -1:
            return self.num_heads_upsample
        return self.num_heads

    @property
    def output_channels(self) -> int:
        return self.out_channels


# ADM configurations to train (python -m ddpm_fast.train --config NAME): unconditional (openai's models
# have no null label, so no classifier-free guidance); learned variance comes with --learn-sigma.
TRAIN_PRESETS: dict[str, ADMConfig] = {
    # improved-diffusion's CIFAR-10 architecture (its README: 128 channels, 3 blocks, dropout 0.3).
    "adm-cifar10": ADMConfig(image_size=32, model_channels=128, num_res_blocks=3, attention_ds=(2, 4),
                             channel_mult=(1, 2, 2, 2), num_heads=4, dropout=0.3, use_scale_shift_norm=True),
    # Small enough for CPU tests, with every ADM block kind (scale-shift, resblock up/down, multi-head attention).
    "adm-tiny": ADMConfig(image_size=8, model_channels=32, num_res_blocks=1, attention_ds=(2,), channel_mult=(1, 2),
                          num_head_channels=32, use_scale_shift_norm=True, resblock_updown=True),
}


def adm_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(ADM_GROUPS, channels, eps=ADM_EPS)


class ADMResample(nn.Module):
    """Nearest 2x upsampling or 2x downsampling (a stride-2 3x3 conv, or 2x2 average pooling), with the
    parameter names of openai's Upsample (``conv``) and Downsample (``op``)."""

    def __init__(self, channels: int, up: bool, use_conv: bool):
        super().__init__()
        self.up = up
        if use_conv and up:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        elif use_conv:
            self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        elif not up:
            self.op = nn.AvgPool2d(2, 2)

    def forward(self, x):
        if self.up:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            return self.conv(x) if hasattr(self, "conv") else x
        return self.op(x)


class ADMResBlock(nn.Module):
    """in_layers (norm, SiLU, conv) -> time modulation -> out_layers (norm, SiLU, dropout, conv) + skip.

    ``resample`` ('up', 'down' or None) resamples both paths between the first SiLU and the first conv.
    """

    def __init__(self, channels: int, temb_dim: int, out_channels: int, dropout: float, scale_shift: bool,
                 resample: str | None = None):
        super().__init__()
        self.scale_shift = scale_shift
        self.resample = resample
        self.in_layers = nn.Sequential(adm_norm(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(temb_dim, out_channels * (2 if scale_shift else 1)))
        self.out_layers = nn.Sequential(adm_norm(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def _resampled(self, h: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            return F.interpolate(h, scale_factor=2.0, mode="nearest")
        return F.avg_pool2d(h, 2, 2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``emb``: SiLU of the time (+ class) embedding, the input of emb_layers' Linear."""
        h = group_norm(self.in_layers[0], x, silu=True)
        if self.resample is not None:
            h, x = self._resampled(h), self._resampled(x)
        h = self.in_layers[2](h)
        mod = self.emb_layers[1](emb).to(h.dtype)
        norm = self.out_layers[0]
        if self.scale_shift:
            scale, shift = mod.chunk(2, dim=1)
            h = ops.group_norm_scale_shift_silu(h, norm.weight, norm.bias, norm.num_groups, norm.eps, scale, shift)
        else:
            h = ops.group_norm_silu(h, norm.weight, norm.bias, norm.num_groups, norm.eps, add=mod, silu=True)
        h = self.out_layers[3](self.out_layers[2](h))
        return self.skip_connection(x) + h


class ADMAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual; qkv and proj_out are 1x1 Conv1d as in
    openai's layout. ``new_order``: qkv channels are [q | k | v], each split into heads; else (legacy) they
    are per head [q k v | q k v | ...]."""

    def __init__(self, channels: int, heads: int, new_order: bool):
        super().__init__()
        self.heads, self.new_order = heads, new_order
        self.norm = adm_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def split_qkv(self, qkv: torch.Tensor):
        """(N, 3C, T) -> q, k, v as (N, heads, T, C/heads)."""
        n, width, length = qkv.shape
        ch = width // (3 * self.heads)
        if self.new_order:
            parts = qkv.reshape(n, 3, self.heads, ch, length).unbind(1)
        else:
            parts = qkv.reshape(n, self.heads, 3, ch, length).unbind(2)
        return tuple(p.transpose(-1, -2) for p in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, hgt, wid = x.shape
        h = group_norm(self.norm, x, silu=False).reshape(n, c, hgt * wid)
        q, k, v = self.split_qkv(F.conv1d(h, self.qkv.weight, self.qkv.bias))
        w = torch.softmax((q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)
        a = (w.to(v.dtype) @ v).transpose(-1, -2).reshape(n, c, hgt * wid)
        return x + F.conv1d(a, self.proj_out.weight, self.proj_out.bias).reshape(n, c, hgt, wid)


class ADMStage(nn.Sequential):
    """One of openai's TimestepEmbedSequential stages: ResBlocks get the time embedding, the rest x alone."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """``skip``: a decoder stage's second input, joined to x by its first layer, a ResBlock (a fast one reads
        the two in place; the reference concatenates)."""
        for i, layer in enumerate(self):
            if i == 0 and skip is not None:
                x = decoder_block(layer, x, skip, emb)
            else:
                x = layer(x, emb) if isinstance(layer, ADMResBlock) else layer(x)
        return x


class ADMUNet(ReferenceDenoiser):
    """The ADM U-Net (fp32 reference). ``model(x, t, class_labels)``: t are integer diffusion steps; the
    output is eps (C channels) or eps and v (2C channels) for a learned-sigma model."""

    def __init__(self, config: ADMConfig):
        super().__init__(config, ADMConfig)
        cfg = config
        mc, temb, drop, ss = cfg.model_channels, cfg.temb_dim, cfg.dropout, cfg.use_scale_shift_norm
        self.time_embed = nn.Sequential(nn.Linear(mc, temb), nn.SiLU(), nn.Linear(temb, temb))
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, temb)

        def res(cin, cout, resample=None):
            return ADMResBlock(cin, temb, cout, drop, ss, resample)

        def attn(c, up):
            return ADMAttention(c, cfg.heads(c, up), cfg.use_new_attention_order)

        ch = cfg.level_channels[0]
        self.input_blocks = nn.ModuleList([ADMStage(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skips, ds = [ch], 1
        levels = len(cfg.channel_mult)
        for level, cout in enumerate(cfg.level_channels):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, cout)]
                ch = cout
                if ds in cfg.attention_ds:
                    layers.append(attn(ch, False))
                self.input_blocks.append(ADMStage(*layers))
                skips.append(ch)
            if level != levels - 1:
                down = res(ch, ch, "down") if cfg.resblock_updown else ADMResample(ch, False, cfg.conv_resample)
                self.input_blocks.append(ADMStage(down))
                skips.append(ch)
                ds *= 2
        self.middle_block = ADMStage(res(ch, ch), attn(ch, False), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            cout = cfg.level_channels[level]
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skips.pop(), cout)]
                ch = cout
                if ds in cfg.attention_ds:
                    layers.append(attn(ch, True))
                if level and i == cfg.num_res_blocks:
                    up = res(ch, ch, "up") if cfg.resblock_updown else ADMResample(ch, True, cfg.conv_resample)
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(ADMStage(*layers))
        self.out = nn.Sequential(adm_norm(ch), nn.SiLU(), nn.Conv2d(cfg.level_channels[0], cfg.out_channels, 3,
                                                                      padding=1))

    # ---- inputs -------------------------------------------------------------------------------

    def _check_inputs(self, x, t, class_labels):
        cfg = self.config
        n, t = check_x_and_t(self, "ADMUNet", x, t, self.out[2].weight, cfg.in_channels, len(cfg.channel_mult))
        top = (cfg.num_classes or 0) - 1
        return t, check_class_labels("ADMUNet", class_labels, n, x.device, cfg.num_classes, top, f"in [0, {top}]")

    def time_features(self, t: torch.Tensor, class_labels, dtype: torch.dtype) -> torch.Tensor:
        """SiLU(time_embed(t * timestep_scale) [+ label_emb(y)]): the input of every ResBlock's emb Linear."""
        cfg = self.config
        emb = timestep_embedding(t.float() * cfg.timestep_scale, cfg.model_channels, flip_sin_to_cos=True,
                                 freq_shift=0)
        emb = self.time_embed[2](F.silu(self.time_embed[0](emb.to(dtype))))
        if cfg.num_classes is not None:
            emb = emb + self.label_emb(class_labels.long()).to(emb.dtype)
        return F.silu(emb)

    # ---- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, t, class_labels=None) -> torch.Tensor:
        t, class_labels = self._check_inputs(x, t, class_labels)
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype).contiguous(memory_format=torch.channels_last)
        emb = self.time_features(t, class_labels, self.time_embed[0].weight.dtype)
        h, skips = x, []
        for stage in self.input_blocks:
            h = stage(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for stage in self.output_blocks:
            h = stage(h, emb, skips.pop())
        return self.out[2](group_norm(self.out[0], h, silu=True))

    def to_fast(self, dtype: torch.dtype = torch.float16, fold: bool = True, copy: bool = True) -> FastADMUNet:
        """The fast path: a FastADMUNet built from a copy of this model (this one is left untouched); ``copy=False``
        builds it from this model's own modules, as UNet.to_fast does."""
        return fast_form(self, FastADMUNet, dtype, fold, copy)


# ---- the fast path ------------------------------------------------------------------------------


class FastADMResBlock(Folding, ADMResBlock):
    """An ADMResBlock's fast form (same parameters): called with the FastADMUNet's one time GEMM output, of
    which ``time_slice`` are this block's columns (its emb_layers projection, + conv1's bias without
    scale-shift); None: called with SiLU(emb) and projects it itself. An upsampling block's upsampling and
    conv1 are one transposed convolution over the low-resolution input (``upsampled_conv``)."""

    def __init__(self, block: ADMResBlock, time_slice: tuple[int, int] | None = None):
        nn.Module.__init__(self)
        for name, child in block.named_children():
            setattr(self, name, child)
        self.scale_shift, self.resample, self.time_slice = block.scale_shift, block.resample, time_slice

    joins_skip = True  # a decoder stage's first block is given its skip beside its input (fast.decoder_block)

    def time_weight(self) -> torch.Tensor:
        return self.emb_layers[1].weight

    def time_bias(self) -> list[torch.Tensor]:
        """The sources of this block's bias in the time GEMM."""
        return [self.emb_layers[1].bias] if self.scale_shift else [self.emb_layers[1].bias, self.in_layers[2].bias]

    def forward(self, x: torch.Tensor, temb: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """The block on x, or (a decoder stage's first block) on torch.cat([x, skip], 1), read in place where
        ops.joins_in_place (as unet.FastResnetBlock does)."""
        x, skip = join(x, skip, self.resample is None and not isinstance(self.skip_connection, nn.Identity))
        if self.time_slice is not None:
            mod = temb[:, self.time_slice[0]:self.time_slice[1]]
        else:
            bias = folded(self, "time_bias", tensor_sum, *self.time_bias())
            mod = F.linear(temb, self.emb_layers[1].weight, bias)
        h = group_norm(self.in_layers[0], x, silu=True, skip=skip)
        conv1, norm = self.in_layers[2], self.out_layers[0]
        bias = conv1.bias if self.scale_shift else None  # else it rides in the time add of norm
        if self.resample == "up":  # upsampling and conv1 as one transposed convolution
            h, x = upsampled_conv(self, h, conv1, bias), self._resampled(x)
        else:
            if self.resample is not None:
                h, x = self._resampled(h), self._resampled(x)
            h = ops.conv3x3(h, conv1.weight, bias)
        if self.scale_shift:
            scale, shift = mod.to(h.dtype).chunk(2, dim=1)
            h = ops.group_norm_scale_shift_silu(h, norm.weight, norm.bias, norm.num_groups, norm.eps, scale, shift)
        else:
            h = ops.group_norm_silu(h, norm.weight, norm.bias, norm.num_groups, norm.eps, add=mod, silu=True)
        conv2 = self.out_layers[3]
        h = self.out_layers[2](h)
        if isinstance(self.skip_connection, nn.Identity):
            return ops.conv3x3_residual_add(h, conv2.weight, x, conv2.bias)
        return ops.conv3x3_residual_add(h, conv2.weight, shortcut(self, self.skip_connection.weight, x, skip),
                                        folded(self, "out_bias", torch.add, conv2.bias, self.skip_connection.bias))


class FastADMAttention(ADMAttention):
    """An ADMAttention's fast form: SDPA over channels_last tokens; a legacy-order qkv is permuted once, here,
    into the new order (the state dict keeps openai's layout: ``state_dict`` permutes it back)."""

    def __init__(self, block: ADMAttention):
        nn.Module.__init__(self)
        self.heads, self.new_order = block.heads, True
        self.norm, self.qkv, self.proj_out = block.norm, block.qkv, block.proj_out
        self.legacy = not block.new_order
        if self.legacy:
            with torch.no_grad():
                perm = self._legacy_to_new()
                self.qkv.weight.copy_(self.qkv.weight[perm])
                self.qkv.bias.copy_(self.qkv.bias[perm])
        self._register_state_dict_hook(FastADMAttention._to_legacy_layout)

    def _legacy_to_new(self) -> torch.Tensor:
        """new-order row r holds legacy row perm[r]."""
        c3 = self.qkv.weight.shape[0]
        ch = c3 // (3 * self.heads)
        return torch.arange(c3).reshape(self.heads, 3, ch).transpose(0, 1).reshape(-1)

    @staticmethod
    def _to_legacy_layout(module, state_dict, prefix, local_metadata):
        """state_dict hook (after the children's entries are in): qkv back in openai's legacy order."""
        if module.legacy:
            inverse = torch.argsort(module._legacy_to_new())
            for name in ("weight", "bias"):
                key = prefix + "qkv." + name
                state_dict[key] = state_dict[key][inverse]
        return state_dict

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.legacy:
            perm = self._legacy_to_new()
            for name in ("weight", "bias"):
                key = prefix + "qkv." + name
                if key in state_dict:
                    state_dict[key] = state_dict[key][perm]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, hgt, wid = x.shape
        tokens = group_norm(self.norm, x, silu=False).reshape(n, c, hgt * wid).transpose(1, 2)  # (N, HW, C), no copy
        qkv = F.linear(tokens, self.qkv.weight[:, :, 0], self.qkv.bias)
        q, k, v = (p.reshape(n, hgt * wid, self.heads, c // self.heads).transpose(1, 2) for p in qkv.chunk(3, -1))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, hgt * wid, c)
        out = F.linear(a, self.proj_out.weight[:, :, 0], self.proj_out.bias)
        return x + out.transpose(1, 2).reshape(n, c, hgt, wid)


class FastADMUNet(FastDenoiser, ADMUNet):
    """The fast path of an ADMUNet (fast.FastDenoiser): attention through SDPA (FastADMAttention); with ``fold``,
    FastADMResBlocks given their column slices of one time GEMM, and upsamplers with a conv as fast.FastUpsample
    (upsampling + conv as one transposed convolution)."""

    def _fast_child(self, child: nn.Module, start: int) -> nn.Module | None:
        if type(child) is ADMAttention:
            return FastADMAttention(child)
        if type(child) is ADMResample and child.up and hasattr(child, "conv") and self.fold:
            return FastUpsample(child)
        if type(child) is ADMResBlock and self.fold:
            return FastADMResBlock(child, (start, start + child.emb_layers[1].out_features))
        return None
