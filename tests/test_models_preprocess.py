"""read_image (EXIF, modes, errors) and preprocess (resize arithmetic, normalisation, batching)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lrp_ray.models import DetrConfig, ImageReadError, preprocess, read_image
from lrp_ray.models.preprocess import resize_shape

RED, BLUE = (255, 0, 0), (0, 0, 255)


def test_exif_orientation_applied(tmp_path: Path) -> None:
    # Stored 80 wide x 48 high: top half red, bottom half blue. Orientation 6 = rotate 90° clockwise to view.
    stored = np.zeros((48, 80, 3), dtype=np.uint8)
    stored[:24] = RED
    stored[24:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    img = read_image(path)
    assert img.shape == (80, 48, 3) and img.dtype == np.uint8
    # After a clockwise turn the former top (red) is on the right, the bottom (blue) on the left.
    left, right = img[:, :16].reshape(-1, 3).mean(0), img[:, -16:].reshape(-1, 3).mean(0)
    assert left[2] > 200 and left[0] < 60
    assert right[0] > 200 and right[2] < 60


def test_modes_convert_to_rgb(tmp_path: Path) -> None:
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((40, 50), 77, dtype=np.uint8), mode="L").save(gray)
    assert (read_image(gray) == 77).all()

    pal = Image.new("P", (40, 40))
    pal.putpalette([10, 20, 30] * 256)
    pal.save(tmp_path / "pal.png")
    assert (read_image(tmp_path / "pal.png") == [10, 20, 30]).all()

    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[:, :20] = (0, 255, 0, 255)  # opaque green
    rgba[:, 20:] = (0, 0, 0, 0)  # fully transparent black -> white background
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    out = read_image(tmp_path / "rgba.png")
    assert (out[:, :20] == [0, 255, 0]).all() and (out[:, 20:] == 255).all()

    Image.new("CMYK", (40, 40), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    cmyk = read_image(tmp_path / "cmyk.jpg")
    assert cmyk.shape == (40, 40, 3) and cmyk.min() > 240

    deep = np.zeros((40, 40), dtype=np.uint16)
    deep[:, :20] = 65535
    deep[:, 20:] = 32896  # 128 * 257
    Image.fromarray(deep).save(tmp_path / "deep.png")
    out16 = read_image(tmp_path / "deep.png")
    assert (out16[:, :20] == 255).all() and (out16[:, 20:] == 128).all()


def _fake_huge_png(path: Path, w: int, h: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_read_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="file not found"):
        read_image(tmp_path / "missing.jpg")
    (tmp_path / "text.jpg").write_text("not an image at all")
    with pytest.raises(ImageReadError, match="not an image"):
        read_image(tmp_path / "text.jpg")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(
        tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(tmp_path / "cut.jpg")
    Image.new("RGB", (100, 20)).save(tmp_path / "small.png")
    assert read_image(tmp_path / "small.png").shape == (20, 100, 3)  # small images are resized like any
    _fake_huge_png(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(ImageReadError, match="decompression bomb") as info:
        read_image(tmp_path / "bomb.png")
    assert "\n" not in str(info.value) and info.value.reason
    with pytest.raises(ImageReadError, match="decompression bomb"):
        read_image(tmp_path / "full.jpg", max_pixels=100 * 100)


def test_resize_arithmetic_by_hand() -> None:
    # 480x640 -> short side 800: scale 5/3, w = 1066.67 -> 1067.
    assert resize_shape(480, 640, 800, 1333) == (800, 1067)
    # 100x1000 -> 800x8000, long side over 1333: x 1333/8000 -> 133.3 x 1333 -> (133, 1333).
    assert resize_shape(100, 1000, 800, 1333) == (133, 1333)
    # Portrait 375x250 to 320 (cap 512): 480x320; 333x500 -> 320 x 480.48 -> 480.
    assert resize_shape(375, 250, 320, 512) == (480, 320)
    assert resize_shape(333, 500, 320, 512) == (320, 480)
    # Halves round up (int(x + 0.5)), not to even as round() would: 200x301 -> 100 x 150.5 -> 151.
    assert resize_shape(200, 301, 100, 1000) == (100, 151)
    assert resize_shape(57, 91, 0, 512) == (57, 91)


def test_preprocess_normalises_and_flips_for_bgr() -> None:
    img = np.zeros((40, 60, 3), dtype=np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 200, 100, 50
    cfg = DetrConfig(min_size_test=40, max_size_test=1000, pixel_mean=(10.0, 20.0, 30.0),
                     pixel_std=(2.0, 4.0, 5.0))
    batch = preprocess([img], cfg)
    assert batch.tensor.shape == (1, 3, 40, 60) and batch.input_sizes == [(40, 60)]
    assert torch.allclose(batch.tensor[0, :, 0, 0], torch.tensor([95.0, 20.0, 4.0]))
    bgr = preprocess([img], cfg.model_copy(update={"input_format": "BGR"}))
    assert torch.allclose(bgr.tensor[0, :, 0, 0], torch.tensor([20.0, 20.0, 34.0]))
    assert not batch.mask.any()


def test_batch_equals_single_in_valid_region() -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(0, 255, (50, 90, 3), dtype=np.uint8)
    b = rng.integers(0, 255, (120, 60, 3), dtype=np.uint8)
    cfg = DetrConfig(min_size_test=64, max_size_test=128)
    batch = preprocess([a, b], cfg)
    assert batch.image_sizes == [(50, 90), (120, 60)]
    assert batch.input_sizes == [resize_shape(50, 90, 64, 128), resize_shape(120, 60, 64, 128)]
    assert batch.input_sizes == [(64, 115), (128, 64)]
    assert batch.tensor.shape == (2, 3, 128, 115) and batch.mask.shape == (2, 128, 115)
    for i, img in enumerate((a, b)):
        alone = preprocess([img], cfg)
        h, w = batch.input_sizes[i]
        assert torch.equal(batch.tensor[i, :, :h, :w], alone.tensor[0])
        assert not batch.mask[i, :h, :w].any() and batch.mask[i].sum() == 128 * 115 - h * w
        assert (batch.tensor[i, :, h:, :] == 0).all() and (batch.tensor[i, :, :, w:] == 0).all()


def test_preprocess_matches_pil_bilinear() -> None:
    img = np.random.default_rng(2).integers(0, 255, (30, 45, 3), dtype=np.uint8)
    cfg = DetrConfig(min_size_test=40, max_size_test=100, pixel_mean=(0.0, 0.0, 0.0),
                     pixel_std=(1.0, 1.0, 1.0))
    out = preprocess([img], cfg).tensor[0]
    expect = np.asarray(Image.fromarray(img).resize((60, 40), Image.Resampling.BILINEAR), dtype=np.float32)
    assert torch.equal(out, torch.from_numpy(expect).permute(2, 0, 1))


def test_preprocess_rejects_bad_arrays() -> None:
    with pytest.raises(ValueError, match="uint8"):
        preprocess([np.zeros((40, 40, 3), dtype=np.float32)], DetrConfig())
    with pytest.raises(ValueError, match="HxWx3"):
        preprocess([np.zeros((40, 40, 4), dtype=np.uint8)], DetrConfig())
