"""Atomic file writes: a file that exists under its final name is always complete.

Every file is written to a hidden temp name (``.NAME.tmp-PID``) in its final folder and renamed into
place; readers skip names starting with ``.`` or ``_``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_text", "temp_name"]


def temp_name(final: Path) -> Path:
    """The hidden temp path ``final`` is written to before it is renamed into place."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temp path next to ``final``; on success rename it to ``final``, on any error (disk full,
    read-only folder, ...) remove it and re-raise: a file that exists at ``final`` is always complete."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    try:
        yield tmp
        _fsync(tmp)  # the data is on disk before the name says the file is complete (power loss)
        os.replace(tmp, final)
        _fsync(final.parent)
    except BaseException:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # e.g. a folder on a file system that cannot sync folders
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8")
