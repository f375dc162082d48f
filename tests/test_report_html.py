"""The run page (OUT/report.html): one file whose figures are inline, links into the feature atlas only, and
renders in headless Chromium with no broken image."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lrp_ray.report import ReportError, build_report
from lrp_ray.report.__main__ import main as report_main
from lrp_ray.viz.heatmaps import select_top_rows
from tests.test_viz_heatmaps import write_fake_results

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)

MARKER_SCRIPT = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  var m = document.createElement('div');
  m.id = 'render-check';
  m.textContent = 'IMAGES=' + imgs.length + ' BROKEN=' + bad.length + ' W=' +
    imgs.map(function (i) { return i.naturalWidth; }).join(',');
  document.body.appendChild(m);
});
</script>
"""


def _highlighted(out: Path, max_features: int) -> int:
    """Features the run page shows with a thumbnail: per layer, up to ``max_features``."""
    rows = select_top_rows(out / "relevance", 1, load_maps=False)
    per_layer: dict[tuple[str, int], set[int]] = {}
    for r in rows:
        per_layer.setdefault((r.module, r.layer), set()).add(r.feature)
    return sum(min(len(f), max_features) for f in per_layer.values())


def _build(tmp_path: Path, **kw) -> Path:
    out = tmp_path / "OUT"
    write_fake_results(out, n_images=5, features=(0, 3, 7))
    return build_report(out, workers=1, **kw)


def test_report_is_self_contained(tmp_path):
    from lrp_ray.results import read_manifest, write_manifest

    out = tmp_path / "OUT"
    write_fake_results(out, n_images=5, features=(0, 3, 7))
    m = read_manifest(out)
    m.timings = {"ray_start": 6.1, "sweep": 2.3, "propagation": 0.5, "total": 14.2}
    write_manifest(out, m)
    path = build_report(out, top=2, max_features=2, workers=1)
    assert path == out / "report.html"
    text = path.read_text()
    srcs = re.findall(r'src="([^"]*)"', text)
    hrefs = re.findall(r'href="([^"]*)"', text)
    figures = [s for s in srcs if s.startswith("data:image/png;base64,")]
    thumbs = [s for s in srcs if not s.startswith("data:")]
    # Figures are inline: timings, conservation, and per layer (2) the matrix and the profile.
    assert len(figures) == 2 + 2 * 2
    # Other pictures and links point into the atlas, at files that exist.
    assert len(thumbs) == _highlighted(out, 2) == 4
    assert all(s.startswith("atlas/img/") and (out / s).is_file() for s in thumbs)
    for h in hrefs:
        assert h.startswith("#") or (h.startswith("atlas/") and (out / h.split("#")[0]).is_file()), h
    assert "<script" not in text and "<link" not in text and "@import" not in text
    assert "http://" not in text and "https://" not in text
    for needed in ("encoder layer 1", "decoder layer 2", "Conservation profile", "Feature x input-channel",
                   "Request", "summary.csv", "decoder.2.cross_attn", "Timings", "Failed images"):
        assert needed in text
    # Labelled tables, not JSON dumps of the manifest.
    assert "{&#34;" not in text and '{"' not in text


def test_report_cli(tmp_path, capsys):
    out = tmp_path / "OUT"
    write_fake_results(out, n_images=3, features=(1,))
    dest = tmp_path / "r" / "x.html"
    assert report_main([str(out), "--out", str(dest), "--top", "1", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert dest.is_file() and "report written to" in printed and "feature atlas: file://" in printed
    # A run page away from OUT still links to the atlas in OUT, and the atlas back to it.
    text = dest.read_text()
    assert 'href="../OUT/atlas/index.html"' in text
    assert (out / "atlas" / "index.html").read_text().count('href="../../r/x.html"') == 1
    assert report_main([str(tmp_path / "missing")]) == 2


def test_report_errors(tmp_path):
    with pytest.raises(ReportError):
        build_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError):
        build_report(tmp_path / "empty")


def test_report_module_entrypoint(tmp_path):
    out = tmp_path / "OUT"
    write_fake_results(out, n_images=2, features=(0,), layers=(("encoder", 0),))
    r = subprocess.run([sys.executable, "-m", "lrp_ray.report", str(out), "--top", "1", "--no-atlas"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (out / "report.html").is_file() and not (out / "atlas").exists()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")
def test_report_renders_in_headless_chromium(tmp_path):
    path = _build(tmp_path, top=2, max_features=2)
    # Same page plus a checker script (the report itself has none).
    page = path.parent / "check.html"  # next to the report: its atlas links resolve the same
    page.write_text(path.read_text().replace("</body>", MARKER_SCRIPT + "</body>"))
    profile = tmp_path / "chrome-profile"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=10000",
           "--dump-dom", page.as_uri()]
    env = {**os.environ, "HOME": str(tmp_path)}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    dom = r.stdout
    m = re.search(r'id="render-check">IMAGES=(\d+) BROKEN=(\d+) W=([\d,]*)<', dom)
    assert m, f"no render marker in the DOM (rc={r.returncode}); stderr tail: {r.stderr[-2000:]}"
    n, broken = int(m.group(1)), int(m.group(2))
    # conservation chart (no timings in the fake manifest), matrix + profile of 2 layers, atlas thumbnails
    assert n == 1 + 2 * 2 + _highlighted(tmp_path / "OUT", 2)
    assert broken == 0
    assert all(int(w) > 0 for w in m.group(3).split(","))
    # And a screenshot of the report itself renders to a non-blank PNG.
    shot = tmp_path / "shot.png"
    r2 = subprocess.run([*cmd[:-2], f"--screenshot={shot}", "--window-size=1200,1600", path.as_uri()],
                        capture_output=True, text=True, timeout=240, env=env)
    assert shot.is_file(), r2.stderr[-2000:]
    import numpy as np
    from PIL import Image

    im = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert im.std() > 5


def _conservation_rows(text: str) -> dict[str, list[str]]:
    """Cells of the relevance accounting table, by 'module layer'."""
    section = text.split('id="conservation"', 1)[1].split("</table>", 1)[0]
    rows = {}
    for tr in re.findall(r"<tr>(.*?)</tr>", section)[1:]:
        cells = re.findall(r"<td>(.*?)</td>", tr)
        rows[f"{cells[0]} {cells[1]}"] = cells[2:]
    return rows


def test_report_conservation_table(tmp_path):
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    out = tmp_path / "OUT"
    write_fake_results(out, n_images=3, features=(0, 3))
    # one decoder row whose parts do not add up to its total
    f = out / "relevance" / "module=decoder" / "layer=2" / "part-1.parquet"
    t = pq.read_table(f)
    i = t.schema.get_field_index("softmax_relevance")
    shift = pa.array([0.0] * (t.num_rows - 1) + [-0.25])
    t = t.set_column(i, "softmax_relevance", pc.add(t.column(i), shift))
    pq.write_table(t, f)
    rows = _conservation_rows(build_report(out, top=1, atlas=False).read_text())
    assert set(rows) == {"encoder 1", "decoder 2"}
    assert rows["encoder 1"][0] == "6" and float(rows["encoder 1"][2]) < 1e-12
    assert rows["decoder 2"][0] == "12" and rows["decoder 2"][2] == "0.25"
    assert float(rows["decoder 2"][3]) == pytest.approx(0.25 / float(rows["decoder 2"][1]), rel=0.01)


def test_report_of_version_1_outputs(tmp_path):
    out = tmp_path / "OUT"
    write_fake_results(out, n_images=2, features=(0,), version=1)
    text = build_report(out, top=1, workers=1).read_text()
    rows = _conservation_rows(text)
    assert rows["encoder 1"][0].startswith("2 (2 rows without pos/softmax)") and rows["encoder 1"][3] == "n/a"
    assert "decoder.2.cross_attn" in text  # profile names of a manifest without version
    (out / "manifest.json").write_text("{broken")
    assert "manifest.json unreadable" in build_report(out, top=0, workers=1).read_text()


def test_report_escapes_user_strings(tmp_path):
    from lrp_ray.results import read_manifest, write_manifest

    out = tmp_path / "OUT"
    evil = "we<i>rd \"&'.png"
    write_fake_results(out, n_images=2, features=(0,), layers=(("encoder", 0),), names=[evil, "b.png"])
    m = read_manifest(out)
    m.spec = {"description": "<script>alert(1)</script>"}
    write_manifest(out, m)
    text = build_report(out, top=2, workers=1).read_text()
    assert "<script" not in text and "<i>rd" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    page = (out / "atlas" / "features" / "encoder-0-0.html").read_text()
    assert "<i>rd" not in page and "we&lt;i&gt;rd &#34;&amp;&#39;.png" in page
