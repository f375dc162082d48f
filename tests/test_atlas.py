"""The feature atlas: layout, links, incremental rebuilds, partial folders, user strings, detection
outputs, and the pages in a real headless Chromium (no network)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lrp_ray.report import build_atlas, build_report
from lrp_ray.report.paths import feature_page, feature_slug
from lrp_ray.results import read_manifest, write_manifest
from tests.test_viz_heatmaps import write_fake_results

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


def _pages(out: Path) -> list[Path]:
    return [out / "report.html", *sorted((out / "atlas").rglob("*.html"))]


def _refs(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    return re.findall(r'(?:src|href)="([^"]*)"', text)


def _check_links(out: Path) -> int:
    """Every src/href of every page is a data: URI, an anchor or a relative file that exists; returns how
    many files were checked."""
    n = 0
    for page in _pages(out):
        text = page.read_text(encoding="utf-8")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, page
        for ref in _refs(page):
            if ref.startswith("data:image/png;base64,") or ref.startswith("#"):
                continue
            parts = urlsplit(ref)
            assert not parts.scheme and not parts.netloc, (page, ref)
            target = (page.parent / unquote(parts.path)).resolve()
            assert target.is_file(), (page, ref)
            n += 1
    return n


def test_atlas_pages_links_and_layout(tmp_path):
    out = tmp_path / "OUT"
    write_fake_results(out, n_images=5, features=(0, 3, 7))
    build_report(out, top=2, workers=2)  # a process pool draws the pictures
    atlas = out / "atlas"
    pages = sorted(p.name for p in (atlas / "features").glob("*.html"))
    want = sorted(Path(feature_page(m, lay, f)).name for m, lay in (("encoder", 1), ("decoder", 2))
                  for f in (0, 3, 7))
    assert pages == want and "encoder-1-3.html" in pages
    assert (atlas / "static" / "atlas.js").is_file() and (atlas / "static" / "atlas.css").is_file()
    assert _check_links(out) > 6 * 4
    index = (atlas / "index.html").read_text()
    assert index.count("<tr data-m=") == 6
    page = (atlas / "features" / "decoder-2-7.html").read_text()
    for section in ("ActMax", "RelMax", "lower quantiles", "histograms", "Most similar features",
                    "How it was computed", "python -m lrp_ray.sweep"):
        assert section in page, section
    # top 2 by activation and by relevance: 2 crops each; every picture is a real image file.
    figs = re.findall(r'<figure><img src="\.\./(img/[^"]+)"', page)
    assert len(figs) >= 4
    from PIL import Image

    for f in figs:
        with Image.open(atlas / f) as im:
            assert im.size == (144, 144)
    run = (out / "report.html").read_text()
    assert 'href="atlas/index.html"' in run and "<script" not in run


def test_atlas_incremental_rebuild(tmp_path):
    out = tmp_path / "OUT"
    write_fake_results(out, n_images=4, features=(0, 1), layers=(("encoder", 1),))
    first = build_atlas(out, top=2, workers=1)
    assert first.rendered == 2 and first.pictures > 0
    pics = {p: p.stat().st_mtime_ns for p in (out / "atlas" / "img").rglob("*.webp")}
    # Add a feature: a new part file with feature 5 (copy of feature 0's rows).
    d = out / "relevance" / "module=encoder" / "layer=1"
    t = pq.read_table(d / "part-0.parquet")
    t = t.filter(pa.compute.equal(t.column("feature"), 0))
    t = t.set_column(t.schema.get_field_index("feature"), "feature",
                     pa.array(np.full(t.num_rows, 5, np.int32)))
    pq.write_table(t, d / "part-2.parquet")
    second = build_atlas(out, top=2, workers=1)
    assert second.rendered == 1
    assert [f.feature for f in second.features] == [0, 1, 5]
    assert all(p.stat().st_mtime_ns == m for p, m in pics.items())  # old pictures untouched
    assert (out / "atlas" / "features" / "encoder-1-5.html").is_file()
    third = build_atlas(out, top=2, workers=1)
    assert third.rendered == 0 and third.pictures == 0 and third.pages_written == 0
    # A deleted picture is redrawn; a feature that left the folder loses its page.
    next((out / "atlas" / "img" / "encoder-1-1").glob("*.webp")).unlink()
    (d / "part-2.parquet").unlink()
    fourth = build_atlas(out, top=2, workers=1)
    assert fourth.rendered == 1
    assert not (out / "atlas" / "features" / "encoder-1-5.html").exists()
    assert not (out / "atlas" / "img" / "encoder-1-5").exists()


def test_single_feature_sweep_shows_every_image(tmp_path):
    out = tmp_path / "OUT"
    write_fake_results(out, n_images=7, features=(233,), layers=(("encoder", 5),))
    build_report(out, workers=1)
    page = (out / "atlas" / "features" / "encoder-5-233.html").read_text()
    gallery = page.split('id="gallery"', 1)[1].split("</div>", 1)[0]
    assert len(re.findall(r"<figure>", gallery)) == 7
    assert "Where it looks, on each of the 7 images" in page


def test_partial_folder_renders_with_banner(tmp_path):
    out = tmp_path / "OUT"
    write_fake_results(out, n_images=5, features=(0, 3), layers=(("encoder", 0), ("encoder", 1)))
    m = read_manifest(out)
    m.status = "interrupted"
    m.selection.layers = {"encoder": "0-2"}
    m.model.dims = {"encoder": 3}
    write_manifest(out, m)
    (out / "errors.csv").write_text("image,reason\nbroken.png,cannot identify image file\n")
    d = out / "relevance" / "module=encoder" / "layer=1"
    (d / "part-1.parquet").unlink()                          # layer 1 lost some images
    shutil.copy(out / "relevance" / "module=encoder" / "layer=0" / "part-0.parquet",
                out / "relevance" / "module=encoder" / "layer=0" / "part-9.parquet")  # duplicate rows
    r = subprocess.run([sys.executable, "-m", "lrp_ray.report", str(out), "--workers", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    for page in (out / "report.html", out / "atlas" / "index.html"):
        text = page.read_text()
        assert 'id="banner"' in text
        assert "run status is &#39;interrupted&#39;" in text
        assert "encoder layers 2 were requested but have no rows" in text
        assert "duplicate rows" in text
        assert "features have fewer than the run" in text
        assert "1 images failed" in text
    run = (out / "report.html").read_text()
    assert "broken.png" in run and "cannot identify image file" in run
    assert "of the run&#39;s 5 images" in (out / "atlas" / "features" / "encoder-1-0.html").read_text()


def test_bad_folders_give_one_line(tmp_path):
    out = tmp_path / "OUT"
    write_fake_results(out, n_images=2, features=(0,), layers=(("encoder", 0),))
    (out / "relevance" / "module=encoder" / "layer=0" / "part-0.parquet").write_bytes(b"not parquet")
    r = subprocess.run([sys.executable, "-m", "lrp_ray.report", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: cannot read the relevance dataset") and r.stderr.count("\n") == 1


def test_user_strings_escaped_and_paths_sanitised(tmp_path):
    out = tmp_path / "OUT"
    names = ['<script>alert(1)</script>.png', 'a"b\'c&d.png', "sub/ünï cödé.png", "back\\\\slash.png"]
    write_fake_results(out, n_images=4, features=(0,), layers=(("encoder", 0),), names=names)
    build_report(out, top=4, workers=1)
    page = (out / "atlas" / "features" / "encoder-0-0.html").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;.png" in page
    assert "a&#34;b&#39;c&amp;d.png" in page
    files = [p.relative_to(out / "atlas" / "img") for p in (out / "atlas" / "img").rglob("*") if p.is_file()]
    assert files and all(re.fullmatch(r"encoder-0-0/[0-9a-f]{12}\.(webp|png)", str(f)) for f in files)
    # every image was found (no gray canvas) and each got its own picture
    assert "gray canvas" not in page
    assert len({f for f in files if f.suffix == ".webp"}) >= 4


def test_slugs_are_stable_and_collision_free():
    assert feature_slug("encoder", 5, 233) == "encoder-5-233"
    assert feature_page("decoder", 0, 7) == "features/decoder-0-7.html"
    a, b = feature_slug("My Module", 1, 2), feature_slug("my_module", 1, 2)
    assert a != b and re.fullmatch(r"[a-z0-9_-]+", a)
    assert feature_slug("../x", 1, 2) != feature_slug("..-x", 1, 2) and "/" not in feature_slug("../x", 1, 2)


# ------------------------------------------------------------------------------------- detections
def _write_detections(out: Path, images: list[tuple[str, int, int]]) -> None:
    """Detection outputs (detections, concepts, concept_maps, faithfulness, concepts_by_class.csv) in the
    lrp_ray.results.detections layout, for encoder layer 1 features 0, 3, 7."""
    det_mod = pytest.importorskip("lrp_ray.results.detections")
    rng = np.random.default_rng(3)
    dets = {c.name: [] for c in det_mod.DETECTION_COLUMNS}
    conc = {c.name: [] for c in det_mod.CONCEPT_COLUMNS}
    maps = {c.name: [] for c in det_mod.CONCEPT_MAP_COLUMNS}
    faith = {c.name: [] for c in det_mod.FAITHFULNESS_COLUMNS}
    for i, (name, h, w) in enumerate(images):
        gh, gw = -(-h // 32), -(-w // 32)
        cid, cname = (0, "car") if i % 2 == 0 else (1, "<b>truck</b>")
        row = {"image": name, "query": 2, "class_id": cid, "class_name": cname, "score": 0.9, "x0": 5.0,
               "y0": 5.0, "x1": w / 2, "y1": h / 2, "image_h": h, "image_w": w, "input_h": h, "input_w": w,
               "stride": 32, "grid_h": gh, "grid_w": gw, "logit": 4.0, "input_relevance": 3.0,
               "bias_relevance": 0.5, "pos_relevance": 0.3, "softmax_relevance": 0.2,
               "token_map": rng.normal(size=gh * gw).astype(np.float32).tolist()}
        for k in dets:
            dets[k].append(row[k])
        for rank, f in enumerate((7, 3, 0)):
            rel = float(3 - rank + i * 0.1)
            for k, v in {"image": name, "query": 2, "class_id": cid, "class_name": cname, "module": "encoder",
                         "layer": 1, "feature": f, "relevance": rel, "share": rel / 4,
                         "other_relevance": None, "other_share": None}.items():
                conc[k].append(v)
            if rank < 2:
                for k, v in {"image": name, "query": 2, "class_id": cid, "class_name": cname,
                             "module": "encoder", "layer": 1, "feature": f, "rank": rank, "relevance": rel,
                             "input_relevance": rel * 0.9, "grid_h": gh, "grid_w": gw,
                             "token_map": rng.normal(size=gh * gw).astype(np.float32).tolist()}.items():
                    maps[k].append(v)
        fr = [0.0, 0.5, 1.0]
        for k, v in {"image": name, "query": 2, "class_id": cid, "class_name": cname, "pointing_hit": i != 1,
                     "auc_relevance": 0.3, "auc_random": 0.6, "fractions": fr, "curve_relevance": [1, 0.3, 0],
                     "curve_random": [1, 0.7, 0.1]}.items():
            faith[k].append(v)
    for name, data, schema in (("detections", dets, det_mod.DETECTION_SCHEMA),
                               ("concepts", conc, det_mod.CONCEPT_SCHEMA),
                               ("concept_maps", maps, det_mod.CONCEPT_MAP_SCHEMA),
                               ("faithfulness", faith, det_mod.FAITHFULNESS_SCHEMA)):
        (out / name).mkdir()
        pq.write_table(pa.Table.from_pydict(data, schema=schema), out / name / "part-00000.parquet")
    import pandas as pd

    frame = pd.DataFrame(conc)
    det_mod.concepts_by_class([frame], top_k=2).to_csv(out / det_mod.BY_CLASS_NAME, index=False)


def test_atlas_with_detection_targets(tmp_path):
    out = tmp_path / "OUT"
    write_fake_results(out, n_images=4, features=(0, 3, 7))
    images = [("img_0.png", 96, 160), ("sub/img_1.jpg", 150, 100), ("img_2.png", 128, 128),
              ("sub/img_3.jpg", 64, 200)]
    _write_detections(out, images)
    build_report(out, top=3, workers=1)
    index = (out / "atlas" / "index.html").read_text()
    assert re.search(r'<th data-sort="s_\d" class="n">car</th>', index)
    assert re.search(r'data-f="7" [^>]*data-s_\d="0\.\d+"', index)  # encoder 1/7 carries class shares
    assert "&lt;b&gt;truck&lt;/b&gt;" in index and "<b>truck" not in index
    page = (out / "atlas" / "features" / "encoder-1-7.html").read_text()
    assert "concept relevance for the explained detections" in page
    relmax = page.split('id="relmax"', 1)[1].split('id="quantiles"', 1)[0]
    assert len(re.findall(r'<img src="\.\./img/', relmax)) == 3     # conditional maps, cropped
    assert "Detections it matters most for" in page and "mean share of the logit" in page
    run = (out / "report.html").read_text()
    assert 'id="faithfulness"' in run and "75.0 %" in run          # 3 of 4 pointing hits
    assert "deletion curves" in run
    assert _check_links(out) > 0


# ------------------------------------------------------------------------------------------ browser
def _browser(tmp_path):
    pw = pytest.importorskip("playwright.sync_api")
    if CHROMIUM is None:
        pytest.skip("chromium not installed")
    return pw


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")
def test_atlas_in_headless_chromium(tmp_path):
    pw = _browser(tmp_path)
    out = tmp_path / "OUT"
    write_fake_results(out, n_images=5, features=(0, 3, 7, 12), layers=(("encoder", 1), ("decoder", 2)))
    build_report(out, top=2, workers=1)
    requests: list[str] = []
    with pw.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                   headless=True, args=CHROMIUM_FLAGS)
        ctx.route("**/*", lambda route: (requests.append(route.request.url), route.abort())
                  if not route.request.url.startswith(("file:", "data:")) else route.continue_())
        page = ctx.new_page()
        page.goto((out / "atlas" / "index.html").as_uri(), wait_until="load")
        page.wait_for_function("document.documentElement.dataset.ready === '1'")
        visible = "Array.from(document.querySelectorAll('#atlas tbody tr')).filter(r => !r.hidden)"
        assert page.evaluate(f"{visible}.length") == 8
        page.select_option("#f-module", "decoder")
        assert page.evaluate(f"{visible}.map(r => r.dataset.m)") == ["decoder"] * 4
        assert page.inner_text("#shown") == "4"
        page.select_option("#f-module", "")
        page.fill("#f-feature", "12")
        assert page.evaluate(f"{visible}.map(r => r.dataset.m + r.dataset.f)") == ["encoder12", "decoder12"]
        page.fill("#f-feature", "")
        page.click("#atlas th[data-sort=a]")                       # descending mean activation
        acts = page.evaluate(f"{visible}.map(r => parseFloat(r.dataset.a))")
        assert len(acts) == 8 and acts == sorted(acts, reverse=True)
        page.click("#atlas th[data-sort=a]")                       # again: ascending
        acts = page.evaluate(f"{visible}.map(r => parseFloat(r.dataset.a))")
        assert acts == sorted(acts)
        page.fill("#f-amin", str(acts[4]))
        assert page.evaluate(f"{visible}.length") == 4
        thumbs = page.evaluate("Array.from(document.querySelectorAll('#atlas img')).length")
        assert thumbs == 8
        page.fill("#f-amin", "")
        # Follow a row's link to its feature page: every picture there loads.
        page.click("#atlas a[href='features/encoder-1-3.html']")
        page.wait_for_load_state("load")
        assert page.url.endswith("/atlas/features/encoder-1-3.html")
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        page.wait_for_function("Array.from(document.images).every(i => i.complete)")
        imgs = page.evaluate("Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth])")
        assert len(imgs) >= 5 and all(w > 0 for _, w in imgs), imgs
        assert page.inner_text("h1") == "encoder layer 1 · feature 3"
        # The links of the feature page resolve (similar features, neighbours, index, run page).
        for href in page.evaluate("Array.from(document.links).map(a => a.href)"):
            target = Path(unquote(urlsplit(href).path))
            assert target.is_file(), href
        page.click("text=atlas index")
        page.wait_for_load_state("load")
        assert page.url.endswith("/atlas/index.html")
        # The run page renders its figures and links into the atlas.
        page.goto((out / "report.html").as_uri(), wait_until="load")
        page.wait_for_function("Array.from(document.images).every(i => i.complete)")
        assert page.evaluate("Array.from(document.images).every(i => i.naturalWidth > 0)")
        assert page.evaluate("document.images.length") >= 2
        ctx.close()
    assert requests == []


def test_atlas_of_a_detections_only_run(tmp_path):
    """A run with detection targets only (no feature rows): features come from the concepts."""
    out = tmp_path / "OUT"
    write_fake_results(out, n_images=2, features=(0,))
    shutil.rmtree(out / "relevance")
    _write_detections(out, [("img_0.png", 96, 160), ("sub/img_1.jpg", 150, 100)])
    r = subprocess.run([sys.executable, "-m", "lrp_ray.report", str(out), "--workers", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    pages = sorted(p.name for p in (out / "atlas" / "features").glob("*.html"))
    assert pages == ["encoder-1-0.html", "encoder-1-3.html", "encoder-1-7.html"]
    page = (out / "atlas" / "features" / "encoder-1-7.html").read_text()
    relmax = page.split('id="relmax"', 1)[1].split('id="quantiles"', 1)[0]
    assert len(re.findall(r'<img src="\.\./img/', relmax)) == 2
    assert _check_links(out) > 0


def test_atlas_benchmark_quick(tmp_path):
    """benchmarks/atlas.py --quick runs end to end and reports every figure (no timing is asserted)."""
    res = tmp_path / "res.json"
    r = subprocess.run([sys.executable, "benchmarks/atlas.py", "--quick", "--out", str(tmp_path / "B"),
                        "--json", str(res), "--workers", "1"],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    data = json.loads(res.read_text())
    assert data["first"]["features"] == 28 and data["add_features"]["features"] == 32
    assert data["size"]["atlas_files"] > 28 and not (tmp_path / "B").exists()
    if CHROMIUM is not None:
        assert data["browser"]["index_rows"] == 32 - 4


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")
def test_atlas_index_pages_through_many_rows(tmp_path):
    pw = _browser(tmp_path)
    out = tmp_path / "OUT"
    write_fake_results(out, n_images=2, features=tuple(range(230)), layers=(("encoder", 0),), hidden=4)
    build_atlas(out, top=1, workers=1)
    with pw.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                   headless=True, args=CHROMIUM_FLAGS)
        page = ctx.new_page()
        page.goto((out / "atlas" / "index.html").as_uri(), wait_until="load")
        page.wait_for_function("document.documentElement.dataset.ready === '1'")
        visible = "Array.from(document.querySelectorAll('#atlas tbody tr')).filter(r => !r.hidden)"
        first = page.evaluate(f"{visible}.map(r => parseInt(r.dataset.f))")
        assert first == list(range(200)) and page.inner_text("#shown") == "230"
        page.click("#p-next")
        assert page.evaluate(f"{visible}.map(r => parseInt(r.dataset.f))") == list(range(200, 230))
        page.click("#atlas th[data-sort=f]")                      # sort by feature: back to page 1
        page.click("#atlas th[data-sort=f]")                      # descending
        assert page.evaluate(f"{visible}.map(r => parseInt(r.dataset.f))") == list(range(229, 29, -1))
        page.check("#p-all")
        assert page.evaluate(f"{visible}.length") == 230
        page.fill("#f-feature", "229, 7")
        assert sorted(page.evaluate(f"{visible}.map(r => parseInt(r.dataset.f))")) == [7, 229]
        ctx.close()


def test_missing_images_are_drawn_on_gray_with_a_banner(tmp_path):
    out = tmp_path / "OUT"
    write_fake_results(out, n_images=3, features=(0,), layers=(("encoder", 0),))
    shutil.rmtree(out / "images")
    build_report(out, top=2, workers=1)
    index = (out / "atlas" / "index.html").read_text()
    assert "3 image files not found" in index
    pics = list((out / "atlas" / "img").rglob("*.webp"))
    assert pics
    from PIL import Image

    sizes = set()
    for pic in pics:
        with Image.open(pic) as im:
            sizes.add(im.size)
    assert (144, 144) in sizes  # crops; the gallery (a one-feature sweep) has whole-image overlays too


def test_pictures_drawn_on_gray_are_drawn_again_once_the_images_are_back(tmp_path):
    out = tmp_path / "OUT"
    write_fake_results(out, n_images=3, features=(0,), layers=(("encoder", 0),))
    shutil.move(out / "images", tmp_path / "moved")
    build_report(out, top=2, workers=1)
    pics = sorted((out / "atlas" / "img").rglob("*.webp"))
    gray = {p: p.read_bytes() for p in pics}
    shutil.move(tmp_path / "moved", out / "images")
    build_report(out, top=2, workers=1)
    assert "image files not found" not in (out / "atlas" / "index.html").read_text()
    assert all(p.read_bytes() != b for p, b in gray.items() if p.is_file())  # redrawn from the images


def test_links_to_the_run_page_are_urls(tmp_path):
    out = tmp_path / "OUT"
    write_fake_results(out, n_images=2, features=(0,), layers=(("encoder", 0),))
    run = out / "sub #x?" / "r%20.html"
    run.parent.mkdir()
    build_report(out, run, top=1, workers=1)
    page = next((out / "atlas" / "features").glob("*.html")).read_text()
    hrefs = [h for h in re.findall(r'href="([^"]+)"', page) if "r%2520.html" in h or "r%20.html" in h]
    assert hrefs
    for h in hrefs:
        target = (out / "atlas" / "features" / unquote(urlsplit(h).path)).resolve()
        assert target == run.resolve()
