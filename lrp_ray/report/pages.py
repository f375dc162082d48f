"""Jinja2 pages: one environment (autoescape on: image and class names are user data), number filters,
files written only when their bytes change, and the static files the atlas ships."""

from __future__ import annotations

import math
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

from lrp_ray.results import atomic_path

__all__ = ["environment", "render", "write_if_changed", "copy_static", "STATIC", "fmt_num"]

STATIC = Path(__file__).resolve().parent / "static"
TEMPLATES = Path(__file__).resolve().parent / "templates"


def _num(v: Any) -> str:
    return fmt_num(v)


def fmt_num(v: Any) -> str:
    """3 significant digits; ``n/a`` for None/NaN; integers as they are."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "n/a" if math.isnan(x) else f"{x:.3g}"


def _pct(v: Any) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return ""
    return "" if math.isnan(x) else f"{100 * x:.1f} %"


def _raw(v: Any) -> str:
    """A number for a data attribute (full precision; empty for None/NaN)."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return ""
    return "" if not math.isfinite(x) else repr(x)


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=False, lstrip_blocks=False)
    env.filters.update(num=_num, pct=_pct, raw=_raw)
    return env


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)


def write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` (atomically) unless it already holds exactly that; True if written."""
    data = text.encode("utf-8")
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return False
    except OSError:
        pass
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return True


def copy_static(dest: Path) -> None:
    """The atlas's CSS and JavaScript into ``dest`` (no page loads anything from the network)."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in STATIC.iterdir():
        if f.is_file():
            target = dest / f.name
            if not target.is_file() or target.read_bytes() != f.read_bytes():
                shutil.copyfile(f, target)
