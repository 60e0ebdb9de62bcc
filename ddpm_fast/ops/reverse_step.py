"""reverse_step: the whole sampler update (DDPM, DDIM, and every multistep solver) in one pass.

    eps     = eps_u + w (eps_c - eps_u)                 (classifier-free guidance, optional)
    x0_hat  = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps    (clipped to [-1, 1] if clip_denoised)
    x_prev  = c_x0 x0_hat + c_xt x_t + c_eps eps + sum_k coef_slot_k H_k + sigma z
    (push_slot = k + 1) H_k <- push_x0 x0_hat + push_eps eps
    learned variance: sigma = sigma_col * exp((frac log_var_max + (1 - frac) log_var_min) / 2), frac = (v + 1) / 2

H_0..H_2 (``history``) are a multistep solver's ring buffers: earlier model outputs, in x0 or eps form as
the table's push columns say, updated in place by the same pass. The table names slots, not lags: the row
of step i weighs the slots that hold the outputs it needs and writes one (the oldest), so a step reads
each slot once and writes one, with no shifting. DDPM and DDIM keep none. ddpm_fast.solvers compiles a
solver written on symbols into such rows.
``model_var_values`` v (optional): a learned-variance model's second output half (Improved DDPM's
learned_range); sigma is then per element, interpolated in log space between the table's two log-variance
columns, and the table's sigma column is the mask (1 on noisy steps, 0 on the last).
Coefficients are rows of a (S, 14) fp32 table (columns COEF_COLUMNS) that the samplers build in float64;
``index`` (N,) picks a row per sample and lives on the device, so a CUDA graph can replay the step.
The state x_t and the result are fp32; the model output may be fp32, fp16 or bf16. ``half_out``
(optional) also receives x_prev in fp16/bf16: the copy the next fast-path U-Net call reads.

Noise z: a tensor, or a ``noise.NoiseKey`` (int64 device tensors [seed, step] and per-sample image
indices) from which every backend draws the project's Philox stream (ddpm_fast.noise) in the kernel:
the same values on every backend, and nothing read back to the host, so a replayed graph draws fresh
noise as the step counter advances. ``out`` may be x_t itself (each element is read before it is
written); it may not be a history buffer. A row that weighs or writes a slot beyond the buffers given is
an error, not a dropped term. The row index is checked without a host read (an asynchronous assert on the device, an
immediate error on the CPU) and again inside the kernels. The kernel backends run as the registered torch
op ddpm_fast::reverse_step_, which declares what it writes (out, half_out, history), so torch.compile
orders it correctly and a CUDA graph captures it.
"""

from __future__ import annotations

import torch

from ddpm_fast.base import memory_format
from ddpm_fast.noise import NoiseKey, randn_like_key
from ddpm_fast.ops import registry

# Column names of the coefficient table (csrc/reverse_step.h keeps the same order).
COEF_COLUMNS = ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "coef_x0", "coef_xt", "coef_eps",
                "sigma", "coef_slot0", "coef_slot1", "coef_slot2", "log_var_min", "log_var_max", "push_x0", "push_eps",
                "push_slot")
SIGMA = COEF_COLUMNS.index("sigma")
SLOT0 = COEF_COLUMNS.index("coef_slot0")
LOG_VAR_MIN = COEF_COLUMNS.index("log_var_min")
PUSH_X0, PUSH_EPS, PUSH_SLOT = (COEF_COLUMNS.index(c) for c in ("push_x0", "push_eps", "push_slot"))
NUM_COEFS = len(COEF_COLUMNS)
MAX_HISTORY = 3  # ring slots a table may name (csrc/reverse_step.h: kMaxHistory)


def reverse_step_ref(
    x_t: torch.Tensor,
    model_output: torch.Tensor,
    coefs: torch.Tensor,
    index: torch.Tensor,
    noise: torch.Tensor | None = None,
    clip_denoised: bool = True,
    model_output_uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    history: tuple[torch.Tensor, ...] = (),
    model_var_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch definition of the update, computed in fp32. ``history`` (the ring slots) is updated in place:
    sample n's row writes its kept value into slot push_slot - 1 (none at 0)."""
    shape = (-1,) + (1,) * (x_t.dim() - 1)
    row = coefs.float()[index]
    a, b, c_x0, c_xt, c_eps, sigma = (row[:, i].view(shape) for i in range(SIGMA + 1))
    lv_min, lv_max, p_x0, p_eps = (row[:, i].view(shape) for i in range(SLOT0 + MAX_HISTORY, PUSH_SLOT))
    if model_var_values is not None:
        frac = (model_var_values.float() + 1.0) / 2.0
        sigma = sigma * torch.exp(0.5 * (frac * lv_max + (1.0 - frac) * lv_min))
    eps = model_output.float()
    if model_output_uncond is not None:
        u = model_output_uncond.float()
        eps = u + guidance_scale * (eps - u)
    x = x_t.float()
    x0 = a * x - b * eps
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
    out = c_x0 * x0 + c_xt * x + c_eps * eps
    for k, h in enumerate(history):
        out = out + row[:, SLOT0 + k].view(shape) * h
    slot = row[:, PUSH_SLOT].long() - 1
    kept = p_x0 * x0 + p_eps * eps
    for k, h in enumerate(history):
        h.copy_(torch.where((slot == k).view(shape), kept, h))
    if noise is not None:
        out = out + sigma * noise.float()
    return out


def _validate(x_t, model_output, coefs, index, noise, model_output_uncond, model_var_values=None):
    if not torch.is_tensor(x_t) or x_t.dim() != 4 or x_t.dtype != torch.float32:
        desc = f"{tuple(x_t.shape)} {x_t.dtype}" if torch.is_tensor(x_t) else type(x_t).__name__
        raise ValueError(f"reverse_step: x_t must be a float32 (N, C, H, W) tensor, got {desc}")
    for name, t in (("model_output", model_output), ("model_output_uncond", model_output_uncond),
                    ("noise", noise), ("model_var_values", model_var_values)):
        if t is None:
            continue
        if t.shape != x_t.shape:
            raise ValueError(f"reverse_step: {name} shape {tuple(t.shape)} != x_t shape {tuple(x_t.shape)}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"reverse_step: {name} must be float32/float16/bfloat16, got {t.dtype}")
        if t.device != x_t.device:
            raise ValueError(f"reverse_step: {name} is on {t.device}, x_t on {x_t.device}")
    if coefs.dim() != 2 or coefs.shape[1] != len(COEF_COLUMNS):
        raise ValueError(f"reverse_step: coefs must be (S, {len(COEF_COLUMNS)}), got {tuple(coefs.shape)}")
    if index.shape != (x_t.shape[0],) or index.dtype != torch.int64:
        raise ValueError(f"reverse_step: index must be int64 of shape ({x_t.shape[0]},), "
                         f"got {tuple(index.shape)} {index.dtype}")


def _validate_call(x_t, model_output, index, coefs, noise, model_output_uncond, model_var_values, out, half_out,
                   history: tuple) -> NoiseKey | None:
    """Every argument check of a reverse_step call that reads no device value; returns the noise key, if any."""
    if len(history) > MAX_HISTORY:
        raise ValueError(f"reverse_step: history holds at most {MAX_HISTORY} ring slots, got {len(history)}")
    key = noise if isinstance(noise, NoiseKey) else None
    _validate(x_t, model_output, coefs, index, None if key is not None else noise, model_output_uncond,
              model_var_values)
    if model_var_values is not None and model_var_values.dtype != model_output.dtype:
        raise ValueError(f"reverse_step: model_var_values is {model_var_values.dtype}, model_output "
                         f"{model_output.dtype}; they are the two halves of one model output")
    if key is not None:
        key.validate(x_t.shape[0], x_t.device)
    outputs = [("out", out, (torch.float32,)), ("half_out", half_out, (torch.float16, torch.bfloat16))]
    outputs += [(f"history[{i}]", h, (torch.float32,)) for i, h in enumerate(history)]
    for name, t, dtypes in outputs:
        if name.startswith("history") and t is None:
            raise ValueError(f"reverse_step: {name} is None")
        if t is not None and (t.shape != x_t.shape or t.dtype not in dtypes or t.stride() != x_t.stride()
                              or t.device != x_t.device):
            kinds = "/".join(str(d).replace("torch.", "") for d in dtypes)
            raise ValueError(f"reverse_step: {name} must be a {kinds} tensor laid out like x_t")

    def same(a, b):
        return a is b or (not torch.compiler.is_compiling() and a.data_ptr() == b.data_ptr())

    if out is not None and any(same(h, out) for h in history):
        raise ValueError("reverse_step: out must not be one of the history buffers (the step shifts them)")
    for j in range(len(history)):
        for k in range(j):
            if same(history[j], history[k]):
                raise ValueError(f"reverse_step: history[{k}] and history[{j}] are one buffer (two ring slots)")
    return key


def _check_table_fit(coefs: torch.Tensor, index: torch.Tensor, slots: int) -> None:
    """The rows ``index`` picks exist, and weigh or keep no ring slot beyond the ``slots`` given (never drop a
    term): asserts on the device, no host read."""
    torch._assert_async(((index >= 0) & (index < coefs.shape[0])).all(),
                        f"reverse_step: index outside the coefficient table of {coefs.shape[0]} rows")
    if slots < MAX_HISTORY:
        rows = coefs.index_select(0, index.clamp(0, coefs.shape[0] - 1))
        torch._assert_async((rows[:, SLOT0 + slots:SLOT0 + MAX_HISTORY] == 0).all(),
                            f"reverse_step: the table's rows weigh history slots beyond the {slots} given "
                            "(coef_slot columns); pass them")
        torch._assert_async((rows[:, PUSH_SLOT].long() <= slots).all(),
                            f"reverse_step: the table's rows keep outputs in history slots beyond the {slots} "
                            "given (push_slot column); pass them")


def reverse_step(
    x_t: torch.Tensor,
    model_output: torch.Tensor,
    coefs: torch.Tensor,
    index: torch.Tensor,
    noise: torch.Tensor | NoiseKey | None = None,
    clip_denoised: bool = True,
    model_output_uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    *,
    out: torch.Tensor | None = None,
    half_out: torch.Tensor | None = None,
    history: tuple[torch.Tensor, ...] | list[torch.Tensor] = (),
    model_var_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """One reverse step on the backend the registry chose for x_t's device; returns x_prev (fp32, ``out`` if given).

    ``history``: () or up to MAX_HISTORY fp32 ring slots laid out like x_t, holding earlier model outputs; the
    step reads the slots its row weighs and writes the one its row names, in place.
    ``model_var_values``: a learned-variance model's v, shaped like x_t (see the module docstring).
    Reads no device value on the host: safe inside CUDA-graph capture.
    """
    history = tuple(history)
    key = _validate_call(x_t, model_output, index, coefs, noise, model_output_uncond, model_var_values, out,
                         half_out, history)
    state = x_t.contiguous(memory_format=memory_format(x_t))

    def dense(t, dtype=None):
        """t laid out exactly like the state (the kernels index every input alike). Slices of a wider output
        (a learned-sigma model's eps and v) are copied; a size-1 dim's stride can differ between formats."""
        if t is None:
            return None
        t = t if dtype is None else t.to(dtype)
        if t.stride() == state.stride():
            return t
        return torch.empty_like(state, dtype=t.dtype).copy_(t)

    coefs = coefs.to(device=x_t.device, dtype=torch.float32).contiguous()
    index = index.contiguous()  # kernels read it densely (callers may pass an expand)
    _check_table_fit(coefs, index, len(history))
    out = torch.empty_like(state) if out is None else out
    REVERSE_STEP(state, dense(model_output), dense(model_output_uncond), dense(model_var_values), coefs, index,
                 None if key is not None else dense(noise, torch.float32),
                 None if key is None else key.counter, None if key is None else key.images.contiguous(),
                 float(guidance_scale), bool(clip_denoised), out, half_out, list(history))
    return out


def _reverse_step_native(x_t, model_output, model_output_uncond, model_var_values, coefs, index, noise,
                         noise_counter, noise_images, guidance_scale, clip_denoised, out, half_out, history):
    registry.extension().reverse_step(x_t, model_output, model_output_uncond, coefs, index, noise, guidance_scale,
                                      clip_denoised, noise_counter, noise_images, out, half_out, list(history),
                                      model_var_values=model_var_values)


def _reverse_step_triton(x_t, model_output, model_output_uncond, model_var_values, coefs, index, noise,
                         noise_counter, noise_images, guidance_scale, clip_denoised, out, half_out, history):
    key = None if noise_counter is None else NoiseKey(noise_counter, noise_images)
    _reverse_step_launch(x_t, model_output, model_output_uncond, coefs, index, noise, key, guidance_scale,
                         clip_denoised, out, half_out, history, model_var_values)


def _reverse_step_reference(x_t, model_output, model_output_uncond, model_var_values, coefs, index, noise,
                            noise_counter, noise_images, guidance_scale, clip_denoised, out, half_out, history):
    z = randn_like_key(x_t, NoiseKey(noise_counter, noise_images)) if noise_counter is not None else noise
    result = reverse_step_ref(x_t, model_output, coefs, index, z, clip_denoised, model_output_uncond,
                              guidance_scale, tuple(history), model_var_values)
    out.copy_(result)
    if half_out is not None:
        half_out.copy_(result)


# The op writes ``out`` (which may be x_t), ``half_out`` and a ``history`` slot, and returns nothing.
REVERSE_STEP = registry.Op(
    "reverse_step", {"cuda": ("native", "triton", "torch"), "cpu": ("native", "triton", "torch")},
    kernels={"native": _reverse_step_native, "triton": _reverse_step_triton}, reference=_reverse_step_reference)


def _reverse_step_kernels(x_t: torch.Tensor, model_output: torch.Tensor, model_output_uncond: torch.Tensor | None,
                          model_var_values: torch.Tensor | None, coefs: torch.Tensor, index: torch.Tensor,
                          noise: torch.Tensor | None,
                          noise_counter: torch.Tensor | None, noise_images: torch.Tensor | None, guidance_scale: float,
                          clip_denoised: bool, out: torch.Tensor, half_out: torch.Tensor | None,
                          history: list[torch.Tensor]) -> None:
    REVERSE_STEP.implementation(x_t, model_output, model_output_uncond, model_var_values, coefs, index, noise,
                                noise_counter, noise_images, guidance_scale, clip_denoised, out, half_out, history)


_reverse_step_op = REVERSE_STEP.bind(_reverse_step_kernels, mutates_args=("out", "half_out", "history"),
                                     name="reverse_step_")


@_reverse_step_op.register_fake
def _(x_t, model_output, model_output_uncond, model_var_values, coefs, index, noise, noise_counter, noise_images,
      guidance_scale,
      clip_denoised, out, half_out, history):
    return None


def _reverse_step_launch(x, eps, eps_u, coefs, index, noise, key, w, clip, out, half_out, history=(), var=None):
    from ddpm_fast.ops.kernels.reverse_step import _reverse_step_kernel, triton

    numel = x.numel()
    if numel >= 2**31:
        raise ValueError("reverse_step: tensors of 2**31 elements or more are not supported; split the batch")
    if numel == 0:
        return out
    noise_mode = 1 if noise is not None else (2 if key is not None else 0)
    n, c, h, w_ = x.shape
    block = 1024
    registry.launch(
        _reverse_step_kernel, (triton.cdiv(numel, block),),
        x, eps, eps_u if eps_u is not None else eps, var if var is not None else eps,
        noise if noise is not None else x, coefs, index,
        key.counter if key is not None else index, key.images if key is not None else index,
        out, half_out if half_out is not None else out, *(tuple(history) + (out, out, out))[:MAX_HISTORY],
        numel, numel // n, c, h * w_, coefs.shape[0], w,
        HAS_UNCOND=eps_u is not None, HAS_VAR=var is not None, NOISE_MODE=noise_mode, CLIP=clip,
        HAS_HALF=half_out is not None,
        CHANNELS_LAST=memory_format(x) == torch.channels_last, HISTORY=len(history), NUM_COEFS=NUM_COEFS,
        BLOCK_SIZE=block,
    )
    return out
