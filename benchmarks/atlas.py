"""The feature atlas on a synthetic sweep folder shaped like the thesis sweep.

Writes ``OUT`` with 6 encoder + 6 decoder layers x 256 features x 131 images (token maps 25 x 38, 256
input channels, images 800 x 1216 JPEG) in the documented layout, then measures:

- ``python -m lrp_ray.report OUT`` (a subprocess): wall time and peak RSS of the driver and of the driver
  plus its worker processes;
- the size on disk of ``OUT/atlas`` and ``OUT/report.html``;
- in headless Chromium (playwright driving the system ``chromium``): the index page's load event and the
  time until its script has indexed every row (``data-ready``), a sort and a filter on it, and the load
  event of feature pages;
- an incremental rerun after adding 8 features (one part file), and a rerun with nothing changed.

``--quick``: 2 layers x 16 features x 12 images (seconds; what the smoke test runs).

    python benchmarks/atlas.py --out /tmp/atlas_bench [--quick] [--keep] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from lrp_ray.results import SCHEMA, Manifest, ModelInfo, Selection, write_manifest

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


def _images(folder: Path, n: int, h: int, w: int) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        base = (np.sin(xx / (40 + 7 * (i % 5))) * 60 + np.cos(yy / (30 + 5 * (i % 7))) * 60 + 128)
        img = np.stack([base, np.roll(base, 50 * i, 1), 255 - base], axis=2)
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        img[y0:y0 + h // 4, x0:x0 + w // 4] = (200, 40, 40)
        name = f"car_{i:03d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / name, quality=85)
        names.append(name)
    return names


def _part(module: str, layer: int, names: list[str], feats: np.ndarray, gh: int, gw: int, hidden: int,
          size: tuple[int, int], rng: np.random.Generator) -> pa.Table:
    """Rows (image-major, then feature) with smooth blob-shaped token maps."""
    b, f = len(names), len(feats)
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    cy = (feats * 7919 % gh).astype(np.float32)[None, :, None, None] + rng.normal(0, 2, (b, f, 1, 1))
    cx = (feats * 104729 % gw).astype(np.float32)[None, :, None, None] + rng.normal(0, 3, (b, f, 1, 1))
    amp = rng.gamma(2.0, 1.0, (b, f, 1, 1)).astype(np.float32)
    maps = amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 18.0) \
        + rng.normal(0, 0.05, (b, f, gh, gw)).astype(np.float32)
    maps = maps.astype(np.float32).reshape(b * f, gh * gw)
    inp = maps.sum(1).astype(np.float64)
    act = amp.reshape(-1).astype(np.float64)
    n = b * f
    h, w = size
    tokens = gh * gw
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * tokens)
    chan = rng.normal(size=(n, hidden)).astype(np.float32)
    prof = np.stack([act, act * 0.9, inp], 1)
    ints = lambda v: pa.array(np.full(n, v, np.int32))  # noqa: E731
    cols = {
        "image": pa.array(np.repeat(np.asarray(names, dtype=object), f)), "image_h": ints(h),
        "image_w": ints(w),
        "input_h": ints(h), "input_w": ints(w), "grid_h": ints(gh), "grid_w": ints(gw), "stride": ints(32),
        "feature": pa.array(np.tile(feats.astype(np.int32), b)),
        "query": pa.array(np.tile(np.zeros(f, np.int32), b), mask=np.full(n, module == "encoder")),
        "act_sum": pa.array(act * tokens), "act_max": pa.array(act * 3), "act_mean": pa.array(act),
        "relevance_total": pa.array(inp + 0.1), "input_relevance": pa.array(inp),
        "bias_relevance": pa.array(np.full(n, 0.1)), "pos_relevance": pa.array(np.zeros(n)),
        "softmax_relevance": pa.array(np.zeros(n)),
        "token_map": pa.ListArray.from_arrays(offsets, pa.array(maps.reshape(-1))),
        "channel_relevance": pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * hidden),
                                                      pa.array(chan.reshape(-1))),
        "profile": pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * 3),
                                            pa.array(prof.reshape(-1))),
        "rules": pa.array(["cp"] * n), "epsilon": pa.array(np.full(n, 1e-6)),
        "precision": pa.array(["fp32"] * n),
    }
    return pa.Table.from_pydict(cols, schema=SCHEMA)


def make_folder(out: Path, layers: int, features: int, n_images: int, grid: tuple[int, int],
                hidden: int, held_back: int, batch: int = 8) -> tuple[float, Path | None]:
    """The synthetic sweep folder; the last ``held_back`` features of encoder layer ``layers - 1`` go into
    a separate part file written later (returned, not yet in place) to measure an incremental rerun."""
    t0 = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    gh, gw = grid
    size = (gh * 32, gw * 32)
    names = _images(out / "images", n_images, *size)
    rng = np.random.default_rng(1)
    feats = np.arange(features)
    late: Path | None = None
    for module in ("encoder", "decoder"):
        for layer in range(layers):
            d = out / "relevance" / f"module={module}" / f"layer={layer}"
            d.mkdir(parents=True, exist_ok=True)
            hold = module == "encoder" and layer == layers - 1 and held_back
            main = feats[:-held_back] if hold else feats
            for bi in range(0, n_images, batch):
                pq.write_table(_part(module, layer, names[bi:bi + batch], main, gh, gw, hidden, size, rng),
                               d / f"part-b{bi // batch:05d}-c0000.parquet")
            if hold:
                late = out / "late.parquet"
                pq.write_table(_part(module, layer, names, feats[-held_back:], gh, gw, hidden, size, rng),
                               late)
    profile = {f"{m}/{lay}": ["target", f"{m}.{lay}", "encoder.input"] for m in ("encoder", "decoder")
               for lay in range(layers)}
    write_manifest(out, Manifest(
        status="complete", images_root=str(out / "images"), profile_names=profile,
        model=ModelInfo(config={"min_size_test": size[0], "max_size_test": size[1], "res5_dilation": 1},
                        dims={"encoder": layers, "decoder": layers, "hidden_dim": hidden}),
        selection=Selection(layers={"encoder": f"0-{layers - 1}", "decoder": f"0-{layers - 1}"},
                            features=f"0-{features - 1}"),
        spec={"module": "both", "layers": "all", "features": "all", "images": str(out / "images")},
        timings={"total": 1.0}))
    return time.perf_counter() - t0, late


def run_report(out: Path, extra: list[str]) -> dict:
    """``python -m lrp_ray.report OUT``: wall time, peak RSS of the driver and of driver + workers."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lrp_ray.report", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = {"driver": 0, "total": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                rss = ps.memory_info().rss
                kids = sum(c.memory_info().rss for c in ps.children(recursive=True))
            except psutil.Error:
                break
            peak["driver"] = max(peak["driver"], rss)
            peak["total"] = max(peak["total"], rss + kids)
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    stdout, stderr = proc.communicate()
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"report failed ({proc.returncode}): {stderr[-3000:]}")
    state = json.loads((out / "atlas" / "state.json").read_text())
    return {"seconds": round(time.perf_counter() - t0, 2),
            "peak_rss_driver_mb": round(peak["driver"] / 2**20),
            "peak_rss_total_mb": round(peak["total"] / 2**20), "features": len(state["features"]),
            "stdout": stdout.strip().splitlines()[-2:]}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def browser(out: Path, chromium: str, pages: int = 5) -> dict:
    """Index load/interactive, sort and filter times, and feature page loads, in headless Chromium."""
    from playwright.sync_api import sync_playwright

    index = (out / "atlas" / "index.html").as_uri()
    feats = sorted((out / "atlas" / "features").glob("*.html"))
    pick = [feats[int(i)] for i in np.linspace(0, len(feats) - 1, min(pages, len(feats)))]
    res: dict = {}
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = b.new_page(viewport={"width": 1280, "height": 900})
        for attempt in ("cold", "warm"):
            t0 = time.perf_counter()
            page.goto(index, wait_until="load")
            page.wait_for_function("document.documentElement.dataset.ready === '1'")
            t = time.perf_counter() - t0
            nav = page.evaluate("() => { const n = performance.getEntriesByType('navigation')[0]; "
                                "return {dcl: n.domContentLoadedEventEnd, load: n.loadEventEnd}; }")
            res[f"index_{attempt}"] = {"interactive_s": round(t, 3),
                                       "dom_content_loaded_s": round(nav["dcl"] / 1000, 3),
                                       "load_event_s": round(nav["load"] / 1000, 3)}
        rows = page.evaluate("document.querySelectorAll('#atlas tbody tr').length")
        t0 = time.perf_counter()
        page.click("#atlas th[data-sort=a]")
        page.wait_for_function(
            "document.querySelector('#atlas th[data-sort=a]').className.includes('sorted')")
        res["index_sort_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        page.fill("#f-feature", "233")
        page.wait_for_function(f"document.getElementById('shown').textContent !== String({rows})")
        res["index_filter_s"] = round(time.perf_counter() - t0, 3)
        res["index_rows"] = rows
        loads = []
        for f in pick:
            t0 = time.perf_counter()
            page.goto(f.as_uri(), wait_until="load")
            loads.append(time.perf_counter() - t0)
        res["feature_page_load_s"] = {"max": round(max(loads), 3), "mean": round(float(np.mean(loads)), 3),
                                      "pages": len(loads)}
        b.close()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/atlas_bench",
                    help="folder for the synthetic sweep (deleted after)")
    ap.add_argument("--quick", action="store_true", help="2 layers x 16 features x 12 images")
    ap.add_argument("--keep", action="store_true", help="keep the folder")
    ap.add_argument("--workers", type=int, default=None, help="passed to the report (default: its own)")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    ap.add_argument("--json", default=None, help="write the figures here too")
    args = ap.parse_args(argv)
    out = Path(args.out)
    shape = dict(layers=1, features=16, n_images=12, grid=(6, 9), hidden=16, held_back=4) if args.quick else \
        dict(layers=6, features=256, n_images=131, grid=(25, 38), hidden=256, held_back=8)
    extra = ["--workers", str(args.workers)] if args.workers is not None else []
    result: dict = {"shape": {**shape, "grid": list(shape["grid"]), "modules": 2},
                    "cpus": psutil.cpu_count(), "python": sys.version.split()[0]}
    try:
        secs, late = make_folder(out, **shape)
        result["folder"] = {"seconds": round(secs, 1), "relevance_mb": round(du(out / "relevance") / 2**20),
                            "rows": sum(pq.ParquetFile(p).metadata.num_rows
                                        for p in (out / "relevance").rglob("*.parquet"))}
        print("folder:", result["folder"], flush=True)
        result["first"] = run_report(out, extra)
        print("first build:", result["first"], flush=True)
        result["size"] = {"atlas_mb": round(du(out / "atlas") / 2**20, 1),
                          "atlas_files": sum(1 for p in (out / "atlas").rglob("*") if p.is_file()),
                          "report_html_mb": round((out / "report.html").stat().st_size / 2**20, 2),
                          "index_html_mb": round((out / "atlas" / "index.html").stat().st_size / 2**20, 2)}
        print("size:", result["size"], flush=True)
        if args.chromium:
            result["browser"] = browser(out, args.chromium)
            print("browser:", result["browser"], flush=True)
        if late is not None:
            dest = next((out / "relevance").glob(f"module=encoder/layer={shape['layers'] - 1}"))
            shutil.move(str(late), dest / "part-late-c0001.parquet")
            result["add_features"] = run_report(out, extra)
            print("after adding features:", result["add_features"], flush=True)
        result["unchanged"] = run_report(out, extra)
        print("nothing changed:", result["unchanged"], flush=True)
    finally:
        if not args.keep and out.exists():
            shutil.rmtree(out)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
