"""``python -m lrp_ray.report OUT [--out OUT/report.html] [--top 3]``: static HTML report of a results
folder."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .build import ReportError, build_report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m lrp_ray.report",
        description="Build a static, self-contained HTML report (inline CSS, images as data: URIs) of a "
                    "sweep results folder (OUT/relevance, summary.csv, manifest.json).")
    ap.add_argument("results", metavar="OUT", help="sweep results folder")
    ap.add_argument("--out", default=None, help="HTML file to write (default: OUT/report.html)")
    ap.add_argument("--top", type=int, default=3, help="top images per feature and ranking (default 3)")
    ap.add_argument("--images-root", default=None,
                    help="folder the image paths are relative to (default: from the manifest)")
    ap.add_argument("--max-features", type=int, default=12,
                    help="features per layer shown with images (default 12; 0 = all)")
    args = ap.parse_args(argv)
    if args.top < 0:
        ap.error("--top must be >= 0")
    t0 = time.time()
    try:
        path = build_report(args.results, args.out, top=args.top, images_root=args.images_root,
                            max_features=args.max_features or None)
    except (ReportError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = Path(path).stat().st_size
    print(f"report written to {path} ({size / 1e6:.1f} MB, {time.time() - t0:.1f}s); "
          f"open it in a browser: file://{Path(path).resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
