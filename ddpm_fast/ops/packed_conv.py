"""packed_conv: a convolution on oneDNN with its weight prepacked once, and a ResBlock's residual add fused in.

F.conv2d on a CPU hands oneDNN the weight in torch's layout on every call, and oneDNN reorders it into its own
blocked layout each time: a pass over the weight per call, plus the wrapper's work. Here the weight is reordered
once (torch.ops.mkldnn._reorder_convolution_weight, the call Inductor's freezing makes), kept in the one
derived-weight cache (ops.derived: remade when the weight or its version changes, so an optimizer step or
``load_state_dict`` repacks instead of going stale), and the convolution runs as
torch.ops.mkldnn._convolution_pointwise on the packed weight. With ``residual``, a ResBlock's end
conv(x) + bias + residual is one call: oneDNN adds the residual as a binary post-op while the output tile is in
registers (one rounding to bf16 instead of two, and no separate pass over the output).

Where it runs: the native backend on a CPU with oneDNN, x, weight and residual of one dtype, bf16 (fp32 3x3
convolutions take ops.conv3x3's Winograd kernel, fewer multiply-adds than any direct form), in calls autograd
does not record. Everything else takes the reference: F.conv2d, and with a residual ops.residual_add's
definition (an fp32 sum, stored once), the unfused composition the fast blocks ran before. The kernel runs as the
registered torch op ddpm_fast::packed_conv, whose argument is the weight itself (the cache lookup happens inside
it), so a compiled graph neither repacks per call nor holds a stale pack.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddpm_fast.ops import registry
from ddpm_fast.ops.derived import derived
from ddpm_fast.ops.residual_add import residual_add_ref

PACKED_DTYPES = (torch.bfloat16,)
_ONEDNN = torch.backends.mkldnn.is_available()  # once: torch.compile does not trace the query


def packed_conv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
                    stride: int, padding: int) -> torch.Tensor:
    """The definition: F.conv2d(x, weight, bias, stride, padding), and with ``residual`` the convolution without
    bias followed by residual_add_ref(conv, residual, bias)."""
    if residual is None:
        return F.conv2d(x, weight, bias, stride, padding)
    return residual_add_ref(F.conv2d(x, weight, None, stride, padding), residual, bias)


def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _validate(x, weight, bias, residual, stride, padding):
    if not torch.is_tensor(x) or x.dim() != 4 or not x.is_floating_point():
        desc = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"packed_conv: x must be a floating (N, C, H, W) tensor, got {desc}")
    if (not torch.is_tensor(weight) or weight.dim() != 4 or weight.shape[1] != x.shape[1]
            or weight.shape[2] != weight.shape[3] or weight.device != x.device):
        desc = tuple(weight.shape) if torch.is_tensor(weight) else type(weight).__name__
        raise ValueError(f"packed_conv: weight must be a square (C_out, {x.shape[1]}, k, k) kernel on {x.device} for "
                         f"x {tuple(x.shape)}, got {desc}")
    if stride < 1 or padding < 0:
        raise ValueError(f"packed_conv: stride must be positive and padding not negative, got {stride}, {padding}")
    k = weight.shape[2]
    n, _, h, w = x.shape
    ho, wo = _out_size(h, k, stride, padding), _out_size(w, k, stride, padding)
    if ho < 1 or wo < 1:
        raise ValueError(f"packed_conv: a {k}x{k} kernel (stride {stride}, padding {padding}) leaves no output of "
                         f"x {tuple(x.shape)}")
    if bias is not None and (not torch.is_tensor(bias) or tuple(bias.shape) != (weight.shape[0],)):
        desc = tuple(bias.shape) if torch.is_tensor(bias) else type(bias).__name__
        raise ValueError(f"packed_conv: bias must be ({weight.shape[0]},), got {desc}")
    out = (n, weight.shape[0], ho, wo)
    if residual is not None and (not torch.is_tensor(residual) or tuple(residual.shape) != out
                                 or residual.device != x.device or not residual.is_floating_point()):
        desc = (f"{tuple(residual.shape)} on {residual.device}" if torch.is_tensor(residual)
                else type(residual).__name__)
        raise ValueError(f"packed_conv: residual must be a floating {out} tensor on {x.device} (the output's "
                         f"shape), got {desc}")


def _pack(weight: torch.Tensor, stride: int, padding: int, input_size: list[int]) -> torch.Tensor:
    """The weight in oneDNN's blocked layout for this convolution (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_convolution_weight(weight, [padding] * 2, [stride] * 2, [1, 1], 1, input_size)


def packed_weight(weight: torch.Tensor, stride: int, padding: int, input_size: list[int]) -> torch.Tensor:
    """``weight`` packed for oneDNN, once per weight and version (ops.derived). The layout oneDNN picks depends on
    the ISA and the channels, not on the batch: a call with another input size runs correctly on the same pack."""
    return derived(None, f"onednn_conv:{stride}:{padding}", lambda w: _pack(w, stride, padding, input_size), weight)


def _packed_native(x, weight, bias, residual, stride, padding):
    cl = torch.channels_last
    x = x.contiguous(memory_format=cl)  # already is (``_takes``); a tensor both layouts describe gets the strides
    packed = packed_weight(weight, stride, padding, list(x.shape))
    pad, step = [padding] * 2, [stride] * 2
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, pad, step, [1, 1], 1, "none", [], "")
    residual = residual.contiguous(memory_format=cl)
    return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, packed, bias, pad, step, [1, 1], 1, "add",
                                                          None, None, [], None)


def _takes(x, weight, bias, residual, stride, padding) -> bool:
    return (x.dtype in PACKED_DTYPES and x.is_contiguous(memory_format=torch.channels_last)
            and all(t is None or t.dtype == x.dtype for t in (weight, bias, residual)) and _ONEDNN)


# oneDNN through torch's own mkldnn ops: a CPU, bf16, forward-only.
PACKED_CONV = registry.Op(
    "packed_conv", {"cpu": ("native", "torch")}, kernels={"native": _packed_native}, reference=packed_conv_ref,
    takes={"native": _takes}, forward_only=("native",))


def _packed_conv_kernels(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         residual: torch.Tensor | None, stride: int, padding: int) -> torch.Tensor:
    return PACKED_CONV.implementation(x, weight, bias, residual, stride, padding)


_packed_conv_op = PACKED_CONV.bind(_packed_conv_kernels)


@_packed_conv_op.register_fake
def _(x, weight, bias, residual, stride, padding):
    n, _, h, w = x.shape
    k = weight.shape[2]
    shape = (n, weight.shape[0], _out_size(h, k, stride, padding), _out_size(w, k, stride, padding))
    return x.new_empty(shape).contiguous(memory_format=torch.channels_last)


def uses_packed_conv(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
    """Whether packed_conv(x, weight, ..., residual) runs oneDNN on the packed weight (see the module docstring)."""
    return PACKED_CONV.route(x, weight, None, residual, 1, 0) == "native"


def packed_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                residual: torch.Tensor | None = None, stride: int = 1, padding: int = 0) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride, padding) (+ ``residual``, summed in fp32 and stored once) on the weight
    packed once for oneDNN where it runs (``uses_packed_conv``; output channels_last), else the reference."""
    _validate(x, weight, bias, residual, int(stride), int(padding))
    return PACKED_CONV(x, weight, bias, residual, int(stride), int(padding))
