"""Deterministic generator of the demo's synthetic detection scenes.

Every scene is a pure function of its integer index: the RNG is seeded with ``(SALT, index)``, so scene
``i`` is identical on every machine and in every run.  Training uses indices ``0 .. N-1``; held-out
evaluation (``evaluate.py``, the faithfulness tests, the shipped sample images) uses indices from
``HELDOUT_START`` upwards, which training never touches.

A scene is an RGB ``uint8`` image of 96-192 px per side (varied aspect ratios) on a noisy, textured
background, with one to three non-overlapping objects:

- class 0 ``car``: a body rectangle, a cabin (trapezoid with a window) and two dark wheels;
- class 1 ``disc``: a filled circle (sometimes with a ring);
- class 2 ``triangle``: a filled triangle;
- class 3 ``bar``: a car-sized, car-shaped rectangle (sometimes with a stripe or a raised block) but no
  wheels and no window: the box alone cannot tell a car from a bar, the wheels and the cabin can.

Boxes are ``xyxy`` in pixels of the returned image (exclusive right/bottom edge, i.e. a box of
``[x0, y0, x1, y1]`` covers pixel columns ``x0 .. x1-1``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES: tuple[str, ...] = ("car", "disc", "triangle", "bar")
CAR, DISC, TRIANGLE, BAR = 0, 1, 2, 3
SALT = 0x5CE7E5
HELDOUT_START = 100_000
MIN_SIDE, MAX_SIDE = 96, 192


@dataclass
class Scene:
    index: int
    image: np.ndarray   # [H, W, 3] uint8 RGB
    boxes: np.ndarray   # [n, 4] float32 xyxy, pixels
    labels: np.ndarray  # [n] int64 class ids (see CLASS_NAMES)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])


def rng_for(index: int) -> np.random.Generator:
    return np.random.default_rng([SALT, int(index)])


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid, bicubically upsampled."""
    gh = max(2, int(round(cells * h / max(h, w))) + 1)
    gw = max(2, int(round(cells * w / max(h, w))) + 1)
    grid = rng.uniform(0, 255, size=(gh, gw)).astype(np.uint8)
    up = Image.fromarray(grid, mode="L").resize((w, h), Image.BICUBIC)
    return np.asarray(up, dtype=np.float32) / 127.5 - 1.0


def _background(rng: np.random.Generator, h: int, w: int, difficulty: float) -> np.ndarray:
    base = rng.uniform(50, 205, size=3)
    img = np.broadcast_to(base, (h, w, 3)).astype(np.float32).copy()
    # Colour blobs (low-frequency), per channel.
    amp = rng.uniform(10, 45) * (0.4 + 0.6 * difficulty)
    for c in range(3):
        img[..., c] += amp * _smooth_noise(rng, h, w, int(rng.integers(2, 6)))
    # A texture: stripes, a checkerboard, a gradient or nothing.
    kind = rng.integers(0, 4)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    tamp = rng.uniform(6, 22) * difficulty
    if kind == 0:
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(6, 24)
        img += (tamp * np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * 2 * np.pi / period))[..., None]
    elif kind == 1:
        period = int(rng.integers(8, 24))
        board = ((xx // period + yy // period) % 2) * 2 - 1
        img += (tamp * board)[..., None]
    elif kind == 2:
        theta = rng.uniform(0, 2 * np.pi)
        ramp = (xx * np.cos(theta) + yy * np.sin(theta)) / max(h, w)
        img += (2.5 * tamp * (ramp - ramp.mean()))[..., None] * rng.uniform(0.5, 1.0, size=3)
    # Pixel noise.
    sigma = rng.uniform(3, 14) * (0.3 + 0.7 * difficulty)
    img += rng.normal(0, sigma, size=img.shape).astype(np.float32)
    return img


def _contrast_colour(rng: np.random.Generator, against: np.ndarray, min_dist: float = 90.0) -> np.ndarray:
    """A random colour at least ``min_dist`` (RGB distance) away from ``against``."""
    best, best_d = None, -1.0
    for _ in range(32):
        col = rng.uniform(0, 255, size=3)
        d = float(np.linalg.norm(col - against))
        if d >= min_dist:
            return col
        if d > best_d:
            best, best_d = col, d
    return best


def _place(rng: np.random.Generator, h: int, w: int, bw: int, bh: int, taken: list[np.ndarray],
           margin: int = 3) -> np.ndarray | None:
    """Top-left corner of a ``bw x bh`` box inside the image not overlapping ``taken`` (+margin)."""
    if bw + 2 >= w or bh + 2 >= h:
        return None
    for _ in range(40):
        x0 = int(rng.integers(1, w - bw - 1))
        y0 = int(rng.integers(1, h - bh - 1))
        box = np.array([x0, y0, x0 + bw, y0 + bh], dtype=np.float32)
        ok = all(box[0] >= t[2] + margin or box[2] + margin <= t[0] or box[1] >= t[3] + margin
                 or box[3] + margin <= t[1] for t in taken)
        if ok:
            return box
    return None


def _draw_car(draw: ImageDraw.ImageDraw, rng: np.random.Generator, box: np.ndarray, body: np.ndarray) -> None:
    x0, y0, x1, y1 = (float(v) for v in box)
    bw, bh = x1 - x0, y1 - y0
    wheel_r = bh * rng.uniform(0.18, 0.24)
    body_bottom = y1 - wheel_r * 0.9
    body_top = y0 + bh * rng.uniform(0.38, 0.48)
    facing_right = rng.random() < 0.5
    # Cabin: a trapezoid on top of the body, offset towards the rear.
    cab_w = bw * rng.uniform(0.42, 0.6)
    rear_gap = bw * rng.uniform(0.08, 0.2)
    cx0 = x0 + rear_gap if facing_right else x1 - rear_gap - cab_w
    cx1 = cx0 + cab_w
    slope = cab_w * rng.uniform(0.12, 0.25)
    body_rgb = tuple(int(v) for v in body)
    cabin = [(cx0, body_top + 1), (cx0 + slope * 0.5, y0), (cx1 - slope, y0), (cx1, body_top + 1)]
    draw.polygon(cabin, fill=body_rgb)
    # Window: lighter, bluish, inside the cabin.
    win = np.clip(np.array([170, 200, 230]) + rng.uniform(-25, 25, size=3), 0, 255)
    inset = max(1.5, (body_top - y0) * 0.22)
    wy0, wy1 = y0 + inset, body_top - inset * 0.4
    if wy1 - wy0 >= 2:
        draw.polygon([(cx0 + inset + slope * 0.3, wy1), (cx0 + inset + slope * 0.5, wy0),
                      (cx1 - inset - slope * 0.8, wy0), (cx1 - inset, wy1)],
                     fill=tuple(int(v) for v in win))
    draw.rectangle([x0, body_top, x1 - 1, body_bottom], fill=body_rgb)
    # Wheels: dark discs with a grey hub.
    tyre = tuple(int(v) for v in rng.uniform(10, 45, size=1).repeat(3))
    hub = tuple(int(v) for v in rng.uniform(120, 190, size=1).repeat(3))
    wy = y1 - wheel_r - 0.5
    for fx in (rng.uniform(0.16, 0.26), rng.uniform(0.74, 0.84)):
        wx = x0 + bw * fx
        draw.ellipse([wx - wheel_r, wy - wheel_r, wx + wheel_r, wy + wheel_r], fill=tyre)
        hr = wheel_r * 0.4
        draw.ellipse([wx - hr, wy - hr, wx + hr, wy + hr], fill=hub)


def _draw_disc(draw: ImageDraw.ImageDraw, rng: np.random.Generator, box: np.ndarray, col: np.ndarray) -> None:
    x0, y0, x1, y1 = (float(v) for v in box)
    draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=tuple(int(v) for v in col))
    if rng.random() < 0.4:
        d = (x1 - x0) * rng.uniform(0.2, 0.32)
        ring = tuple(int(v) for v in np.clip(col * rng.uniform(0.4, 0.7), 0, 255))
        draw.ellipse([x0 + d, y0 + d, x1 - 1 - d, y1 - 1 - d], fill=ring)


def _draw_bar(draw: ImageDraw.ImageDraw, rng: np.random.Generator, box: np.ndarray, col: np.ndarray) -> None:
    x0, y0, x1, y1 = (float(v) for v in box)
    bw, bh = x1 - x0, y1 - y0
    rgb = tuple(int(v) for v in col)
    kind = rng.integers(0, 3)
    if kind == 0:      # a plain block
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=rgb)
    elif kind == 1:    # a lower body with a raised block on top (a car's silhouette without wheels)
        top = y0 + bh * rng.uniform(0.38, 0.48)
        bx0 = x0 + bw * rng.uniform(0.08, 0.3)
        draw.rectangle([bx0, y0, bx0 + bw * rng.uniform(0.4, 0.55), top], fill=rgb)
        draw.rectangle([x0, top, x1 - 1, y1 - 1], fill=rgb)
    else:              # a block with a horizontal stripe
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=rgb)
        stripe = tuple(int(v) for v in np.clip(col * rng.uniform(0.4, 0.7), 0, 255))
        sy = y0 + bh * rng.uniform(0.3, 0.6)
        draw.rectangle([x0, sy, x1 - 1, sy + bh * 0.15], fill=stripe)


def _draw_triangle(draw: ImageDraw.ImageDraw, rng: np.random.Generator, box: np.ndarray,
                   col: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = (float(v) for v in box)
    kind = rng.integers(0, 3)
    if kind == 0:      # apex up
        pts = [(x0, y1 - 1), (x1 - 1, y1 - 1), (x0 + (x1 - x0) * rng.uniform(0.3, 0.7), y0)]
    elif kind == 1:    # apex down
        pts = [(x0, y0), (x1 - 1, y0), (x0 + (x1 - x0) * rng.uniform(0.3, 0.7), y1 - 1)]
    else:              # right-angled
        pts = [(x0, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)]
        if rng.random() < 0.5:
            pts = [(x1 - 1, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)]
    draw.polygon(pts, fill=tuple(int(v) for v in col))
    return box


def generate_scene(index: int, difficulty: float = 1.0, size: tuple[int, int] | None = None) -> Scene:
    """Scene number ``index`` (deterministic).

    ``difficulty`` in [0, 1] scales background texture/noise (used for a short easy warm-up at the
    start of training; evaluation and the shipped samples always use 1.0). ``size`` forces ``(h, w)``.
    """
    rng = rng_for(index)
    if size is None:
        h = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
        w = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    else:
        h, w = size
        rng.integers(0, 2, size=2)  # keep the stream aligned with the unforced case
    img = _background(rng, h, w, difficulty)
    n_obj = int(rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25]))
    # At least one car in 70% of the scenes; the others are drawn from all classes.
    labels = [CAR if rng.random() < 0.7 else int(rng.integers(0, len(CLASS_NAMES)))]
    labels += [int(rng.choice(len(CLASS_NAMES), p=[0.35, 0.2, 0.2, 0.25])) for _ in range(n_obj - 1)]
    short = min(h, w)
    boxes: list[np.ndarray] = []
    kept: list[int] = []
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for lab in labels:
        if lab in (CAR, BAR):
            bw = int(round(short * rng.uniform(0.42, 0.62)))
            bh = int(round(bw * rng.uniform(0.55, 0.65)))
        elif lab == DISC:
            bw = bh = int(round(short * rng.uniform(0.2, 0.36)))
        else:
            bw = int(round(short * rng.uniform(0.22, 0.4)))
            bh = int(round(bw * rng.uniform(0.7, 1.2)))
        box = _place(rng, h, w, bw, bh, boxes)
        if box is None:
            continue
        x0, y0, x1, y1 = (int(v) for v in box)
        local = np.asarray(pil, dtype=np.float32)[y0:y1, x0:x1].reshape(-1, 3).mean(0)
        col = _contrast_colour(rng, local)
        if lab == CAR:
            _draw_car(draw, rng, box, col)
        elif lab == DISC:
            _draw_disc(draw, rng, box, col)
        elif lab == BAR:
            _draw_bar(draw, rng, box, col)
        else:
            _draw_triangle(draw, rng, box, col)
        boxes.append(box)
        kept.append(lab)
    out = np.asarray(pil, dtype=np.float32)
    # Mild sensor noise over everything (objects included), then quantise.
    out = out + rng.normal(0, 2.0 + 3.0 * difficulty, size=out.shape)
    image = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return Scene(index=int(index), image=image,
                 boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                 labels=np.asarray(kept, dtype=np.int64))


def heldout_indices(n: int, start: int = HELDOUT_START) -> list[int]:
    """The first ``n`` held-out scene indices (never used for training)."""
    return list(range(start, start + n))
