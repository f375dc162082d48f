"""Stable, collision-free file names of the atlas (user strings never reach a path as they are)."""

from __future__ import annotations

import hashlib
import re

__all__ = ["ATLAS_DIR", "feature_slug", "feature_page", "image_file", "digest"]

ATLAS_DIR = "atlas"
"""The atlas folder inside a results folder: ``OUT/atlas/index.html``, ``OUT/atlas/features/*.html``."""

_PLAIN = re.compile(r"[a-z0-9_]{1,32}")


def digest(*parts: object, n: int = 12) -> str:
    """A short hex digest of ``parts`` (their ``repr``, separated)."""
    h = hashlib.sha1()
    for p in parts:
        h.update(repr(p).encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:n]


def _module_slug(module: str) -> str:
    """``encoder``/``decoder`` as they are; any other name sanitised plus a digest of the original, so two
    names that sanitise alike still get different slugs."""
    if _PLAIN.fullmatch(module):
        return module
    return re.sub(r"[^a-z0-9_]+", "_", module.lower())[:24] + "_" + digest(module, n=8)


def feature_slug(module: str, layer: int, feature: int) -> str:
    """``encoder-5-233``: the stable name of a (module, layer, feature)."""
    return f"{_module_slug(module)}-{int(layer)}-{int(feature)}"


def feature_page(module: str, layer: int, feature: int) -> str:
    """The feature's page, relative to the atlas folder: ``features/encoder-5-233.html``."""
    return f"features/{feature_slug(module, layer, feature)}.html"


def image_file(slug: str, *key: object, ext: str = "webp") -> str:
    """A picture of a feature, relative to the atlas folder: ``img/<slug>/<digest of key>.<ext>``."""
    return f"img/{slug}/{digest(*key)}.{ext}"
