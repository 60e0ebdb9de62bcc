"""What every model family shares: the input checks and the time embedding, and the fast-path toolkit.

The toolkit: ``group_norm`` (a GroupNorm module through the ops registry, optionally reading a decoder's skip
in place), the derived-weight cache (``folded``: summed biases, stacked weights, Winograd transforms, keyed by
each source's storage and version), the decoder join (``join``, ``decoder_block``) with its two-GEMM 1x1
shortcut (``shortcut``), the upsampler as one transposed convolution (``upsampled_conv``, ``FastUpsample``),
and ``FastDenoiser``, the base of every family's fast model: it takes the reference model's modules over,
swaps in the family's fast blocks (``_fast_child``), gives every ResBlock its column slice of one time GEMM,
and casts the whole to fp16/bf16/fp32 channels_last. A family module (unet.py, adm.py) keeps only its own blocks.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_fast import ops
from ddpm_fast.ops.derived import capturing, derived, forget

__all__ = ["FAST_DTYPES", "FastDenoiser", "FastUpsample", "Folding", "ReferenceDenoiser", "cat", "check_class_labels",
           "check_x_and_t", "decoder_block",
           "fast_form", "folded", "group_norm", "join", "shortcut", "tensor_sum", "timestep_embedding",
           "upsampled_conv"]

FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FREQS: dict[tuple, torch.Tensor] = {}


# ---- inputs and the time embedding -------------------------------------------------------------------


def _sinusoid_freqs(half: int, freq_shift: float, max_period: float, device: torch.device) -> torch.Tensor:
    """exp(-log(max_period) * i / (half - freq_shift)), made once per device (four launches fewer per step)."""
    if torch.compiler.is_compiling():  # a constant of the compiled graph
        return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=device)
                         / (half - freq_shift))
    key = (half, float(freq_shift), float(max_period), device)
    freqs = _FREQS.get(key)
    if freqs is None:
        with torch.inference_mode(False), torch.no_grad():
            exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=device)
            freqs = torch.exp(exponent / (half - freq_shift))
        if not capturing():
            _FREQS[key] = freqs
    return freqs


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = False, freq_shift: float = 1,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (N,) -> (N, dim), fp32, in the layout of the DDPM/diffusers code; t integer or float
    (the embedding is defined between steps: fractional t as diffusers' schedulers evaluate it)."""
    half = dim // 2
    args = t.float()[:, None] * _sinusoid_freqs(half, freq_shift, max_period, t.device)[None, :]
    parts = [torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)]
    emb = torch.cat(parts, dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def check_x_and_t(model, name: str, x, t, weight: torch.Tensor, in_channels: int, levels: int):
    """(N, t (N,) on x's device, integer or float): x and t as a U-Net's forward takes them, each problem one
    error naming ``name``. The reference computes in its weights' dtype, as asked; a fast form (compute_dtype)
    casts x."""
    if not torch.is_tensor(x) or x.dim() != 4 or not x.is_floating_point():
        desc = f"shape {tuple(x.shape)} {x.dtype}" if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name}: x must be a floating (N, C, H, W) tensor, got {desc}")
    if x.device != weight.device:
        raise ValueError(f"{name}: x is on {x.device}, the model on {weight.device}")
    if model.compute_dtype is None and x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"{name}: x is {x.dtype}, the model's weights are {weight.dtype}; pass x.to({weight.dtype})"
                         " or convert the model (model.to(dtype), model.to_fast(dtype))")
    n, c, h, w = x.shape
    if c != in_channels:
        raise ValueError(f"{name}: x has {c} channels, the model takes {in_channels}")
    factor = 2 ** (levels - 1)
    if h % factor or w % factor:
        raise ValueError(f"{name}: H and W ({h}x{w}) must be divisible by {factor}")
    t = torch.as_tensor(t)
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name}: t must be a tensor of diffusion steps (integer, or float for steps between "
                         f"them), got {t.dtype}")
    if t.dim() == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"{name}: t must have shape ({n},) (or be a scalar), got {tuple(t.shape)}")
    t = t.to(x.device)
    if t.is_floating_point():  # the sinusoidal embedding is defined between steps (Heun evaluates there)
        torch._assert_async(torch.isfinite(t).all(), f"{name}: t holds a non-finite step")  # no host read
    return n, t


def check_class_labels(name: str, class_labels, n: int, device, num_classes: int | None, top: int, hint: str):
    """A U-Net's class labels: None for an unconditional model, else n integers in [0, ``top``] (an int is every
    image's); ``hint`` says what to pass when they are missing. No host read (a CUDA graph may be capturing): an
    immediate error on the CPU, an assert on the GPU."""
    if not num_classes:
        if class_labels is not None:
            raise ValueError(f"{name}: class_labels given, but this model is unconditional")
        return None
    if class_labels is None:
        raise ValueError(f"{name}: this model is class-conditional; pass class_labels {hint}")
    class_labels = torch.as_tensor(class_labels, device=device)
    if class_labels.dim() == 0:
        class_labels = class_labels.expand(n)
    if class_labels.shape != (n,) or class_labels.is_floating_point():
        raise ValueError(f"{name}: class_labels must be integers of shape ({n},)")
    torch._assert_async(((class_labels >= 0) & (class_labels <= top)).all(),
                        f"{name}: class_labels must lie in [0, {top}]")
    return class_labels


class ReferenceDenoiser(nn.Module):
    """What every family's reference model shares: it computes in its weights' dtype (a fast form, a
    FastDenoiser, casts its input to ``compute_dtype``), and is built from a config of its family's class that fits
    this machine (config.budget_problem)."""

    def __init__(self, config, config_class: type):
        super().__init__()
        name = type(self).__name__
        if not isinstance(config, config_class):
            raise TypeError(f"{name}: config must be of type {config_class.__name__}, got {type(config).__name__}")
        problem = config.budget_problem()
        if problem:
            raise ValueError(f"{name}: {problem}")
        self.config = config

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The dtype the model casts its input to and computes in; None: x's own (the reference)."""
        return None

    @property
    def is_fast(self) -> bool:
        return self.compute_dtype is not None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---- norms and derived weights -------------------------------------------------------------------------


def group_norm(norm: nn.GroupNorm, x: torch.Tensor, silu: bool, add: torch.Tensor | None = None,
               skip: torch.Tensor | None = None) -> torch.Tensor:
    """norm (+ SiLU) of x, or of torch.cat([x, skip], 1) read in place (ops.group_norm_silu_cat)."""
    if skip is not None:
        return ops.group_norm_silu_cat(x, skip, norm.weight, norm.bias, norm.num_groups, norm.eps, add=add, silu=silu)
    return ops.group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, add=add, silu=silu)


def folded(module: nn.Module, name: str, fn, *sources: torch.Tensor) -> torch.Tensor:
    """``fn(*sources)``, a parameter derived from others (summed biases, stacked weights): from the one
    derived-weight cache (ops.derived, keyed by the sources and their versions), except under autograd (recomputed
    so gradients reach the sources) and while torch.compile traces (part of the graph; Inductor fuses it)."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(s.requires_grad for s in sources)):
        return fn(*sources)
    return derived(module, name, fn, *sources)


class Folding(nn.Module):
    """A module whose fast form uses derived weights: moving or casting it drops them (their sources change)."""

    def _apply(self, fn, *args, **kwargs):
        forget(*self.parameters())
        return super()._apply(fn, *args, **kwargs)


def cat(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat(tensors)


def tensor_sum(*tensors: torch.Tensor) -> torch.Tensor:
    out = tensors[0]
    for t in tensors[1:]:
        out = out + t
    return out


# ---- the decoder join ---------------------------------------------------------------------------------


def join(x: torch.Tensor, skip: torch.Tensor | None, has_shortcut: bool):
    """(x, skip) as a decoder block runs on them: kept apart where ops.joins_in_place and the block has a 1x1
    shortcut, else (torch.cat([x, skip], 1), None) (without a shortcut the residual is the concatenation)."""
    if skip is not None and not (has_shortcut and ops.joins_in_place(x, skip)):
        return torch.cat([x, skip], dim=1), None
    return x, skip


def decoder_block(block: nn.Module, h: torch.Tensor, skip: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """A decoder ResBlock on its input and the skip it joins: a fast block (``joins_skip``) is given both and joins
    them itself; a reference block gets their concatenation."""
    if getattr(block, "joins_skip", False):
        return block(h, temb, skip)
    return block(torch.cat([h, skip], dim=1), temb)


def shortcut(module: nn.Module, weight: torch.Tensor, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
    """The bias-free 1x1 convolution ``weight`` of x, or of torch.cat([x, skip], 1) without making it: x's columns
    of the weight on x plus skip's on skip, over the positions (N*H*W rows: channels_last tensors' own memory)."""
    if skip is None:
        return F.conv2d(x, weight, None)
    wt = folded(module, "shortcut_t", _matrix_t, weight)
    n, c, hgt, wid = x.shape
    out = torch.mm(_positions(x), wt[:c])
    out.addmm_(_positions(skip), wt[c:])
    return out.view(n, hgt, wid, -1).permute(0, 3, 1, 2)


def _matrix_t(weight: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution's (C_out, C, 1, 1) weight as the (C, C_out) matrix that multiplies positions' rows."""
    return weight.reshape(weight.shape[0], -1).t().contiguous()


def _positions(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C), each position's channels a row (a view of a channels_last tensor)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


# ---- upsampling ------------------------------------------------------------------------------------------


def _upsampled_conv_kernel(weight: torch.Tensor) -> torch.Tensor:
    """The (Cin, Cout, 4, 4) kernel of a stride-2 transposed convolution (padding 1) equal to a 3x3 convolution
    (padding 1, ``weight`` (Cout, Cin, 3, 3)) of the 2x nearest-upsampled input.

    Output row 2i reads upsampled rows 2i-1, 2i, 2i+1, that is input rows i-1 (tap 0) and i (taps 1 + 2);
    row 2i+1 reads input rows i (taps 0 + 1) and i+1 (tap 2); per axis the transposed kernel is
    [w2, w1 + w2, w0 + w1, w0]. Each output pixel then costs 2x2 taps instead of 3x3 (2.25x fewer
    multiply-adds) and no upsampled copy of the input is made. Summed in fp32 (or wider), cast back to the
    weight's dtype.
    """
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))
    for axis in (2, 3):
        w0, w1, w2 = w.unbind(axis)
        w = torch.stack([w2, w1 + w2, w0 + w1, w0], axis)
    return w.transpose(0, 1).to(weight.dtype)


def upsampled_conv(module: nn.Module, x: torch.Tensor, conv: nn.Conv2d, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv`` (3x3, padding 1; ``bias`` in place of its own) of x upsampled 2x (nearest): where ops.conv3x3 runs
    Winograd (a CPU, fp32), by it, reading the upsampled image in place (4x fewer multiply-adds than the direct
    convolution); elsewhere as one transposed convolution over x (see ``_upsampled_conv_kernel``, cached on
    ``module`` by ``folded``; 2.25x fewer)."""
    if ops.uses_winograd(x, conv.weight):
        return ops.conv3x3(x, conv.weight, bias, upsample=True)
    kernel = folded(module, "upsampled_conv_kernel", _upsampled_conv_kernel, conv.weight)
    return F.conv_transpose2d(x, kernel, bias, stride=2, padding=1)


class FastUpsample(Folding):
    """An upsampler's fast form (nearest 2x, then its 3x3 ``conv``), either family's: the two in one call over the
    low-resolution input, no upsampled copy (``upsampled_conv``: Winograd reading the upsampled image in place
    on a CPU in fp32, else one transposed convolution)."""

    def __init__(self, block: nn.Module):
        nn.Module.__init__(self)
        self.conv = block.conv

    def forward(self, x):
        return upsampled_conv(self, x, self.conv, self.conv.bias)


# ---- the fast model ------------------------------------------------------------------------------------


def fast_form(model: nn.Module, fast_class, dtype: torch.dtype, fold: bool, copy_model: bool) -> nn.Module:
    """``fast_class(model or a copy of it, dtype, fold)``: what a reference model's ``to_fast`` returns. Without
    a copy the fast model takes the reference's modules over (cast and regrouped in place), so the reference
    is marked used up: calling it raises instead of running a half-converted model."""
    if dtype not in FAST_DTYPES:
        raise ValueError(f"to_fast: dtype must be one of {FAST_DTYPES}, got {dtype}")
    if copy_model:
        return fast_class(copy.deepcopy(model), dtype, fold=fold)
    fast = fast_class(model, dtype, fold=fold)
    name = type(model).__name__

    def used_up(*args, **kwargs):
        raise RuntimeError(f"this {name} was converted by to_fast(copy=False): its modules now belong to the fast "
                           "model; run that one (or call to_fast with copy=True to keep the reference)")

    model.forward = used_up
    return fast


class FastDenoiser(Folding):
    """The base of a family's fast model, ``class FastX(FastDenoiser, X)``: built from a reference model whose
    modules it takes over (``to_fast`` passes a copy), cast to ``dtype`` channels_last.

    The family says which blocks get a fast form in ``_fast_child(child, start)`` (the module to put in the
    child's place, or None); a fast ResBlock that is given ``time_slice`` (columns from ``start``) declares its
    time projection's sources, ``time_weight()`` and ``time_bias()`` (summed), and every such block's
    projection is then one GEMM over their stacked weights, made in ``time_features`` (one launch instead of one
    per block). Slices are assigned here, by block, so no call order is assumed.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, fold: bool = True):
        if dtype not in FAST_DTYPES:
            raise ValueError(f"{type(self).__name__}: dtype must be one of {FAST_DTYPES}, got {dtype}")
        nn.Module.__init__(self)
        self.config = model.config
        for name, child in model._modules.items():  # None entries too (an unconditional model's class embedding)
            setattr(self, name, child)
        self._dtype = dtype
        self.fold = bool(fold)
        self._time_blocks: list[nn.Module] = []
        start = 0
        for parent in list(self.modules()):
            for name, child in parent.named_children():
                fast = self._fast_child(child, start)
                if fast is None:
                    continue
                if getattr(fast, "time_slice", None) is not None:
                    self._time_blocks.append(fast)
                    start = fast.time_slice[1]
                setattr(parent, name, fast)
        self.to(dtype=dtype, memory_format=torch.channels_last)

    def _fast_child(self, child: nn.Module, start: int) -> nn.Module | None:
        raise NotImplementedError

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._dtype

    def time_features(self, t, class_labels, dtype):
        temb = super().time_features(t, class_labels, dtype)
        if not self.fold or not self._time_blocks:
            return temb
        blocks = self._time_blocks
        weight = folded(self, "time_weight", cat, *(b.time_weight() for b in blocks))
        counts = [len(b.time_bias()) for b in blocks]

        def stacked_bias(*flat):
            parts, i = [], 0
            for k in counts:
                parts.append(tensor_sum(*flat[i:i + k]))
                i += k
            return torch.cat(parts)

        bias = folded(self, "time_bias", stacked_bias, *(s for b in blocks for s in b.time_bias()))
        return F.linear(temb, weight, bias)

    def to_fast(self, *args, **kwargs):
        reference = next(c.__name__ for c in type(self).__mro__
                         if issubclass(c, nn.Module) and not issubclass(c, Folding) and c is not nn.Module)
        raise TypeError(f"to_fast: this model is already a {type(self).__name__}; call to_fast on the reference "
                        f"{reference}")
