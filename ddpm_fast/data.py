"""Training data: an image folder, an .npz of uint8 images, or the built-in scikit-learn digits.

Two kinds of data set, one interface (``len``, ``labels``, ``get(index)`` -> NHWC uint8/uint16 images):
- ``ImageData``: the whole set in one tensor in memory (.npz, digits; small sets, no decoding per step);
- ``FolderDataset``: an image folder decoded lazily. Construction scans the files' headers only (modes,
  sizes, 16-bit samples), so memory does not grow with the folder; ``get`` reads, converts and resizes.
Images are uint8, or uint16 when any image has 16 bits per sample (16-bit grayscale PNG/TIFF keep their
precision; 8-bit images in the same set are widened exactly, v * 257). Bad data fails early with one line
naming the file and the problem; conversions (mixed modes, dropped alpha, resizing) are listed once in
``notes``.

Training reads batches through ``batch_loader``: a torch DataLoader whose items are whole batches. The
index stream (``BatchStream``) is drawn in the main process from the run's saved generator, each rank from
its own shard; workers only decode the indices they are given, and every batch carries the generator state
after its draws, so a checkpoint records exactly what was consumed however far the workers read ahead.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MAX_IMAGE_PIXELS = 2**26  # 67 megapixels (8192 x 8192): a larger image is refused unless the limit is raised
LARGE_IMAGE_PIXELS = 2**22  # 4 megapixels: an image beyond it is reduced while decoding, and decoded once
REDUCED_CACHE_BYTES = 256 << 20  # per process: the reduced copies of large images kept for the next draw


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

    def get(self, index: torch.Tensor) -> torch.Tensor:
        return self.images[index]

    def batch(self, index: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images as float NCHW in [-1, 1] on ``device``, and their labels."""
        y = None if self.labels is None else self.labels[index].to(device)
        return to_model_range(self.get(index), device), y

    def check_fits(self, image_size: int, channels: int) -> None:
        _, h, w, c = self.images.shape
        if (h, w) != (image_size, image_size) or c != channels:
            raise DataError(f"data is {h}x{w} with {c} channel(s), the model config wants "
                            f"{image_size}x{image_size} with {channels}")


def to_model_range(images: torch.Tensor, device) -> torch.Tensor:
    """NHWC uint8/uint16 images -> float NCHW in [-1, 1] on ``device``."""
    # non_blocking: a pinned batch (the loader pins on a GPU) copies while the host goes on.
    if images.dtype == torch.uint16:  # 0..65535 -> [-1, 1]; int32 travels where uint16 kernels are few
        return images.to(torch.int32).to(device, non_blocking=True).permute(0, 3, 1, 2).float() / 32767.5 - 1.0
    return images.to(device, non_blocking=True).permute(0, 3, 1, 2).float() / 127.5 - 1.0


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


@contextlib.contextmanager
def _pillow_limit(max_pixels: int):
    """Pillow's decompression-bomb limit set to ours while we open files (it refuses at twice the limit, and
    its warning between 1x and 2x is ours to give: _scan_header refuses those with a line naming the flag)."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _halved(w: int, h: int, size: int | None) -> tuple[int, int]:
    """The (w, h) center_crop_resize's box halvings take a w x h image to on its way to ``size``."""
    while size is not None and min(w, h) >= 2 * size:
        w, h = w // 2, h // 2
    return w, h


def _read_image(path: str, channels: int, size: int | None = None,
                max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """One image as (H, W, channels) uint8, or uint16 for 16-bit grayscale. An image of more than
    LARGE_IMAGE_PIXELS that is read for a smaller ``size`` is reduced while decoding (JPEG draft mode, then
    one box resize in its own 8-bit type to where center_crop_resize's halvings end), so its full-size float
    copy never exists."""
    from PIL import Image, UnidentifiedImageError

    try:
        with _pillow_limit(max_pixels), Image.open(path) as im:
            target = _halved(*im.size, size) if im.size[0] * im.size[1] > LARGE_IMAGE_PIXELS else im.size
            reduce = target != im.size
            if reduce and im.format == "JPEG":
                im.draft(im.mode, target)  # decodes at 1/2, 1/4 or 1/8 scale, still at least the target

            def shrink(im):  # the halvings in one box resize (integer reduce first), in the image's own type
                return im.resize(target, Image.BOX, reducing_gap=3.0) if reduce else im

            mode = im.mode
            if mode in _SIXTEEN_BIT_GRAY or mode == "I":
                arr = np.asarray(shrink(im) if mode == "I" else im)
                if mode == "I" and arr.size and (arr.min() < 0 or arr.max() > 65535):
                    raise DataError(f"{path}: 32-bit integer samples outside 0..65535 "
                                    f"({arr.min()}..{arr.max()}); save it as an 8- or 16-bit image")
                arr = arr.astype(np.uint16)[..., None]
                return np.repeat(arr, 3, axis=-1) if channels == 3 else arr
            if mode == "F":
                raise DataError(f"{path}: 32-bit float images have no fixed range; save it as an 8- or 16-bit image")
            im = im.convert("L" if channels == 1 else "RGB")
            arr = np.asarray(shrink(im))
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: {_bomb(exc, max_pixels)}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from None
    return arr if arr.ndim == 3 else arr[..., None]


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


_GRAY16 = _SIXTEEN_BIT_GRAY + ("I",)


def _list_images(path: str) -> list[str]:
    files = []
    for root, _, names in os.walk(path):
        files += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise DataError(f"{path}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return sorted(files)


def _bomb(exc: Exception, max_pixels: int) -> str:
    """One line for an image whose header claims far too many pixels (Pillow's decompression-bomb refusal)."""
    import re

    found = re.search(r"\((\d+) pixels\)", str(exc))
    what = f"its header claims {int(found.group(1)):,} pixels" if found else "its header claims too many pixels"
    return f"{what}, over the limit of {max_pixels:,} (--max-image-pixels); not read"


def _scan_header(path: str, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[str, tuple[int, int], bool]:
    """(mode, (width, height), whether Pillow reads its 16-bit color samples at 8 bits), without decoding.
    An image over ``max_pixels`` is refused here, before anything is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with _pillow_limit(max_pixels), Image.open(path) as im:
            mode, size = im.mode, im.size
            reduced = mode in ("RGB", "RGBA") and any(";16" in str(t.args) for t in (im.tile or []))
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: {_bomb(exc, max_pixels)}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from None
    if size[0] * size[1] > max_pixels:
        raise DataError(f"{path}: its header claims {size[0] * size[1]:,} pixels ({size[0]}x{size[1]}), over the "
                        f"limit of {max_pixels:,} (--max-image-pixels); not read")
    if mode == "F":
        raise DataError(f"{path}: 32-bit float images have no fixed range; save it as an 8- or 16-bit image")
    return mode, size, reduced


class FolderDataset:
    """Every image under ``path``, decoded lazily; with class subfolders (path/<class>/img.png) they become
    labels. Images are converted to the model's channels (grayscale "L" or "RGB"; 16-bit grayscale stays
    16-bit) and, when ``image_size`` is given, images of another size are resized and center-cropped to it
    (center_crop_resize); without it, all images must share one size. Memory: the file list and labels."""

    def __init__(self, path: str, channels: int = 3, image_size: int | None = None,
                 max_pixels: int = MAX_IMAGE_PIXELS):
        self.path, self.channels, self.max_pixels = path, channels, max_pixels
        self.files = files = _list_images(path)
        self._reduced: dict[int, np.ndarray] = {}  # large images, decoded once (see get)
        self._reduced_bytes = 0
        target = "L" if channels == 1 else "RGB"
        modes, sizes, reduced, first = Counter(), Counter(), 0, {}
        self._large = set()
        for k, f in enumerate(files):
            mode, size, was_reduced = _scan_header(f, max_pixels)
            if size[0] * size[1] > LARGE_IMAGE_PIXELS:
                self._large.add(k)
            modes[mode] += 1
            sizes[size] += 1
            reduced += was_reduced
            first.setdefault(size, f)
        if image_size is None:
            if len(sizes) > 1:
                (a, fa), (b, fb) = sorted(first.items(), key=lambda kv: kv[1])[:2]
                raise DataError(f"images of mixed sizes: {fa} is {a[0]}x{a[1]}, {fb} is {b[0]}x{b[1]}")
            (w, h), = sizes
            if w != h:
                raise DataError(f"{files[0]}: images are {w}x{h}; give an image size to crop them square")
            image_size = w
        self.image_size = image_size
        sixteen = any(m in _GRAY16 for m in modes)
        self.dtype = torch.uint16 if sixteen else torch.uint8
        notes = []
        if sixteen:
            widened = sum(k for m, k in modes.items() if m not in _GRAY16)
            notes.append(f"{path}: 16-bit images kept at 16-bit precision"
                         + (f" ({widened} 8-bit images widened exactly)" if widened else ""))
        # A mode is native when it needs no conversion to the model's channels (16-bit gray is native for "L").
        converted = {m: k for m, k in modes.items() if m != target and not (channels == 1 and m in _GRAY16)}
        if converted:
            found = ", ".join(f"{k} {m}" for m, k in sorted(converted.items()))
            dropped = " (alpha dropped)" if any("A" in m for m in converted) else ""
            notes.append(f"{path}: converted {sum(converted.values())} of {len(files)} images to {target}: {found}"
                         + dropped)
        resized = {wh: k for wh, k in sizes.items() if wh != (image_size, image_size)}
        if resized:
            found = ", ".join(f"{k} {w}x{h}" for (w, h), k in sorted(resized.items()))
            notes.append(f"{path}: resized {sum(resized.values())} of {len(files)} images to "
                         f"{image_size}x{image_size} (box halving, bicubic, center crop): {found}")
        if reduced:
            notes.append(f"{path}: {reduced} 16-bit color image(s) read at 8-bit precision (Pillow reads 16-bit "
                         "color at 8 bits; 16-bit grayscale keeps its precision)")
        self.notes = notes
        classes = sorted({os.path.relpath(os.path.dirname(f), path) for f in files})
        self.labels, self.class_names = None, None
        if len(classes) > 1 and "." not in classes:
            index = {c: i for i, c in enumerate(classes)}
            self.labels = torch.tensor([index[os.path.relpath(os.path.dirname(f), path)] for f in files])
            self.class_names = classes

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int | None:
        return None if self.labels is None else int(self.labels.max()) + 1

    def get(self, index: torch.Tensor) -> torch.Tensor:
        """Images ``index`` as one NHWC tensor (self.dtype), decoded now. A large image (over
        LARGE_IMAGE_PIXELS) is reduced while decoding and its result kept (up to REDUCED_CACHE_BYTES per
        process), so it is decoded once, not at every draw."""
        size, arrays = self.image_size, []
        for k in index.tolist():
            arr = self._reduced.get(k)
            if arr is None:
                arr = self._decode(k)
            arrays.append(arr)
        if not arrays:
            return torch.empty((0, size, size, self.channels), dtype=self.dtype)
        return torch.from_numpy(np.stack(arrays))  # the one copy: Pillow's read-only views into a new batch

    def _decode(self, k: int) -> np.ndarray:
        size = self.image_size
        arr = _read_image(self.files[k], self.channels, size, self.max_pixels)
        if arr.shape[:2] != (size, size):
            arr = center_crop_resize(arr, size)
        if self.dtype == torch.uint16 and arr.dtype != np.uint16:
            arr = arr.astype(np.uint16) * 257  # exact: 255 -> 65535
        if k in self._large and self._reduced_bytes + arr.nbytes <= REDUCED_CACHE_BYTES:
            arr.setflags(write=False)
            self._reduced[k] = arr
            self._reduced_bytes += arr.nbytes
        return arr

    def check_fits(self, image_size: int, channels: int) -> None:
        if self.image_size != image_size or self.channels != channels:
            raise DataError(f"data is {self.image_size}x{self.image_size} with {self.channels} channel(s), the "
                            f"model config wants {image_size}x{image_size} with {channels}")


def load_image_folder(path: str, channels: int = 3, image_size: int | None = None,
                      max_pixels: int = MAX_IMAGE_PIXELS) -> ImageData:
    """A FolderDataset decoded into memory at once (small folders; see FolderDataset for the rules)."""
    folder = FolderDataset(path, channels, image_size, max_pixels)
    return ImageData(folder.get(torch.arange(len(folder))), folder.labels, folder.class_names, folder.notes)


def load_data(spec: str, image_size: int, channels: int,
              max_pixels: int = MAX_IMAGE_PIXELS) -> ImageData | FolderDataset:
    """``digits`` or a .npz file (in memory), or an image folder (lazy; images over ``max_pixels`` refused);
    checked against the model's size and channels."""
    if spec == "digits":
        data = load_digits(image_size)
    elif not os.path.exists(spec):
        raise DataError(f"{spec}: no such file or folder (use an image folder, an .npz, or 'digits')")
    elif os.path.isdir(spec):
        data = FolderDataset(spec, channels, image_size, max_pixels)
    elif spec.endswith(".npz"):
        data = load_npz(spec)
    else:
        raise DataError(f"{spec}: not an image folder, an .npz file, or 'digits'")
    data.check_fits(image_size, channels)
    return data


# ---- the training stream --------------------------------------------------------------------------------


class BatchStream:
    """The index stream, step after step: ``batch_size`` indices drawn with replacement from this rank's shard
    (image k belongs to rank k % world; one rank: every image) and, with ``hflip``, a flip flag per image, all
    from one generator started at ``state``. Each item carries the generator's state after its draws."""

    def __init__(self, state: torch.Tensor, size: int, batch_size: int, hflip: bool, rank: int = 0, world: int = 1):
        self.state, self.batch_size, self.hflip = state, batch_size, hflip
        self.shard = torch.arange(rank, size, world)
        if len(self.shard) == 0:
            raise DataError(f"{size} images cannot be shared by {world} processes: rank {rank} would get none")

    def __iter__(self):
        gen = torch.Generator()
        gen.set_state(self.state)
        while True:
            pick = torch.randint(0, len(self.shard), (self.batch_size,), generator=gen)
            flip = torch.rand(self.batch_size, generator=gen) < 0.5 if self.hflip else None
            yield {"index": self.shard[pick], "flip": flip, "state": gen.get_state()}


class _WholeBatches(torch.utils.data.Dataset):
    """DataLoader adapter: an item is a whole batch, built from one BatchStream entry (a worker decodes it).
    A file that cannot be read travels back as the batch's "error" (one line naming the file), not as the
    worker's traceback."""

    def __init__(self, data):
        self.data = data

    def __getitem__(self, item: dict) -> dict:
        try:
            batch = dict(item, images=self.data.get(item["index"]))
        except DataError as exc:
            return {"error": str(exc)}
        if self.data.labels is not None:
            batch["labels"] = self.data.labels[item["index"]]
        return batch


class BatchLoader:
    """An iterator of batches (dicts: index, images (NHWC, the data's dtype), labels, flip, state) in stream
    order. With workers > 0, that many processes decode batches ahead (2 each); the stream stays in order.
    A file that cannot be read, or a worker that died, is a DataError of one line. ``close()`` stops the
    workers (call it on every way out: a worker left to the interpreter's exit is stopped with SIGTERM,
    which workers ignore)."""

    def __init__(self, data, stream: BatchStream, workers: int = 0, pin_memory: bool = False):
        # The loader draws its workers' base seed from ``generator``: never from torch's global generator,
        # whose state a checkpoint saves (a resumed run starts a loader at another point of the global stream).
        self._it = iter(torch.utils.data.DataLoader(
            _WholeBatches(data), batch_size=None, sampler=stream, num_workers=workers, pin_memory=pin_memory,
            prefetch_factor=2 if workers else None, generator=torch.Generator().manual_seed(0),
            worker_init_fn=_leave_stop_signals_to_the_main_process if workers else None))
        if workers:
            _close_at_exit(self)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        try:
            batch = next(self._it)
        except RuntimeError as exc:  # torch's report of a worker killed by a signal or out of memory
            if "DataLoader worker" not in str(exc):
                raise
            raise DataError(f"a data-loading worker died ({str(exc).strip().splitlines()[0]})") from None
        if "error" in batch:
            raise DataError(batch["error"])
        return batch

    def close(self) -> None:
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


_OPEN_LOADERS: weakref.WeakSet = weakref.WeakSet()
_EXIT_HOOK: list = []


def _close_at_exit(loader: BatchLoader) -> None:
    """Close the loaders their owner left open before the interpreter exits. The hook is registered after
    torch's and multiprocessing's exit hooks, so it runs before them (atexit runs last-in first-out): those
    would stop the workers with SIGTERM, which workers ignore."""
    if not _EXIT_HOOK:
        atexit.register(_close_open_loaders)
        _EXIT_HOOK.append(_close_open_loaders)
    _OPEN_LOADERS.add(loader)


def _close_open_loaders() -> None:
    for loader in list(_OPEN_LOADERS):
        loader.close()


def batch_loader(data, stream: BatchStream, workers: int = 0, pin_memory: bool = False) -> BatchLoader:
    """The training batches: see BatchLoader."""
    return BatchLoader(data, stream, workers, pin_memory)


def _leave_stop_signals_to_the_main_process(_worker_id: int) -> None:
    """A worker ignores SIGINT and SIGTERM. Ctrl-C reaches the whole process group, and so does the SIGTERM of
    a job scheduler or `timeout`: the main process decides (it saves the step boundary, then stops its workers
    through the loader, never by a signal)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
