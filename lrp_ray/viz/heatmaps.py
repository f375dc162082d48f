"""Relevance heatmaps: token or pixel relevance maps overlaid on their images (PNG, matplotlib Agg).

- :func:`overlay_png` draws one overlay: the image, the token map upsampled to the image (bilinear) or a
  pixel map (``kind="pixel"``, :mod:`lrp_ray.pixels`: on the image grid, block-summed, drawn as is), a
  diverging colormap centred at zero with symmetric limits, a colour bar labelled with the kind of map
  ("token relevance" / "pixel relevance") and a title.
- :func:`write_top_heatmaps` writes, for every (module, layer, feature) of a results folder, the overlays
  of the top-N images by activation and by relevance -- at most ``2 * top_n`` PNGs per feature, never one
  per map.
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # noqa: E402  (headless; must precede pyplot)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402

from lrp_ray.results import atomic_path, image_path  # noqa: E402

log = logging.getLogger(__name__)

__all__ = ["overlay_png", "overlay_figure", "render_overlay", "figure_png", "write_top_heatmaps",
           "select_top_rows", "heatmap_name",
           "opt_int", "int_pair", "row_image_hw", "token_extent", "pixel_extent", "TopRow", "CMAP",
           "MAP_KINDS"]

CMAP = "RdBu_r"
MAP_KINDS = {"token": "token relevance", "pixel": "pixel relevance"}
PIXEL_PERCENTILE = 99.5
"""Pixel maps: colour limits at this percentile of |map| (LRP pixel maps have a few extreme pixels)."""
DEFAULT_WIDTH_PX = 560
DPI = 100


def token_extent(image_hw: tuple[int, int], grid_hw: tuple[int, int],
                 input_hw: tuple[int, int] | None = None, stride: int | None = None) -> tuple[float, float]:
    """Height and width, in original-image pixels, covered by the token grid.

    The backbone's grid is ``ceil(input / stride)`` tokens, so its last row/column can reach past the
    image; with the resized input size and the stride known that overhang is kept exact (and cropped by
    the caller), otherwise the grid is stretched over the image.
    """
    h, w = image_hw
    gh, gw = grid_hw
    if input_hw is None or stride is None:
        return float(h), float(w)
    ih, iw = input_hw
    return gh * stride * h / ih, gw * stride * w / iw


def _as_map(token_map, grid_hw: tuple[int, int] | None) -> np.ndarray:
    m = np.asarray(token_map, dtype=np.float64)
    if m.ndim == 1:
        if grid_hw is None:
            raise ValueError("a flat token map needs grid_hw")
        m = m.reshape(grid_hw)
    if m.ndim != 2:
        raise ValueError(f"token map must be [h, w], got shape {m.shape}")
    return np.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0)


def _layout(image_hw: tuple[int, int], width_px: int) -> tuple[float, float, list[float], list[float]]:
    """Figure size (inches) and axes rectangles (image, colour bar), for a fixed pixel width."""
    h, w = image_hw
    fig_w = width_px / DPI
    img_w_frac, cbar_gap, cbar_w = 0.78, 0.03, 0.035
    left = 0.03
    title_in, bottom_in = 0.55, 0.12
    img_w_in = fig_w * img_w_frac
    img_h_in = img_w_in * h / max(w, 1)
    img_h_in = min(img_h_in, 2.2 * img_w_in)
    fig_h = img_h_in + title_in + bottom_in
    ax_rect = [left, bottom_in / fig_h, img_w_frac, img_h_in / fig_h]
    cb_rect = [left + img_w_frac + cbar_gap, bottom_in / fig_h, cbar_w, img_h_in / fig_h]
    return fig_w, fig_h, ax_rect, cb_rect


def pixel_extent(image_hw: tuple[int, int], map_hw: tuple[int, int]) -> tuple[float, float]:
    """Height and width, in original-image pixels, covered by a pixel map of ``map_hw`` cells: each cell
    sums an ``f x f`` block (``f`` the block side of :func:`lrp_ray.pixels.maps.block_factor`), so the
    last row/column may reach past the image."""
    h, w = image_hw
    ph, pw = max(int(map_hw[0]), 1), max(int(map_hw[1]), 1)
    f = max(math.ceil(h / ph), math.ceil(w / pw), 1)
    if math.ceil(h / f) != ph or math.ceil(w / f) != pw:  # not a block sum of this image: stretch it
        return float(h), float(w)
    return float(ph * f), float(pw * f)


def overlay_figure(image_rgb: np.ndarray, token_map, title: str = "", *,
                   grid_hw: tuple[int, int] | None = None,
                   input_hw: tuple[int, int] | None = None, stride: int | None = None, alpha: float = 0.6,
                   width_px: int = DEFAULT_WIDTH_PX, cmap: str = CMAP, boxes: Sequence[Sequence[float]] = (),
                   kind: str = "token"):
    """A matplotlib Figure with the overlay (caller closes it). See :func:`overlay_png`."""
    if kind not in MAP_KINDS:
        raise ValueError(f"kind must be one of {', '.join(MAP_KINDS)}, got {kind!r}")
    img = np.asarray(image_rgb)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"image must be HxWx3 RGB, got shape {img.shape}")
    h, w = img.shape[:2]
    m = _as_map(token_map, grid_hw)
    if kind == "pixel":
        ext_h, ext_w = pixel_extent((h, w), m.shape)
        lim = float(np.percentile(np.abs(m), PIXEL_PERCENTILE)) if m.size else 0.0
        lim = lim if lim > 0 else (float(np.max(np.abs(m))) if m.size else 0.0)
    else:
        ext_h, ext_w = token_extent((h, w), m.shape, input_hw, stride)
        lim = float(np.max(np.abs(m))) if m.size else 0.0
    lim = lim if lim > 0 and math.isfinite(lim) else 1.0
    fig_w, fig_h, ax_rect, cb_rect = _layout((h, w), width_px)
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=DPI)
    ax = fig.add_axes(ax_rect)
    ax.imshow(img, extent=(0, w, h, 0), interpolation="bilinear")
    # Gray the image slightly so that the colours of the map dominate.
    ax.imshow(np.full((1, 1, 3), 0.5), extent=(0, w, h, 0), alpha=0.25)
    ax.imshow(m, cmap=cmap, vmin=-lim, vmax=lim, alpha=alpha,
              interpolation="bilinear" if kind == "token" else "antialiased", extent=(0, ext_w, ext_h, 0))
    for b in boxes:
        x0, y0, x1, y1 = (float(v) for v in b[:4])
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.5, ec="black", ls="--"))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    cax = fig.add_axes(cb_rect)
    # Colour bar from an opaque mappable: the scale shows the colormap itself, not the blend.
    cb = fig.colorbar(ScalarMappable(norm=Normalize(vmin=-lim, vmax=lim), cmap=cmap), cax=cax)
    cb.ax.tick_params(labelsize=7)
    cb.set_label(MAP_KINDS[kind], fontsize=7)
    cb.formatter.set_powerlimits((-2, 3))
    cb.update_ticks()
    fig.text(0.03, 1 - 0.08 / fig_h, title, ha="left", va="top", fontsize=9, wrap=True)
    return fig


def figure_png(fig, palette: bool = False, colors: int = 128) -> bytes:
    """PNG bytes of a figure (closed afterwards); ``palette``: adaptive ``colors`` palette (~4x smaller)."""
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    if not palette:
        return buf.getvalue()
    from PIL import Image

    im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    out = io.BytesIO()
    im.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        out, format="PNG", optimize=True)
    return out.getvalue()


def render_overlay(image_rgb: np.ndarray, token_map, title: str = "", *, palette: bool = False,
                   **kw) -> bytes:
    """PNG bytes of :func:`overlay_figure` (``palette``: 8-bit palette PNG, for embedding)."""
    return figure_png(overlay_figure(image_rgb, token_map, title, **kw), palette=palette)


def overlay_png(image_rgb: np.ndarray, token_map, path: str | Path, title: str = "", **kw) -> Path:
    """Write one heatmap overlay PNG and return its path.

    ``image_rgb``: the original image, uint8 ``[H, W, 3]``. ``token_map``: the token relevance map
    ``[grid_h, grid_w]`` (or flat with ``grid_hw=``), upsampled bilinearly over the image. The colormap is
    diverging (``RdBu_r``: red positive, blue negative) with symmetric limits ``+-max|map|`` so that white
    is exactly zero; a colour bar shows the scale and ``title`` goes on top. Optional keywords:
    ``input_hw``/``stride`` (exact token footprint), ``alpha``, ``width_px`` (PNG width, default 560),
    ``boxes`` (xyxy boxes drawn dashed), ``kind`` ("token", the default, or "pixel": ``token_map`` is then
    a pixel map on the image grid reduced by block sums (:mod:`lrp_ray.pixels`), drawn without smoothing
    over the blocks it sums, colour limits at the 99.5th percentile of ``|map|``); the colour bar says
    which kind the picture shows.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = render_overlay(image_rgb, token_map, title, **kw)
    with atomic_path(path) as tmp:  # a failed write (disk full) leaves no temp file behind
        tmp.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------- results folder
_SCALAR_COLUMNS = ("module", "layer", "image", "image_h", "image_w", "input_h", "input_w", "grid_h", "grid_w",
                   "stride", "feature", "query", "act_sum", "relevance_total")
RANKINGS = {"act": "act_sum", "rel": "relevance_total"}


@dataclass
class TopRow:
    module: str
    layer: int
    feature: int
    kind: str          # "act" | "rel"
    rank: int          # 1-based
    score: float
    image: str
    query: int | None
    image_hw: tuple[int, int]
    grid_hw: tuple[int, int]
    token_map: np.ndarray | None = None
    fragment: int = -1  # index of its part file in ``lrp_ray.results.part_files``
    row: int = -1       # unused (rows are found by key)
    input_hw: tuple[int, int] | None = None
    stride: int | None = None
    pixel_map: np.ndarray | None = None
    """The row's pixel map (:mod:`lrp_ray.pixels`) where the results folder has one."""


def heatmap_name(module: str, layer: int, feature: int, kind: str, rank: int) -> str:
    return f"{module}_L{int(layer)}_F{int(feature)}_{kind}_{int(rank)}.png"


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", s)


def opt_int(v: object) -> int | None:
    """An int, or None for null/NaN."""
    import pandas as pd

    return None if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)) else int(v)


def int_pair(a: object, b: object) -> tuple[int, int] | None:
    x, y = opt_int(a), opt_int(b)
    return None if x is None or y is None else (x, y)


def row_image_hw(r: Any) -> tuple[int, int]:
    """A row's original image size (rows without one: the area its token grid covers)."""
    hw = int_pair(r.image_h, r.image_w)
    if hw is None:
        step = opt_int(r.stride) or 32
        hw = (int(r.grid_h) * step, int(r.grid_w) * step)
    return hw


def select_top_rows(relevance_dir: str | Path, top_n: int = 3, *, modules: Sequence[str] | None = None,
                    rankings: dict[str, str] | None = None, load_maps: bool = True,
                    max_features: int | None = None) -> list[TopRow]:
    """Top-``top_n`` rows (distinct images) per (module, layer, feature) and ranking of a relevance dataset.

    ``relevance_dir``: a results folder or its ``relevance`` folder (read through :mod:`lrp_ray.results`).
    Reads only the scalar columns of every row, then the ``token_map`` of the chosen rows' part files
    only, so a sweep of any size costs memory for its scalars, not its maps. ``rankings`` maps a kind to
    the column it ranks by (default ``{"act": "act_sum", "rel": "relevance_total"}``); rows are ordered
    by descending score. ``max_features`` keeps only the first features (ascending id) of each
    (module, layer).
    """
    import pyarrow.compute as pc

    from lrp_ray.results import dataset, part_files, table_to_frame

    rankings = dict(rankings or RANKINGS)
    files = part_files(relevance_dir)
    if not files:
        return []
    flt = pc.field("module").isin(list(modules)) if modules else None
    cols = list(dict.fromkeys([*_SCALAR_COLUMNS, *rankings.values()]))
    table = dataset(relevance_dir, files).to_table(columns=[*cols, "__filename"], filter=flt)
    df = table_to_frame(table)
    index = {str(f): i for i, f in enumerate(files)}
    df["frag_id"] = df["__filename"].map(index)
    out: list[TopRow] = []
    for (module, layer), g in df.groupby(["module", "layer"], sort=True):
        feats = sorted(g["feature"].unique())
        if max_features is not None:
            feats = feats[:max_features]
            g = g[g["feature"].isin(feats)]
        for kind, col in rankings.items():
            s = g[np.isfinite(g[col].astype(float))].sort_values([col, "image"], ascending=[False, True],
                                                                  kind="stable")
            s = s.drop_duplicates(["feature", "image"], keep="first")
            s = s.groupby("feature", sort=True).head(top_n)
            for feature, gf in s.groupby("feature", sort=True):
                for rank, r in enumerate(gf.itertuples(index=False), start=1):
                    out.append(TopRow(module=str(module), layer=int(layer), feature=int(feature), kind=kind,
                                      rank=rank, score=float(getattr(r, col)), image=str(r.image),
                                      query=opt_int(r.query), image_hw=row_image_hw(r),
                                      grid_hw=(int(r.grid_h), int(r.grid_w)), fragment=int(r.frag_id),
                                      input_hw=int_pair(r.input_h, r.input_w), stride=opt_int(r.stride)))
    if load_maps:
        _load_maps(files, out)
    return out


def _load_maps(files: Sequence[Path], rows: list[TopRow]) -> None:
    """Fill ``token_map`` of ``rows``: per part file, only the rows of the chosen images and features."""
    import pyarrow.compute as pc

    from lrp_ray.results import read_parts, table_to_frame

    by_frag: dict[int, list[TopRow]] = {}
    for r in rows:
        by_frag.setdefault(r.fragment, []).append(r)
    for fi, rs in by_frag.items():
        flt = (pc.field("image").isin(sorted({r.image for r in rs}))
               & pc.field("feature").isin(sorted({r.feature for r in rs})))
        df = table_to_frame(read_parts([files[fi]], ["image", "feature", "query", "token_map"], flt))
        maps = {(im, int(f), opt_int(q)): m for im, f, q, m in
                zip(df["image"], df["feature"], df["query"], df["token_map"], strict=True)}
        for r in rs:
            r.token_map = np.asarray(maps[(r.image, r.feature, r.query)], dtype=np.float32).reshape(r.grid_hw)


def _load_pixel_maps(out_dir: Path, rows: list[TopRow]) -> None:
    """Set ``pixel_map`` of the rows that have one in ``out_dir/pixels`` (:mod:`lrp_ray.results.pixels`)."""
    from lrp_ray.results.pixels import pixel_files, read_pixel_maps

    if not rows or not pixel_files(out_dir):
        return
    maps = read_pixel_maps(out_dir, {(r.module, r.layer, r.feature, r.image, r.query) for r in rows})
    for r in rows:
        r.pixel_map = maps.get((r.module, r.layer, r.feature, r.image, r.query))


def _read_rgb(path: Path) -> np.ndarray | None:
    try:
        from lrp_ray.models import read_image

        return read_image(path)
    except Exception:  # noqa: BLE001
        try:
            from PIL import Image, ImageOps

            with Image.open(path) as im:
                return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        except Exception:  # noqa: BLE001
            return None


def row_title(r: TopRow) -> str:
    q = "" if r.query is None else f" query {r.query}"
    label = {"act": "activation", "rel": "relevance"}.get(r.kind, r.kind)
    return (f"{r.module} layer {r.layer} feature {r.feature}{q} | top {r.rank} by {label}: "
            f"{r.score:.4g}\n{r.image}")


def group_title(rows: Sequence[TopRow]) -> str:
    """Title of an overlay that is the top of one or more rankings (same module/layer/feature/image/query)."""
    r = rows[0]
    q = "" if r.query is None else f" query {r.query}"
    label = {"act": "activation", "rel": "relevance"}
    tags = ", ".join(f"top {x.rank} by {label.get(x.kind, x.kind)}: {x.score:.4g}" for x in rows)
    return f"{r.module} layer {r.layer} feature {r.feature}{q} | {tags}\n{r.image}"


def write_top_heatmaps(out_dir: str | Path, images_root: str | Path | None = None, top_n: int = 3, *,
                       modules: Sequence[str] | None = None, max_features: int | None = None,
                       width_px: int = DEFAULT_WIDTH_PX, input_size: tuple[int, int] | None = None,
                       stride: int | None = None) -> list[Path]:
    """Write heatmap overlays of the top images of every (module, layer, feature) of a sweep.

    ``out_dir`` is a sweep results folder (read through :mod:`lrp_ray.results`); ``images_root`` is the
    folder the ``image`` column is relative to (default: the manifest's ``images_root``). For each
    (module, layer, feature), the ``top_n`` distinct images with the largest ``act_sum`` ("act") and the
    largest ``relevance_total`` ("rel") get
    ``out_dir/heatmaps/{module}_L{layer}_F{feature}_{act|rel}_{rank}.png`` (rank 1 = highest): the image
    with the upsampled token relevance map (diverging colormap centred at zero, colour bar) and a title
    with module, layer, feature, query, rank and score. So at most ``2 * top_n`` files per feature,
    whatever the number of images. Tokens are placed exactly with each row's ``input_h``/``input_w`` and
    ``stride``; rows without them (older outputs) use ``input_size=(min_size_test, max_size_test)`` and
    ``stride``, else the manifest's model config, else the grid is stretched over the image. Images that
    cannot be read are skipped with a warning. Rows with a pixel map in ``out_dir/pixels``
    (:mod:`lrp_ray.results.pixels`) are drawn from it (colour bar "pixel relevance"), the others from
    their token map ("token relevance"). Returns the written paths.
    """
    from lrp_ray.models.preprocess import resize_shape
    from lrp_ray.results import part_files, read_manifest

    out_dir = Path(out_dir)
    if not part_files(out_dir) and not (out_dir / "relevance").is_dir():
        raise FileNotFoundError(f"no relevance dataset at {out_dir / 'relevance'}")
    if top_n < 1:
        return []
    manifest = read_manifest(out_dir)
    if images_root is None:
        if manifest is None or not manifest.images_root:
            raise FileNotFoundError(f"images_root not given and no manifest in {out_dir} names it")
        images_root = manifest.images_root
    if (input_size is None or not stride) and manifest is not None:
        input_size, stride = manifest.input_geometry()
    rows = select_top_rows(out_dir, top_n, modules=modules, max_features=max_features)
    _load_pixel_maps(out_dir, rows)
    dest = out_dir / "heatmaps"
    dest.mkdir(parents=True, exist_ok=True)
    cache: dict[str, np.ndarray | None] = {}
    written: list[Path] = []
    # The same map is often top by activation and by relevance: render it once, name it under each.
    groups: dict[tuple, list[TopRow]] = {}
    for r in rows:
        groups.setdefault((r.module, r.layer, r.feature, r.image, r.query), []).append(r)
    for rs in groups.values():
        r = rs[0]
        if r.image not in cache:
            if len(cache) > 64:
                cache.clear()
            cache[r.image] = _read_rgb(image_path(images_root, r.image))
        img = cache[r.image]
        if img is None:
            log.warning("heatmaps: cannot read image %s; skipped", r.image)
            continue
        input_hw, step = r.input_hw, r.stride
        if (input_hw is None or step is None) and input_size is not None and stride:
            input_hw, step = resize_shape(img.shape[0], img.shape[1], int(input_size[0]),
                                          int(input_size[1])), stride
        if r.pixel_map is not None:
            data = render_overlay(img, r.pixel_map, group_title(rs), width_px=width_px, kind="pixel")
        else:
            data = render_overlay(img, r.token_map, group_title(rs), input_hw=input_hw, stride=step,
                                  width_px=width_px)
        for x in rs:
            path = dest / _safe(heatmap_name(x.module, x.layer, x.feature, x.kind, x.rank))
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
            written.append(path)
    return sorted(written)
