"""The feature model of the atlas: per (module, layer, feature) its statistics, reference rows (ActMax,
RelMax, lower-quantile samples, the gallery), the classes and detections it matters for, its most similar
features, and a signature of everything its pictures depend on (for incremental rebuilds).

All from the scalars of :mod:`.scan` and the detection tables (no token map is read here); the pictures
are planned as :class:`.render.MapJob` and drawn by :mod:`.render`.

Rankings: activation = ``act_mean`` (mean over the valid tokens; a decoder target's value), relevance =
``input_relevance`` (what reaches the input tokens; the ranking of ``summary.csv``) -- or, when the run
has detection targets, the feature's concept relevance for each explained detection (RelMax as in CRP).
An image counts once per ranking, with its best row (decoder: its best query).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

from lrp_ray.viz.heatmaps import int_pair, opt_int, row_image_hw

from .detect import Detections, class_label
from .paths import digest, feature_page, feature_slug, image_file
from .render import MapJob

__all__ = ["Ref", "Hist", "Feature", "Settings", "build_features", "make_hist", "QUANTILES"]

QUANTILES = (0.25, 0.4, 0.5, 0.6, 0.75, 0.9)
"""Lower-quantile samples: fraction of the feature's images ranked above the sample (0.5 = the median)."""
KEY = ["module", "layer", "feature"]


@dataclass(frozen=True)
class Settings:
    """What the pictures depend on besides the data (part of every feature's signature)."""

    top: int = 8
    quantiles: tuple[float, ...] = QUANTILES
    gallery_max_features: int = 4
    similar: int = 8
    version: int = 1


@dataclass
class Ref:
    """One reference picture of a feature."""

    image: str
    query: int | None
    score: float
    label: str
    src: str | None = None
    detail: str = ""
    box: tuple[float, float, float, float] | None = None


@dataclass
class Hist:
    """A histogram drawn by the page template as inline SVG (bars in a 0..1 box; marks as fractions)."""

    label: str
    bars: list[tuple[float, float, float]]     # (x0, width, height), fractions of the plot box
    lo: float
    hi: float
    peak: int
    n: int
    marks: list[float] = field(default_factory=list)


def make_hist(values: np.ndarray, label: str, marks: Sequence[float] = ()) -> Hist | None:
    """Counts of ``values`` (finite ones) in up to 40 bins, as :class:`Hist`."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return None
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts, _ = np.histogram(v, bins=min(40, max(5, 2 * int(np.sqrt(v.size)))), range=(lo, hi))
    peak = int(counts.max())
    w = 1.0 / len(counts)
    bars = [(i * w, w, c / peak) for i, c in enumerate(counts.tolist()) if c]
    return Hist(label=label, bars=bars, lo=lo, hi=hi, peak=peak, n=int(v.size),
                marks=[(float(x) - lo) / (hi - lo) for x in marks if lo <= float(x) <= hi])


@dataclass
class Feature:
    module: str
    layer: int
    feature: int
    slug: str
    page: str
    n_rows: int = 0
    n_images: int = 0
    act_mean: float = math.nan
    act_std: float = math.nan
    act_max: float = math.nan
    rel_mean: float = math.nan
    rel_std: float = math.nan
    refs_act: list[Ref] = field(default_factory=list)
    refs_rel: list[Ref] = field(default_factory=list)
    refs_low: list[Ref] = field(default_factory=list)
    gallery: list[Ref] = field(default_factory=list)
    rel_source: str = "input relevance"
    hists: list[Hist] = field(default_factory=list)
    shares: dict[str, float] = field(default_factory=dict)
    classes: list[dict[str, Any]] = field(default_factory=list)
    detections: list[dict[str, Any]] = field(default_factory=list)
    similar: list[tuple[Feature, float]] = field(default_factory=list, repr=False)
    signature: str = ""
    incomplete: bool = False
    jobs: list[tuple[int | tuple, MapJob]] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, int, int]:
        return self.module, self.layer, self.feature

    @property
    def order(self) -> int:
        """Module order: encoder, decoder, others."""
        return {"encoder": 0, "decoder": 1}.get(self.module, 2)

    @property
    def thumb(self) -> str | None:
        for r in (*self.refs_act, *self.refs_rel):
            if r.src:
                return r.src
        return None

    def files(self) -> list[str]:
        """Every picture of the feature (relative to the atlas folder)."""
        return [j.dest for _, j in self.jobs]


_opt, _pair, _image_hw = opt_int, int_pair, row_image_hw  # one reading of nullable row fields (viz)


def _order(df: pd.DataFrame) -> pd.Series:
    return df["module"].astype(str).map({"encoder": 0, "decoder": 1}).fillna(2)


def _best_per_image(rows: pd.DataFrame, col: str) -> pd.DataFrame:
    """Each feature's rows sorted by ``col`` (descending, ties by image), one per image."""
    s = rows[np.isfinite(rows[col].to_numpy(np.float64))]
    s = s.sort_values([*KEY, col, "image"], ascending=[True, True, True, False, True], kind="stable")
    s = s.drop_duplicates([*KEY, "image"], keep="first")
    g = s.groupby(KEY, sort=False, observed=True)
    return s.assign(pos=g.cumcount().to_numpy(), n=g[col].transform("size").to_numpy())


def _geometry_fill(manifest_geometry: tuple[Any, Any]):
    size, stride = manifest_geometry

    def fill(r: Any, hw: tuple[int, int]) -> tuple[tuple[int, int] | None, int | None]:
        input_hw, step = _pair(r.input_h, r.input_w), _opt(r.stride)
        if (input_hw is None or step is None) and size is not None and stride:
            from lrp_ray.models.preprocess import resize_shape

            input_hw, step = resize_shape(hw[0], hw[1], int(size[0]), int(size[1])), int(stride)
        return input_hw, step
    return fill


def _row_job(f: Feature, r: Any, mode: str, geometry) -> MapJob:
    hw = _image_hw(r)
    input_hw, step = geometry(r, hw)
    image, query = str(r.image), _opt(r.query)
    return MapJob(key=(image, f.feature, query), dest=image_file(f.slug, "row", image, query, mode),
                  image=image, image_hw=hw, grid_hw=(int(r.grid_h), int(r.grid_w)), input_hw=input_hw,
                  stride=step, mode=mode)


def _records(df: pd.DataFrame) -> list[SimpleNamespace]:
    """Rows as attribute records (one conversion for the whole frame, not one per group)."""
    cols = list(df.columns)
    data = [df[c].astype(object).tolist() if isinstance(df[c].dtype, pd.CategoricalDtype) else df[c].tolist()
            for c in cols]
    return [SimpleNamespace(**dict(zip(cols, vals, strict=True))) for vals in zip(*data, strict=True)]


PixelIndex = dict[tuple[str, int, int, str, "int | None"], tuple[str, int, int]]
"""(module, layer, feature, image, query) -> (pixel part file, pixel_h, pixel_w)."""


def pixel_index(out: Path) -> PixelIndex:
    """Where the pixel maps of a sweep's ``--pixels`` are (key columns only; empty without any)."""
    import pyarrow.parquet as pq

    from lrp_ray.results.pixels import pixel_files

    index: PixelIndex = {}
    for path in pixel_files(out):
        try:
            t = pq.read_table(path, columns=["module", "layer", "image", "feature", "query", "pixel_h",
                                              "pixel_w"]).to_pydict()
        except (OSError, ValueError):
            continue
        for i in range(len(t["image"])):
            key = (str(t["module"][i]), int(t["layer"][i]), int(t["feature"][i]), str(t["image"][i]),
                   _opt(t["query"][i]))
            index.setdefault(key, (str(path), int(t["pixel_h"][i]), int(t["pixel_w"][i])))
    return index


def _add_ref(f: Feature, r: Any, target: list[Ref], label: str, mode: str, geometry,
             pixels: PixelIndex | None = None) -> None:
    q = _opt(r.query)
    px = (pixels or {}).get((f.module, f.layer, f.feature, str(r.image), q))
    if px is None:  # the token map, from the row's part file
        job = _row_job(f, r, mode, geometry)
        f.jobs.append((int(r.frag), job))
        kind = "token map"
    else:  # the pixel map (--pixels): on the original image's grid
        path, ph, pw = px
        image = str(r.image)
        job = MapJob(key=(image, f.feature, q), dest=image_file(f.slug, "pixel", image, q, mode), image=image,
                     image_hw=_image_hw(r), grid_hw=(ph, pw), mode=mode, kind="pixel")
        f.jobs.append((("pixels", path), job))
        kind = "pixel map"
    target.append(Ref(image=str(r.image), query=q, score=float(r.score), label=label, src=job.dest,
                      detail=kind if q is None else f"query {q}, {kind}"))


def _signatures(rows: pd.DataFrame) -> dict[tuple, str]:
    """Per feature: an order-independent digest of its rows' scalars."""
    if not len(rows):
        return {}
    cols = ["image", "query", "act_sum", "act_mean", "act_max", "relevance_total", "input_relevance",
            "grid_h", "grid_w", "image_h", "image_w", "input_h", "input_w", "stride"]
    h = pd.util.hash_pandas_object(rows[cols].astype({"image": str}), index=False).to_numpy(np.uint64)
    df = rows[KEY].assign(h=h, h2=(h >> np.uint64(7)) * np.uint64(31))
    g = df.groupby(KEY, observed=True, sort=False)
    s, s2, n = g["h"].sum(), g["h2"].sum(), g.size()
    return {k: f"{int(s[k]) & (2**64 - 1):x}.{int(s2[k]) & (2**64 - 1):x}.{int(n[k])}" for k in s.index}


def _similar(rows: pd.DataFrame, features: dict[tuple, Feature], k: int) -> None:
    """Most similar features: Pearson correlation of the per-image relevance (summed over queries)."""
    if k <= 0 or len(features) < 2 or not len(rows):
        return
    per = rows.groupby([*KEY, "image"], observed=True)["input_relevance"].sum()
    mat = per.unstack("image")
    keys = [tuple(x) for x in mat.index]
    x = mat.to_numpy(np.float64)
    mean = np.nanmean(x, axis=1, keepdims=True)
    x = np.where(np.isnan(x), mean, x) - mean
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    ok = (norm[:, 0] > 1e-12) & np.isfinite(norm[:, 0])
    z = np.where(ok[:, None], x / np.where(norm > 0, norm, 1.0), 0.0).astype(np.float32)
    n = len(keys)
    kk = min(k, n - 1)
    for start in range(0, n, 1024):
        c = z[start:start + 1024] @ z.T
        for i in range(c.shape[0]):
            c[i, start + i] = -np.inf
        c[:, ~ok] = -np.inf
        top = np.argpartition(-c, kk - 1, axis=1)[:, :kk] if kk < n else np.argsort(-c, axis=1)
        for i in range(c.shape[0]):
            if not ok[start + i]:
                continue
            idx = top[i][np.argsort(-c[i, top[i]], kind="stable")]
            f = features.get(keys[start + i])
            if f is None:
                continue
            f.similar = [(features[keys[j]], float(c[i, j])) for j in idx
                         if np.isfinite(c[i, j]) and keys[j] in features]


def _pct(q: float) -> str:
    return f"{round(100 * (1 - q))}th percentile"


def build_features(rows: pd.DataFrame, det: Detections | None, settings: Settings,
                   manifest_geometry: tuple[Any, Any] = (None, None),
                   pixels: PixelIndex | None = None) -> list[Feature]:
    """Every swept feature with its references and planned pictures (``Feature.jobs``: (part file index or
    (module, layer) for concept maps, job)). Features in the order encoder, decoder; layer; feature."""
    geometry = _geometry_fill(manifest_geometry)
    keys = rows[KEY].drop_duplicates() if len(rows) else pd.DataFrame(columns=KEY)
    if det is not None and det.concepts is not None and len(det.concepts):
        keys = pd.concat([keys, det.concepts[KEY].drop_duplicates()]).drop_duplicates()
    keys = keys.assign(_o=_order(keys)).sort_values(["_o", "module", "layer", "feature"], kind="stable")
    features: dict[tuple, Feature] = {}
    for m, lay, fe in keys[KEY].itertuples(index=False):
        k = (str(m), int(lay), int(fe))
        features[k] = Feature(module=k[0], layer=k[1], feature=k[2], slug=feature_slug(*k),
                              page=feature_page(*k))
    if len(rows):
        _from_rows(rows, features, settings, geometry, pixels)
    if det is not None and det.present:
        _from_detections(rows, det, features, settings, geometry)
    _similar(rows, features, settings.similar)
    sigs = _signatures(rows)
    for k, f in features.items():
        concept_sig = ""
        if det is not None and det.concepts is not None:
            concept_sig = f.rel_source
        f.signature = digest(settings, sigs.get(k, ""), concept_sig, [r.label for r in f.refs_rel],
                             [(j.dest, j.key, j.box) for _, j in f.jobs])
    return list(features.values())


def _from_rows(rows: pd.DataFrame, features: dict[tuple, Feature], settings: Settings, geometry,
               pixels: PixelIndex | None = None) -> None:
    g = rows.groupby(KEY, observed=True, sort=False)
    stats = pd.DataFrame({"n_rows": g.size(), "n_images": g["image"].nunique(),
                          "act_mean": g["act_mean"].mean(), "act_std": g["act_mean"].std(ddof=0),
                          "act_max": g["act_max"].max(), "rel_mean": g["input_relevance"].mean(),
                          "rel_std": g["input_relevance"].std(ddof=0)})
    for k, s in stats.iterrows():
        f = features[(str(k[0]), int(k[1]), int(k[2]))]
        for name in ("n_rows", "n_images"):
            setattr(f, name, int(s[name]))
        for name in ("act_mean", "act_std", "act_max", "rel_mean", "rel_std"):
            setattr(f, name, float(s[name]))
    top = settings.top
    act = _best_per_image(rows, "act_mean").rename(columns={"act_mean": "score"})
    rel = _best_per_image(rows, "input_relevance").rename(columns={"input_relevance": "score"})
    pos, n = act["pos"].to_numpy(), act["n"].to_numpy()
    quantile = np.full(len(act), np.nan)
    for q in sorted(settings.quantiles, reverse=True):
        quantile[(pos == np.floor(q * (n - 1)).astype(np.int64)) & (pos >= top)] = q
    gallery = len(features) <= settings.gallery_max_features
    keep = (pos < top) | np.isfinite(quantile) | gallery
    sel_act = act[keep].assign(q=quantile[keep])
    sel_rel = rel[rel["pos"] < top]
    for r in _records(sel_act):
        f = features[(str(r.module), int(r.layer), int(r.feature))]
        if r.pos < top:
            _add_ref(f, r, f.refs_act, f"#{int(r.pos) + 1} by activation", "crop", geometry, pixels)
        if np.isfinite(r.q):
            _add_ref(f, r, f.refs_low, _pct(float(r.q)), "crop", geometry, pixels)
        if gallery:
            _add_ref(f, r, f.gallery, f"activation rank {int(r.pos) + 1}", "full", geometry, pixels)
    for r in _records(sel_rel):
        f = features[(str(r.module), int(r.layer), int(r.feature))]
        _add_ref(f, r, f.refs_rel, f"#{int(r.pos) + 1} by relevance", "crop", geometry, pixels)
    # Histograms: every row of each feature (one sort, then slices).
    codes = g.ngroup().to_numpy()
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(codes.max() + 2)) if len(codes) else np.zeros(1, int)
    act_v = rows["act_mean"].to_numpy(np.float64)[order]
    rel_v = rows["input_relevance"].to_numpy(np.float64)[order]
    first = rows[KEY].iloc[order[bounds[:-1]]]
    for i, (m, lay, fe) in enumerate(first.itertuples(index=False)):
        f = features[(str(m), int(lay), int(fe))]
        a, b = bounds[i], bounds[i + 1]
        f.hists = [h for h in (make_hist(act_v[a:b], "activation (act_mean) per row",
                                         [r.score for r in f.refs_low]),
                               make_hist(rel_v[a:b], "input relevance per row")) if h is not None]


def _from_detections(rows: pd.DataFrame, det: Detections, features: dict[tuple, Feature],
                     settings: Settings, geometry) -> None:
    by = det.by_class
    if by is not None and len(by):
        by = by.assign(label=[class_label(i, n) for i, n in zip(by["class_id"], by["class_name"],
                                                                strict=True)])
        for (m, lay, fe), g in by.groupby(KEY, sort=False):
            f = features.get((str(m), int(lay), int(fe)))
            if f is None:
                continue
            f.shares = {str(lab): float(s) for lab, s in zip(g["label"], g["share_mean"], strict=True)}
            g = g.sort_values("share_mean", ascending=False, kind="stable").head(10)
            f.classes = [{"label": r.label, "detections": int(r.detections), "share_mean": r.share_mean,
                          "share_std": r.share_std, "relevance_mean": r.relevance_mean,
                          "top_k_rate": r.top_k_rate} for r in g.itertuples(index=False)]
    conc = det.concepts
    if conc is None or not len(conc):
        return
    dets = det.detections
    info: dict[tuple, Any] = {}
    if dets is not None and len(dets):
        for r in dets.itertuples(index=False):
            info[(str(r.image), int(r.query), int(r.class_id))] = r
    map_keys: set[tuple] = set()
    if det.has_maps:
        mk = det.concept_maps(["image", "query", "module", "layer", "feature"])
        if mk is not None:
            map_keys = {(str(a), int(b), str(c), int(d), int(e))
                        for a, b, c, d, e in mk.itertuples(index=False)}
    # The feature's own rows, to draw a detection's image when no conditional map was stored.
    own: dict[tuple, Any] = {}
    if len(rows):
        for r in rows.itertuples(index=False):  # keyed with the query: a decoder row is one query's map
            own.setdefault((str(r.module), int(r.layer), int(r.feature), str(r.image),
                            _opt(getattr(r, "query", None))), r)
    c = conc[np.isfinite(conc["relevance"].to_numpy(np.float64))]
    c = c.sort_values([*KEY, "relevance", "image", "query"], ascending=[True, True, True, False, True, True],
                      kind="stable")
    c = c.groupby(KEY, sort=False).head(settings.top)
    for k, g in c.groupby(KEY, sort=False):
        f = features.get((str(k[0]), int(k[1]), int(k[2])))
        if f is None:
            continue
        f.rel_source = "concept relevance for the explained detections"
        keep = {r.src for r in (*f.refs_act, *f.refs_low, *f.gallery) if r.src}
        f.jobs = [(i, j) for i, j in f.jobs if j.dest in keep]  # the detection ranking replaces RelMax
        f.refs_rel = []
        for rank, r in enumerate(g.itertuples(index=False), start=1):
            image, query, cid = str(r.image), int(r.query), int(r.class_id)
            d = info.get((image, query, cid))
            label = class_label(cid, r.class_name)
            box = (float(d.x0), float(d.y0), float(d.x1), float(d.y1)) if d is not None else None
            share = "" if pd.isna(r.share) else f", {100 * float(r.share):.1f} % of the logit"
            detail = f"{label} (query {query}{'' if d is None else f', score {float(d.score):.2f}'}){share}"
            ref = Ref(image=image, query=query, score=float(r.relevance), label=f"#{rank} by relevance",
                      detail=detail, box=box)
            mkey = (image, query, f.module, f.layer, f.feature)
            if mkey in map_keys and d is not None:
                job = MapJob(key=mkey, dest=image_file(f.slug, "concept", image, query, cid), image=image,
                             image_hw=_det_hw(d), grid_hw=(int(d.grid_h), int(d.grid_w)),
                             input_hw=_pair(d.input_h, d.input_w), stride=_opt(d.stride), box=box)
                f.jobs.append(((f.module, f.layer), job))
                ref.src = job.dest
            elif (f.module, f.layer, f.feature, image, query if f.module == "decoder" else None) in own:
                rr = own[(f.module, f.layer, f.feature, image, query if f.module == "decoder" else None)]
                job = _row_job(f, rr, "crop", geometry)
                job.box = box
                job.dest = image_file(f.slug, "rowbox", image, query, cid)
                f.jobs.append((int(rr.frag), job))
                ref.src = job.dest
                ref.detail += " (the feature's own map: no conditional map stored)"
            f.refs_rel.append(ref)
            f.detections.append({"image": image, "query": query, "label": label,
                                 "score": None if d is None else float(d.score),
                                 "relevance": float(r.relevance),
                                 "share": None if pd.isna(r.share) else float(r.share)})


def _det_hw(d: Any) -> tuple[int, int]:
    hw = _pair(d.image_h, d.image_w)
    return hw if hw is not None else (int(d.grid_h) * (_opt(d.stride) or 32),
                                      int(d.grid_w) * (_opt(d.stride) or 32))

