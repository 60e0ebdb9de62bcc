"""The project's one noise stream: counter-based Philox4x32-10, keyed by (seed, image, step, element).

Every random draw of a sampling run is a pure function of where it sits:

    z = normal(Philox4x32-10(key = seed (64 bit), counter = (element, image, step, stream)))

``element`` is the position inside one image (its NCHW flat index, whatever the memory layout), ``image`` the image's
global index in the run (its place among all requested images, whatever the batch size or the number
of processes), ``step`` the reverse-step number, ``stream`` 0 for step noise and 1 for x_T. The two
uint32 outputs become one N(0, 1) value by the Box-Muller map Triton's ``tl.randn`` uses.

Three implementations draw the same values (up to the last bits of log/cos): this file (torch ops on
any device; the reference path and the torch fallback), the Triton kernels (``tl.philox``), and the
extension's kernels (ATen's Philox engine on the CPU and GPU, csrc/philox_normal.h). A counter-based
stream needs no generator state, so a CUDA graph that advances ``step`` on the device draws fresh
noise each replay, and nothing depends on which loop runs the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddpm_fast import base

STEP_STREAM, X_T_STREAM, BOUND_STREAM = 0, 1, 2  # BOUND_STREAM: the q(x_t | x_0) draws of the likelihood bound
MAX_SEED = 2**63 - 1  # the key travels as one int64

_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 round multipliers
_K0, _K1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_MASK = 0xFFFFFFFF
_UNIFORM_SCALE = 4.6566127342e-10  # largest scale with (2**31 - 1) * scale < 1 in fp32


def check_seed(seed) -> int:
    """An int in [0, 2**63): the sampling seed (clear error otherwise)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        try:
            seed = int(seed) if float(seed) == int(seed) else None
        except (TypeError, ValueError, OverflowError):
            seed = None
        if seed is None:
            raise ValueError("seed must be an integer")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must lie in [0, 2**63 - 1], got {seed}")
    return seed


@dataclass(frozen=True)
class NoiseKey:
    """Where one step's draws sit in the stream: ``counter`` = int64 [seed, step] and ``images`` = int64 (N,)
    global image indices, both on the state's device (a CUDA graph reads them there, they never come back
    to the host)."""

    counter: torch.Tensor
    images: torch.Tensor

    def validate(self, n: int, device: torch.device) -> None:
        if self.counter.shape != (2,) or self.counter.dtype != torch.int64 or self.counter.device != device:
            raise ValueError(f"noise key: counter must be an int64 [seed, step] tensor on {device}, got "
                             f"{tuple(self.counter.shape)} {self.counter.dtype} on {self.counter.device}")
        if self.images.shape != (n,) or self.images.dtype != torch.int64 or self.images.device != device:
            raise ValueError(f"noise key: images must be int64 of shape ({n},) on {device}, got "
                             f"{tuple(self.images.shape)} {self.images.dtype} on {self.images.device}")


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    prod = b * a  # int64: both factors < 2**32 (as non-negative values), so the product fits in 64 bits unsigned
    return (prod >> 32) & _MASK, prod & _MASK


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox4x32-``rounds`` on int64 tensors holding uint32 values (broadcasting); returns four uint32 tensors."""
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _K0) & _MASK, (k1 + _K1) & _MASK
    return c0, c1, c2, c3


def _uniform(u: torch.Tensor) -> torch.Tensor:
    i = torch.where(u >= 2**31, u - 2**32, u)  # bitcast to int32
    i = torch.where(i < 0, -i - 1, i)
    return i.to(torch.float32) * _UNIFORM_SCALE


def normal(counter: torch.Tensor, images: torch.Tensor, per_image: int, stream: int = STEP_STREAM,
           steps: torch.Tensor | None = None) -> torch.Tensor:
    """(N, per_image) fp32 N(0, 1) draws at step counter[1] of seed counter[0], for images ``images``
    (``steps``: one step per row instead, an int64 (N,) tensor).

    The values a kernel draws for element e of image images[n] are out[n, e]; everything stays on the
    tensors' device (no host read).
    """
    seed, step = counter[0], counter[1] if steps is None else steps.view(-1, 1)
    # uint32 products wrap mod 2**64 in int64 two's complement; the masks below keep the low 32 bits exact.
    k0 = (seed & _MASK).view(1, 1)
    k1 = ((seed >> 32) & _MASK).view(1, 1)
    c0 = torch.arange(per_image, device=counter.device, dtype=torch.int64).view(1, -1)
    c1 = (images & _MASK).view(-1, 1)
    c2 = (step & _MASK).view(-1, 1)
    c3 = torch.full((1, 1), stream, device=counter.device, dtype=torch.int64)
    r0, r1, _, _ = philox4x32(c0, c1, c2, c3, k0, k1)
    u1 = _uniform(r0).clamp_min(1.0e-7)
    u2 = _uniform(r1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(6.283185307179586 * u2)


def randn_like_key(x: torch.Tensor, key: NoiseKey, stream: int = STEP_STREAM) -> torch.Tensor:
    """Noise shaped like x and laid out like it (element e of an image is its NCHW flat index, whatever
    the layout: NCHW and channels_last paths draw the same values)."""
    z = normal(key.counter, key.images, x[0].numel() if x.shape[0] else 0, stream).view(x.shape)
    return z.contiguous(memory_format=base.memory_format(x))


def initial_noise(shape, seed: int, images: torch.Tensor, device, memory_format=torch.contiguous_format):
    """x_T of images ``images`` (global indices) in a run with ``seed``: image k's x_T depends on (seed, k) only."""
    counter = torch.tensor([check_seed(seed), 0], dtype=torch.int64, device=device)
    z = normal(counter, images.to(device), int(torch.Size(shape[1:]).numel()), X_T_STREAM).view(shape)
    return z.contiguous(memory_format=memory_format)


def image_indices(image_index, n: int) -> torch.Tensor:
    """Global image indices of a batch: ``image_index`` is the first one (an int) or all n of them."""
    if isinstance(image_index, int) and not isinstance(image_index, bool):
        images = torch.arange(image_index, image_index + n, dtype=torch.int64)
    else:
        images = torch.as_tensor(image_index)
        if images.shape != (n,) or images.is_floating_point() or images.dtype == torch.bool:
            raise ValueError(f"image_index must be an int or {n} integer indices, got {tuple(images.shape)}")
        images = images.to("cpu", torch.int64)
    if n and (int(images.min()) < 0 or int(images.max()) >= 2**31):
        raise ValueError("image indices must lie in [0, 2**31)")
    return images
