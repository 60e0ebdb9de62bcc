"""Training data: an image folder, an .npz of uint8 images, or the built-in scikit-learn digits.

Everything loads into one uint8 NHWC tensor (plus optional int64 labels) held in memory: the data sets
this engine trains on here are small, and a tensor makes batch sampling exact and resumable (indices
drawn from a saved generator). Bad data fails early with one line naming the file and the problem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataError(ValueError):
    """Data that cannot be used as asked; the message names the file and the problem."""


@dataclass
class ImageData:
    images: torch.Tensor  # uint8 (N, H, W, C)
    labels: torch.Tensor | None  # int64 (N,) or None
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int | None:
        return None if self.labels is None else int(self.labels.max()) + 1

    def batch(self, index: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images as float NCHW in [-1, 1] on ``device``, and their labels."""
        x = self.images[index].to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
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
    if arr.dtype != np.uint8:
        raise DataError(f"{path}: arr_0 must be uint8 images, got {arr.dtype}")
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


def load_image_folder(path: str, channels: int = 3) -> ImageData:
    """Every image under ``path``; with class subfolders (path/<class>/img.png) they become labels."""
    from PIL import Image, UnidentifiedImageError

    files = []
    for root, _, names in os.walk(path):
        files += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    files.sort()
    if not files:
        raise DataError(f"{path}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    mode = "L" if channels == 1 else "RGB"
    arrays, size, first = [], None, None
    for f in files:
        try:
            with Image.open(f) as im:
                arr = np.asarray(im.convert(mode))
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{f}: cannot read image ({exc})") from None
        if size is None:
            size, first = arr.shape[:2], f
        elif arr.shape[:2] != size:
            raise DataError(f"images of mixed sizes: {first} is {size[1]}x{size[0]}, "
                            f"{f} is {arr.shape[1]}x{arr.shape[0]}")
        arrays.append(arr if arr.ndim == 3 else arr[..., None])
    images = torch.from_numpy(np.stack(arrays))
    classes = sorted({os.path.relpath(os.path.dirname(f), path) for f in files})
    if len(classes) > 1 and "." not in classes:
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index[os.path.relpath(os.path.dirname(f), path)] for f in files])
        return ImageData(images, labels, classes)
    return ImageData(images, None)


def load_data(spec: str, image_size: int, channels: int) -> ImageData:
    """``digits``, a .npz file, or an image folder; checked against the model's size and channels."""
    if spec == "digits":
        data = load_digits(image_size)
    elif not os.path.exists(spec):
        raise DataError(f"{spec}: no such file or folder (use an image folder, an .npz, or 'digits')")
    elif os.path.isdir(spec):
        data = load_image_folder(spec, channels)
    elif spec.endswith(".npz"):
        data = load_npz(spec)
    else:
        raise DataError(f"{spec}: not an image folder, an .npz file, or 'digits'")
    data.check_fits(image_size, channels)
    return data
