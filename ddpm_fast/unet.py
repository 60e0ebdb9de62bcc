"""The DDPM U-Net (Ho et al. 2020): ResBlocks with GroupNorm + SiLU, sinusoidal time embedding,
single-head self-attention at chosen resolutions, dropout.

Parameter names follow diffusers' UNet2DModel (down_blocks.i.resnets.j.norm1, ..., to_q/to_k/to_v/to_out.0)
so its checkpoints load without renaming, and the pytorch_diffusion layout maps onto them one to one.
Every GroupNorm(+SiLU)(+time-embedding add) goes through ddpm_fast.ops.group_norm_silu, so the same
module runs the reference ops or the fused kernels, as the ops registry chose for the device.

Two paths, one definition: a UNet is the fp32 NCHW reference. ``model.to_fast(torch.float16)`` returns a
FastUNet, a separate module built from a copy of it: weights cast once to fp16 (or bf16) channels_last,
activations channels_last end to end, attention through scaled_dot_product_attention (flash/memory-efficient
kernels on a GPU). The original model is left untouched, and the state dict keeps its names.

The fast blocks (FastResnetBlock, FastAttentionBlock) are explicit modules built from the reference blocks, each
with its own folds of work that eager torch spends extra passes over memory or extra launches on (cuDNN adds a
convolution's bias in a pass of its own; at batch 1 a step costs what its launches cost): conv1's bias rides in the
time-embedding add of norm2, conv2's and the 1x1 shortcut's biases and the residual add are one ops.residual_add,
q/k/v are one GEMM (with one head, the attention's output projection folded into v), and an Upsample's nearest 2x
upsampling and 3x3 convolution are one stride-2 transposed convolution over the low-resolution input (FastUpsample:
2x2 taps per output pixel instead of 3x3, and no upsampled copy). A ResBlock's two 3x3 convolutions are
ops.conv3x3: on a CPU in fp32, Winograd's F(4x4, 3x3) with 4x fewer multiply-adds, which also takes the upsamplers
there (reading the upsampled image in place). A decoder ResBlock takes its skip beside its input: on a CPU in fp32
norm1 reads the two in place (ops.group_norm_silu_cat) and the 1x1 shortcut is one GEMM per input, so their
concatenation is never made; elsewhere the block concatenates. FastUNet makes every ResBlock's time projection in
one GEMM; each block is given its column slice of it when the FastUNet is built. The folded parameters (summed
biases, stacked weights) are derived from the same parameters, cached while no gradient is recorded and rebuilt when
a source changes (see ``fast.folded``). ``to_fast(fold=False)`` keeps the reference blocks' plain structure (SDPA
attention only). What both families share (the input checks, the folds, the decoder join, the upsampler, the fast
model's base) is in fast.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_fast import ops
from ddpm_fast.config import UNetConfig
from ddpm_fast.fast import (
    FastDenoiser,
    FastUpsample,
    Folding,
    ReferenceDenoiser,
    cat,
    check_class_labels,
    check_x_and_t,
    decoder_block,
    fast_form,
    folded,
    group_norm,
    join,
    shortcut,
    timestep_embedding,
)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, groups: int, eps: float, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """``temb``: SiLU of the time embedding, the input of time_emb_proj."""
        h = self.conv1(group_norm(self.norm1, x, silu=True))
        h = group_norm(self.norm2, h, silu=True, add=self.time_emb_proj(temb))
        h = self.conv2(self.dropout(h))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions, residual; one head unless head_dim says otherwise.

    In channels_last the (N, C, H, W) -> (N, HW, C) token view is free (no copy), in and out.
    """

    def __init__(self, ch: int, groups: int, eps: float, head_dim: int | None = None):
        super().__init__()
        head_dim = head_dim or ch
        if ch % head_dim:
            raise ValueError(f"attention: {ch} channels not divisible by head dim {head_dim}")
        self.heads = ch // head_dim
        self.group_norm = nn.GroupNorm(groups, ch, eps=eps)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])  # diffusers' name (its [1] is a parameterless Dropout)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        n, c, hgt, wid = x.shape
        return group_norm(self.group_norm, x, silu=False).reshape(n, c, hgt * wid).transpose(1, 2)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        n, hw, c = t.shape
        return t.reshape(n, hw, self.heads, c // self.heads).transpose(1, 2)

    def _attend(self, q, k, v) -> torch.Tensor:
        scale = 1.0 / math.sqrt(q.shape[-1])
        w = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1).to(v.dtype)
        return w @ v

    def _out(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        n, c, hgt, wid = x.shape
        o = o.transpose(1, 2).reshape(n, hgt * wid, c)
        return x + self.to_out[0](o).transpose(1, 2).reshape(n, c, hgt, wid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._tokens(x)
        q, k, v = self._heads(self.to_q(h)), self._heads(self.to_k(h)), self._heads(self.to_v(h))
        return self._out(x, self._attend(q, k, v))


class Downsample(nn.Module):
    def __init__(self, ch: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: resnets, optional attentions after each, optional resampler."""

    def __init__(self):
        super().__init__()
        self.resnets = nn.ModuleList()
        self.attentions = nn.ModuleList()


class UNet(ReferenceDenoiser):
    def __init__(self, config: UNetConfig):
        super().__init__(config, UNetConfig)
        cfg = config
        ch, groups, eps, temb = cfg.ch, cfg.num_groups, cfg.norm_eps, cfg.temb_dim
        chans = [ch * m for m in cfg.ch_mult]
        levels = len(chans)

        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.time_embedding = nn.Module()
        self.time_embedding.linear_1 = nn.Linear(ch, temb)
        self.time_embedding.linear_2 = nn.Linear(temb, temb)
        # registered even when None, so the fast form (fast.FastDenoiser) takes it over with the other children
        self.register_module("class_embedding", nn.Embedding(cfg.num_classes + 1, temb) if cfg.num_classes else None)

        def block(cin, cout):
            return ResnetBlock(cin, cout, temb, groups, eps, cfg.dropout)

        def attn(c):
            return AttentionBlock(c, groups, eps, cfg.attention_head_dim)

        self.down_blocks = nn.ModuleList()
        cin = ch
        for i, cout in enumerate(chans):
            lvl = _Level()
            for j in range(cfg.num_res_blocks):
                lvl.resnets.append(block(cin if j == 0 else cout, cout))
                if cfg.resolutions[i] in cfg.attn_resolutions:
                    lvl.attentions.append(attn(cout))
            lvl.downsamplers = nn.ModuleList([Downsample(cout, cfg.downsample_padding)] if i < levels - 1 else [])
            self.down_blocks.append(lvl)
            cin = cout

        self.mid_block = _Level()
        self.mid_block.resnets.extend([block(chans[-1], chans[-1]), block(chans[-1], chans[-1])])
        self.mid_block.attentions.append(attn(chans[-1]))

        # Skip channels, in the order the up path pops them (diffusers' UpBlock2D arithmetic).
        self.up_blocks = nn.ModuleList()
        rev = list(reversed(chans))
        prev_out = rev[0]
        for i, cout in enumerate(rev):
            skip_in = rev[min(i + 1, levels - 1)]
            lvl = _Level()
            for j in range(cfg.num_res_blocks + 1):
                skip = skip_in if j == cfg.num_res_blocks else cout
                lvl.resnets.append(block((prev_out if j == 0 else cout) + skip, cout))
                if cfg.resolutions[levels - 1 - i] in cfg.attn_resolutions:
                    lvl.attentions.append(attn(cout))
            lvl.upsamplers = nn.ModuleList([Upsample(cout)] if i < levels - 1 else [])
            self.up_blocks.append(lvl)
            prev_out = cout

        self.conv_norm_out = nn.GroupNorm(groups, ch, eps=eps)
        self.conv_out = nn.Conv2d(ch, cfg.output_channels, 3, padding=1)
        self._zero_init_outputs()

    def _zero_init_outputs(self):
        # Each residual branch starts as the identity and the output as zero (improved-diffusion).
        for m in self.modules():
            if isinstance(m, ResnetBlock):
                nn.init.zeros_(m.conv2.weight)
                nn.init.zeros_(m.conv2.bias)
            elif isinstance(m, AttentionBlock):
                nn.init.zeros_(m.to_out[0].weight)
                nn.init.zeros_(m.to_out[0].bias)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    # ---- inputs -------------------------------------------------------------------------------

    def _check_inputs(self, x, t, class_labels):
        cfg = self.config
        n, t = check_x_and_t(self, "UNet", x, t, self.conv_in.weight, cfg.in_channels, len(cfg.ch_mult))
        return t, check_class_labels("UNet", class_labels, n, x.device, cfg.num_classes, cfg.num_classes,
                                     f"(use {cfg.num_classes} for the null label)")

    def time_features(self, t: torch.Tensor, class_labels: torch.Tensor | None, dtype: torch.dtype):
        """SiLU(temb): the shared input of every ResBlock's time_emb_proj."""
        cfg = self.config
        emb = timestep_embedding(t, cfg.ch, cfg.flip_sin_to_cos, cfg.freq_shift).to(dtype)
        emb = self.time_embedding.linear_2(F.silu(self.time_embedding.linear_1(emb)))
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(class_labels.long()).to(emb.dtype)
        return F.silu(emb)

    # ---- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, t, class_labels=None) -> torch.Tensor:
        x, temb = self.prepare(x, t, class_labels)
        return self._trunk(x, temb)

    def prepare(self, x: torch.Tensor, t, class_labels=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x as the trunk reads it, the time features): the checked inputs of ``_trunk`` (and of its three
        parts, for feature caching)."""
        t, class_labels = self._check_inputs(x, t, class_labels)
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype).contiguous(memory_format=torch.channels_last)
        return x, self.time_features(t, class_labels, self.conv_in.weight.dtype)

    def _trunk(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """conv_in ... conv_out; every ResBlock is called as block(h, temb) with what time_features gave. Three
        parts with one boundary: the shallow branch (encode_shallow, decode_shallow: the first level down and
        the last level up) around the deep one (everything between), which feature caching skips."""
        h, skips = self.encode_shallow(x, temb)
        return self.decode_shallow(self.deep(h, temb), skips, temb)

    def encode_shallow(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """conv_in and the first level's blocks: (its output, the skips the last up level reads)."""
        h = self.conv_in(x)
        skips = [h]
        lvl = self.down_blocks[0]
        for j, res in enumerate(lvl.resnets):
            h = res(h, temb)
            if len(lvl.attentions):
                h = lvl.attentions[j](h)
            skips.append(h)
        return h, skips

    def deep(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """The first level's downsampler, the deeper levels, the middle and every up level but the last: the
        features the last up level reads (DeepCache's cached branch)."""
        skips = []
        for i, lvl in enumerate(self.down_blocks):
            for j, res in enumerate(lvl.resnets if i else ()):
                h = res(h, temb)
                if len(lvl.attentions):
                    h = lvl.attentions[j](h)
                skips.append(h)
            for down in lvl.downsamplers:
                h = down(h)
                skips.append(h)
        h = self.mid_block.resnets[0](h, temb)
        h = self.mid_block.attentions[0](h)
        h = self.mid_block.resnets[1](h, temb)
        for lvl in self.up_blocks[:-1]:
            h = self._up_level(lvl, h, skips, temb)
        return h

    def decode_shallow(self, h: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor) -> torch.Tensor:
        """The last up level on the deep features and encode_shallow's skips, then the output head."""
        h = self._up_level(self.up_blocks[-1], h, list(skips), temb)
        return self._head(group_norm(self.conv_norm_out, h, silu=True))

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """conv_out."""
        return self.conv_out(h)

    def _up_level(self, lvl, h: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor) -> torch.Tensor:
        for j, res in enumerate(lvl.resnets):
            h = decoder_block(res, h, skips.pop(), temb)
            if len(lvl.attentions):
                h = lvl.attentions[j](h)
        for up in lvl.upsamplers:
            h = up(h)
        return h

    def to_fast(self, dtype: torch.dtype = torch.float16, fold: bool = True, copy: bool = True) -> FastUNet:
        """The fast path: a FastUNet built from a copy of this model (this one is left untouched).

        Its forward takes x in any float dtype and layout and returns eps in ``dtype``, channels_last.
        ``to_fast(torch.float32)`` is the training form: fp32 master weights, fp16/bf16 compute under
        torch.autocast, the same folded blocks (their gradients flow to the original parameters).
        ``fold=False`` keeps the blocks' plain torch structure (the fp16 eager / torch.compile baselines).
        ``copy=False`` builds it from this model's own modules (no second copy of the weights); this model is
        used up and refuses to run afterwards.
        """
        return fast_form(self, FastUNet, dtype, fold, copy)


# ---- the fast path ------------------------------------------------------------------------------


class FastResnetBlock(Folding, ResnetBlock):
    """A ResnetBlock's fast form: its submodules (the same parameters), with conv1's bias folded into the
    time-embedding add of norm2 and conv2's (+ the shortcut's) bias and the residual add in one residual_add.

    ``time_slice``: the columns of this block's time projection (+ conv1.bias) in the FastUNet's one
    time GEMM, whose output the block is then called with; None: the block is called with the time
    activations, like a ResnetBlock, and projects them itself.
    """

    def __init__(self, block: ResnetBlock, time_slice: tuple[int, int] | None = None):
        nn.Module.__init__(self)
        for name, child in block.named_children():
            setattr(self, name, child)
        self.conv_shortcut = block.conv_shortcut
        self.time_slice = time_slice

    joins_skip = True  # a decoder block is given its skip beside its input (fast.decoder_block)

    def time_weight(self) -> torch.Tensor:
        return self.time_emb_proj.weight

    def time_bias(self) -> list[torch.Tensor]:
        """The sources of this block's bias in the time GEMM: its projection's and conv1's (see forward)."""
        return [self.time_emb_proj.bias, self.conv1.bias]

    def forward(self, x: torch.Tensor, temb: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """The block on x, or (a decoder block) on torch.cat([x, skip], 1). Where ``ops.joins_in_place`` the
        concatenation is never made: norm1 reads both in place (ops.group_norm_silu_cat) and the 1x1 shortcut
        is two GEMMs, one per input, summed."""
        x, skip = join(x, skip, self.conv_shortcut is not None)
        # norm2(conv1(a) + b1 + proj(temb)) = norm2(conv1_nobias(a) + (proj(temb) with bias + b1)).
        if self.time_slice is not None:
            temb_add = temb[:, self.time_slice[0]:self.time_slice[1]]
        else:
            temb_bias = folded(self, "temb_bias", torch.add, self.time_emb_proj.bias, self.conv1.bias)
            temb_add = F.linear(temb, self.time_emb_proj.weight, temb_bias)
        h = ops.conv3x3(group_norm(self.norm1, x, silu=True, skip=skip), self.conv1.weight)
        h = group_norm(self.norm2, h, silu=True, add=temb_add)
        h = self.dropout(h)
        if self.conv_shortcut is None:
            return ops.conv3x3_residual_add(h, self.conv2.weight, x, self.conv2.bias)
        bias = folded(self, "out_bias", torch.add, self.conv2.bias, self.conv_shortcut.bias)
        return ops.conv3x3_residual_add(h, self.conv2.weight, shortcut(self, self.conv_shortcut.weight, x, skip), bias)


def _qkv_out_weight(wq, wk, wv, wo):
    """[W_q; W_k; W_o W_v] (the product in float64, rounded once): see FastAttentionBlock."""
    return torch.cat((wq, wk, (wo.double() @ wv.double()).to(wv.dtype)))


def _qkv_out_bias(bq, bk, bv, wo, bo):
    return torch.cat((bq, bk, (wo.double() @ bv.double() + bo.double()).to(bv.dtype)))


class FastAttentionBlock(Folding, AttentionBlock):
    """An AttentionBlock's fast form: SDPA (flash/memory-efficient kernels on a GPU); with ``fold``, q/k/v
    from one GEMM over stacked weights, and with one head the output projection folded into v: each row of
    softmax(q k^T) sums to 1, so softmax(q k^T) (v W_o^T + b_o) = (softmax(q k^T) v) W_o^T + b_o, and
    v' = h (W_o W_v)^T + (W_o b_v + b_o) comes from the same GEMM as q and k. One GEMM per block, not two."""

    def __init__(self, block: AttentionBlock, fold: bool = True):
        nn.Module.__init__(self)
        for name, child in block.named_children():
            setattr(self, name, child)
        self.heads = block.heads
        self.fold = bool(fold)

    def _attend(self, q, k, v) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fold:
            return super().forward(x)
        h = self._tokens(x)
        if self.heads == 1:
            out = self.to_out[0]
            w = folded(self, "qkv_weight", _qkv_out_weight, self.to_q.weight, self.to_k.weight, self.to_v.weight,
                        out.weight)
            b = folded(self, "qkv_bias", _qkv_out_bias, self.to_q.bias, self.to_k.bias, self.to_v.bias,
                        out.weight, out.bias)
            q, k, v = (t.unsqueeze(1) for t in F.linear(h, w, b).split(x.shape[1], dim=-1))
            n, c, hgt, wid = x.shape
            return x + self._attend(q, k, v).squeeze(1).transpose(1, 2).reshape(n, c, hgt, wid)
        w = folded(self, "qkv_weight", cat, self.to_q.weight, self.to_k.weight, self.to_v.weight)
        b = folded(self, "qkv_bias", cat, self.to_q.bias, self.to_k.bias, self.to_v.bias)
        q, k, v = (self._heads(t) for t in F.linear(h, w, b).split(x.shape[1], dim=-1))
        return self._out(x, self._attend(q, k, v))


class FastUNet(FastDenoiser, UNet):
    """The fast path of a UNet (see the module docstring and fast.FastDenoiser): every ResBlock a FastResnetBlock
    given its column slice of one time GEMM (all blocks' time_emb_proj weights stacked, biases summed with
    conv1's), every attention block a FastAttentionBlock, every Upsample a FastUpsample (one transposed
    convolution, 2.25x fewer multiply-adds than upsampling and convolving). ``fold=False``: SDPA attention only.
    """

    def _fast_child(self, child: nn.Module, start: int) -> nn.Module | None:
        if isinstance(child, ResnetBlock) and self.fold:
            return FastResnetBlock(child, (start, start + child.time_emb_proj.out_features))
        if isinstance(child, AttentionBlock):
            return FastAttentionBlock(child, self.fold)
        if type(child) is Upsample and self.fold:
            return FastUpsample(child)
        return None

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """conv_out by ops.conv3x3: on a CPU in fp32 its few output channels take one GEMM over all nine taps."""
        if not self.fold:
            return self.conv_out(h)
        return ops.conv3x3(h, self.conv_out.weight, self.conv_out.bias)


def compile_model(model: UNet, **options) -> nn.Module:
    """``torch.compile(model)`` with no graph breaks (the fused ops are registered torch ops Inductor keeps
    between the code it generates). The result samples like the model: it forwards ``compute_dtype``,
    ``config`` and the parameters. Each new input shape compiles once; the first call takes a while."""
    return torch.compile(model, fullgraph=True, dynamic=False, **options)
