"""The atlas's image work: heatmap crops and overlays (numpy + Pillow, no figure per picture).

Work arrives as :class:`MapTask`: one Parquet file (or one layer of the conditional maps), whose token
maps of some rows are read once and drawn as crops around where each map is concentrated, or as
whole-image overlays. :func:`run_tasks` runs tasks in this process or in a process pool; each worker
keeps a bounded cache of decoded, downsized images. A task writes its files atomically and returns how many
it wrote and which images it could not read.
"""

from __future__ import annotations

import io
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["MapJob", "MapTask", "TaskResult", "run_tasks", "overlay_rgb", "crop_window",
           "WORK_PX", "CROP_PX", "FULL_PX"]

WORK_PX = 512
"""Longest side of the working copy of an image (overlays are drawn at this size, then cropped)."""
CROP_PX = 144
"""Side of a reference-image crop (square)."""
FULL_PX = 256
"""Width of a whole-image overlay (the gallery of a feature's every image)."""
WEBP_QUALITY = 80


@dataclass
class MapJob:
    """One picture: the token map of row ``key`` on image ``image``, saved to ``dest``."""

    key: tuple
    dest: str                           # path relative to the atlas folder
    image: str                          # stored image name (lrp_ray.results.names)
    image_hw: tuple[int, int]
    grid_hw: tuple[int, int]
    input_hw: tuple[int, int] | None = None
    stride: int | None = None
    mode: str = "crop"                  # "crop" | "full"
    box: tuple[float, float, float, float] | None = None  # xyxy in original pixels (a detection)
    kind: str = "token"                 # "token" (one value per token) | "pixel" (a block-summed pixel map)


@dataclass
class MapTask:
    """The jobs whose maps live in one Parquet file. ``source``: ``relevance`` (key: image, feature,
    query), ``concept_maps`` (image, query, module, layer, feature) or ``detections`` (image, query,
    class_id)."""

    path: str
    source: str
    jobs: list[MapJob] = field(default_factory=list)


@dataclass
class TaskResult:
    written: int = 0
    missing_images: set[str] = field(default_factory=set)
    failed: list[str] = field(default_factory=list)


_KEYS = {"relevance": ("image", "feature", "query"),
         "concept_maps": ("image", "query", "module", "layer", "feature"),
         "detections": ("image", "query", "class_id"),
         "pixels": ("image", "feature", "query")}


# ------------------------------------------------------------------------------------------ pictures
_LUT: np.ndarray | None = None


def _lut() -> np.ndarray:
    global _LUT
    if _LUT is None:
        import matplotlib

        _LUT = (matplotlib.colormaps["RdBu_r"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.float32)
    return _LUT


def _extent(job: MapJob) -> tuple[float, float]:
    """Original-image pixels covered by the token grid (see ``lrp_ray.viz.heatmaps.token_extent``)."""
    h, w = job.image_hw
    gh, gw = job.grid_hw
    if job.kind == "pixel":  # blocks of f x f original pixels; the last ones may reach past the image
        from lrp_ray.viz.heatmaps import pixel_extent

        return pixel_extent((h, w), (gh, gw))
    if job.input_hw is None or not job.stride:
        return float(h), float(w)
    ih, iw = job.input_hw
    return gh * job.stride * h / max(ih, 1), gw * job.stride * w / max(iw, 1)


def _colorize(base: np.ndarray, m: np.ndarray, lim: float) -> np.ndarray:
    """The map ``m`` (same size as ``base``) over ``base``: diverging colours centred at zero, opacity
    growing with |relevance|, so the image stays visible where the map is near zero."""
    x = np.clip(m / lim, -1.0, 1.0)
    color = _lut()[np.round((x + 1.0) * 127.5).astype(np.int32)]
    alpha = (0.8 * np.sqrt(np.abs(x)))[..., None]
    under = base.astype(np.float32) * 0.85 + 0.15 * 128.0
    return np.clip(under * (1 - alpha) + color * alpha, 0, 255).astype(np.uint8)


def _limit(token_map: np.ndarray) -> float:
    """The colour scale's end: the largest |value| of a token map; for a pixel map (many cells, a few
    extreme ones) its 99.5th percentile, so that one hot pixel does not wash the rest out."""
    a = np.abs(token_map[np.isfinite(token_map)]) if token_map.size else np.zeros(0)
    if not a.size:
        return 1.0
    lim = float(np.percentile(a, 99.5)) if a.size > 4096 else float(a.max())
    lim = lim if lim > 0 else float(a.max())
    return lim if lim > 0 and math.isfinite(lim) else 1.0


def overlay_rgb(img: np.ndarray, token_map: np.ndarray, job: MapJob) -> np.ndarray:
    """The map over the whole (working-size) image."""
    h, w = img.shape[:2]
    return _region(img, token_map, job, (0, 0, h, w), (w, h))


def _region(img: np.ndarray, token_map: np.ndarray, job: MapJob, window: tuple[int, int, int, int],
            size_wh: tuple[int, int]) -> np.ndarray:
    """The overlay of one window ``(y0, x0, y1, x1)`` of the working image, drawn directly at
    ``size_wh``: only the output's pixels are coloured (the map is resampled from the token grid with
    the window as its source box)."""
    from PIL import Image

    h, w = img.shape[:2]
    y0, x0, y1, x1 = window
    ow, oh = size_wh
    base = np.asarray(Image.fromarray(img).resize((ow, oh), Image.Resampling.BILINEAR, box=(x0, y0, x1, y1)))
    gh, gw = token_map.shape
    ext_h, ext_w = _extent(job)
    scale = w / max(job.image_hw[1], 1)                      # working pixels per original pixel
    ty, tx = gh / (ext_h * scale), gw / (ext_w * scale)      # tokens per working pixel
    fm = Image.fromarray(np.ascontiguousarray(token_map, dtype=np.float32), mode="F")
    m = np.asarray(fm.resize((ow, oh), Image.Resampling.BILINEAR,
                             box=(x0 * tx, y0 * ty, min(x1 * tx, gw), min(y1 * ty, gh))))
    return _colorize(base, m, _limit(token_map))


def crop_window(token_map: np.ndarray, job: MapJob, hw: tuple[int, int], min_frac: float = 0.3
                ) -> tuple[int, int, int, int]:
    """A square ``(y0, x0, y1, x1)`` (working-image pixels) around where the map is concentrated: the
    connected region of tokens at >= 35 % of the (3x3-smoothed) positive peak, padded by a token, at least
    ``min_frac`` of the shorter image side."""
    from scipy import ndimage

    h, w = hw
    m = np.nan_to_num(np.asarray(token_map, np.float64))
    p = np.clip(m, 0, None)
    if p.sum() <= 0:
        p = np.abs(m)
    gh, gw = m.shape
    ext_h, ext_w = _extent(job)
    sy, sx = ext_h * h / max(job.image_hw[0], 1) / gh, ext_w * w / max(job.image_hw[1], 1) / gw
    if p.max() <= 0:
        r0, r1, c0, c1 = 0, gh - 1, 0, gw - 1
    else:
        s = ndimage.uniform_filter(p, size=3, mode="constant")
        peak = np.unravel_index(int(np.argmax(s)), s.shape)
        labels, _ = ndimage.label(s >= 0.35 * s[peak])
        rr, cc = np.nonzero(labels == labels[peak])
        r0, r1, c0, c1 = rr.min() - 1, rr.max() + 1, cc.min() - 1, cc.max() + 1
    y0, y1, x0, x1 = r0 * sy, (r1 + 1) * sy, c0 * sx, (c1 + 1) * sx
    side = max(y1 - y0, x1 - x0, min_frac * min(h, w))
    side = int(round(min(side, h, w)))
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    top = int(round(min(max(cy - side / 2, 0), h - side)))
    left = int(round(min(max(cx - side / 2, 0), w - side)))
    return top, left, top + side, left + side


def _draw_box(rgb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    from PIL import Image, ImageDraw

    im = Image.fromarray(rgb)
    d = ImageDraw.Draw(im)
    x0, y0, x1, y1 = box
    d.rectangle([x0, y0, x1, y1], outline=(0, 0, 0), width=2)
    d.rectangle([x0 + 2, y0 + 2, x1 - 2, y1 - 2], outline=(255, 255, 0), width=1)
    return np.asarray(im)


def picture(img: np.ndarray, token_map: np.ndarray, job: MapJob) -> np.ndarray:
    """The RGB picture of a job: a ``CROP_PX`` square around where the map is concentrated, or the whole
    image ``FULL_PX`` wide; a detection's box drawn on top."""
    h, w = img.shape[:2]
    if job.mode == "full":
        window = (0, 0, h, w)
        size = (FULL_PX, max(1, round(h * FULL_PX / max(w, 1))))
    else:
        window = crop_window(token_map, job, (h, w))
        size = (CROP_PX, CROP_PX)
    rgb = _region(img, token_map, job, window, size)
    if job.box is not None:
        y0, x0, y1, x1 = window
        scale = w / max(job.image_hw[1], 1)
        sx, sy = size[0] / max(x1 - x0, 1), size[1] / max(y1 - y0, 1)
        bx0, by0, bx1, by1 = (float(v) * scale for v in job.box)
        rgb = _draw_box(rgb, ((bx0 - x0) * sx, (by0 - y0) * sy, (bx1 - x0) * sx, (by1 - y0) * sy))
    return rgb


# -------------------------------------------------------------------------------------------- workers
_IMAGES: OrderedDict[tuple[str, str], np.ndarray | None] = OrderedDict()
_IMAGE_CACHE = 256


def _read_small(path: Path) -> np.ndarray | None:
    """An image as RGB uint8 with its EXIF orientation, at most ``WORK_PX`` on its longer side (JPEGs are
    decoded at a reduced scale); None when it cannot be read. Pillow only: workers never import torch."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            if im.width * im.height > 200_000_000:
                return None
            im.draft("RGB", (WORK_PX, WORK_PX))
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:  # noqa: BLE001  (a malformed EXIF block: keep the pixels as stored)
                pass
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, rgba)
            im = im.convert("RGB")
            im.thumbnail((WORK_PX, WORK_PX), Image.Resampling.BILINEAR)
            return np.asarray(im)
    except Exception:  # noqa: BLE001  (missing, corrupt, not an image)
        return None


def _working_image(root: str, name: str, hw: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """The image at working size (cached); a gray canvas of its size when it cannot be read or is not the
    image the row was computed on (another aspect ratio)."""
    key = (root, name)
    if key in _IMAGES:
        _IMAGES.move_to_end(key)
        img = _IMAGES[key]
    else:
        from lrp_ray.results import image_path

        img = _read_small(image_path(root, name)) if root else None
        _IMAGES[key] = img
        if len(_IMAGES) > _IMAGE_CACHE:
            _IMAGES.popitem(last=False)
    if img is not None and abs(img.shape[0] / max(img.shape[1], 1) - hw[0] / max(hw[1], 1)) > 0.05:
        img = None
    if img is None:
        wh, ww = _work_hw(hw)
        return np.full((wh, ww, 3), 170, np.uint8), False
    return img, True


def _work_hw(hw: tuple[int, int]) -> tuple[int, int]:
    h, w = hw
    s = min(1.0, WORK_PX / max(h, w, 1))
    return max(1, round(h * s)), max(1, round(w * s))


def _save_webp(rgb: np.ndarray, path: Path) -> None:
    from PIL import Image

    from lrp_ray.results import atomic_path

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="WEBP", quality=WEBP_QUALITY, method=2)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def _norm_key(values: Iterable) -> tuple:
    return tuple(None if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in values)


def _read_maps(task: MapTask) -> dict[tuple, np.ndarray]:
    """The token maps of the task's rows, by key (the first row of a duplicated key wins)."""
    import pyarrow.compute as pc

    keys = _KEYS[task.source]
    images = sorted({j.key[0] for j in task.jobs})
    if task.source == "concept_maps":
        from .detect import Detections

        module, layer = task.jobs[0].key[2], task.jobs[0].key[3]
        feats = sorted({j.key[4] for j in task.jobs})
        df = Detections(out=Path(task.path)).concept_maps(
            [*keys, "token_map"], filters=[("module", "=", module), ("layer", "=", int(layer)),
                                           ("feature", "in", feats), ("image", "in", images)])
        rows = [] if df is None else zip(*(df[k].tolist() for k in keys), df["token_map"], strict=True)
        pairs = ((tuple(r[:-1]), np.asarray(r[-1], np.float32)) for r in rows)
    else:
        flt = pc.field("image").isin(images)
        if "feature" in keys:
            flt = flt & pc.field("feature").isin(sorted({j.key[keys.index("feature")] for j in task.jobs}))
        if task.source == "relevance":
            from lrp_ray.results import read_parts

            t = read_parts([Path(task.path)], [*keys, "token_map"], flt)
        elif task.source == "pixels":  # a part of OUT/pixels: the map on the original image's grid
            import pyarrow.parquet as pq

            t = pq.read_table(task.path, columns=[*keys, "pixel_map"], filters=flt)
            t = t.rename_columns([*keys, "token_map"])
        else:
            from .detect import Detections

            df = Detections(out=Path(task.path)).detection_maps(filters=[("image", "in", images)])
            import pyarrow as pa

            t = pa.Table.from_pandas(df, preserve_index=False) if df is not None else None
        if t is None:
            return {}
        cols = [t.column(k).to_pylist() for k in keys]
        maps = t.column("token_map")
        pairs = ((key, np.asarray(maps[i].values.to_numpy(zero_copy_only=False), np.float32))
                 for i, key in enumerate(zip(*cols, strict=True)))
    out: dict[tuple, np.ndarray] = {}
    for key, m in pairs:
        key = _norm_key(key)
        if key not in out:
            out[key] = m
    return out


def _run_map_task(task: MapTask, root: str, atlas: str) -> TaskResult:
    res = TaskResult()
    maps = _read_maps(task)
    for job in task.jobs:
        m = maps.get(_norm_key(job.key))
        if m is None or m.size != job.grid_hw[0] * job.grid_hw[1]:
            res.failed.append(f"{job.dest}: no token map for {job.key}")
            continue
        img, ok = _working_image(root, job.image, job.image_hw)
        if not ok:
            res.missing_images.add(job.image)
        _save_webp(picture(img, m.reshape(job.grid_hw), job), Path(atlas) / job.dest)
        res.written += 1
    return res


def _run_batch(batch: list, root: str, atlas: str) -> TaskResult:
    total = TaskResult()
    for task in batch:
        try:
            r = _run_map_task(task, root, atlas)
        except Exception as exc:  # noqa: BLE001  (one bad file must not stop the atlas)
            r = TaskResult(failed=[f"{task.path}: {type(exc).__name__}: {exc}"])
        total.written += r.written
        total.missing_images |= r.missing_images
        total.failed += r.failed
    return total


def default_workers() -> int:
    """Processes for the image work: the CPUs this process may use, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def run_tasks(tasks: list[MapTask], images_root: str | None, atlas_dir: Path, workers: int = 0,
              progress: Callable[[int, int], None] | None = None) -> TaskResult:
    """Run map tasks: here (``workers`` <= 1) or in a pool of ``workers`` processes
    (spawned: no state of this process is shared). Returns the summed result."""
    root, atlas = str(images_root or ""), str(atlas_dir)
    batches = [[t] for t in tasks]
    total = TaskResult()

    def add(r: TaskResult) -> None:
        total.written += r.written
        total.missing_images |= r.missing_images
        total.failed += r.failed

    if workers <= 1 or len(batches) <= 1:
        for i, b in enumerate(batches):
            add(_run_batch(b, root, atlas))
            if progress:
                progress(i + 1, len(batches))
        return total
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_run_batch, b, root, atlas) for b in batches]
        for i, f in enumerate(as_completed(futures)):
            add(f.result())
            if progress:
                progress(i + 1, len(batches))
    return total
