"""Image discovery and validation: recursion, extensions, globs, bad files, duplicates, safe names."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lrp_ray.sweep.images import (
    discover,
    duplicate_groups,
    validate,
    write_synthetic_images,
)
from lrp_ray.sweep.spec import BadRequest

from .conftest import TINY_SIZES, write_images


def _png_header_only(path, width, height):
    """A PNG whose header claims width x height (no pixel data): a decompression-bomb stand-in."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def make_bad_images(folder):
    """Every kind of unusable file the sweep must survive; returns {name: reason substring}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a JPEG\n")
    good = folder / "_full.png"
    Image.fromarray(np.full((80, 80, 3), 120, np.uint8)).save(good)
    data = good.read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    good.unlink()
    _png_header_only(folder / "bomb.png", 20000, 20000)
    (folder / "broken_link.jpg").symlink_to(folder / "does_not_exist.jpg")
    return {"zero.jpg": "empty file", "text.jpg": "not an image", "truncated.png": "", "bomb.png": "bomb",
            "broken_link.jpg": "not found"}


def test_discover_recursive_extensions_and_glob(tmp_path):
    write_images(tmp_path / "imgs")
    (tmp_path / "imgs" / "notes.txt").write_text("x")
    (tmp_path / "imgs" / "UPPER.JPG").write_bytes((tmp_path / "imgs" / "a.jpg").read_bytes())
    s = discover(str(tmp_path / "imgs"))
    assert s.names == sorted([*TINY_SIZES, "UPPER.JPG"])
    assert s.root == (tmp_path / "imgs").resolve()
    g = discover(str(tmp_path / "imgs" / "**" / "*.png"))
    assert g.names == ["b.png", "sub/c.png"] and g.root == (tmp_path / "imgs").resolve()
    one = discover(str(tmp_path / "imgs" / "sub" / "c.png"))
    assert one.names == ["c.png"]
    for name in s.names:  # names are relative and cannot point outside the images root
        assert not name.startswith("/") and ".." not in name.split("/")
    out = tmp_path / "imgs" / "results"  # an output folder inside the image folder is never an input
    write_images(out / "heatmaps", {"h.png": (40, 40)})
    assert discover(str(tmp_path / "imgs"), exclude=out).names == s.names
    assert discover(str(tmp_path / "imgs" / "**" / "*.png"), exclude=out).names == g.names
    with pytest.raises(BadRequest, match="matches no image files"):
        discover(str(tmp_path / "imgs" / "*.gif"))
    with pytest.raises(BadRequest, match="no such folder"):
        discover(str(tmp_path / "missing"))


def test_bad_images_are_recorded_with_reasons(tmp_path):
    folder = tmp_path / "mixed"
    expected = make_bad_images(folder)
    write_images(folder, {"ok.png": (64, 64)})
    ok, bad = validate(discover(str(folder)))
    assert [i.name for i in ok] == ["ok.png"] and (ok[0].height, ok[0].width) == (64, 64)
    reasons = {e.name: e.reason for e in bad}
    assert set(reasons) == set(expected)
    for name, part in expected.items():
        assert part in reasons[name] and reasons[name], (name, reasons[name])


def test_duplicates_are_found_and_kept(tmp_path):
    write_images(tmp_path, {"x.png": (64, 64)})
    (tmp_path / "copy_of_x.png").write_bytes((tmp_path / "x.png").read_bytes())
    ok, bad = validate(discover(str(tmp_path)))
    assert not bad and len(ok) == 2
    assert duplicate_groups(ok) == [["copy_of_x.png", "x.png"]]


def test_synthetic_images_are_deterministic(tmp_path):
    a = write_synthetic_images(tmp_path / "a")
    b = write_synthetic_images(tmp_path / "b")
    names = sorted(p.name for p in a.iterdir())
    assert len(names) == 4 and names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes()
    ok, bad = validate(discover(str(a)))
    assert len(ok) == 4 and not bad


def test_folder_links_are_followed_once_and_loops_end(tmp_path):
    import os
    import time

    d = write_images(tmp_path / "imgs", {"a.png": (40, 40), "sub/b.png": (40, 40)})
    os.symlink("..", d / "sub" / "up")
    os.symlink(".", d / "loop1")
    os.symlink(".", d / "loop2")
    other = write_images(tmp_path / "elsewhere", {"c.png": (40, 40)})
    os.symlink(other, d / "linked")  # a linked folder outside: followed
    t0 = time.perf_counter()
    folder = discover(str(d))
    glob_all = discover(str(d / "**" / "*.png"))
    assert time.perf_counter() - t0 < 10
    assert folder.names == ["a.png", "linked/c.png", "sub/b.png"]
    assert glob_all.names == folder.names  # both modes choose the same files
    assert discover(str(d / "*.png")).names == ["a.png"]
    assert discover(str(d / "sub" / "*.png")).names == ["b.png"]
