"""A static, self-contained HTML report of a sweep results folder.

Everything is inline: CSS in a ``<style>`` block, every picture a base64 PNG ``data:`` URI; the page loads
no script, font or stylesheet from anywhere. Sections:

- run metadata (``manifest.json``), the per-(module, layer) totals of ``summary.csv`` and the
  relevance accounting check per module/layer (``relevance_total`` against input + bias + pos + softmax);
- per (module, layer): the feature x input-channel relevance matrix (mean ``channel_relevance`` over the
  layer's rows) and the conservation profile (mean ``profile`` over the rows, as a fraction of the
  target relevance, one point per propagation stage, named by the manifest);
- per feature: its top images by activation and by relevance with heatmap overlays.

Everything is read through :mod:`lrp_ray.results`. Only scalar columns of the whole dataset are read;
token maps are read for the chosen rows only and the per-layer vectors are averaged file by file, so a
large sweep costs memory for its scalars only. Every text from the results (image names, manifest values)
is HTML-escaped.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lrp_ray.results import Manifest, ManifestError, conservation, iter_parts, part_files, read_manifest
from lrp_ray.viz.heatmaps import (
    CMAP,
    TopRow,
    _read_rgb,
    render_overlay,
    select_top_rows,
)

__all__ = ["build_report", "ReportError"]

DPI = 100


class ReportError(RuntimeError):
    """A results folder the report cannot be built from."""


# -------------------------------------------------------------------------------------------- reading
def _read_manifest(out: Path) -> tuple[Manifest | None, str | None]:
    """The manifest, or None and why it could not be read (None, None when there is none)."""
    try:
        return read_manifest(out, strict=True), None
    except ManifestError as exc:
        return None, f"manifest.json unreadable: {exc}"


def _read_csv(p: Path, limit: int = 10_000) -> tuple[list[str], list[list[str]], int]:
    if not p.is_file():
        return [], [], 0
    with p.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return [], [], 0
    return rows[0], rows[1:limit + 1], len(rows) - 1


@dataclass
class LayerStats:
    module: str
    layer: int
    rows: int = 0
    images: set = field(default_factory=set)
    # feature -> (sum of channel_relevance vectors, count)
    channel_sum: dict[int, np.ndarray] = field(default_factory=dict)
    channel_n: dict[int, int] = field(default_factory=dict)
    profile_sum: np.ndarray | None = None
    profile_frac_sum: np.ndarray | None = None
    profile_n: int = 0
    target_sum: float = 0.0
    input_sum: float = 0.0
    feature_act: dict[int, float] = field(default_factory=dict)
    feature_rel: dict[int, float] = field(default_factory=dict)
    feature_n: dict[int, int] = field(default_factory=dict)


def _numbers(t: Any, name: str) -> np.ndarray:
    return np.asarray(t.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)


def _vectors(t: Any, name: str) -> np.ndarray | None:
    """A list column as a [rows, width] matrix (None if its lists differ in length)."""
    n = t.num_rows
    flat = np.asarray(t.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False), np.float64)
    width = len(flat) // n
    return flat.reshape(n, width) if width and width * n == len(flat) else None


def _scan(out: Path) -> dict[tuple[str, int], LayerStats]:
    """One pass over the dataset, part file by part file: per-layer means of the vector columns."""
    stats: dict[tuple[str, int], LayerStats] = {}
    cols = ["image", "feature", "act_sum", "relevance_total", "input_relevance", "channel_relevance",
            "profile"]
    for module, layer, _, t in iter_parts(out, cols):
        n = t.num_rows
        if n == 0:
            continue
        st = stats.setdefault((module, layer), LayerStats(module, layer))
        st.rows += n
        st.images.update(t.column("image").to_pylist())
        feats = np.asarray(t.column("feature").to_numpy(zero_copy_only=False), dtype=np.int64)
        act, tgt = _numbers(t, "act_sum"), _numbers(t, "relevance_total")
        st.target_sum += float(np.nansum(tgt))
        st.input_sum += float(np.nansum(_numbers(t, "input_relevance")))
        chan = _vectors(t, "channel_relevance")
        for fe in np.unique(feats):
            sel, f = feats == fe, int(fe)
            st.feature_n[f] = st.feature_n.get(f, 0) + int(sel.sum())
            st.feature_act[f] = st.feature_act.get(f, 0.0) + float(np.nansum(act[sel]))
            st.feature_rel[f] = st.feature_rel.get(f, 0.0) + float(np.nansum(np.abs(tgt[sel])))
            if chan is not None:
                st.channel_sum[f] = st.channel_sum.get(f, 0) + np.nansum(chan[sel], axis=0)
                st.channel_n[f] = st.channel_n.get(f, 0) + int(sel.sum())
        mat = _vectors(t, "profile")
        if mat is not None:
            p = mat.shape[1]
            if st.profile_sum is None or st.profile_sum.shape[0] != p:
                st.profile_sum = np.zeros(p)
                st.profile_frac_sum = np.zeros(p)
                st.profile_n = 0
            st.profile_sum += np.nansum(mat, axis=0)
            denom = np.where(np.abs(tgt) > 1e-12, tgt, np.nan)[:, None]
            with np.errstate(invalid="ignore", divide="ignore"):
                frac = mat / denom
            st.profile_frac_sum += np.nansum(np.where(np.isfinite(frac), frac, 0.0), axis=0)
            st.profile_n += n
    return stats


# ------------------------------------------------------------------------------------------- pictures
def _png_uri(fig) -> str:
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _bytes_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _matrix_figure(st: LayerStats, features: Sequence[int]) -> Any:
    mat = np.stack([st.channel_sum[f] / max(st.channel_n[f], 1) for f in features])
    lim = float(np.nanmax(np.abs(mat))) if mat.size else 1.0
    lim = lim if lim > 0 and math.isfinite(lim) else 1.0
    nf, d = mat.shape
    w_in = min(11.0, max(5.0, 2.0 + d * 0.03))
    h_in = min(9.0, max(2.4, 1.3 + nf * 0.16))
    fig, ax = plt.subplots(figsize=(w_in, h_in), dpi=DPI, layout="constrained")
    im = ax.imshow(mat, cmap=CMAP, vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    ax.set_xlabel("input channel (encoder input, after input_proj)")
    ax.set_ylabel("feature")
    if nf <= 40:
        ax.set_yticks(range(nf), [str(f) for f in features], fontsize=7)
    ax.set_title(f"{st.module} layer {st.layer}: mean channel relevance (feature x input channel)",
                 fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.9)
    return fig


def _profile_figure(st: LayerStats, names: Sequence[str] | None) -> Any:
    assert st.profile_sum is not None
    p = len(st.profile_sum)
    frac = st.profile_frac_sum / max(st.profile_n, 1)
    mean = st.profile_sum / max(st.profile_n, 1)
    labels = list(names) if names is not None and len(names) == p else [str(i) for i in range(p)]
    fig, ax = plt.subplots(figsize=(min(11.0, max(6.5, 3.0 + 0.35 * p)), 3.2), dpi=DPI,
                           layout="constrained")
    ax.plot(range(p), frac, marker="o", lw=1.5, label="mean over rows of stage relevance / target")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xticks(range(p), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("fraction of target")
    ax.set_title(f"{st.module} layer {st.layer}: relevance kept at each stage (mean at the input "
                 f"{mean[-1]:.3g})", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    return fig


# ------------------------------------------------------------------------------------------------ HTML
CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em auto;max-width:1200px;
color:#222;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
h3{margin-bottom:.3em}h4{margin:.8em 0 .3em}
table{border-collapse:collapse;font-size:.85em;margin:.4em 0}
td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3}
img{max-width:100%;height:auto}
.grid{display:flex;flex-wrap:wrap;gap:8px}
.grid figure{margin:0;width:260px}
.grid figcaption{font-size:.75em;color:#555;word-break:break-all}
.muted{color:#777;font-size:.85em}
nav a{margin-right:.8em}
.scroll{overflow-x:auto;max-width:100%}
pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:.8em;max-height:24em}
details summary{cursor:pointer}
"""


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _kv_table(items: Iterable[tuple[str, Any]]) -> str:
    rows = []
    for k, v in items:
        if isinstance(v, (dict, list)):
            v = json.dumps(v, default=str)
            if len(v) > 300:
                v = v[:300] + " ..."
        rows.append(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _cell(text: str) -> str:
    """A CSV cell for display: floats to 4 significant digits, long texts shortened."""
    t = text.strip()
    if t and not t.lstrip("-").isdigit():
        try:
            return f"{float(t):.4g}"
        except ValueError:
            pass
    return text if len(text) <= 80 else text[:77] + "..."


def _csv_table(header: list[str], rows: list[list[str]], total: int) -> str:
    if not header:
        return ""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(_cell(c))}</td>" for c in r) + "</tr>" for r in rows)
    more = f'<p class="muted">{total - len(rows)} more rows not shown</p>' if total > len(rows) else ""
    return '<div class="scroll">' + f"<table><tr>{head}</tr>{body}</table></div>{more}"


def _layer_key(key: tuple[str, int]) -> tuple[int, str, int]:
    module, layer = key
    return ({"encoder": 0, "decoder": 1}.get(module, 2), module, layer)


def _anchor(module: str, layer: int, feature: int | None = None) -> str:
    return f"{module}-L{layer}" + ("" if feature is None else f"-F{feature}")


def _pick_features(st: LayerStats, max_features: int | None) -> list[int]:
    feats = sorted(st.feature_n)
    if max_features is None or len(feats) <= max_features:
        return feats
    # The features with the largest mean |relevance at the target| (ties by id).
    score = {f: st.feature_rel.get(f, 0.0) / max(st.feature_n[f], 1) for f in feats}
    return sorted(sorted(feats, key=lambda f: (-score[f], f))[:max_features])


def build_report(out_dir: str | Path, html_path: str | Path | None = None, top: int = 3,
                 images_root: str | Path | None = None, max_features: int | None = 12,
                 thumb_px: int = 260) -> Path:
    """Build ``out_dir/report.html`` (or ``html_path``) from a sweep results folder; returns its path.

    ``top``: images per feature and ranking (activation, relevance). ``images_root``: the folder image
    paths are relative to (default: the manifest's images root, else ``out_dir``). ``max_features``:
    features shown per layer with images (those with the largest mean |target relevance|; ``None``: all);
    the relevance matrix always shows every feature.
    """
    out = Path(out_dir)
    rel_dir = out / "relevance"
    if not out.is_dir():
        raise ReportError(f"results folder not found: {out}")
    if not rel_dir.is_dir():
        raise ReportError(f"no relevance dataset in {out} (expected {rel_dir}/)")
    html_path = Path(html_path) if html_path is not None else out / "report.html"
    manifest, manifest_error = _read_manifest(out)
    root = Path(images_root) if images_root is not None else _images_root(manifest, out)
    stats = _scan(out)
    if not stats:
        raise ReportError(f"the relevance dataset in {rel_dir} has no rows "
                          f"({len(part_files(out))} part files)")
    chosen = {k: _pick_features(st, max_features) for k, st in stats.items()}
    top_rows = select_top_rows(out, top) if top > 0 else []
    by_feature: dict[tuple[str, int, int], list[TopRow]] = {}
    for r in top_rows:
        if r.feature in chosen.get((r.module, r.layer), ()):
            by_feature.setdefault((r.module, r.layer, r.feature), []).append(r)

    parts: list[str] = []
    title = f"lrp_ray report: {out.resolve().name}"
    parts.append(f"<h1>{_esc(title)}</h1>")
    parts.append(f'<p class="muted">Generated {_esc(_dt.datetime.now().isoformat(timespec="seconds"))} from '
                 f"{_esc(out.resolve())}. Red = positive relevance, blue = negative, white = 0.</p>")
    order = sorted(stats, key=_layer_key)
    nav = " ".join(f'<a href="#{_esc(_anchor(m, lay))}">{_esc(m)} L{lay}</a>' for (m, lay) in order)
    parts.append(f"<nav>{nav}</nav>")

    # Run metadata.
    parts.append("<h2 id=\"run\">Run</h2>")
    if manifest is not None:
        data = manifest.model_dump(mode="json")
        flat = [(k, v) for k, v in data.items() if v is not None and (not isinstance(v, (dict, list)) or len(
            json.dumps(v, default=str)) <= 300)]
        parts.append(_kv_table(flat))
        parts.append("<details><summary>manifest.json</summary><pre>"
                     + _esc(json.dumps(_truncated(data), indent=2, default=str)) + "</pre></details>")
    else:
        parts.append(f'<p class="muted">{_esc(manifest_error or "no manifest.json")}</p>')
    header, rows, total = _read_csv(out / "summary.csv", limit=200)
    if header:
        parts.append(f"<details><summary><b>summary.csv</b> ({total} rows)</summary>"
                     + _csv_table(header, rows, total) + "</details>")
    eh, er, et = _read_csv(out / "errors.csv", limit=50)
    if et:
        parts.append(f"<h3>errors.csv ({et} errors)</h3>" + _csv_table(eh, er, et))
    layer_rows = [(f"{m} layer {lay}",
                   f"{st.rows} rows, {len(st.images)} images, {len(st.feature_n)} features, "
                   f"target relevance {st.target_sum:.4g}, input relevance {st.input_sum:.4g}")
                  for (m, lay), st in sorted(stats.items(), key=lambda kv: _layer_key(kv[0]))]
    parts.append("<h3>Layers</h3>" + _kv_table(layer_rows))
    parts.append(_conservation_table(out))

    image_cache: dict[str, np.ndarray | None] = {}
    input_size, stride = manifest.input_geometry() if manifest is not None else (None, None)
    n_missing = 0
    for key in order:
        st = stats[key]
        module, layer = key
        parts.append(f'<h2 id="{_esc(_anchor(module, layer))}">{_esc(module)} layer {layer}</h2>')
        feats_all = sorted(st.channel_sum)
        if feats_all:
            parts.append("<h3>Feature x input-channel relevance</h3>")
            parts.append(f'<img alt="{_esc(module)} layer {layer} relevance matrix" src="'
                         f'{_png_uri(_matrix_figure(st, feats_all))}">')
        if st.profile_sum is not None:
            names = manifest.profile_names_for(module, layer) if manifest is not None else None
            parts.append("<h3>Conservation profile</h3>")
            parts.append(f'<img alt="{_esc(module)} layer {layer} conservation profile" src="'
                         f'{_png_uri(_profile_figure(st, names))}">')
        feats = chosen[key]
        if len(feats) < len(st.feature_n):
            parts.append(f'<p class="muted">Top images for {len(feats)} of {len(st.feature_n)} features '
                         "(largest mean |target relevance|).</p>")
        for fe in feats:
            rows_f = by_feature.get((module, layer, fe), [])
            if not rows_f:
                continue
            mean_act = st.feature_act.get(fe, 0.0) / max(st.feature_n.get(fe, 1), 1)
            parts.append(f'<h4 id="{_esc(_anchor(module, layer, fe))}">feature {fe} '
                         f'<span class="muted">mean activation {mean_act:.4g}</span></h4><div class="grid">')
            # One overlay per distinct (image, query): the top-N by activation and by relevance overlap.
            groups: dict[tuple[str, int | None], list[TopRow]] = {}
            for r in sorted(rows_f, key=lambda r: (r.rank, r.kind)):
                groups.setdefault((r.image, r.query), []).append(r)
            for rs in groups.values():
                r = rs[0]
                tags = ", ".join(f"#{x.rank} by {'activation' if x.kind == 'act' else 'relevance'} "
                                 f"({x.score:.3g})" for x in rs)
                if r.image not in image_cache:
                    image_cache[r.image] = _read_rgb(root / r.image)
                img = image_cache[r.image]
                if img is None:
                    n_missing += 1
                    img = np.full((r.image_hw[0], r.image_hw[1], 3), 200, dtype=np.uint8)
                input_hw, step = r.input_hw, r.stride
                if (input_hw is None or step is None) and input_size is not None \
                        and img.shape[:2] == r.image_hw:
                    from lrp_ray.models.preprocess import resize_shape

                    input_hw, step = resize_shape(r.image_hw[0], r.image_hw[1], *input_size), stride
                q = "" if r.query is None else f" query {r.query}"
                png = render_overlay(img, r.token_map, f"{module} L{layer} F{fe}{q}", width_px=thumb_px,
                                     input_hw=input_hw, stride=step, palette=True)
                parts.append(f'<figure><img alt="{_esc(r.image)}" src="{_bytes_uri(png)}">'
                             f"<figcaption><b>{_esc(r.image)}</b>{_esc(q)}: {_esc(tags)}</figcaption>"
                             "</figure>")
            parts.append("</div>")
    if n_missing:
        parts.insert(3, f'<p class="muted">{n_missing} overlays drawn on a blank canvas: image files not '
                        f"found "
                        f"under {_esc(root)}.</p>")
    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
           f"<title>{_esc(title)}</title>"
           f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    html_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = html_path.with_name(html_path.name + ".tmp")
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(html_path)
    return html_path


def _truncated(obj: Any, max_items: int = 40) -> Any:
    """A copy of a JSON structure with long lists cut (for display)."""
    if isinstance(obj, dict):
        return {k: _truncated(v, max_items) for k, v in obj.items()}
    if isinstance(obj, list):
        head = [_truncated(v, max_items) for v in obj[:max_items]]
        return head + ([f"... {len(obj) - max_items} more"] if len(obj) > max_items else [])
    return obj


def _images_root(manifest: Manifest | None, out: Path) -> Path:
    if manifest is not None and manifest.images_root and Path(manifest.images_root).is_dir():
        return Path(manifest.images_root)
    return out


def _fmt(v: Any) -> str:
    """A number for a table cell: 3 significant digits, ``n/a`` for NaN."""
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    v = float(v)
    return "n/a" if math.isnan(v) else f"{v:.3g}"


def _conservation_table(out: Path) -> str:
    """The relevance accounting check per module/layer (:func:`lrp_ray.results.conservation`)."""
    df = conservation(out)
    if df.empty:
        return ""
    df = df.sort_values(["module", "layer"], key=lambda s: s.map({"encoder": 0, "decoder": 1})
                        if s.name == "module" else s, kind="stable")
    head = ("<tr><th>module</th><th>layer</th><th>rows</th><th>max |relevance_total|</th>"
            "<th>max |total - (input + bias + pos + softmax)|</th><th>relative</th></tr>")
    body = []
    for r in df.itertuples(index=False):
        note = f" ({r.rows_unchecked} rows without pos/softmax)" if r.rows_unchecked else ""
        body.append(f"<tr><td>{_esc(r.module)}</td><td>{int(r.layer)}</td><td>{int(r.rows)}{_esc(note)}</td>"
                    f"<td>{_fmt(r.max_abs_total)}</td><td>{_fmt(r.max_abs_error)}</td>"
                    f"<td>{_fmt(r.rel_error)}</td></tr>")
    return ('<h3 id="conservation">Relevance accounting</h3><p class="muted">relevance at the target = '
            "input + bias + positional + softmax-leak relevance: exact (up to rounding) for epsilon 0, "
            "the epsilon rule absorbs a little otherwise. Relative = max error / max |relevance_total|.</p>"
            f'<div class="scroll"><table>{head}{"".join(body)}</table></div>')
