"""conv3x3: the fast U-Nets' 3x3, stride-1, padding-1 convolutions, by Winograd's F(4x4, 3x3) on a CPU.

Each 4x4 block of outputs is A^T [(G g G^T) (.) (B^T d B)] A (Lavin & Gray 2016): summed over the input channels,
36 GEMMs over transformed tiles, 36 multiply-adds per channel pair and 4x4 block instead of 144. The direct
convolution (oneDNN) runs near the CPU's GEMM peak, so the fewer products are the gain: 1.3-2.0x per layer on
the embedded model's shapes, 1.9-3.3x on the cifar10 preset's (benchmarks/test_cpu_bench.py -k conv3x3,
RESULTS.md). With ``upsample`` it convolves x's 2x nearest upsampling, read in place (the U-Nets' upsamplers on a
CPU: 1.3-1.6x the folded transposed convolution of fast.upsampled_conv). csrc/conv3x3_cpu.cpp holds the kernel;
the weight's transform U = G g G^T (``winograd_weight``, float64 then rounded once) is made once per weight and
version, in the one derived-weight cache (ops.derived, ``transformed_weight``).

Where it runs: the extension's kernel (backend ``native``, the CPU default) for float32 CPU inputs with at least
``MIN_CHANNELS`` input and output channels, in calls autograd does not record or where it records x's gradient
alone (a frozen network's weights, as the guidance classifier's: the backward is the same kernel on the adjoint
weight, channels swapped and taps flipped). Everything else takes the reference, F.conv2d: a GPU (cuDNN chooses
among its own algorithms, Winograd included), half precision (oneDNN's bf16 kernels on CPUs that have them),
training (weights that need gradients, autocast), and the thin first and last convolutions of a U-Net, whose
transforms would outweigh the saving. Of those, bf16 convolutions on a CPU run on a weight prepacked once for
oneDNN (ops.packed_conv; ``conv3x3_residual_add`` also fuses a ResBlock's residual add into that call), and a
convolution to fewer than ``MIN_CHANNELS`` outputs (a U-Net's conv_out) in fp32 takes ``taps_gemm_conv3x3`` (one
GEMM for all nine taps, in torch). The kernel runs as the registered torch op ddpm_fast::conv3x3_winograd.

Precision: fp32 arithmetic; the transforms' coefficients (up to 8) give 10-20x the direct convolution's rounding
error, ~5e-6 relative to the output's scale, inside the fast path's contract (tests/test_conv3x3.py holds the
kernel to the float64 convolution).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddpm_fast.ops import registry
from ddpm_fast.ops.derived import derived
from ddpm_fast.ops.packed_conv import packed_conv, uses_packed_conv
from ddpm_fast.ops.residual_add import residual_add

MIN_CHANNELS = 8  # fewer input or output channels: the direct convolution (U-Nets' conv_in and conv_out)

# F(4x4, 3x3)'s kernel transform G (6x3), interpolation points 0, 1, -1, 2, -2 and infinity; B^T and A^T are in
# csrc/conv3x3_cpu.cpp.
_G = ((1 / 4, 0.0, 0.0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
      (1 / 24, -1 / 12, 1 / 6), (0.0, 0.0, 1.0))


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C, 3, 3) -> U (36, C, C_out) float32: U[6 i + j, c, o] = (G weight[o, c] G^T)[i, j], in float64."""
    if not torch.is_tensor(weight) or weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        desc = tuple(weight.shape) if torch.is_tensor(weight) else type(weight).__name__
        raise ValueError(f"winograd_weight: weight must be (C_out, C, 3, 3), got {desc}")
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ij,ocjk,lk->ilco", g, weight.detach().double(), g)
    return u.reshape(36, weight.shape[1], weight.shape[0]).float().contiguous()


def conv3x3_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                upsample: bool = False) -> torch.Tensor:
    """The definition: F.conv2d with stride 1 and padding 1, of x or (``upsample``) of its 2x nearest upsampling."""
    if upsample:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
    return F.conv2d(x, weight, bias, padding=1)


def _validate(x, weight, bias):
    if not torch.is_tensor(x) or x.dim() != 4 or not x.is_floating_point():
        desc = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"conv3x3: x must be a floating (N, C, H, W) tensor, got {desc}")
    if (not torch.is_tensor(weight) or weight.dim() != 4 or tuple(weight.shape[1:]) != (x.shape[1], 3, 3)
            or weight.device != x.device):
        desc = tuple(weight.shape) if torch.is_tensor(weight) else type(weight).__name__
        raise ValueError(f"conv3x3: weight must be (C_out, {x.shape[1]}, 3, 3) on {x.device} for x "
                         f"{tuple(x.shape)}, got {desc}")
    if bias is not None and (not torch.is_tensor(bias) or tuple(bias.shape) != (weight.shape[0],)):
        desc = tuple(bias.shape) if torch.is_tensor(bias) else type(bias).__name__
        raise ValueError(f"conv3x3: bias must be ({weight.shape[0]},), got {desc}")


def _native_cpu_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp32 on a CPU, no autograd, the native backend: where conv3x3 takes one of its own forms."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not registry.needs_grad(x, weight) and registry.backend_for("conv3x3", x.device) == "native")


def uses_winograd(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether conv3x3(x, weight) runs the Winograd kernel (see the module docstring)."""
    return CONV3X3.route(x, weight, None, False) == "native"


def transformed_weight(weight: torch.Tensor) -> torch.Tensor:
    """``winograd_weight(weight)``, made once per weight and its version (ops.derived)."""
    return derived(None, "winograd", winograd_weight, weight)


def _winograd(x, weight, bias, upsample):
    return registry.extension().conv3x3(x.contiguous(memory_format=torch.channels_last), transformed_weight(weight),
                                        bias, upsample)


def _winograd_takes(x, weight, bias, upsample) -> bool:
    """fp32, at least MIN_CHANNELS in and out; under autograd only for x's gradient through a fixed weight (a frozen
    network, as a guidance classifier is: the backward is the same kernel on the adjoint weight). A weight that
    trains, and autocast (training's mixed precision), take the reference."""
    if not x.dtype == weight.dtype == torch.float32 or min(weight.shape[0], weight.shape[1]) < MIN_CHANNELS:
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (weight, bias)):
        return False
    return not torch.is_autocast_enabled(x.device.type)


# The Winograd kernel (csrc/conv3x3_cpu.cpp): fp32 on a CPU, at least MIN_CHANNELS in and out; its backward (x's
# gradient) is the same kernel (see _backward).
CONV3X3 = registry.Op(
    "conv3x3", {"cpu": ("native", "torch")}, kernels={"native": _winograd}, reference=conv3x3_ref,
    takes={"native": _winograd_takes})


def _conv3x3_kernels(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, upsample: bool) -> torch.Tensor:
    return CONV3X3.implementation(x, weight, bias, upsample)


# The op takes the weight, not its transform: the cache lookup runs inside it, so a compiled graph (which cannot
# hold the cache) neither recomputes the transform per call nor keeps a stale one.
_conv3x3_op = CONV3X3.bind(_conv3x3_kernels, name="conv3x3_winograd")


@_conv3x3_op.register_fake
def _(x, weight, bias, upsample):
    n, _, h, w = x.shape
    scale = 2 if upsample else 1
    return x.new_empty((n, weight.shape[0], h * scale, w * scale)).contiguous(memory_format=torch.channels_last)


def _adjoint(weight: torch.Tensor) -> torch.Tensor:
    """The 3x3 convolution (padding 1) whose output is the input's gradient: channels swapped, taps flipped."""
    return weight.transpose(0, 1).flip(2, 3)


def _setup_context(ctx, inputs, output):
    x, weight, bias, upsample = inputs
    ctx.save_for_backward(x, weight)
    ctx.upsample = upsample


def _backward(ctx, grad):
    """x's gradient by the Winograd kernel on the adjoint weight (its transform cached like the forward's; for an
    upsampling call, the upsampled image's gradient summed over each 2x2 block); the weight's and bias's, where
    asked, by torch (the kernel runs only for fixed weights: see _winograd_takes)."""
    x, weight = ctx.saved_tensors
    grad = grad.contiguous(memory_format=torch.channels_last)
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        if grad.dtype == torch.float32 and registry.extension() is not None:
            u = derived(None, "winograd_adjoint", lambda w: winograd_weight(_adjoint(w)), weight)
            gx = registry.extension().conv3x3(grad, u, None, False)
        else:  # the registered op called directly (the reference ran): its formula holds for any dtype
            gx = F.conv2d(grad, _adjoint(weight).to(grad.dtype), padding=1)
        if ctx.upsample:
            gx = F.avg_pool2d(gx, 2) * 4  # sum over the 2x2 copies of each input pixel (exact: powers of 2)
    if ctx.needs_input_grad[1]:
        xin = F.interpolate(x, scale_factor=2, mode="nearest") if ctx.upsample else x
        gw = torch.ops.aten.convolution_backward(grad, xin, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                 [False, True, False])[1]
    if ctx.needs_input_grad[2]:
        gb = grad.sum(dim=(0, 2, 3))
    return gx, gw, gb, None


_conv3x3_op.register_autograd(_backward, setup_context=_setup_context)


def uses_taps_gemm(x: torch.Tensor, weight: torch.Tensor, upsample: bool = False) -> bool:
    """Whether conv3x3(x, weight) runs ``taps_gemm_conv3x3``: on a CPU in fp32 (inference, the native backend),
    fewer than MIN_CHANNELS output channels from at least MIN_CHANNELS inputs (a U-Net's conv_out)."""
    return not upsample and weight.shape[0] < MIN_CHANNELS <= weight.shape[1] and _native_cpu_inference(x, weight)


def taps_gemm_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """conv3x3 for few output channels: one GEMM of the pixels against all nine taps' weights, (N*H*W, C) @
    (C, 9 * C_out), into per-tap partial sums, then the sum of the nine shifted by their offsets (zero padding:
    each over the outputs it reaches). oneDNN's direct kernel runs a 32 -> 1 channel convolution at a few
    GFLOP/s; this is 2x faster on the embedded model's conv_out (RESULTS.md). Output channels_last."""
    n, c, h, w = x.shape
    co = weight.shape[0]
    taps = weight.permute(1, 2, 3, 0).reshape(c, 9 * co)  # column (3 dy + dx) * co + o
    part = (x.permute(0, 2, 3, 1).reshape(n * h * w, c) @ taps).view(n, h, w, 9, co)
    out = part[:, :, :, 4] if bias is None else part[:, :, :, 4] + bias  # the centre tap reaches every output
    out = out.contiguous()
    for dy in range(3):
        for dx in range(3):
            if (dy, dx) == (1, 1):
                continue
            # output (i, j) takes tap (dy, dx) of input pixel (i + dy - 1, j + dx - 1), where that pixel exists
            i0, i1, j0, j1 = max(0, 1 - dy), min(h, h + 1 - dy), max(0, 1 - dx), min(w, w + 1 - dx)
            out[:, i0:i1, j0:j1] += part[:, i0 + dy - 1:i1 + dy - 1, j0 + dx - 1:j1 + dx - 1, 3 * dy + dx]
    return out.permute(0, 3, 1, 2)


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
            upsample: bool = False) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1), of x or (``upsample``) of x's 2x nearest upsampling, by the Winograd
    kernel where it runs (``uses_winograd``; its output is then channels_last; the upsampled image is read in place,
    never made). The weight's transform is cached (``transformed_weight``): about 4x the weight's memory, per weight
    the kernel has run with."""
    _validate(x, weight, bias)
    args = (x, weight, bias, bool(upsample))
    if CONV3X3.route(*args) == "torch":
        if uses_taps_gemm(x, weight, upsample):
            return taps_gemm_conv3x3(x, weight, bias)
        if not upsample and uses_packed_conv(x, weight):
            return packed_conv(x, weight, bias, padding=1)
    return CONV3X3(*args)


def conv3x3_residual_add(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """residual_add(conv3x3(x, weight), residual, bias), a ResBlock's end: where ops.packed_conv runs (bf16 on a
    CPU) one oneDNN call with the residual added as a post-op; elsewhere the two ops (Winograd, then the fused
    add)."""
    _validate(x, weight, bias)
    if CONV3X3.route(x, weight, bias, False) == "torch" and uses_packed_conv(x, weight, residual):
        return packed_conv(x, weight, bias, residual, padding=1)
    return residual_add(conv3x3(x, weight), residual, bias)
