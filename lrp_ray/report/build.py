"""``python -m lrp_ray.report OUT``: the run page ``OUT/report.html`` and the feature atlas ``OUT/atlas/``.

The run page is one file (inline CSS, figures as PNG ``data:`` URIs, no script) with labelled tables of the
run (request, counts, memory), a timings chart, the layers, conservation as a per-layer chart and the
accounting table, failed images and work items, the explained detections and the faithfulness figures of a
run with detection targets, and per layer the feature x channel matrix and the conservation profile. It
links into the atlas (:mod:`.atlas`). Everything is read through :mod:`lrp_ray.results` (:mod:`.folder`);
text from the results is escaped by Jinja2.
"""

from __future__ import annotations

import csv
import datetime as _dt
import math
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from lrp_ray.results import conservation

from . import figures
from .atlas import AtlasResult, build_atlas
from .detect import class_label
from .folder import Folder, ReportError, read_folder, sweep_command
from .pages import STATIC, fmt_num, render, write_if_changed
from .paths import ATLAS_DIR

__all__ = ["build_report", "ReportError"]


def _labelled(d: dict[str, Any], labels: dict[str, str] | None = None) -> list[tuple[str, str]]:
    rows = []
    for k, v in d.items():
        if v is None or v == {} or v == []:
            continue
        if isinstance(v, dict):
            v = ", ".join(f"{a}: {b}" for a, b in v.items())
        elif isinstance(v, (list, tuple)):
            v = ", ".join(map(str, v[:40])) + (f" … ({len(v)} in all)" if len(v) > 40 else "")
        rows.append(((labels or {}).get(k, k.replace("_", " ")), str(v)))
    return rows


def _mb(v: Any) -> str:
    return f"{int(v) / 2**20:.0f} MiB" if isinstance(v, (int, float)) and v else "n/a"


def _run_section(folder: Folder) -> dict[str, Any]:
    m = folder.manifest
    if m is None:
        return {"manifest_note": folder.manifest_error or "no manifest.json", "run_rows": [],
                "request_rows": [], "count_rows": [], "memory_rows": [], "command": "", "settings_rows": []}
    rs = m.result_spec or m.result_key or {}
    run_rows = [("status", m.status), ("request digest (spec_hash)", m.spec_hash or "n/a"),
                ("model weights sha256", rs.get("weights_sha256", "n/a")), ("output folder", m.out or "n/a"),
                ("images root", m.images_root or "n/a"), ("format version", m.version)]
    if m.error:
        run_rows.append(("error", m.error))
    if m.run is not None:
        run_rows += [("device", m.run.device or "n/a"), ("actors", m.run.actors),
                     ("Ray", m.run.ray or "n/a"), ("nodes", ", ".join(m.run.nodes) or "n/a")]
    if m.forward_passes is not None:
        run_rows.append(("forward passes", m.forward_passes))
    if m.cache:
        run_rows.append(("forward cache",
                         ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in m.cache.items())))
    run_rows.append(("versions", ", ".join(f"{k} {v}" for k, v in m.versions.items()) or "n/a"))
    if m.history:
        run_rows.append(("earlier runs into this folder",
                         ", ".join(str(h.get("status", "?")) for h in m.history)))
    from .folder import RUN_KEYS

    request = {k: v for k, v in m.spec.items() if k not in RUN_KEYS}
    settings = {k: v for k, v in m.spec.items() if k in RUN_KEYS and k != "out"}
    counts = m.counts.model_dump() if m.counts is not None else {}
    memory: list[tuple[str, str]] = []
    if m.peak_memory is not None:
        memory.append(("driver RSS", _mb(m.peak_memory.driver_rss)))
        for k, v in sorted(m.peak_memory.actors.items()):
            if isinstance(v, dict):
                memory.append((f"actor {k}",
                               f"RSS {_mb(v.get('peak_rss'))}, device {_mb(v.get('peak_device'))}"))
    return {"run_rows": run_rows, "request_rows": _labelled(request), "count_rows": _labelled(counts),
            "settings_rows": _labelled(settings),
            "memory_rows": memory, "command": sweep_command(m, folder.out), "manifest_note": ""}


def _conservation_rows(folder: Folder) -> tuple[list[dict[str, str]], dict[tuple[str, int], float]]:
    df = conservation(folder.out) if folder.scan.files else None
    if df is None or df.empty:
        return [], {}
    order = {"encoder": 0, "decoder": 1}
    df = df.assign(_o=df["module"].map(order).fillna(2)).sort_values(["_o", "module", "layer"], kind="stable")
    rows, rel = [], {}
    for r in df.itertuples(index=False):
        note = f" ({r.rows_unchecked} rows without pos/softmax)" if r.rows_unchecked else ""
        rows.append({"module": r.module, "layer": int(r.layer), "rows": f"{int(r.rows)}{note}",
                     "total": fmt_num(r.max_abs_total), "error": fmt_num(r.max_abs_error),
                     "rel": fmt_num(r.rel_error)})
        rel[(str(r.module), int(r.layer))] = float(r.rel_error)
    return rows, rel


def _summary(out: Path, limit: int = 200) -> dict[str, Any] | None:
    p = out / "summary.csv"
    if not p.is_file():
        return None
    try:
        with p.open(newline="", encoding="utf-8", errors="replace") as f:
            rows = list(csv.reader(f))
    except OSError:
        return None
    if not rows:
        return None

    def cell(t: str) -> str:
        s = t.strip()
        if s and not s.lstrip("-").isdigit():
            try:
                return f"{float(s):.4g}"
            except ValueError:
                pass
        return t if len(t) <= 80 else t[:77] + "..."
    return {"header": rows[0], "rows": [[cell(c) for c in r] for r in rows[1:limit + 1]],
            "total": len(rows) - 1}


def _faithfulness(folder: Folder) -> dict[str, Any] | None:
    fa = folder.det.faithfulness
    if fa is None or not len(fa):
        return None
    hit = fa["pointing_hit"].astype(float)
    rows = [("explained detections", len(fa)), ("pointing game (most relevant token on the box)",
                                                f"{100 * hit.mean():.1f} %"),
            ("mean AUC, tokens deleted by relevance", fmt_num(fa["auc_relevance"].mean())),
            ("mean AUC, random order", fmt_num(fa["auc_random"].mean()))]
    png = None
    try:
        lens = fa["fractions"].map(len)
        common = fa[lens == lens.mode().iloc[0]]
        fr = np.asarray(common["fractions"].iloc[0], float)
        rel = np.mean(np.stack([np.asarray(x, float) for x in common["curve_relevance"]]), axis=0)
        rnd = np.mean(np.stack([np.asarray(x, float) for x in common["curve_random"]]), axis=0)
        png = figures.png_uri(figures.deletion_figure(fr, rel, rnd, len(common)))
    except (ValueError, IndexError, TypeError):
        pass
    by = []
    labelled = fa.assign(label=[class_label(i, n)
                                for i, n in zip(fa["class_id"], fa["class_name"], strict=True)])
    for lab, g in labelled.groupby("label", sort=True):
        by.append({"label": lab, "n": len(g), "hit": g["pointing_hit"].astype(float).mean(),
                   "auc_rel": g["auc_relevance"].mean(), "auc_rand": g["auc_random"].mean()})
    return {"rows": rows, "png": png, "by_class": by}


def _detections(folder: Folder) -> list[dict[str, Any]]:
    d = folder.det.detections
    if d is None or not len(d):
        return []
    d = d.assign(label=[class_label(i, n) for i, n in zip(d["class_id"], d["class_name"], strict=True)])
    return [{"label": lab, "n": len(g), "images": g["image"].nunique(), "score": g["score"].mean()}
            for lab, g in d.groupby("label", sort=True)]


def _layers(folder: Folder, atlas: AtlasResult | None, max_features: int | None) -> list[dict[str, Any]]:
    rows = folder.scan.rows
    by_feature = {f.key: f for f in atlas.features} if atlas else {}
    out = []
    for (module, layer), st in folder.scan.layers.items():
        sel = rows[(rows["module"] == module) & (rows["layer"] == layer)]
        feats_all = sorted(st.channel_sum)
        names = folder.manifest.profile_names_for(module, layer) if folder.manifest is not None else None
        entry: dict[str, Any] = {
            "module": module, "layer": layer, "rows": st.rows, "images": sel["image"].nunique(),
            "features": sel["feature"].nunique(), "target": st.parts_sum.get("relevance_total", math.nan),
            "input": st.parts_sum.get("input_relevance", math.nan), "anchor": f"{module}-L{layer}",
            "matrix_png": figures.png_uri(figures.matrix_figure(st, feats_all)) if feats_all else None,
            "profile_png": figures.png_uri(figures.profile_figure(st, names)) if st.profile_sum is not None
            else None, "top": [], "stages": list(names or [])}
        if by_feature:
            score = sel.assign(a=sel["input_relevance"].abs()).groupby("feature")["a"].mean()
            score = score.sort_values(ascending=False, kind="stable")
            k = len(score) if max_features is None else max_features
            entry["top"] = [by_feature[(module, layer, int(f))] for f in score.index[:k]
                            if (module, layer, int(f)) in by_feature]
        out.append(entry)
    return out


def build_report(out_dir: str | Path, html_path: str | Path | None = None, top: int = 8,
                 images_root: str | Path | None = None, max_features: int | None = 12,
                 thumb_px: int | None = None, *, atlas: bool = True, workers: int | None = None,
                 force: bool = False) -> Path:
    """Build ``OUT/report.html`` (or ``html_path``) and, with ``atlas``, the feature atlas ``OUT/atlas/``;
    returns the run page's path.

    ``top``: reference images per feature and ranking in the atlas; ``images_root``: the folder image names
    are relative to (default: the manifest's); ``max_features``: features per layer highlighted on the run
    page (largest mean |input relevance|; None: all); ``workers``: processes for the atlas's pictures;
    ``force``: redraw every picture. ``thumb_px`` is accepted for compatibility and unused.
    """
    if top < 0:
        raise ReportError("top must be >= 0")
    folder = read_folder(out_dir, images_root)
    out = folder.out
    html_path = Path(html_path) if html_path is not None else out / "report.html"
    atlas_res = None
    atlas_prefix = ""
    if atlas:
        rel = os.path.relpath(out / ATLAS_DIR, html_path.parent)
        run_page = quote(os.path.relpath(html_path, out / ATLAS_DIR).replace(os.sep, "/"))  # a URL
        atlas_res = build_atlas(out, folder=folder, top=top, workers=workers, force=force, run_page=run_page)
        atlas_prefix = quote(rel.replace(os.sep, "/")) + "/"
    cons_rows, rel_err = _conservation_rows(folder)
    layers = _layers(folder, atlas_res, max_features)
    m = folder.manifest
    timings = figures.timings_figure(m.timings) if m is not None else None
    stats = list(folder.scan.layers.values())
    cons = figures.conservation_figure(stats, rel_err)
    failed_items = sorted(m.failed_items.items()) if m is not None else []
    problems = atlas_res.problems if atlas_res is not None else folder.health.problems
    html = render(
        "run.html", title=f"lrp_ray report: {out.resolve().name}", css=(STATIC / "atlas.css").read_text(),
        generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), out=str(out),
        problems=problems, atlas_index=(atlas_prefix + "index.html") if atlas_res else None,
        atlas_prefix=atlas_prefix, n_features=len(atlas_res.features) if atlas_res else 0,
        timings_png=figures.png_uri(timings) if timings is not None else None,
        conservation_png=figures.png_uri(cons) if cons is not None else None, conservation=cons_rows,
        layers=layers, errors=folder.errors[:500], errors_more=max(0, len(folder.errors) - 500),
        failed_items=failed_items, faith=_faithfulness(folder), detections=_detections(folder),
        summary=_summary(out), **_run_section(folder))
    html_path.parent.mkdir(parents=True, exist_ok=True)
    write_if_changed(html_path, html)
    return html_path
