"""Training data keeps its precision: 16-bit images, mixed modes converted with one notice, uint16 .npz."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast import train as train_cli
from ddpm_fast.data import DataError, center_crop_resize, load_data, load_image_folder, load_npz

RAMP = np.linspace(0, 65535, 64).round().astype(np.uint16).reshape(8, 8)  # 64 levels, 0..65535


def _png_rgb16(path, arr):
    """A 48-bit RGB PNG (Pillow cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_16_bit_grayscale_keeps_its_levels(tmp_path, ext):
    """A 0..65535 ramp used to become two gray levels (Pillow's convert clips at 255)."""
    Image.fromarray(RAMP).save(tmp_path / f"ramp.{ext}")
    data = load_image_folder(str(tmp_path), channels=1)
    assert data.images.dtype == torch.uint16
    x, _ = data.batch(torch.tensor([0]), "cpu")
    want = torch.from_numpy(RAMP.astype(np.float32) / 32767.5 - 1.0)
    torch.testing.assert_close(x[0, 0], want, rtol=0, atol=1e-6)
    assert x.unique().numel() == 64 and x.min() == -1.0 and x.max() == 1.0
    assert any("16-bit precision" in n for n in data.notes)


def test_8_and_16_bit_images_mix_exactly_and_modes_convert_with_one_notice(tmp_path):
    Image.fromarray(RAMP).save(tmp_path / "a16.png")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "b8.png")
    Image.fromarray(np.full((8, 8, 4), 128, np.uint8), "RGBA").save(tmp_path / "c.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "d.png")
    gray = load_image_folder(str(tmp_path), channels=1)
    x, _ = gray.batch(torch.arange(4), "cpu")
    assert x[1].unique().tolist() == [1.0], "8-bit 255 widens to exactly 65535"
    assert x[2].unique().tolist() == pytest.approx([128 / 127.5 - 1.0], abs=1e-6)
    assert gray.notes == [f"{tmp_path}: 16-bit images kept at 16-bit precision (3 8-bit images widened exactly)",
                          f"{tmp_path}: converted 2 of 4 images to L: 1 RGB, 1 RGBA (alpha dropped)"]
    rgb = load_image_folder(str(tmp_path), channels=3)
    assert rgb.images.shape == (4, 8, 8, 3)
    assert rgb.notes[-1] == f"{tmp_path}: converted 3 of 4 images to RGB: 1 I;16, 1 L, 1 RGBA (alpha dropped)"
    assert torch.equal(rgb.images[0, ..., 0], rgb.images[0, ..., 2])


def test_one_mode_folder_has_no_notes(tmp_path):
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / f"{i}.png")
    data = load_image_folder(str(tmp_path), channels=3)
    assert data.images.dtype == torch.uint8 and data.notes == []


def test_16_bit_color_png_is_read_at_8_bits_and_says_so(tmp_path):
    arr = (np.arange(8 * 8 * 3).reshape(8, 8, 3) * 341).astype(np.uint16)
    _png_rgb16(tmp_path / "c.png", arr)
    data = load_image_folder(str(tmp_path), channels=3)
    assert torch.equal(data.images[0], torch.from_numpy((arr >> 8).astype(np.uint8)))
    assert any("read at 8-bit precision" in n for n in data.notes)


def test_float_images_are_refused(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.float32), "F").save(tmp_path / "f.tif")
    with pytest.raises(DataError, match="f.tif: 32-bit float images have no fixed range"):
        load_image_folder(str(tmp_path), channels=1)


def test_uint16_npz(tmp_path):
    np.savez(tmp_path / "d.npz", arr_0=np.stack([RAMP, RAMP[::-1]])[..., None])
    data = load_npz(str(tmp_path / "d.npz"))
    x, _ = data.batch(torch.tensor([1]), "cpu")
    assert x.unique().numel() == 64 and x.max() == 1.0
    np.savez(tmp_path / "i.npz", arr_0=np.zeros((2, 8, 8), np.int32))
    with pytest.raises(DataError, match=r"arr_0 must be uint8 \(or uint16\) images, got int32"):
        load_npz(str(tmp_path / "i.npz"))


def test_training_on_a_16_bit_folder(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.roll(RAMP, i, axis=1)).save(folder / f"{i}.png")
    assert load_data(str(folder), 8, 3).dtype == torch.uint16
    out = tmp_path / "run"
    assert train_cli.main(["--data", str(folder), "--config", "tiny", "--batch-size", "2", "--num-timesteps", "20",
                           "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "16-bit images kept at 16-bit precision" in err and "converted 4 of 4 images to RGB: 4 I;16" in err
    assert (out / "model" / "config.json").exists()


def _guided_diffusion_crop(img, size):
    """guided-diffusion's center_crop_arr on a Pillow image (the reference for center_crop_resize)."""
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.array(img)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y:y + size, x:x + size]


@pytest.mark.parametrize("hw", [(40, 72), (9, 8), (8, 8), (33, 17)])
def test_center_crop_resize_matches_guided_diffusion(hw):
    rng = np.random.default_rng(hw[0])
    yy, xx = np.mgrid[0:hw[0], 0:hw[1]]
    arr = np.stack([(yy * 7 + xx * 3) % 256, (xx * 11) % 256, rng.integers(0, 256, hw)], -1).astype(np.uint8)
    got = center_crop_resize(arr, 8)
    want = _guided_diffusion_crop(Image.fromarray(arr), 8)
    assert got.shape == want.shape == (8, 8, 3) and got.dtype == np.uint8
    # Pillow's 8-bit resampler rounds after each stage (halving, bicubic); ours rounds once, in float32.
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 2 and diff.mean() <= 1.0


def test_folder_of_other_sizes_is_resized_with_one_notice(tmp_path):
    Image.fromarray(np.full((8, 8, 3), 10, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((24, 16, 3), 200, np.uint8)).save(tmp_path / "b.png")
    Image.fromarray(np.full((16, 32, 3), 90, np.uint8)).save(tmp_path / "c.png")
    data = load_image_folder(str(tmp_path), 3, 8)
    assert torch.equal(data.images, load_data(str(tmp_path), 8, 3).get(torch.arange(3)))  # lazy == in memory
    assert data.images.shape == (3, 8, 8, 3)
    assert data.images[1].unique().tolist() == [200] and data.images[2].unique().tolist() == [90]
    assert data.notes == [f"{tmp_path}: resized 2 of 3 images to 8x8 (box halving, bicubic, center crop): "
                          "1 16x24, 1 32x16"]
    with pytest.raises(DataError, match="images of mixed sizes"):
        load_image_folder(str(tmp_path), 3)  # without a target size, sizes must agree


def test_resizing_keeps_16_bit_precision(tmp_path):
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "r.png")
    data = load_image_folder(str(tmp_path), 1, 8)
    assert data.images.dtype == torch.uint16 and data.images.unique().numel() == 64
