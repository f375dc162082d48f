"""``python -m lrp_ray.report OUT``: the run page ``OUT/report.html`` and the feature atlas ``OUT/atlas/``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .build import build_report
from .folder import ReportError


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m lrp_ray.report",
        description="Build the run page (OUT/report.html: one self-contained file) and the feature atlas "
                    "(OUT/atlas/index.html plus one page per feature) of a sweep results folder. Pages load "
                    "nothing from the network. A rerun redraws only the features whose results changed.")
    ap.add_argument("results", metavar="OUT", help="sweep results folder")
    ap.add_argument("--out", default=None, help="run page to write (default: OUT/report.html)")
    ap.add_argument("--top", type=int, default=8,
                    help="reference images per feature and ranking (activation, relevance) (default 8)")
    ap.add_argument("--images-root", default=None,
                    help="folder the image paths are relative to (default: from the manifest)")
    ap.add_argument("--max-features", type=int, default=12,
                    help="features per layer highlighted on the run page (default 12; 0 = all)")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes drawing the atlas's pictures (default: the CPUs, at most 8; 1: none)")
    ap.add_argument("--no-atlas", action="store_true", help="only the run page")
    ap.add_argument("--force", action="store_true", help="redraw every picture of the atlas")
    args = ap.parse_args(argv)
    if args.max_features < 0:
        ap.error("--max-features must be >= 0 (0 = all)")
    if args.top < 0:
        ap.error("--top must be >= 0")
    t0 = time.time()
    try:
        path = build_report(args.results, args.out, top=args.top, images_root=args.images_root,
                            max_features=args.max_features or None, atlas=not args.no_atlas,
                            workers=args.workers, force=args.force)
    except (ReportError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = Path(path).stat().st_size
    print(f"report written to {path} ({size / 1e6:.1f} MB, {time.time() - t0:.1f}s); "
          f"open it in a browser: file://{Path(path).resolve()}")
    atlas = Path(args.results) / "atlas"
    if not args.no_atlas and (atlas / "index.html").is_file():
        print(f"feature atlas: file://{(atlas / 'index.html').resolve()} ({_size(atlas) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
