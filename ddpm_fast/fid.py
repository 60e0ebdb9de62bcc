"""Frechet Inception Distance between two image sets, computed the way the field computes it.

    python -m ddpm_fast.fid samples_50000x32x32x3.npz cifar10_train/        # prints "FID: ..." last
    python -m ddpm_fast.fid cifar10_train/ --save-stats cifar10_stats.npz   # statistics for later runs
    python -m ddpm_fast.fid samples.npz cifar10_stats.npz

Each input is an ``.npz`` of uint8 NHWC images (``arr_0``, as ``sample`` writes it), a folder of images, or a
statistics ``.npz`` (``mu``, ``sigma``, as pytorch-fid writes it). The network, its input resizing (bilinear to
299x299) and normalization, the feature layer and the distance are pytorch-fid's own (``pip install
'ddpm_fast[fid]'``); this module reads our formats, streams them in batches (no whole set in memory), shards
the feature pass over a torchrun's processes and runs the network on a faster form: each convolution with its
batch norm folded in, the 3x3 stride-1 ones by Winograd on a CPU (ops.conv3x3), channels-last, no autograd.
The weights are the standard FID Inception weights (``pt_inception-2015-12-05-6726825d.pth``), read with
``weights_only`` from pytorch-fid's download cache (torch.hub's ``checkpoints`` folder) or from
``--inception-weights PATH``; nothing is downloaded.

API: ``statistics(images) -> (mu, sigma)`` and ``frechet_distance(mu1, sigma1, mu2, sigma2)``.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import zipfile
from collections.abc import Iterator
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddpm_fast import ops
from ddpm_fast.checkpoint import read_torch_file
from ddpm_fast.cli import DefaultsHelpFormatter, command_exit, run_command
from ddpm_fast.distributed import Dist, parse_device
from ddpm_fast.fileio import atomic_write

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
DIMS = (64, 192, 768, 2048)  # pytorch-fid's feature layers: the first and second max pools, pre-aux, final pool


class FIDError(ValueError):
    """A problem with an FID input, the weights or the environment, said in one line."""


def _pytorch_fid():
    try:
        from pytorch_fid import fid_score, inception
    except ImportError:
        raise FIDError("FID needs pytorch-fid (its network and distance): pip install 'ddpm_fast[fid]'") from None
    return inception, fid_score


def default_weights_path() -> str:
    """Where pytorch-fid's first run downloads the FID Inception weights (torch.hub's cache, TORCH_HOME)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_NAME)


def fid_architecture() -> nn.Module:
    """pytorch-fid's FID Inception (torchvision's InceptionV3 with the TF-ported blocks), unweighted."""
    inception, _ = _pytorch_fid()
    from torchvision.models.inception import Inception3

    with mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(Inception3, "load_state_dict", lambda *a, **k: None):
        return inception.fid_inception_v3()


def random_weights(seed: int = 0) -> dict:
    """Seeded random weights for the FID architecture, scaled so that features stay O(1) at every layer (for
    tests and benchmarks on machines without the real weights)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in fid_architecture().state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = t.clone()
        elif name.endswith("conv.weight"):
            state[name] = torch.randn(t.shape, generator=g) * math.sqrt(2.0 / t[0].numel())
        elif name.endswith(("running_var", "bn.weight")):
            state[name] = 0.5 + torch.rand(t.shape, generator=g)
        else:  # bn.bias, running_mean, the classifier
            state[name] = 0.1 * torch.randn(t.shape, generator=g)
    return state


def read_weights(path: str | None = None) -> dict:
    """The FID Inception weights from ``path`` (default: pytorch-fid's cache); one line if they are missing."""
    path = path or default_weights_path()
    if not os.path.isfile(path):
        raise FIDError(f"FID Inception weights not found: {path} is missing; download {WEIGHTS_URL} to that path "
                       "(pytorch-fid's cache) or pass --inception-weights PATH")
    state = read_torch_file(path)
    if not isinstance(state, dict) or "Mixed_7c.branch_pool.conv.weight" not in state:
        raise FIDError(f"{path}: not the FID Inception weights (no Mixed_7c.branch_pool.conv.weight)")
    return state


def inception_network(dims: int = 2048, weights: str | dict | None = None) -> nn.Module:
    """pytorch-fid's ``InceptionV3`` for ``dims``-d features (its resize and normalization included), with
    ``weights`` (a path, a state dict, or pytorch-fid's cache). Input: (N, 3, H, W) floats in [0, 1]."""
    if dims not in DIMS:
        raise FIDError(f"dims must be one of {DIMS} (pytorch-fid's feature layers), got {dims}")
    state = weights if isinstance(weights, dict) else read_weights(weights)
    inception, _ = _pytorch_fid()
    try:
        with mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: state):
            net = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
    except RuntimeError as exc:  # load_state_dict: missing or mismatched keys
        raise FIDError(f"the FID Inception weights do not fit its architecture: {str(exc).splitlines()[0]}") \
            from None
    return net.eval()


def fold_batch_norms_(net: nn.Module) -> nn.Module:
    """Each BasicConv2d's batch norm (inference statistics) folded into its convolution, in place: one pass
    over each activation instead of two. The same function up to float32 rounding."""
    from torchvision.models.inception import BasicConv2d

    for m in net.modules():
        if isinstance(m, BasicConv2d) and isinstance(m.bn, nn.BatchNorm2d):
            conv, bn = m.conv, m.bn
            scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
            fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              conv.dilation, conv.groups, bias=True)
            with torch.no_grad():
                fused.weight.copy_(conv.weight.double() * scale.reshape(-1, 1, 1, 1))
                bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
                fused.bias.copy_(bn.bias.double() + (bias - bn.running_mean.double()) * scale)
            m.conv, m.bn = fused, nn.Identity()
    return net


class _Conv3x3(nn.Conv2d):
    """A 3x3, stride-1, padding-1 convolution through ops.conv3x3: Winograd's F(4x4, 3x3) on a CPU in fp32 (4x fewer
    multiply-adds; ~5e-6 of the output's scale from the exact convolution), F.conv2d elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.conv3x3(x, self.weight, self.bias)


def winograd_convs_(net: nn.Module) -> nn.Module:
    """Every 3x3, stride-1, padding-1 convolution of ``net`` run by ops.conv3x3 (in place; the same parameters).
    In the FID Inception about a fifth of the FLOPs (Conv2d_2b_3x3 and the Mixed blocks' 3x3 pairs)."""
    for parent in list(net.modules()):
        for name, conv in list(parent.named_children()):
            if (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
                    and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
                    and conv.padding_mode == "zeros"):
                fast = _Conv3x3(conv.in_channels, conv.out_channels, 3, padding=1, bias=conv.bias is not None,
                                device=conv.weight.device, dtype=conv.weight.dtype)
                fast.weight, fast.bias = conv.weight, conv.bias
                setattr(parent, name, fast)
    return net


class FeatureNet(nn.Module):
    """uint8 NHWC images -> (N, dims) features, as pytorch-fid takes them (ToTensor's x / 255, its network,
    a global average pool where the layer is spatial). ``fast`` folds the batch norms, runs the 3x3 stride-1
    convolutions by Winograd (``winograd_convs_``) and runs channels-last."""

    def __init__(self, dims: int = 2048, weights: str | dict | None = None, device=None, fast: bool = True):
        super().__init__()
        self.dims = dims
        net = inception_network(dims, weights)
        if fast:
            net = winograd_convs_(fold_batch_norms_(net))
        self.net = net.to(device or "cpu")
        if fast:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.fast = fast
        for p in self.net.parameters():
            p.requires_grad_(False)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"FeatureNet: expected uint8 (N, H, W, 3) images, got {images.dtype} "
                             f"{tuple(images.shape)}")
        device = next(self.net.parameters()).device
        x = images.to(device).permute(0, 3, 1, 2).float() / 255.0
        if self.fast:
            x = x.contiguous(memory_format=torch.channels_last)
        else:
            x = x.contiguous()
        feats = self.net(x)[0]
        if feats.shape[2:] != (1, 1):
            feats = F.adaptive_avg_pool2d(feats, (1, 1))
        return feats.flatten(1)


# --- inputs: an images .npz, a folder, or a statistics .npz ---------------------------------------------------


class ImageSet:
    """Images read in batches: ``len``, ``size`` (H, W) and ``batches(start, stop, batch_size)`` yielding uint8
    (n, H, W, 3) arrays (grey images repeated to RGB, as PIL's convert("RGB") does)."""

    path: str
    size: tuple[int, int]

    def __len__(self) -> int:
        raise NotImplementedError

    def batches(self, start: int, stop: int, batch_size: int) -> Iterator[np.ndarray]:
        raise NotImplementedError


def _rgb(arr: np.ndarray) -> np.ndarray:
    return np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr


class NpzImages(ImageSet):
    """``arr_0`` of an .npz read straight from the archive member, a batch at a time (stored or deflated)."""

    def __init__(self, path: str):
        self.path = path
        try:
            with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
                self._shape, self._fortran, dtype, self._offset = _npy_header(f)
        except (OSError, zipfile.BadZipFile, KeyError, ValueError) as exc:
            raise FIDError(f"{path}: not a readable images .npz ({exc})") from None
        shape = self._shape
        if dtype != np.uint8:
            raise FIDError(f"{path}: arr_0 must be uint8 images, got {dtype}")
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3)):
            raise FIDError(f"{path}: arr_0 must be (N, H, W) or (N, H, W, 1|3) images, got {shape}")
        if self._fortran:
            raise FIDError(f"{path}: arr_0 is stored in Fortran order; save it C-contiguous")
        self.size = (shape[1], shape[2])
        self._per_image = int(np.prod(shape[1:]))

    def __len__(self) -> int:
        return self._shape[0]

    def batches(self, start, stop, batch_size):
        with zipfile.ZipFile(self.path) as z, z.open("arr_0.npy") as f:
            f.seek(self._offset + start * self._per_image)
            for i in range(start, stop, batch_size):
                n = min(batch_size, stop - i)
                raw = f.read(n * self._per_image)
                if len(raw) != n * self._per_image:
                    raise FIDError(f"{self.path}: arr_0 ends early (truncated file)")
                arr = np.frombuffer(raw, np.uint8).reshape(n, *self._shape[1:3], -1)
                yield _rgb(arr)


def _npy_header(f) -> tuple[tuple, bool, np.dtype, int]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"npy format version {version} is not read here")
    return shape, fortran, dtype, f.tell()


class FolderImages(ImageSet):
    """A folder's images (pytorch-fid's extensions, sorted), decoded by PIL as pytorch-fid decodes them. Every
    image's size is read from its header before any work: a folder of mixed sizes is refused."""

    def __init__(self, path: str):
        from PIL import Image

        _, fid_score = _pytorch_fid()
        self.path = path
        names = sorted(n for n in os.listdir(path) if n.rsplit(".", 1)[-1].lower() in fid_score.IMAGE_EXTENSIONS)
        if not names:
            raise FIDError(f"{path}: the folder holds no images ({', '.join(sorted(fid_score.IMAGE_EXTENSIONS))})")
        self.files = [os.path.join(path, n) for n in names]
        sizes = {}
        for file in self.files:
            try:
                with Image.open(file) as im:
                    sizes.setdefault((im.height, im.width), file)
            except OSError as exc:
                raise FIDError(f"{file}: not a readable image ({exc})") from None
            if len(sizes) > 1:
                (a, fa), (b, fb) = sizes.items()
                raise FIDError(f"{path}: its images differ in size ({fa} is {a[0]}x{a[1]}, {fb} is {b[0]}x{b[1]})")
        self.size = next(iter(sizes))

    def __len__(self) -> int:
        return len(self.files)

    def batches(self, start, stop, batch_size):
        from PIL import Image

        for i in range(start, stop, batch_size):
            batch = []
            for file in self.files[i:min(i + batch_size, stop)]:
                with Image.open(file) as im:
                    batch.append(np.asarray(im.convert("RGB")))
            yield np.stack(batch)


class ArrayImages(ImageSet):
    """Images already in memory: a uint8 (N, H, W[, 1|3]) array or tensor."""

    def __init__(self, images, name: str = "images"):
        arr = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[-1] not in (1, 3)):
            raise FIDError(f"{name}: expected uint8 (N, H, W) or (N, H, W, 1|3) images, got {arr.dtype} "
                           f"{arr.shape}")
        self.path, self.arr = name, arr if arr.ndim == 4 else arr[..., None]
        self.size = tuple(self.arr.shape[1:3])

    def __len__(self) -> int:
        return len(self.arr)

    def batches(self, start, stop, batch_size):
        for i in range(start, stop, batch_size):
            yield _rgb(self.arr[i:min(i + batch_size, stop)])


def read_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a statistics .npz, checked for shape and finiteness."""
    with np.load(path) as f:
        if "mu" not in f or "sigma" not in f:
            raise FIDError(f"{path}: neither images (arr_0) nor statistics (mu and sigma): its arrays are "
                           f"{', '.join(f.files) or 'none'}")
        mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    _check_stats(mu, sigma, path)
    return mu, sigma


def _check_stats(mu, sigma, name):
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise FIDError(f"{name}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise FIDError(f"{name}: the statistics are not finite")


def open_input(path: str) -> ImageSet | tuple[np.ndarray, np.ndarray]:
    """An FID input: an ImageSet, or (mu, sigma) for a statistics file."""
    if os.path.isdir(path):
        return FolderImages(path)
    if not os.path.exists(path):
        raise FIDError(f"{path}: no such file or folder")
    try:
        with zipfile.ZipFile(path) as z:
            members = z.namelist()
    except (OSError, zipfile.BadZipFile):
        raise FIDError(f"{path}: not an .npz (images in arr_0, or mu and sigma) nor a folder") from None
    if "arr_0.npy" in members:
        return NpzImages(path)
    try:
        return read_stats(path)
    except (OSError, ValueError) as exc:
        if isinstance(exc, FIDError):
            raise
        raise FIDError(f"{path}: not a readable statistics .npz ({exc})") from None


# --- statistics and distance ----------------------------------------------------------------------------------


def statistics(images, *, dims: int = 2048, batch_size: int = 50, device=None, weights=None,
               network: FeatureNet | None = None, dist: Dist | None = None,
               progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma): the mean and covariance (float64, as pytorch-fid's np.mean / np.cov) of the Inception
    features of ``images`` (a path to an images .npz or a folder, an ImageSet, or a uint8 NHWC array). Streams
    in batches; under torchrun (``dist``) each process takes a contiguous share and the sums are reduced."""
    source = images if isinstance(images, ImageSet) else (
        _as_image_set(images) if isinstance(images, (str, os.PathLike)) else ArrayImages(images))
    if len(source) < 2:
        raise FIDError(f"{source.path}: FID needs at least 2 images for a covariance, got {len(source)}")
    if batch_size < 1:
        raise FIDError(f"batch_size must be positive, got {batch_size}")
    net = network or FeatureNet(dims, weights, device)
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    n = len(source)
    start, stop = n * rank // world, n * (rank + 1) // world
    dev = next(net.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=dev)
    s1 = torch.zeros(net.dims, dtype=torch.float64, device=dev)
    s2 = torch.zeros(net.dims, net.dims, dtype=torch.float64, device=dev)
    from tqdm import tqdm

    with tqdm(total=stop - start, desc=f"features of {source.path}", unit="img", file=sys.stderr,
              disable=not (progress and rank == 0)) as bar:
        for batch in source.batches(start, stop, batch_size):
            f = net(torch.from_numpy(np.ascontiguousarray(batch))).double()
            total += f.shape[0]
            s1 += f.sum(0)
            s2 += f.T @ f
            bar.update(f.shape[0])
    if world > 1:
        import torch.distributed as tdist

        for t in (total, s1, s2):
            tdist.all_reduce(t)
    mu = (s1 / total).cpu().numpy()
    sigma = ((s2 - total * torch.outer(s1 / total, s1 / total)) / (total - 1)).cpu().numpy()
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise FIDError(f"{source.path}: the Inception features are not finite (a corrupt image or weights)")
    return mu, sigma


def _as_image_set(path) -> ImageSet:
    got = open_input(os.fspath(path))
    if not isinstance(got, ImageSet):
        raise FIDError(f"{path}: a statistics file, not images")
    return got


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """pytorch-fid's calculate_frechet_distance, after checking that the two statistics fit each other."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    _check_stats(mu1, sigma1, "the first statistics")
    _check_stats(mu2, sigma2, "the second statistics")
    if mu1.shape != mu2.shape:
        raise FIDError(f"the statistics have different feature sizes ({len(mu1)} and {len(mu2)})")
    _, fid_score = _pytorch_fid()
    return float(fid_score.calculate_frechet_distance(mu1, sigma1, mu2, sigma2, eps))


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
    """A statistics .npz (mu, sigma) that pytorch-fid reads, written atomically."""
    def write(tmp):
        buf = io.BytesIO()
        np.savez_compressed(buf, mu=mu, sigma=sigma)
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())

    atomic_write(path, write)


# --- the command ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_fast.fid", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="an images .npz (arr_0, uint8 NHWC), an image folder, or a statistics .npz (mu, sigma); "
                        "two inputs: their FID; one input with --save-stats: its statistics")
    p.add_argument("--save-stats", metavar="S.npz", default=None,
                   help="write the one input's statistics (mu, sigma) to S.npz, which pytorch-fid reads")
    p.add_argument("--batch-size", type=int, default=50, help="images per network call")
    p.add_argument("--dims", type=int, default=2048, choices=DIMS, help="the Inception feature layer's size")
    p.add_argument("--inception-weights", metavar="PATH", default=None,
                   help=f"the FID Inception weights (default: pytorch-fid's cache, {default_weights_path()})")
    p.add_argument("--allow-different-sizes", action="store_true",
                   help="compare image sets of different sizes (each image is resized to 299x299 as pytorch-fid "
                        "does); refused by default, since the score then measures the resize as well")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _check_save_path(path: str) -> None:
    if os.path.isdir(path):
        raise FIDError(f"--save-stats {path}: a folder; name a .npz file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FIDError(f"--save-stats {path}: its folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise FIDError(f"--save-stats {path}: its folder {parent} is not writable")


def run(args) -> None:
    inputs = [open_input(p) for p in args.inputs]  # every input checked before any feature pass
    images = [(p, x) for p, x in zip(args.inputs, inputs, strict=True) if isinstance(x, ImageSet)]
    for path, x in images:
        if len(x) < 2:
            raise FIDError(f"{path}: FID needs at least 2 images for a covariance, got {len(x)}")
    if len(images) == 2 and images[0][1].size != images[1][1].size and not args.allow_different_sizes:
        (pa, a), (pb, b) = images
        raise FIDError(f"{pa} is {a.size[0]}x{a.size[1]} and {pb} is {b.size[0]}x{b.size[1]}: an FID across sizes "
                       "measures the resize as well; pass --allow-different-sizes to compare them (each image "
                       "resized to 299x299, as pytorch-fid does)")
    for path, x in zip(args.inputs, inputs, strict=True):
        if not isinstance(x, ImageSet) and len(x[0]) != args.dims:
            raise FIDError(f"{path}: its statistics are {len(x[0])}-d, not --dims {args.dims}")
    _pytorch_fid()
    dist = Dist(args.device) if images else None
    net = FeatureNet(args.dims, args.inception_weights, dist.device) if images else None
    try:
        results = []
        for x in inputs:
            if isinstance(x, ImageSet):
                results.append(statistics(x, batch_size=args.batch_size, network=net, dist=dist,
                                          progress=not args.no_progress))
            else:
                results.append(x)
        if dist is not None and not dist.main:
            return
        if args.save_stats:
            save_stats(args.save_stats, *results[0])
            what = f"{len(inputs[0])} images of " if images else ""
            print(f"wrote {args.save_stats} (the statistics of {what}{args.inputs[0]})")
        else:
            print(f"FID: {frechet_distance(*results[0], *results[1]):.6f}")
    finally:
        if dist is not None:
            dist.close()


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be positive")
    try:
        parse_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    if args.save_stats is None and len(args.inputs) != 2:
        parser.error("give two inputs (A B) for their FID, or one with --save-stats S.npz")
    if args.save_stats is not None:
        if len(args.inputs) != 1:
            parser.error("--save-stats writes one input's statistics: give one input")
        try:
            _check_save_path(args.save_stats)
        except FIDError as exc:
            parser.error(str(exc))
    return run_command("ddpm_fast.fid", run, args)


if __name__ == "__main__":
    command_exit(main())
