"""LrpWorker: a Ray actor that builds the model once and computes work items.

The model arrives as (config, state dict of numpy arrays) through the object store, so worker nodes need
no shared filesystem. Forward caches are kept per image batch (LRU under a byte budget). A work item finds
its batch's cache locally, or imports one another actor exported (numpy through the object store), or, as
a last resort, runs the forward itself from the batch's images: every item can always complete, which is
what makes driver-side retries and Ray's actor restarts safe.
"""

from __future__ import annotations

import os
import resource
import time
import warnings
from collections import OrderedDict
from typing import Any

import pyarrow as pa
import ray
import torch

from .errors import ItemOutOfMemory

OUT_OF_MEMORY = (torch.OutOfMemoryError, MemoryError)
"""Out-of-memory errors, recognised by type (never by message text)."""

__all__ = ["LrpWorker", "cache_footprint", "enforce_cache_budget"]


def _rss_peak_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def cache_footprint(cache: Any) -> int:
    """Bytes a forward cache holds: its tensors plus the engine's derived data (per-token maps)."""
    return int(cache.nbytes) + int(getattr(cache, "derived_nbytes", 0))


def enforce_cache_budget(caches: OrderedDict, budget: int, stats: dict) -> int:
    """Keep an actor's live caches (``key -> (cache, meta)``, least recently used first) under ``budget``
    bytes, derived data included; returns the bytes kept.

    First the derived data of older caches is dropped (the engine rebuilds it on demand, with the same
    arithmetic), then older caches are evicted. The newest cache (the batch in work) always stays whole:
    dropping its maps would only rebuild them for its next item, so one batch larger than the budget is
    the one allowed excess (as in the driver's accounting). ``stats`` gets ``evictions``,
    ``derived_drops`` and the maxima ``max_caches``, ``max_cache_bytes``, ``max_derived_bytes``.
    """
    total = sum(cache_footprint(c) for c, _ in caches.values())
    for key in list(caches)[:-1]:
        if total <= budget:
            break
        c, _ = caches[key]
        derived = int(getattr(c, "derived_nbytes", 0))
        if derived:
            c.drop_derived()
            total -= derived
            stats["derived_drops"] = stats.get("derived_drops", 0) + 1
    while total > budget and len(caches) > 1:
        _, (c, _) = caches.popitem(last=False)
        total -= cache_footprint(c)
        stats["evictions"] = stats.get("evictions", 0) + 1
    derived = sum(int(getattr(c, "derived_nbytes", 0)) for c, _ in caches.values())
    stats["max_caches"] = max(stats.get("max_caches", 0), len(caches))
    stats["max_cache_bytes"] = max(stats.get("max_cache_bytes", 0), total)
    stats["max_derived_bytes"] = max(stats.get("max_derived_bytes", 0), derived)
    return total


@ray.remote(concurrency_groups={"ping": 1})
class LrpWorker:
    """One per GPU (or per ``cpus_per_actor`` CPUs). Methods run one at a time, except :meth:`ping`."""

    def __init__(self, cfg: Any, engine_opts: dict, threads: int, cache_budget_bytes: int) -> None:
        torch.set_num_threads(max(1, int(threads)))
        device = engine_opts.get("device", "auto")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.cfg = cfg
        self.engine_opts = {**engine_opts, "device": device}
        self.engine: Any = None
        self.cache_budget = int(cache_budget_bytes)
        self.caches: OrderedDict[str, tuple[Any, dict]] = OrderedDict()
        self.stats = {"forwards": 0, "imports": 0, "exports": 0, "items": 0, "evictions": 0,
                      "derived_drops": 0, "max_caches": 0, "max_cache_bytes": 0, "max_derived_bytes": 0,
                      "load_seconds": 0.0, "decode_seconds": 0.0, "forward_seconds": 0.0,
                      "import_seconds": 0.0, "relevance_seconds": 0.0, "table_seconds": 0.0}
        self.pid = os.getpid()
        self._t: dict[str, float] = dict.fromkeys(("decode", "forward", "import", "relevance", "table"), 0.0)

    def _ensure_engine(self, weights_box: list) -> None:
        """Build the model and its engine on first use. The weights come with every call (a reference,
        fetched once): a restarted actor rebuilds from them, and nothing of the object store is a
        constructor argument (which Ray cannot guarantee across restarts)."""
        if self.engine is not None:
            return
        from lrp_ray.lrp import EngineConfig, LrpEngine
        from lrp_ray.models import build_model, from_module

        t0 = time.perf_counter()
        model = build_model(self.cfg)
        state = ray.get(weights_box[0], timeout=600)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only object-store arrays; load_state_dict copies them
            sd = {k: torch.from_numpy(v) for k, v in state.items()}
        model.load_state_dict(sd, strict=True)
        del sd, state
        # the engine's chunking and folding are fixed by the request (never by this actor's budget), so any
        # actor on any machine computes the same numbers for a work item
        self.engine = LrpEngine(from_module(model.eval()), EngineConfig(**self.engine_opts))
        self.stats["load_seconds"] = time.perf_counter() - t0

    # ----------------------------------------------------------------- health
    @ray.method(concurrency_group="ping")
    def ping(self) -> dict:
        return {"pid": self.pid, "node": ray.get_runtime_context().get_node_id(), "device": self.device,
                "stats": dict(self.stats), "peak_rss": _rss_peak_bytes(), "peak_device": self._device_peak(),
                "cached": list(self.caches)}

    def _device_peak(self) -> int:
        if self.device.startswith("cuda"):
            return int(torch.cuda.max_memory_allocated())
        return 0

    # ----------------------------------------------------------------- caches
    def _store(self, key: str, cache: Any, meta: dict) -> None:
        self.caches[key] = (cache, meta)
        self.caches.move_to_end(key)
        enforce_cache_budget(self.caches, self.cache_budget, self.stats)

    def _forward(self, key: str, images: list) -> tuple[Any, dict]:
        from lrp_ray.models import preprocess

        t0 = time.perf_counter()
        batch = preprocess(list(images), self.cfg)
        t1 = time.perf_counter()
        cache = self.engine.forward(batch)
        self._t["decode"] += t1 - t0
        self._t["forward"] += time.perf_counter() - t1
        meta = {"image_sizes": [tuple(int(v) for v in s) for s in batch.image_sizes]}
        self.stats["forwards"] += 1
        self._store(key, cache, meta)
        return cache, meta

    def _get_cache(self, key: str, images_box: list, cache_box: list | None) -> tuple[Any, dict, str]:
        from lrp_ray.lrp import ForwardCache

        if key in self.caches:
            self.caches.move_to_end(key)
            cache, meta = self.caches[key]
            return cache, meta, "local"
        if cache_box:
            try:
                t0 = time.perf_counter()
                payload = ray.get(cache_box[0], timeout=600)
                cache = ForwardCache.from_numpy(payload["cache"], device=self.device)
                meta = payload["meta"]
                self._t["import"] += time.perf_counter() - t0
                self.stats["imports"] += 1
                self._store(key, cache, meta)
                return cache, meta, "import"
            except OUT_OF_MEMORY:
                raise
            except Exception:  # exporter died or evicted it: fall back to our own forward
                pass
        images = ray.get(images_box[0], timeout=600)
        cache, meta = self._forward(key, images)
        return cache, meta, "forward"

    def export_cache(self, key: str) -> dict:
        """The batch's cache as numpy arrays (for another actor, through the object store)."""
        if key not in self.caches:
            raise KeyError(f"no forward cache for batch {key} on this actor")
        cache, meta = self.caches[key]
        self.stats["exports"] += 1
        return {"cache": cache.to_numpy(), "meta": meta}

    def drop(self, keys: list[str]) -> int:
        for k in keys:
            self.caches.pop(k, None)
        return len(self.caches)

    # ----------------------------------------------------------------- work
    def run_item(self, weights_box: list, item: dict, image_names: list[str], images_box: list,
                 cache_box: list | None) -> dict:
        """Rows of one work item as an Arrow table, plus where its forward cache came from."""
        try:
            return self._run_item(weights_box, item, image_names, images_box, cache_box)
        except OUT_OF_MEMORY as exc:  # anywhere (forward, import, propagation, rows): free this actor's
            self.caches.clear()       # caches; the driver retries the item as it is (same chunking)
            self._empty_device_cache()
            raise ItemOutOfMemory(f"out of memory on {self.device} ({type(exc).__name__})") from None

    def _run_item(self, weights_box: list, item: dict, image_names: list[str], images_box: list,
                  cache_box: list | None) -> dict:
        self._ensure_engine(weights_box)
        t0 = time.perf_counter()
        self._t = dict.fromkeys(("decode", "forward", "import", "relevance", "table"), 0.0)
        cache, meta, source = self._get_cache(item["batch_key"], images_box, cache_box)
        t_cache = time.perf_counter() - t0
        compute = {"features": self._feature_tables, "detections": self._detection_tables,
                   "pixels": self._pixel_tables}[item["kind"]]
        tables, extra = compute(item, cache, meta, image_names, images_box)
        # the engine may have built derived data (per-token maps) for this cache: account for it now
        footprint = cache_footprint(cache)
        enforce_cache_budget(self.caches, self.cache_budget, self.stats)
        self.stats["items"] += 1
        for k, v in self._t.items():
            self.stats[f"{k}_seconds"] += v
        return {"uid": item["uid"], "tables": tables, "source": source,
                "cache_nbytes": int(cache.nbytes), "footprint": footprint, **extra, "timings": dict(self._t),
                "seconds": time.perf_counter() - t0, "cache_seconds": t_cache, "pid": self.pid,
                "peak_rss": _rss_peak_bytes(), "peak_device": self._device_peak()}

    def _feature_tables(self, item: dict, cache: Any, meta: dict, image_names: list[str],
                        images_box: list) -> tuple[dict, dict]:
        """Rows of a feature item: ``relevance`` (one per image x target)."""
        from .writer import result_to_table

        queries = item["queries"] if item["module"] == "decoder" else None
        t1 = time.perf_counter()
        res = self.engine.relevance(cache, item["module"], item["layer"], list(item["features"]), queries)
        t2 = time.perf_counter()
        self._t["relevance"] = t2 - t1
        table = result_to_table(res, image_names, meta["image_sizes"], cfg=self.cfg)
        self._t["table"] = time.perf_counter() - t2
        return {"relevance": table}, {"profile_names": list(res.profile_names)}

    def _detection_tables(self, item: dict, cache: Any, meta: dict, image_names: list[str],
                          images_box: list) -> tuple[dict, dict]:
        """Rows of a detection item: its batch's detections, concepts, concept maps (and faithfulness)."""
        from lrp_ray.lrp.concepts import explain_batch
        from lrp_ray.results.detections import detection_tables, faithfulness_table, tables_to_frames

        t1 = time.perf_counter()
        names = item.get("class_names")
        batch = explain_batch(self.engine, cache, item["selection"], item["layers"],
                              int(item["top_concepts"]))
        t2 = time.perf_counter()
        tables = detection_tables(batch, image_names, meta["image_sizes"], cfg=self.cfg, class_names=names)
        if "faithfulness" in item["datasets"]:
            from lrp_ray.faithfulness import detection_faithfulness

            frame = tables_to_frames([{"detections": tables["detections"]}])["detections"]
            images = ray.get(images_box[0], timeout=600)
            by_name = dict(zip(image_names, images, strict=True))
            scores = detection_faithfulness(self.engine, self.cfg, by_name, frame)
            tables["faithfulness"] = faithfulness_table(scores, names)
        self._t["relevance"] = t2 - t1
        self._t["table"] = time.perf_counter() - t2
        return tables, {"detections": int(tables["detections"].num_rows)}

    def _pixel_tables(self, item: dict, cache: Any, meta: dict, image_names: list[str],
                      images_box: list) -> tuple[dict, dict]:
        """Rows of a pixel item: the pixel maps of its picks (image, feature, query) only, each from the
        target's relevance at the transformer input through input_proj and the backbone."""
        import numpy as np

        from lrp_ray.models import preprocess
        from lrp_ray.pixels import pixel_maps_from_tokens
        from lrp_ray.results.pixels import pixel_table

        t1 = time.perf_counter()
        features = [int(f) for f in item["features"]]
        queries = item["queries"] if item["module"] == "decoder" else None
        rel, qs = self.engine.token_relevance(cache, item["module"], item["layer"], features, queries)
        per = qs.shape[1] // max(1, len(features))
        feats = np.repeat(np.asarray(features), per)
        want = {(str(i), int(f), int(q)) for i, f, q in item["picks"]}
        valid = np.array([[(image_names[b], int(feats[n]), int(qs[b, n])) in want for n in range(qs.shape[1])]
                          for b in range(qs.shape[0])])
        batch = preprocess(list(ray.get(images_box[0], timeout=600)), self.cfg)
        pm = pixel_maps_from_tokens(self.engine, cache, batch, rel, item["composite"], item["max_side"],
                                    valid=valid)
        pm.features, pm.queries = feats, qs
        t2 = time.perf_counter()
        table = pixel_table(pm, item["module"], item["layer"], image_names)
        table = table.filter(pa.array(valid.reshape(-1)))
        self._t["relevance"] = t2 - t1
        self._t["table"] = time.perf_counter() - t2
        return {"pixels": table}, {}

    def _empty_device_cache(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
