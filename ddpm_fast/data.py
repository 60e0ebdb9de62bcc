"""Training data: an image folder, an .npz of uint8 images, or the built-in scikit-learn digits.

Everything loads into one NHWC tensor (plus optional int64 labels) held in memory: uint8, or uint16 when
any image has 16 bits per sample (16-bit grayscale PNG/TIFF keep their precision; 8-bit images in the same
set are widened exactly, v * 257). The data sets this engine trains on here are small, and a tensor makes
batch sampling exact and resumable (indices drawn from a saved generator). Bad data fails early with one
line naming the file and the problem; conversions (mixed modes, dropped alpha) are listed once in
``ImageData.notes``.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataError(ValueError):
    """Data that cannot be used as asked; the message names the file and the problem."""


@dataclass
class ImageData:
    images: torch.Tensor  # uint8 or uint16 (N, H, W, C)
    labels: torch.Tensor | None  # int64 (N,) or None
    class_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)  # what loading converted, for the user to read once

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int | None:
        return None if self.labels is None else int(self.labels.max()) + 1

    def batch(self, index: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images as float NCHW in [-1, 1] on ``device``, and their labels."""
        picked = self.images[index]
        if picked.dtype == torch.uint16:  # 0..65535 -> [-1, 1]; int32 travels where uint16 kernels are few
            x = picked.to(torch.int32).to(device).permute(0, 3, 1, 2).float() / 32767.5 - 1.0
        else:
            x = picked.to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        y = None if self.labels is None else self.labels[index].to(device)
        return x, y

    def check_fits(self, image_size: int, channels: int) -> None:
        _, h, w, c = self.images.shape
        if (h, w) != (image_size, image_size) or c != channels:
            raise DataError(f"data is {h}x{w} with {c} channel(s), the model config wants "
                            f"{image_size}x{image_size} with {channels}")


def load_digits(image_size: int = 16) -> ImageData:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), upscaled bilinearly."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise DataError("--data digits needs scikit-learn (pip install scikit-learn)") from exc
    d = sk_load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return ImageData(images, torch.from_numpy(d.target.astype(np.int64)), [str(i) for i in range(10)])


def load_npz(path: str) -> ImageData:
    try:
        with np.load(path) as f:
            if "arr_0" not in f:
                raise DataError(f"{path}: no arr_0 (expected uint8 images in arr_0, labels in arr_1)")
            arr = f["arr_0"]
            labels = f["arr_1"] if "arr_1" in f else None
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: not a readable .npz ({exc})") from None
    if arr.dtype not in (np.uint8, np.uint16):
        raise DataError(f"{path}: arr_0 must be uint8 (or uint16) images, got {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise DataError(f"{path}: arr_0 must be (N, H, W) or (N, H, W, 1|3), got {arr.shape}")
    if len(arr) == 0:
        raise DataError(f"{path}: arr_0 holds no images")
    lab = None
    if labels is not None:
        if labels.shape != (len(arr),) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise DataError(f"{path}: arr_1 must hold one non-negative integer label per image")
        lab = torch.from_numpy(labels.astype(np.int64))
    return ImageData(torch.from_numpy(np.ascontiguousarray(arr)), lab)


_SIXTEEN_BIT_GRAY = ("I;16", "I;16B", "I;16L", "I;16N")


def _read_image(path: str, channels: int) -> tuple[np.ndarray, str, bool]:
    """One image as (H, W, channels) uint8, or uint16 for 16-bit grayscale; also the file's mode and whether
    Pillow itself reduced 16-bit color samples to 8 bits (it reads 48/64-bit PNGs that way)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode = im.mode
            reduced = mode in ("RGB", "RGBA") and any(";16" in str(t.args) for t in (im.tile or []))
            if mode in _SIXTEEN_BIT_GRAY or mode == "I":
                arr = np.asarray(im)
                if mode == "I" and arr.size and (arr.min() < 0 or arr.max() > 65535):
                    raise DataError(f"{path}: 32-bit integer samples outside 0..65535 "
                                    f"({arr.min()}..{arr.max()}); save it as an 8- or 16-bit image")
                arr = arr.astype(np.uint16)[..., None]
                if channels == 3:
                    arr = np.repeat(arr, 3, axis=-1)
                return arr, mode, False
            if mode == "F":
                raise DataError(f"{path}: 32-bit float images have no fixed range; save it as an 8- or 16-bit image")
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from None
    return (arr if arr.ndim == 3 else arr[..., None]), mode, reduced


def center_crop_resize(arr: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) uint8/uint16 -> (size, size, C), as guided-diffusion prepares its data: halve (box filter)
    while the short side is at least 2 * size, resize bicubically so the short side is ``size``, then crop the
    center. Each channel is resampled in float32, then rounded and clipped back to the input's range."""
    from PIL import Image

    h, w = arr.shape[:2]
    top = np.iinfo(arr.dtype).max
    planes = [Image.fromarray(arr[..., c].astype(np.float32), mode="F") for c in range(arr.shape[2])]
    while min(h, w) >= 2 * size:
        h, w = h // 2, w // 2
        planes = [p.resize((w, h), resample=Image.BOX) for p in planes]
    scale = size / min(h, w)
    h, w = max(size, round(h * scale)), max(size, round(w * scale))
    planes = [np.asarray(p.resize((w, h), resample=Image.BICUBIC)) for p in planes]
    out = np.clip(np.rint(np.stack(planes, axis=-1)), 0, top).astype(arr.dtype)
    y, x = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(out[y:y + size, x:x + size])


def load_image_folder(path: str, channels: int = 3, image_size: int | None = None) -> ImageData:
    """Every image under ``path``; with class subfolders (path/<class>/img.png) they become labels.

    Images are converted to the model's channels (grayscale "L" or "RGB"); 16-bit grayscale stays 16-bit.
    With ``image_size``, images of another size are resized and center-cropped to it (center_crop_resize);
    without, all images must share one size."""
    files = []
    for root, _, names in os.walk(path):
        files += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    files.sort()
    if not files:
        raise DataError(f"{path}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    target = "L" if channels == 1 else "RGB"
    arrays, size, first, modes, reduced, resized = [], None, None, Counter(), 0, Counter()
    for f in files:
        arr, mode, was_reduced = _read_image(f, channels)
        modes[mode] += 1
        reduced += was_reduced
        if image_size is not None and arr.shape[:2] != (image_size, image_size):
            resized[f"{arr.shape[1]}x{arr.shape[0]}"] += 1
            arr = center_crop_resize(arr, image_size)
        if size is None:
            size, first = arr.shape[:2], f
        elif arr.shape[:2] != size:
            raise DataError(f"images of mixed sizes: {first} is {size[1]}x{size[0]}, "
                            f"{f} is {arr.shape[1]}x{arr.shape[0]}")
        arrays.append(arr)
    notes = []
    gray16 = _SIXTEEN_BIT_GRAY + ("I",)
    if any(a.dtype == np.uint16 for a in arrays):
        arrays = [a if a.dtype == np.uint16 else a.astype(np.uint16) * 257 for a in arrays]  # exact: 255 -> 65535
        widened = sum(k for m, k in modes.items() if m not in gray16)
        notes.append(f"{path}: 16-bit images kept at 16-bit precision"
                     + (f" ({widened} 8-bit images widened exactly)" if widened else ""))
    # A mode is native when it needs no conversion to the model's channels (16-bit gray is native for "L").
    converted = {m: k for m, k in modes.items() if m != target and not (channels == 1 and m in gray16)}
    if converted:
        found = ", ".join(f"{k} {m}" for m, k in sorted(converted.items()))
        dropped = " (alpha dropped)" if any("A" in m for m in converted) else ""
        notes.append(f"{path}: converted {sum(converted.values())} of {len(files)} images to {target}: {found}"
                     + dropped)
    if resized:
        found = ", ".join(f"{k} {wh}" for wh, k in sorted(resized.items()))
        notes.append(f"{path}: resized {sum(resized.values())} of {len(files)} images to {image_size}x{image_size} "
                     f"(box halving, bicubic, center crop): {found}")
    if reduced:
        notes.append(f"{path}: {reduced} 16-bit color image(s) read at 8-bit precision (Pillow reads 16-bit "
                     "color at 8 bits; 16-bit grayscale keeps its precision)")
    images = torch.from_numpy(np.stack(arrays))
    classes = sorted({os.path.relpath(os.path.dirname(f), path) for f in files})
    if len(classes) > 1 and "." not in classes:
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index[os.path.relpath(os.path.dirname(f), path)] for f in files])
        return ImageData(images, labels, classes, notes)
    return ImageData(images, None, notes=notes)


def load_data(spec: str, image_size: int, channels: int) -> ImageData:
    """``digits``, a .npz file, or an image folder; checked against the model's size and channels."""
    if spec == "digits":
        data = load_digits(image_size)
    elif not os.path.exists(spec):
        raise DataError(f"{spec}: no such file or folder (use an image folder, an .npz, or 'digits')")
    elif os.path.isdir(spec):
        data = load_image_folder(spec, channels, image_size)
    elif spec.endswith(".npz"):
        data = load_npz(spec)
    else:
        raise DataError(f"{spec}: not an image folder, an .npz file, or 'digits'")
    data.check_fits(image_size, channels)
    return data
