"""Messy photo folders through the CLI: one sweep over a folder holding every kind of awkward or broken file.

Each image is either processed correctly or listed in errors.csv with a clear reason; the sweep goes on, the
exit code (1) and the final summary line say how many failed, and no output path escapes OUT (heatmaps on).
Unusual but valid formats are checked against a plain 8-bit RGB twin: with one image per batch, the twin's
rows must be equal value for value. A single CLI run serves all the checks (one test per input).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from .conftest import LIST_COLUMNS, drop_dac_override, load_rows, run_cli
from .test_sweep_images import _png_header_only

FEATURES = [0, 1]
UNICODE_NAME = "my photos/Ürlaub 日本 (1).png"
ESCAPE_NAMES = ["nested/.../..png", "nested/..evil../x..y.png", "nested/.hidden/..jpg.png"]


def _png16_rgb(path: Path, rgb8: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one) whose values are ``rgb8 * 257``."""
    a16 = rgb8.astype(">u2") * 257
    h, w, _ = a16.shape
    raw = b"".join(b"\x00" + a16[i].tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def make_messy_folder(f: Path) -> tuple[dict, dict]:
    """Returns (processed: name -> (twin name or None, (h, w)), failed: name -> reason substring)."""
    f.mkdir(parents=True)
    rng = np.random.default_rng(11)
    ok: dict[str, tuple[str | None, tuple[int, int]]] = {}
    bad: dict[str, str] = {}

    def save(name: str, arr: np.ndarray, **kw) -> None:
        (f / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(f / name, format="PNG", **kw)  # "..png" has no suffix for Pillow

    rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    save("ref_rgb.png", rgb)
    ok["ref_rgb.png"] = (None, (48, 64))
    _png16_rgb(f / "rgb16.png", rgb)
    ok["rgb16.png"] = ("ref_rgb.png", (48, 64))
    gray = rng.integers(0, 256, (40, 56), dtype=np.uint8)
    save("gray_as_rgb.png", np.repeat(gray[:, :, None], 3, axis=2))
    ok["gray_as_rgb.png"] = (None, (40, 56))
    save("gray.png", gray)
    ok["gray.png"] = ("gray_as_rgb.png", (40, 56))
    save("gray16.png", gray.astype(np.uint16) * 257)
    assert Image.open(f / "gray16.png").mode == "I;16"
    ok["gray16.png"] = ("gray_as_rgb.png", (40, 56))
    pal = Image.fromarray(rng.integers(0, 256, (44, 60, 3), dtype=np.uint8)).quantize(colors=16)
    pal.save(f / "palette.png")
    save("palette_as_rgb.png", np.asarray(pal.convert("RGB")))
    ok["palette.png"] = ("palette_as_rgb.png", (44, 60))
    ok["palette_as_rgb.png"] = (None, (44, 60))
    rgba = rng.integers(0, 256, (50, 40, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((50, 40)) < 0.3, 0, 255)  # fully transparent or opaque
    save("rgba.png", rgba)
    flat = np.where(rgba[..., 3:] == 255, rgba[..., :3], 255).astype(np.uint8)  # onto white
    save("rgba_as_rgb.png", flat)
    ok["rgba.png"] = ("rgba_as_rgb.png", (50, 40))
    ok["rgba_as_rgb.png"] = (None, (50, 40))
    Image.fromarray(rgb).convert("CMYK").save(f / "cmyk.jpg", quality=95)
    ok["cmyk.jpg"] = (None, (48, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(f / "exif_rotated.jpg", exif=exif.tobytes(), quality=95)
    with Image.open(f / "exif_rotated.jpg") as im:  # stored pixels, rotated by hand
        save("exif_rotated_by_hand.png", np.rot90(np.asarray(im.convert("RGB")), k=-1).copy())
    ok["exif_rotated.jpg"] = ("exif_rotated_by_hand.png", (64, 48))
    ok["exif_rotated_by_hand.png"] = (None, (64, 48))
    save(UNICODE_NAME, rng.integers(0, 256, (36, 70, 3), dtype=np.uint8))
    ok[UNICODE_NAME] = (None, (36, 70))
    shutil.copyfile(f / UNICODE_NAME, f / "copy of it.png")  # two identical images, different names
    ok["copy of it.png"] = (UNICODE_NAME, (36, 70))
    save("tiny.png", rng.integers(0, 256, (20, 31, 3), dtype=np.uint8))  # resized like any other
    ok["tiny.png"] = (None, (20, 31))
    save("one_pixel.png", rng.integers(0, 256, (1, 1, 3), dtype=np.uint8))
    ok["one_pixel.png"] = (None, (1, 1))
    for i, name in enumerate(ESCAPE_NAMES):
        save(name, rng.integers(0, 256, (40 + i, 48, 3), dtype=np.uint8))
        ok[name] = (None, (40 + i, 48))

    # unusable files
    (f / "zero.jpg").write_bytes(b"")
    bad["zero.jpg"] = "empty file"
    (f / "text.jpg").write_text("not a photo, just text\n")
    bad["text.jpg"] = "not an image"
    Image.fromarray(rgb).save(f / "_full.jpg", quality=90)
    data = (f / "_full.jpg").read_bytes()
    (f / "_full.jpg").unlink()
    (f / "truncated.jpg").write_bytes(data[: len(data) // 2])
    bad["truncated.jpg"] = "truncated"
    (f / "corrupt.jpg").write_bytes(data[:3] + bytes(rng.integers(0, 256, 300, dtype=np.uint8)) + data[303:])
    bad["corrupt.jpg"] = "not an image"
    _png_header_only(f / "bomb.png", 40000, 40000)
    bad["bomb.png"] = "decompression bomb"
    shutil.copyfile(f / "ref_rgb.png", f / "unreadable.png")
    os.chmod(f / "unreadable.png", 0)
    bad["unreadable.png"] = "permission denied"
    (f / "broken_link.jpg").symlink_to(f / "gone" / "missing.jpg")
    bad["broken_link.jpg"] = "not found"
    os.mkfifo(f / "pipe.jpg")  # reading it would block forever
    bad["pipe.jpg"] = "not a regular file"
    return ok, bad


def _files(root: Path, skip: Path) -> dict[str, tuple]:
    """Every entry under ``root`` but inside ``skip``: relative path -> (kind, size)."""
    out = {}
    for p in root.rglob("*"):
        if p == skip or skip in p.parents:
            continue
        st = p.lstat()
        out[p.relative_to(root).as_posix()] = (st.st_mode >> 12, st.st_size if p.is_file() else 0)
    return out


@pytest.fixture(scope="module")
def messy(tiny_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    images = root / "photos"
    ok, bad = make_messy_folder(images)
    out = root / "results"
    probe = subprocess.run([sys.executable, "-c", f"open({str(images / 'unreadable.png')!r}, 'rb').read()"],
                           capture_output=True, preexec_fn=drop_dac_override)
    unreadable = probe.returncode != 0
    if not unreadable:  # root that cannot drop CAP_DAC_OVERRIDE: the file is readable, so it is processed
        bad.pop("unreadable.png")
        ok["unreadable.png"] = ("ref_rgb.png", (48, 64))
    before = _files(root, out)
    args = ["--images", str(images), "--module", "encoder", "--layers", "1", "--features", "0,1",
            "--batch-size", "1", "--actors", "1", "--cpus-per-actor", "1", "--address", "local", "--device",
            "cpu", "--heatmaps", "--config", str(tiny_config), "--out", str(out)]
    proc = run_cli(args, preexec_fn=drop_dac_override)
    after = _files(root, out)
    rows = load_rows(out) if (out / "relevance").is_dir() else None
    errors = pd.read_csv(out / "errors.csv") if (out / "errors.csv").is_file() else None
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else {}
    return dict(images=images, out=out, ok=ok, bad=bad, proc=proc, rows=rows, errors=errors,
                manifest=manifest, before=before, after=after, unreadable=unreadable)


def test_sweep_goes_on_and_reports_how_many_failed(messy):
    proc, bad = messy["proc"], messy["bad"]
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # done, some images failed
    m = messy["manifest"]
    assert m["status"] == "complete"
    assert m["counts"]["images_failed"] == len(bad) and m["counts"]["images_ok"] == len(messy["ok"])
    line = f"{len(messy['ok'])} images ok, {len(bad)} failed (see {messy['out'] / 'errors.csv'})"
    assert line in proc.stdout
    # every file is accounted for exactly once: rows or errors.csv
    processed = set(messy["rows"].image)
    failed = list(messy["errors"].image)
    assert processed == set(messy["ok"]) and set(failed) == set(bad) and len(failed) == len(set(failed))
    assert len(messy["rows"]) == len(messy["ok"]) * len(FEATURES)


@pytest.mark.parametrize("name", ["zero.jpg", "text.jpg", "truncated.jpg", "corrupt.jpg", "bomb.png",
                                  "unreadable.png", "broken_link.jpg", "pipe.jpg"])
def test_unusable_file_is_listed_with_a_clear_reason(messy, name):
    if name not in messy["bad"]:
        pytest.skip("running as root without CAP_SETPCAP: a chmod 000 file stays readable")
    errors = messy["errors"].set_index("image")["reason"]
    reason = errors[name]
    assert messy["bad"][name] in reason, reason
    assert "\n" not in reason and len(reason) < 300


def _rows_of(messy, name: str) -> pd.DataFrame:
    return messy["rows"][messy["rows"].image == name].sort_values("feature").reset_index(drop=True)


@pytest.mark.parametrize("name", ["rgb16.png", "gray.png", "gray16.png", "palette.png", "rgba.png",
                                  "exif_rotated.jpg", "cmyk.jpg", "copy of it.png", UNICODE_NAME,
                                  "tiny.png", "one_pixel.png",
                                  *ESCAPE_NAMES])
def test_awkward_but_valid_image_is_processed_correctly(messy, name):
    twin, (h, w) = messy["ok"][name]
    got = _rows_of(messy, name)
    assert list(got.feature) == FEATURES
    assert (got.image_h == h).all() and (got.image_w == w).all()  # EXIF orientation applied
    for col in LIST_COLUMNS:
        assert all(np.isfinite(v).all() for v in got[col])
    assert np.isfinite(got[["act_sum", "relevance_total", "input_relevance"]].to_numpy()).all()
    if twin is not None:  # decodes to the same pixels as its plain RGB twin: the same rows, exactly
        want = _rows_of(messy, twin)
        for col in got.columns:
            if col == "image":
                continue
            if col in LIST_COLUMNS:
                assert all(np.array_equal(a, b) for a, b in zip(got[col], want[col], strict=True)), col
            else:
                assert (got[col].values == want[col].values).all(), col


def test_duplicates_are_listed_in_the_manifest(messy):
    assert [sorted(g) for g in messy["manifest"]["duplicate_images"]] == [sorted(["copy of it.png",
                                                                                   UNICODE_NAME])]


def test_image_names_cannot_make_outputs_escape_out(messy):
    out = messy["out"]
    assert messy["before"] == messy["after"]  # nothing written (or removed) next to OUT or in the images
    for p in out.rglob("*"):  # and nothing in OUT points or lies outside it
        assert not p.is_symlink() and out.resolve() in p.resolve().parents, p
    names = set(messy["rows"].image) | set(messy["errors"].image)
    for name in names:
        assert not name.startswith("/") and ".." not in name.split("/"), name
    pngs = sorted(p.relative_to(out).as_posix() for p in (out / "heatmaps").rglob("*.png"))
    assert len(pngs) == messy["manifest"]["heatmaps"]["files"] == len(FEATURES) * 2 * 3
    assert all(p.count("/") == 1 for p in pngs)  # flat: heatmaps/<module>_L<layer>_F<feature>_...png
