"""Running a prepared sweep: Ray, the actor fleet, the loop, then summary, heatmaps and the manifest.

``execute`` composes :mod:`cluster` (reaching Ray), :class:`~lrp_ray.sweep.fleet.Fleet` (actors),
:class:`~lrp_ray.sweep.loop.SweepLoop` (placement and retries) and
:class:`~lrp_ray.sweep.sink.ResultSink` (OUT). Exit codes: the ``EXIT_*`` constants in :mod:`errors`.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import interrupts
from .errors import (
    EXIT_IMAGES_FAILED,
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_OUTPUT,
    BadRequest,
    OutputError,
    SweepFailed,
    one_line,
)
from .indices import format_indices
from .preparation import Prepared, prepare
from .progress import make_progress
from .sink import ResultSink, versions
from .spec import SweepSpec

__all__ = ["SweepResult", "execute", "run_sweep"]


@dataclass
class SweepResult:
    out: Path
    exit_code: int
    manifest: dict
    errors: list
    failed_items: dict[str, str]


def _connect(prep: Prepared, n_todo: int) -> tuple[bool, str, int, dict, str, list[str]]:
    """Reach Ray and size the fleet: (whether we shut Ray down, description, actors, options, device,
    nodes). Done before OUT is touched: a cluster that cannot be reached must not cost earlier results."""
    from . import cluster

    run = prep.run
    try:
        shutdown, desc = cluster.connect(run.address)
    except Exception as exc:
        where = run.address or os.environ.get("RAY_ADDRESS") or "local"
        raise BadRequest(f"--address {where}: cannot start or reach Ray ({one_line(exc, 300)})") from None
    import ray

    try:
        n, opts, device = cluster.actor_plan(run, "local" in desc)
    except BadRequest:
        if shutdown:
            ray.shutdown()
        raise
    nodes = sorted({x["NodeManagerAddress"] for x in ray.nodes() if x.get("Alive")})
    return shutdown, desc, max(1, min(n, n_todo)), opts, device, nodes


def _start_fleet(prep: Prepared, n: int, opts: dict, device: str, log_fn: Callable[[str], None],
                 on_event: Callable[..., None] | None) -> Any:
    """Ship the weights into the object store and start ``n`` actors."""
    import ray

    from .actor import LrpWorker
    from .fleet import Fleet, RetryPolicy

    run = prep.run
    engine_opts = {"rules": prep.spec.rules, "epsilon": prep.spec.epsilon, "precision": prep.spec.precision,
                   "device": device, "compile": run.compile}
    args = (prep.model_cfg, engine_opts, run.cpus_per_actor, 2 * (int(run.cache_budget_mb) << 20))
    policy = RetryPolicy.from_run(run, n)
    fleet = Fleet(LrpWorker, opts, args, [ray.put(prep.state)], policy, log_fn, on_event)
    fleet.start(n)
    return fleet


def _base_manifest(prep: Prepared, status: str) -> dict:
    return {
        "status": status, "spec": prep.spec.model_dump(mode="json"), "spec_hash": prep.hash,
        "result_spec": prep.result.model_dump(mode="json"), "run_spec": prep.run.model_dump(mode="json"),
        "out": str(prep.out), "images_root": str(prep.image_root), "versions": versions(),
        "model": {"dims": prep.dims, "config": prep.result.model},
        "selection": {"layers": {m: format_indices(v) for m, v in prep.result.layers.items()},
                      "features": prep.result.features, "queries": prep.result.queries},
        "duplicate_images": prep.duplicates, "history": _history(prep),
    }


def _history(prep: Prepared) -> list[dict]:
    """Earlier runs into this folder (a resumed one keeps the record of every run before it)."""
    old = prep.old_manifest
    if not prep.resumed or old is None:
        return []
    last = {"status": old.status, "run_spec": old.run_spec,
            "run": old.run.model_dump(mode="json") if old.run else None,
            "counts": old.counts.model_dump(mode="json") if old.counts else None, "timings": old.timings}
    return [*old.history, last]


def _already_complete(prep: Prepared, todo: list, log_fn: Callable[[str], None]) -> bool:
    """Nothing to compute (``todo``, from the parts on disk) or render in a folder whose manifest says
    complete: the run is reported without writing anything (so this works on read-only storage too)."""
    old = prep.old_manifest
    if todo or not prep.resumed or old is None or old.status != "complete":
        return False
    if prep.run.heatmaps and (old.heatmaps is None or old.heatmaps.error
                              or len(list((prep.out / "heatmaps").glob("*.png"))) < old.heatmaps.files):
        return False
    if old.counts is None or old.counts.images_failed != len(prep.errors):  # errors.csv must be rewritten
        return False
    if not (prep.out / "summary.csv").is_file():
        return False
    log_fn(f"results: {prep.out}")
    log_fn(f"already complete: all {len(prep.plan.items)} work items are in OUT; nothing to compute")
    return True


def execute(prep: Prepared, *, log_fn: Callable[[str], None] = print, progress: bool | None = None,
            on_event: Callable[..., None] | None = None) -> SweepResult:
    """Run the prepared sweep. A result file that cannot be written stops it with ``EXIT_OUTPUT``; nothing
    partial is left and the same request resumes once OUT is writable again. 'complete' is declared only
    when every planned part is on disk with its rows. The lock on OUT is released on every exit path."""
    try:
        return _execute(prep, log_fn, progress, on_event)
    finally:
        prep.release()


def _execute(prep: Prepared, log_fn: Callable[[str], None], progress: bool | None,
             on_event: Callable[..., None] | None) -> SweepResult:
    from .loop import SweepLoop

    t_start = time.perf_counter()
    run, out = prep.run, prep.out
    sink = ResultSink(out, usable=[i.name for i in prep.images])
    # what is done is proven from disk (every planned part there with its rows), never from names alone:
    # a short or corrupt part is computed again
    planned = {it.part_relpath for it in prep.plan.items}
    redo = planned if run.overwrite else set(sink.missing(prep.plan.items))
    todo = [it for it in prep.plan.items if it.part_relpath in redo]
    finished = planned - redo
    maps_before = sum(it.n_maps for it in prep.plan.items if it.part_relpath in finished)
    # pixel maps follow the token sweep (they are for each feature's reference rows, known once its rows
    # are on disk): planned now when they already are, else after the token loop
    pixel_plan, pixel_error = [], None
    if prep.result.pixels is not None and not todo:
        try:
            pixel_plan = _pixel_plan(prep)
        except Exception as exc:  # token parts that cannot be read: they are not what the plan needs
            pixel_error = f"cannot plan the pixel maps: {one_line(exc, 300)}"
    pixel_todo = _redo(sink, pixel_plan, run.overwrite)
    if pixel_error is None and _already_complete(prep, todo + pixel_todo, log_fn):
        manifest = prep.old_manifest.model_dump(mode="json")
        return SweepResult(out, EXIT_IMAGES_FAILED if prep.errors else EXIT_OK, manifest, prep.errors, {})
    fleet, loop, ploop, shutdown, desc, device = None, None, None, False, "nothing to compute", None
    nodes: list[str] = []
    status, exit_code, output_error, actors_info = "complete", EXIT_OK, None, []
    t_ray = time.perf_counter()
    t_sweep = ray_start = 0.0
    pixels_pending = prep.result.pixels is not None and (bool(todo) or bool(pixel_todo))
    if todo or pixels_pending:  # (pixel items, planned after the token loop, are one or more per batch)
        n_items = max(len(todo), len(pixel_todo), len(prep.plan.batches) if pixels_pending else 1)
        shutdown, desc, n_actors, opts, device, nodes = _connect(prep, n_items)
    try:
        interrupts.check()
        sink.open(run.overwrite, prep.errors, todo)
        if prep.out_note:
            log_fn(prep.out_note)
        log_fn(f"results: {out}")
        if finished and not run.overwrite:
            log_fn(f"resuming: {len(prep.plan.items) - len(todo)} of {len(prep.plan.items)} work items "
                   "already done")
        sink.write_manifest(_base_manifest(prep, "running"))
        if todo or pixels_pending:
            fleet = _start_fleet(prep, n_actors, opts, device, log_fn, on_event)
            interrupts.check()
        ray_start = time.perf_counter() - t_ray
        if todo:
            log_fn(f"{desc}: {n_actors} actor(s) on {device}, {len(todo)} work items, "
                   f"{len(prep.plan.batches)} image batches")
            bar, slog = make_progress(prep.plan.total_maps, maps_before, progress, log_fn)
            loop = SweepLoop(prep, todo, fleet, sink, slog, bar, on_event)
            t0 = time.perf_counter()
            try:
                loop.run()
            finally:
                t_sweep = time.perf_counter() - t0
                if bar is not None:
                    bar.close()
                actors_info = fleet.final_info()
            if loop.failed:
                status, exit_code = "incomplete", EXIT_INCOMPLETE
        if pixels_pending and status == "complete":
            if todo:
                try:
                    pixel_plan = _pixel_plan(prep)
                except Exception as exc:
                    pixel_error = f"cannot plan the pixel maps: {one_line(exc, 300)}"
                pixel_todo = _redo(sink, pixel_plan, False)
            if pixel_todo:
                sink.drop_parts(pixel_todo)
                log_fn(f"pixel maps: {sum(it.n_maps for it in pixel_todo)} for the reference rows of each "
                       f"feature, {len(pixel_todo)} work items")
                ploop = SweepLoop(prep, pixel_todo, fleet, sink, log_fn, None, on_event)
                t0 = time.perf_counter()
                try:
                    ploop.run()
                finally:
                    t_sweep += time.perf_counter() - t0
                    actors_info = fleet.final_info()
                if ploop.failed:
                    status, exit_code = "incomplete", EXIT_INCOMPLETE
    except KeyboardInterrupt:
        status, exit_code = "interrupted", EXIT_INTERRUPTED
        log_fn("interrupted: finished work items are kept; run the same command again to resume")
    except SweepFailed as exc:
        status, exit_code = "incomplete", EXIT_INCOMPLETE
        log_fn(f"sweep stopped: {exc}; finished work items are kept; run again to resume")
    except OutputError as exc:
        status, exit_code, output_error = "output_error", EXIT_OUTPUT, exc
        log_fn(f"sweep stopped: {exc}")
    finally:
        if fleet is not None:
            fleet.stop()
        if shutdown:
            import ray

            ray.shutdown()

    if sink.lost and status not in ("interrupted", "output_error"):
        try:  # a resumed batch: its parts from earlier runs still hold the lost images' rows
            sink.drop_lost_rows(prep.plan.items + pixel_plan)
        except OutputError as exc:
            status, exit_code, output_error = "output_error", EXIT_OUTPUT, exc
            log_fn(f"sweep stopped: {exc}")
    if pixel_error and status == "complete":
        status, exit_code = "incomplete", EXIT_INCOMPLETE
        log_fn(f"sweep incomplete: {pixel_error}; run the same command again (with --overwrite if a "
               "token part is damaged)")
    missing = sink.missing(prep.plan.items + pixel_plan) if status == "complete" else []
    if missing:
        status, exit_code = "incomplete", EXIT_INCOMPLETE
        log_fn(f"sweep incomplete: {len(missing)} planned part(s) are not in {out} (first: "
               f"{missing[0]}); run the same command again to compute them")
    t_sum = time.perf_counter()
    summary = None
    if status not in ("interrupted", "output_error"):
        from .summary import write_summary

        try:
            summary = write_summary(out)
        except OSError as exc:
            output_error = OutputError(exc, f"{out / 'summary.csv'}")
            status, exit_code = "output_error", EXIT_OUTPUT
            log_fn(f"sweep stopped: {output_error}")
        except Exception as exc:  # a part that cannot be read (changed behind the sweep's back)
            status, exit_code = "incomplete", EXIT_INCOMPLETE
            log_fn(f"summary failed: {one_line(exc, 300)}; run the same command again to recompute")
    det_summary = None
    if prep.result.detections is not None and status not in ("interrupted", "output_error"):
        det_summary, status, exit_code, output_error = _detection_summary(prep, status, exit_code,
                                                                          output_error, log_fn)
    t_sum = time.perf_counter() - t_sum
    heatmaps = _render_heatmaps(prep, log_fn) if run.heatmaps and status == "complete" else None
    if heatmaps and heatmaps.get("error"):  # a requested step that failed: not complete
        status, exit_code = "incomplete", EXIT_INCOMPLETE
    if exit_code == EXIT_OK and prep.errors:
        exit_code = EXIT_IMAGES_FAILED
    failed_items = {**(loop.failed if loop else {}), **(ploop.failed if ploop else {})}
    lost = sink.lost_names  # changed or vanished during the run
    stats = _merged(lp.stats for lp in (loop, ploop) if lp)
    fstats = dict(fleet.stats) if fleet else {}
    profile_names = dict(loop.profile_names) if loop else {}
    if prep.resumed and prep.old_manifest is not None:
        profile_names = {**(prep.old_manifest.profile_names or {}), **profile_names}
    manifest = _base_manifest(prep, status)
    manifest.update({
        "run": {"ray": desc, "nodes": nodes, "actors": len(fleet.actors) if fleet else 0, "device": device,
                "actors_info": actors_info},
        "counts": {
            "images_found": len(prep.images) + len(prep.errors) - len(lost),
            "images_ok": len(prep.images) - len(lost), "images_failed": len(prep.errors),
            "batches": len(prep.plan.batches),
            "items_total": len(prep.plan.items) + len(pixel_plan),
            "items_skipped_resume": len(prep.plan.items) + len(pixel_plan) - len(todo) - len(pixel_todo),
            "items_run": sum(len(lp.done) for lp in (loop, ploop) if lp), "items_failed": len(failed_items),
            "items_missing": len(missing),
            "maps_total": prep.plan.total_maps, "maps_run": (loop.stats.get("maps", 0) if loop else 0),
            "rows_written_this_run": sink.rows, "summary_rows": None if summary is None else len(summary),
        },
        "forward_passes": stats.get("forward_passes", 0),
        "cache": {k: stats.get(k, 0) for k in ("cache_hits", "cache_transfers", "exports")},
        "reliability": {"item_retries": stats.get("item_retries", 0), "duplicate_results": sink.duplicates,
                        **{k: fstats.get(k, 0) for k in ("reassigned", "actor_restarts", "actors_replaced")}},
        "failed_items": failed_items,
        "error": None if output_error is None else str(output_error),
        "timings": _timings(prep, ray_start, t_sweep, t_sum, [lp for lp in (loop, ploop) if lp], sink,
                            prep.timings.get("prepare", 0) + time.perf_counter() - t_start),
        "peak_memory": {"driver_rss": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
                        "actors": {k: v for lp in (loop, ploop) if lp for k, v in lp.actor_peaks.items()}},
        "profile_names": profile_names,
        "heatmaps": heatmaps,
        "detections": det_summary,
        "pixels": None if prep.result.pixels is None else {
            **prep.result.pixels, "maps": sum(it.n_maps for it in pixel_plan),
            "maps_run": ploop.stats.get("maps", 0) if ploop else 0, "error": pixel_error},
    })
    try:
        sink.write_manifest(manifest)
    except OutputError as exc:  # OUT still unwritable: the manifest of the run (status "running") stays
        if output_error is None:
            output_error = exc
            manifest.update(status="output_error", error=str(exc))
            exit_code = EXIT_OUTPUT
            log_fn(f"sweep stopped: {exc}")
    _final_table(log_fn, prep, manifest, summary)
    return SweepResult(out, exit_code, manifest, prep.errors, failed_items)


def _pixel_plan(prep: Prepared) -> list:
    """Pixel work items for every feature's reference rows (from the token rows on disk)."""
    from lrp_ray.results.references import reference_rows

    from .plan import pixel_items

    refs = reference_rows(prep.out, int(prep.result.pixels["top"]))
    picks = [(r.module, int(r.layer), str(r.image), int(r.feature), int(r.query))
             for r in refs.itertuples(index=False)]
    return pixel_items(picks, prep.plan.batches, tag=prep.hash)


def _redo(sink: ResultSink, items: list, overwrite: bool) -> list:
    """Of ``items``, those to compute: all with ``overwrite``, else those not proven on disk."""
    if overwrite:
        return list(items)
    missing = set(sink.missing(items))
    return [it for it in items if it.part_relpath in missing]


def _detection_summary(prep: Prepared, status: str, exit_code: int, output_error: Any,
                       log_fn: Callable[[str], None]) -> tuple[dict | None, str, int, Any]:
    """``concepts_by_class.csv`` and the manifest's ``detections`` counts (on failure: why, and the
    run's new status)."""
    from .summary import write_detection_summary

    try:
        info = write_detection_summary(prep.out, int(prep.result.detections["top_concepts"]))
    except OSError as exc:
        err = OutputError(exc, f"{prep.out / 'concepts_by_class.csv'}")
        log_fn(f"sweep stopped: {err}")
        return None, "output_error", EXIT_OUTPUT, output_error or err
    except Exception as exc:
        log_fn(f"detection summary failed: {one_line(exc, 300)}; run the same command again to recompute")
        return None, "incomplete", EXIT_INCOMPLETE, output_error
    return info, status, exit_code, output_error


def _merged(counters: Any) -> dict[str, float]:
    """Sum of dicts of numbers (the loops' stats or seconds)."""
    out: dict[str, float] = {}
    for c in counters:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


def _timings(prep: Prepared, ray_start: float, sweep: float, summary: float, loops: list, sink: ResultSink,
             total: float) -> dict[str, float]:
    """Wall seconds of the phases, and where the sweep's time went (``manifest.json`` ``timings``).

    Driver wall seconds: ``discover``, ``model_load``, ``validate_images``, ``plan``, ``prepare`` (all of
    these), ``ray_start`` (connect or start Ray, the weights into the object store, actors started),
    ``sweep`` (the loop), ``summary``, ``total``. Summed over this run's written work items: ``decode``
    (image reads on the driver + resize/normalise on the actors), ``forward``, ``cache_import``,
    ``propagation`` (actor-seconds: with several actors they can add up to more than ``sweep``),
    ``writing`` (the driver's Parquet part writes) and ``result_tables`` (rows to Arrow on the actors).
    """
    sec = _merged(lp.seconds for lp in loops)
    out = dict(prep.timings)
    out.update({
        "ray_start": ray_start, "sweep": sweep, "summary": summary,
        "decode": sec.get("read_images", 0.0) + sec.get("decode", 0.0), "forward": sec.get("forward", 0.0),
        "cache_import": sec.get("import", 0.0), "propagation": sec.get("relevance", 0.0),
        "result_tables": sec.get("table", 0.0), "writing": sink.seconds, "total": total,
    })
    return {k: round(float(v), 3) for k, v in out.items()}


def _render_heatmaps(prep: Prepared, log_fn: Callable[[str], None]) -> dict:
    """OUT/heatmaps: overlays of the top images per module/layer/feature (lrp_ray.viz); ``error`` says
    why they were not rendered."""
    where = str(prep.out / "heatmaps")
    t0 = time.perf_counter()
    try:
        from lrp_ray.viz import write_top_heatmaps

        written = write_top_heatmaps(prep.out, prep.image_root, top_n=3)
    except Exception as exc:
        log_fn(f"--heatmaps: rendering failed: {one_line(exc)}")
        seconds = round(time.perf_counter() - t0, 3)
        return {"dir": where, "files": 0, "error": one_line(exc), "seconds": seconds}
    note = "" if prep.spec.feature_targets else (
        " (heatmap PNGs are drawn for feature targets; the detections' maps are in the atlas: "
        "python -m lrp_ray.report)")
    log_fn(f"heatmaps: {len(written)} images in {where}{note}")
    return {"dir": where, "files": len(written), "seconds": round(time.perf_counter() - t0, 3)}


def _final_table(log_fn: Callable[[str], None], prep: Prepared, manifest: dict, summary: Any) -> None:
    c, cache = manifest["counts"], manifest["cache"]
    head = f"{'module':8} {'layer':>5} {'features':>8} {'maps':>10} {'input rel.':>11} {'activation':>11}"
    lines = ["", head]
    if summary is not None and len(summary):
        for m in ("encoder", "decoder"):
            for layer, g in summary[summary["module"] == m].groupby("layer", sort=True):
                rel, act = g["input_relevance_mean"].mean(), g["activation_mean"].mean()
                lines.append(f"{m:8} {int(layer):>5} {len(g):>8} {int(g['n_rows'].sum()):>10} "
                             f"{rel:>11.4g} {act:>11.4g}")
    det = manifest.get("detections")
    if det:
        classes = ", ".join(f"{k} {v}" for k, v in (det.get("per_class") or {}).items())
        lines.append(f"detections explained: {det['detections']}{f' ({classes})' if classes else ''}; "
                     f"{det['images_without_detections']} image(s) without one; per-class concept ranking "
                     f"in {prep.out / 'concepts_by_class.csv'}")
        if "pointing_game" in det:
            lines.append(f"faithfulness: pointing game {det['pointing_game']:.0%}, deletion AUC "
                         f"{det['auc_relevance_mean']:.3f} by relevance vs {det['auc_random_mean']:.3f} "
                         "random")
    failed = f" (see {prep.out / 'errors.csv'})" if c["images_failed"] else ""
    lines.append(f"status {manifest['status']}: {c['images_ok']} images ok, "
                 f"{c['images_failed']} failed{failed}")
    lines.append(f"{c['items_total']} work items: {c['items_skipped_resume']} resumed, {c['items_run']} run, "
                 f"{c['items_failed']} failed; {manifest['forward_passes']} forward passes, "
                 f"{cache['cache_hits']} cache hits, {cache['cache_transfers']} cache transfers; "
                 f"{manifest['timings']['total']:.1f}s")
    lines.append(f"results: {prep.out}")
    for line in lines:
        log_fn(line)


def run_sweep(spec: SweepSpec, *, log_fn: Callable[[str], None] = print, progress: bool | None = None,
              on_event: Callable[..., None] | None = None) -> SweepResult:
    """Validate (raises :class:`BadRequest`), then run. The in-process API behind the CLI."""
    return execute(prepare(spec, log_fn), log_fn=log_fn, progress=progress, on_event=on_event)
