"""vb_terms: the variational bound's term, the eps MSE and the x_0 MSE of each (image, t) row, in one pass.

Per row (an image at its timestep t, the row of the (T, 8) table picked by t):

    x0_hat = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps          (clipped to [-1, 1] if clip_denoised)
    mean   = coef1 x0_hat + coef2 x_t                           the model's posterior mean
    logvar = model_log_variance, or with v (learned_range):
             frac log_var_max + (1 - frac) log_var_min,  frac = (v + 1) / 2
    t > 0:  vb = mean over elements of KL(N(coef1 x_0 + coef2 x_t, true_logvar) || N(mean, logvar)) / ln 2
    t = 0:  vb = mean over elements of -log P(x_0 | mean, logvar), the Gaussian discretized to the 8-bit grid
            (bins of 2/255; the end bins reach to +-infinity; the tanh approximation of the normal CDF) / ln 2
    mse = mean (eps - noise)^2,  xstart_mse = mean (x0_hat - x_0)^2

The result is (N, 3) fp32: [vb in bits/dim, mse, xstart_mse]. x_start, x_t and noise are fp32; eps and v
(the model output's two halves) fp32, fp16 or bf16, all laid out alike (NCHW or channels_last: an image's
elements are one contiguous block in both, which is all a per-image reduction needs). Arithmetic is fp32;
the sums accumulate in fp32 (Triton, per lane) or float64 (C++). The table is built by
likelihood.vb_table in float64 and cast once; ``t`` (int64 (N,)) is checked on the device, without a host
read, and again inside the kernels. The kernel backends run as the registered torch op ddpm_fast::vb_terms;
a call autograd records (the hybrid loss) takes the reference.
"""

from __future__ import annotations

import math

import torch

from ddpm_fast.base import memory_format
from ddpm_fast.ops import registry

# Column names of the table (csrc/vb_terms_cpu.cpp keeps the same order).
VB_COLUMNS = ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1",
              "posterior_mean_coef2", "true_log_variance", "model_log_variance", "log_var_min", "log_var_max")
NUM_VB_COLUMNS = len(VB_COLUMNS)
LN2 = math.log(2.0)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF (the one the published bounds use)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) for x on the 8-bit grid rescaled to [-1, 1] (bins of width 2/255; the end bins reach to
    +-infinity), under N(means, exp(log_scales)^2); elementwise, in nats."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vb_terms_ref(x_start: torch.Tensor, x_t: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor,
                 table: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                 v: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch definition (fp32): (N, 3) [vb bits/dim, mse, xstart_mse]; autograd flows through it."""
    shape = (-1, 1, 1, 1)
    row = table.float()[t]
    a, b, c1, c2, true_lv, fixed_lv, lv_min, lv_max = (row[:, i].view(shape) for i in range(NUM_VB_COLUMNS))
    x0, xt, e = x_start.float(), x_t.float(), eps.float()
    pred = a * xt - b * e
    if clip_denoised:
        pred = pred.clamp(-1.0, 1.0)
    mean = c1 * pred + c2 * xt
    if v is not None:
        frac = (v.float() + 1.0) / 2.0
        lv = frac * lv_max + (1.0 - frac) * lv_min
    else:
        lv = fixed_lv.expand_as(mean)
    dims = (1, 2, 3)
    kl = normal_kl(c1 * x0 + c2 * xt, true_lv, mean, lv).mean(dim=dims) / LN2
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * lv).mean(dim=dims) / LN2
    vb = torch.where(t == 0, nll, kl)
    mse = (e - noise.float()).square().mean(dim=dims)
    xmse = (pred - x0).square().mean(dim=dims)
    return torch.stack([vb, mse, xmse], dim=1)


def _validate(x_start, x_t, eps, noise, table, t, v):
    if not torch.is_tensor(x_t) or x_t.dim() != 4 or x_t.dtype != torch.float32:
        desc = f"{tuple(x_t.shape)} {x_t.dtype}" if torch.is_tensor(x_t) else type(x_t).__name__
        raise ValueError(f"vb_terms: x_t must be a float32 (N, C, H, W) tensor, got {desc}")
    for name, ten, dtypes in (("x_start", x_start, (torch.float32,)), ("noise", noise, (torch.float32,)),
                              ("eps", eps, (torch.float32, torch.float16, torch.bfloat16)),
                              ("v", v, (torch.float32, torch.float16, torch.bfloat16))):
        if ten is None:
            continue
        if not torch.is_tensor(ten) or ten.shape != x_t.shape:
            desc = tuple(ten.shape) if torch.is_tensor(ten) else type(ten).__name__
            raise ValueError(f"vb_terms: {name} shape {desc} != x_t shape {tuple(x_t.shape)}")
        if ten.dtype not in dtypes:
            raise ValueError(f"vb_terms: {name} must be {'/'.join(str(d).replace('torch.', '') for d in dtypes)}, "
                             f"got {ten.dtype}")
        if ten.device != x_t.device:
            raise ValueError(f"vb_terms: {name} is on {ten.device}, x_t on {x_t.device}")
    if not torch.is_tensor(table) or table.dim() != 2 or table.shape[1] != NUM_VB_COLUMNS:
        desc = tuple(table.shape) if torch.is_tensor(table) else type(table).__name__
        raise ValueError(f"vb_terms: table must be (T, {NUM_VB_COLUMNS}), got {desc}")
    if not torch.is_tensor(t) or t.shape != (x_t.shape[0],) or t.dtype != torch.int64:
        desc = f"{tuple(t.shape)} {t.dtype}" if torch.is_tensor(t) else type(t).__name__
        raise ValueError(f"vb_terms: t must be int64 of shape ({x_t.shape[0]},), got {desc}")


def vb_terms(x_start: torch.Tensor, x_t: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor, table: torch.Tensor,
             t: torch.Tensor, clip_denoised: bool = True, v: torch.Tensor | None = None) -> torch.Tensor:
    """(N, 3) fp32 [vb bits/dim, mse, xstart_mse] per row on the backend the registry chose for x_t's device
    (see the module docstring). Reads no device value on the host."""
    _validate(x_start, x_t, eps, noise, table, t, v)
    table = table.to(device=x_t.device, dtype=torch.float32).contiguous()
    torch._assert_async(((t >= 0) & (t < table.shape[0])).all(),
                        f"vb_terms: t outside the table of {table.shape[0]} rows")
    if VB_TERMS.route(x_start, x_t, eps, noise, table, t, clip_denoised, v) == "torch":
        return vb_terms_ref(x_start, x_t, eps, noise, table, t, clip_denoised, v)
    fmt = memory_format(x_t)
    state = x_t.contiguous(memory_format=fmt)

    def dense(ten):
        """Laid out exactly like x_t (the kernels index every input alike): slices of a wider model output
        (a learned-sigma model's eps and v) are copied."""
        if ten is None or ten.stride() == state.stride():
            return ten
        return torch.empty_like(state, dtype=ten.dtype).copy_(ten)

    return VB_TERMS(dense(x_start), state, dense(eps), dense(noise), table, t.contiguous(), bool(clip_denoised),
                    dense(v))


def _vb_terms_triton(x_start, x_t, eps, noise, table, t, clip, v):
    from ddpm_fast.ops.kernels.vb_terms import _vb_terms_kernel

    n = x_t.shape[0]
    out = torch.empty((n, 3), dtype=torch.float32, device=x_t.device)
    per_sample = x_t[0].numel() if n else 0
    if n == 0 or per_sample == 0:
        return out.zero_()
    if x_t.numel() >= 2**31:
        raise ValueError("vb_terms: tensors of 2**31 elements or more are not supported; split the batch")
    registry.launch(
        _vb_terms_kernel, (n,), x_start, x_t, eps, v if v is not None else eps, noise, table, t, out,
        per_sample, table.shape[0],
        HAS_VAR=v is not None, CLIP=clip, NUM_COLUMNS=NUM_VB_COLUMNS, BLOCK_SIZE=1024,
    )
    return out


def _vb_terms_native(x_start, x_t, eps, noise, table, t, clip_denoised, v):
    return registry.extension().vb_terms(x_start, x_t, eps, noise, table, t, clip_denoised, v)


# Forward-only kernels: a bound autograd records (none does today) takes the reference.
VB_TERMS = registry.Op("vb_terms", {"cuda": ("triton", "torch"), "cpu": ("native", "triton", "torch")},
                       kernels={"native": _vb_terms_native, "triton": _vb_terms_triton},
                       reference=vb_terms_ref, forward_only=("native", "triton"))


def _vb_terms_kernels(x_start: torch.Tensor, x_t: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor,
                      table: torch.Tensor, t: torch.Tensor, clip_denoised: bool,
                      v: torch.Tensor | None) -> torch.Tensor:
    return VB_TERMS.implementation(x_start, x_t, eps, noise, table, t, clip_denoised, v)


_vb_terms_op = VB_TERMS.bind(_vb_terms_kernels)


@_vb_terms_op.register_fake
def _(x_start, x_t, eps, noise, table, t, clip_denoised, v):
    return x_t.new_empty((x_t.shape[0], 3))
