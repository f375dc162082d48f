"""Reading images and turning them into a normalised, padded DETR input batch (detectron2 test-time path)."""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageBatch", "ImageReadError", "read_image", "preprocess", "resize_shape",
           "MAX_IMAGE_PIXELS"]

MAX_IMAGE_PIXELS = 50_000_000
"""Images with more pixels are refused as possible decompression bombs."""
"""Images with a side shorter than this are refused (nothing left after the stride-32 backbone)."""


class ImageReadError(ValueError):
    """An image file that cannot be used; ``reason`` is a one-line explanation."""

    def __init__(self, reason: str, path: str | Path | None = None) -> None:
        self.reason = reason
        self.path = None if path is None else str(path)
        super().__init__(reason if path is None else f"{path}: {reason}")


@dataclass
class ImageBatch:
    """A preprocessed batch: what the model and the LRP engine consume."""

    tensor: torch.Tensor  # [B,3,H,W] float32, normalised, zero-padded to the batch's max size
    mask: torch.Tensor  # [B,H,W] bool, True = padding
    image_sizes: list[tuple[int, int]]  # original (h, w), after EXIF orientation
    input_sizes: list[tuple[int, int]]  # resized (h, w) before padding

    def __len__(self) -> int:
        return len(self.image_sizes)

    def to(self, device: str | torch.device) -> ImageBatch:
        return ImageBatch(self.tensor.to(device), self.mask.to(device), self.image_sizes, self.input_sizes)


def _to_rgb(im: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        a8 = np.clip(np.round(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(a8[:, :, None], 3, axis=2)
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a = a * 255.0 if a.max(initial=0) <= 1.0 else a
        a8 = np.clip(np.round(a), 0, 255).astype(np.uint8)
        return np.repeat(a8[:, :, None], 3, axis=2)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode in ("LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
    elif mode in ("L", "RGB") and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        canvas = Image.new("RGB", im.size, background)
        canvas.paste(im, mask=im.getchannel("A"))
        im = canvas
    elif im.mode != "RGB":
        im = im.convert("RGB")
    return np.array(im, dtype=np.uint8)


def read_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read an image as RGB uint8 [H,W,3] with its EXIF orientation applied.

    Grayscale, palette, CMYK and 16-bit images are converted to 8-bit RGB (16-bit scaled by 255/65535).
    Transparency is flattened onto a white background. A malformed EXIF block is ignored (no rotation).
    Raises :class:`ImageReadError` for missing,
    unreadable, corrupt or truncated files, non-images and images over ``max_pixels`` (possible
    decompression bombs). Small images are fine: :func:`preprocess` resizes them like detectron2.
    """
    p = Path(path)
    if not p.exists():
        raise ImageReadError("file not found", p)
    if not p.is_file():
        raise ImageReadError("not a regular file", p)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageReadError(f"image too large ({w}x{h} = {w * h} px > {max_pixels}); "
                                         "refused as a possible decompression bomb", p)
                im.load()
                try:
                    im = ImageOps.exif_transpose(im)
                except Exception:  # malformed EXIF block: orientation unknowable, keep pixels as stored
                    pass
                arr = _to_rgb(im)
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(f"refused as a possible decompression bomb ({exc})", p) from None
    except UnidentifiedImageError:
        raise ImageReadError("not an image (format not recognised)", p) from None
    except PermissionError:
        raise ImageReadError("permission denied", p) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        if "truncated" in msg.lower():
            raise ImageReadError(f"truncated image file ({msg})", p) from None
        raise ImageReadError(f"corrupt or unreadable image ({msg})", p) from None
    return arr


def resize_shape(h: int, w: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """detectron2 ``ResizeShortestEdge`` output (h, w): short side to ``short_edge``, long side capped at
    ``max_size``, rounded with ``int(x + 0.5)``. ``short_edge`` 0 keeps the size."""
    if short_edge <= 0:
        return h, w
    scale = short_edge / min(h, w)
    if h < w:
        new_h, new_w = float(short_edge), scale * w
    else:
        new_h, new_w = scale * h, float(short_edge)
    longest = max(new_h, new_w)
    if longest > max_size:
        factor = max_size / longest
        new_h, new_w = new_h * factor, new_w * factor
    return int(new_h + 0.5), int(new_w + 0.5)


def _check_image(img: Any, i: int) -> np.ndarray:
    if not isinstance(img, np.ndarray):
        raise TypeError(f"image {i}: expected a numpy array, got {type(img).__name__}")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image {i}: expected shape HxWx3, got {img.shape}")
    if img.dtype != np.uint8:
        raise ValueError(f"image {i}: expected uint8 RGB, got {img.dtype}")
    if min(img.shape[:2]) < 1:
        raise ValueError(f"image {i}: empty image {img.shape}")
    return img


def preprocess(images: list[np.ndarray], cfg: Any) -> ImageBatch:
    """Resize (shortest edge, PIL bilinear), normalise and pad RGB uint8 images into an :class:`ImageBatch`.

    Channels are flipped to BGR first when ``cfg.input_format`` is "BGR" (PIXEL_MEAN/STD are then in BGR
    order, as detectron2 feeds BGR models). Each image's valid region is the same alone or in a batch.
    """
    if len(images) == 0:
        raise ValueError("preprocess needs at least one image")
    mean = torch.tensor(cfg.pixel_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(cfg.pixel_std, dtype=torch.float32).view(3, 1, 1)
    tensors, image_sizes, input_sizes = [], [], []
    for i, img in enumerate(images):
        img = _check_image(img, i)
        h, w = img.shape[:2]
        nh, nw = resize_shape(h, w, cfg.min_size_test, cfg.max_size_test)
        if (nh, nw) != (h, w):
            img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.Resampling.BILINEAR))
        if cfg.input_format == "BGR":
            img = img[:, :, ::-1]
        t = torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1)
        tensors.append((t - mean) / std)
        image_sizes.append((h, w))
        input_sizes.append((nh, nw))
    max_h = max(s[0] for s in input_sizes)
    max_w = max(s[1] for s in input_sizes)
    batch = torch.zeros((len(tensors), 3, max_h, max_w), dtype=torch.float32)
    mask = torch.ones((len(tensors), max_h, max_w), dtype=torch.bool)
    for i, t in enumerate(tensors):
        _, th, tw = t.shape
        batch[i, :, :th, :tw] = t
        mask[i, :th, :tw] = False
    return ImageBatch(batch, mask, image_sizes, input_sizes)
