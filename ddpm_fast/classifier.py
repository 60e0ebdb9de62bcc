"""guided-diffusion's noise-aware classifier (Dhariwal & Nichol 2021, openai's ``EncoderUNetModel``): the ADM
U-Net's encoder and middle block (adm.py's own blocks) and a pooling head, ``clf(x, t) -> logits``.

The heads, named as openai's ``--classifier_pool``:
- ``adaptive``: norm, SiLU, global average pool, a 1x1 conv to the logits;
- ``attention`` (guided-diffusion's default): norm, SiLU, CLIP's attention pooling (the spatial mean attends
  over the positions, with a learned positional embedding; heads of ``num_head_channels``);
- ``spatial``: the spatial mean of every encoder stage's output and the middle block's, concatenated, then
  Linear(2048), ReLU, Linear;
- ``spatial_v2``: the same with GroupNorm(32, 2048) and SiLU between the Linears.

The module tree mirrors openai's state-dict layout (input_blocks.N, middle_block, out.K), so its classifier
``.pt`` files load key for key (openai.load_openai_classifier). Every norm goes through the ops registry, which
runs the reference ops for calls autograd records: the guidance gradient is an ordinary backward. ``to_fast``
gives FastEncoderUNet, the ADM U-Net's fast blocks in the encoder (channels_last, one time GEMM, SDPA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_fast.adm import (
    ADM_EPS,
    ADM_GROUPS,
    ADMAttention,
    ADMConfig,
    ADMResample,
    ADMResBlock,
    ADMStage,
    FastADMUNet,
    adm_norm,
    normalize_levels,
)
from ddpm_fast.config import ConfigDict
from ddpm_fast.fast import FastDenoiser, check_class_labels, check_x_and_t, fast_form, group_norm, timestep_embedding

POOLS = ("adaptive", "attention", "spatial", "spatial_v2")
SPATIAL_WIDTH = 2048  # the spatial heads' hidden width (openai's, fixed)


@dataclass(frozen=True)
class ClassifierConfig(ConfigDict):
    """The classifier's hyper-parameters, named as openai's EncoderUNetModel arguments (``attention_ds``: the
    downsample rates with attention, openai's image_size // res; ``num_classes``: its out_channels)."""

    image_size: int = 64
    in_channels: int = 3
    model_channels: int = 128
    num_res_blocks: int = 2
    attention_ds: tuple[int, ...] = (2, 4, 8)
    channel_mult: tuple[float, ...] = (1, 2, 3, 4)
    num_classes: int = 1000
    num_heads: int = 1
    num_head_channels: int = 64
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_new_attention_order: bool = False
    pool: str = "attention"
    dropout: float = 0.0

    def __post_init__(self):
        normalize_levels(self)
        errors = []
        if self.pool not in POOLS:
            errors.append(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.pool == "attention" and self.num_head_channels == -1:
            errors.append("pool 'attention' needs num_head_channels (openai asserts it)")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            errors.append(f"num_classes must be a positive integer, got {self.num_classes!r}")
        if errors:
            raise ValueError("invalid ClassifierConfig: " + "; ".join(errors))
        try:
            self.encoder()
        except ValueError as exc:
            raise ValueError(str(exc).replace("invalid ADMConfig", "invalid ClassifierConfig")) from None
        if self.pool == "attention" and self.pooled_channels % self.num_head_channels:
            raise ValueError(f"invalid ClassifierConfig: attention pooling over {self.pooled_channels} channels is "
                             f"not divisible into heads of {self.num_head_channels}")

    def encoder(self) -> ADMConfig:
        """The ADM configuration whose encoder and middle block this classifier shares."""
        return ADMConfig(image_size=self.image_size, in_channels=self.in_channels,
                         model_channels=self.model_channels, num_res_blocks=self.num_res_blocks,
                         attention_ds=self.attention_ds, dropout=self.dropout, channel_mult=self.channel_mult,
                         num_heads=self.num_heads, num_head_channels=self.num_head_channels,
                         use_scale_shift_norm=self.use_scale_shift_norm, resblock_updown=self.resblock_updown,
                         use_new_attention_order=self.use_new_attention_order)

    @property
    def pooled_channels(self) -> int:
        return self.encoder().level_channels[-1]

    @property
    def pooled_size(self) -> int:
        return self.image_size // 2 ** (len(self.channel_mult) - 1)


class AttentionPool2d(nn.Module):
    """CLIP's attention pooling as openai's classifier has it: the positions' mean prepended as a query token,
    a learned positional embedding (C, HW + 1), multi-head attention with qkv in [q | k | v] order, the
    mean token's output projected to the logits."""

    def __init__(self, size: int, channels: int, head_channels: int, out_channels: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(channels, size * size + 1) / channels ** 0.5)
        self.qkv_proj = nn.Conv1d(channels, 3 * channels, 1)
        self.c_proj = nn.Conv1d(channels, out_channels, 1)
        self.heads = channels // head_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        x = x.reshape(n, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + self.positional_embedding.to(x.dtype)
        qkv = F.conv1d(x, self.qkv_proj.weight, self.qkv_proj.bias)
        q, k, v = (p.reshape(n, self.heads, c // self.heads, -1) for p in qkv.chunk(3, dim=1))
        w = torch.softmax((q.float().transpose(-1, -2) @ k.float()) / math.sqrt(q.shape[2]), dim=-1)
        a = (v @ w.to(v.dtype).transpose(-1, -2)).reshape(n, c, -1)  # (n, heads, ch, T) -> (n, C, T)
        return F.conv1d(a[:, :, :1], self.c_proj.weight, self.c_proj.bias)[:, :, 0]


class EncoderUNet(nn.Module):
    """The classifier (fp32 reference): ``clf(x, t) -> logits`` (N, num_classes); t are the diffusion model's
    original timesteps (integer or fractional)."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        if not isinstance(config, ClassifierConfig):
            raise TypeError(f"EncoderUNet needs a ClassifierConfig, got {type(config).__name__}")
        self.config = cfg = config
        enc = cfg.encoder()
        mc, temb, drop, ss = enc.model_channels, enc.temb_dim, enc.dropout, enc.use_scale_shift_norm
        self.time_embed = nn.Sequential(nn.Linear(mc, temb), nn.SiLU(), nn.Linear(temb, temb))

        def res(cin, cout, resample=None):
            return ADMResBlock(cin, temb, cout, drop, ss, resample)

        def attn(c):
            return ADMAttention(c, enc.heads(c, False), enc.use_new_attention_order)

        ch = enc.level_channels[0]
        self.input_blocks = nn.ModuleList([ADMStage(nn.Conv2d(enc.in_channels, ch, 3, padding=1))])
        features, ds = ch, 1
        levels = len(enc.channel_mult)
        for level, cout in enumerate(enc.level_channels):
            for _ in range(enc.num_res_blocks):
                layers = [res(ch, cout)]
                ch = cout
                if ds in enc.attention_ds:
                    layers.append(attn(ch))
                self.input_blocks.append(ADMStage(*layers))
                features += ch
            if level != levels - 1:
                down = res(ch, ch, "down") if enc.resblock_updown else ADMResample(ch, False, enc.conv_resample)
                self.input_blocks.append(ADMStage(down))
                features += ch
                ds *= 2
        self.middle_block = ADMStage(res(ch, ch), attn(ch), res(ch, ch))
        features += ch
        k = cfg.num_classes
        if cfg.pool == "adaptive":
            self.out = nn.Sequential(adm_norm(ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)), nn.Conv2d(ch, k, 1),
                                     nn.Flatten())
        elif cfg.pool == "attention":
            self.out = nn.Sequential(adm_norm(ch), nn.SiLU(),
                                     AttentionPool2d(cfg.pooled_size, ch, cfg.num_head_channels, k))
        elif cfg.pool == "spatial":
            self.out = nn.Sequential(nn.Linear(features, SPATIAL_WIDTH), nn.ReLU(), nn.Linear(SPATIAL_WIDTH, k))
        else:
            self.out = nn.Sequential(nn.Linear(features, SPATIAL_WIDTH), nn.GroupNorm(ADM_GROUPS, SPATIAL_WIDTH,
                                                                                       eps=ADM_EPS),
                                     nn.SiLU(), nn.Linear(SPATIAL_WIDTH, k))

    compute_dtype = None  # the reference computes in its weights' dtype

    def time_features(self, t: torch.Tensor, class_labels, dtype: torch.dtype) -> torch.Tensor:
        """SiLU(time_embed(t)): the input of every ResBlock's emb Linear (the classifier has no class input)."""
        emb = timestep_embedding(t.float(), self.config.model_channels, flip_sin_to_cos=True, freq_shift=0)
        return F.silu(self.time_embed[2](F.silu(self.time_embed[0](emb.to(dtype)))))

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        cfg = self.config
        name = type(self).__name__
        _, t = check_x_and_t(self, name, x, t, self.input_blocks[0][0].weight, cfg.in_channels, len(cfg.channel_mult))
        if x.shape[-2:] != (cfg.image_size, cfg.image_size):
            raise ValueError(f"{name}: x is {x.shape[-2]}x{x.shape[-1]}, the classifier takes "
                             f"{cfg.image_size}x{cfg.image_size} images")
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype).contiguous(memory_format=torch.channels_last)
        emb = self.time_features(t, None, self.time_embed[0].weight.dtype)
        spatial = cfg.pool.startswith("spatial")
        h, means = x, []
        for stage in self.input_blocks:
            h = stage(h, emb)
            if spatial:
                means.append(h.mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial:
            means.append(h.mean(dim=(2, 3)))
            return self.out(torch.cat(means, dim=-1))
        h = group_norm(self.out[0], h, silu=True)
        if cfg.pool == "adaptive":
            return self.out[3](h.mean(dim=(2, 3), keepdim=True)).flatten(1)
        return self.out[2](h)


    def to_fast(self, dtype: torch.dtype = torch.float32, fold: bool = True, copy: bool = True) -> FastEncoderUNet:
        """The fast path: a FastEncoderUNet built from a copy of this classifier (this one is left untouched), the
        ADM U-Net's fast blocks in ``dtype`` channels_last; ``copy=False`` as ADMUNet.to_fast. Its forward runs
        under autograd (the guidance gradient): the fused ops that have no backward of their own run their
        reference there, the 3x3 convolutions keep their fast forward and backward (ops.conv3x3)."""
        return fast_form(self, FastEncoderUNet, dtype, fold, copy)


class FastEncoderUNet(FastDenoiser, EncoderUNet):
    """The classifier's fast form (fast.FastDenoiser): the ADM U-Net's fast blocks (FastADMResBlock with its slice
    of one time GEMM, FastADMAttention) in the encoder and middle block; the pooling head as the reference has it,
    in the fast dtype. Logits come out in that dtype (classifier_grad takes their log-softmax in fp32)."""

    _fast_child = FastADMUNet._fast_child


def classifier_grad(clf: nn.Module, x: torch.Tensor, t, y, scale: float = 1.0) -> torch.Tensor:
    """guided-diffusion's ``cond_fn``: ``scale`` times the gradient of log_softmax(clf(x, t))[y] with respect to
    x, per image (each image's log-probability depends on its own x alone). No host read: labels outside the
    classifier's classes are an immediate error on the CPU, an assert on the GPU."""
    num_classes = clf.config.num_classes
    y = check_class_labels("classifier_grad", y, x.shape[0], x.device, num_classes, num_classes - 1,
                           f"(the classes to steer towards, in [0, {num_classes - 1}])")
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        log_probs = F.log_softmax(clf(x_in, t).float(), dim=-1)
        selected = log_probs.gather(1, y.long()[:, None])
        grad = torch.autograd.grad(selected.sum(), x_in)[0]
    return grad * scale
