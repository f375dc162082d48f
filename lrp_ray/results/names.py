"""Image names as stored in results: a reversible text form of the names the OS gives.

File names are bytes on POSIX; Python hands undecodable bytes over as lone surrogates
(``surrogateescape``), which no UTF-8 file (Parquet, CSV, JSON) can hold. The stored form keeps every
valid name as it is, except that a backslash is doubled, and writes an undecodable byte as ``\\xHH``:
so ``bad\\xff\\xfename.png`` on disk is stored as the text ``bad\\xff\\xfename.png`` and read back to the
same bytes. :func:`image_path` turns a stored name into the path to open.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["image_text", "image_name", "image_path"]

_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2})")


def image_text(name: str) -> str:
    """The stored (valid UTF-8) text of an OS file name."""
    if "\\" not in name and not any("\udc80" <= c <= "\udcff" for c in name):
        return name
    out = []
    for ch in name:
        if ch == "\\":
            out.append("\\\\")
        elif "\udc80" <= ch <= "\udcff":
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch)
    return "".join(out)


def image_name(text: str) -> str:
    """The OS file name of a stored text (inverse of :func:`image_text`)."""
    if "\\" not in text:
        return text
    return _ESCAPE.sub(lambda m: "\\" if m.group(1) == "\\" else chr(0xDC00 + int(m.group(1)[1:], 16)), text)


def image_path(root: str | Path, text: str) -> Path:
    """The file a stored image name refers to, under the images root."""
    return Path(root) / image_name(text)
