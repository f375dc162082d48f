"""One owner per output folder: an OS file lock on ``OUT/.lrp_ray.lock``, held from the end of preparing a
sweep (before anything is written) to the end of running it.

A second sweep, or an ``--overwrite``, into a folder another run holds is refused with one line naming
that run (pid, host, start time, command). The OS releases the lock when its process ends, however it
ends; in-process it is released on every exit path of ``execute``. (``flock`` locks are local to a
machine: two drivers on different machines writing one network folder are not detected.)
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO

from .errors import BadRequest

__all__ = ["LOCK_NAME", "OutputLock"]

LOCK_NAME = ".lrp_ray.lock"


class OutputLock:
    """An exclusive, non-blocking lock on an output folder (created if missing)."""

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK_NAME
        self._file: IO[str] | None = None
        self._created: list[Path] = []

    def acquire(self) -> OutputLock:
        """Take the lock, or raise :class:`BadRequest` naming the run that holds it."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking
            return self
        try:
            missing = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._created = missing  # removed again if the run leaves nothing else there
            f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held open while locked)
        except OSError:  # read-only storage: nobody can write there, so there is nothing to guard
            return self
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise BadRequest(f"--out {self.path.parent}: in use by another sweep ({_describe(holder)}); "
                             "wait for it to finish or use another --out") from None
        if not _same_file(f, self.path):  # the holder removed the file as we opened it: take the new one
            f.close()
            return self.acquire()
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:]}))
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        """Give the lock up. The lock file stays (removing it would race with a waiting run), except in a
        folder this lock created that holds nothing else (a request refused before writing anything
        leaves no trace)."""
        f, self._file = self._file, None
        if f is None:
            return
        if self._created and [p.name for p in self.path.parent.iterdir()] == [LOCK_NAME]:
            with contextlib.suppress(OSError):
                self.path.unlink()
                for folder in self._created:  # innermost first
                    folder.rmdir()
        f.close()

    @property
    def held(self) -> bool:
        return self._file is not None


def _same_file(f: IO[str], path: Path) -> bool:
    """Whether the open lock file is still the one at ``path`` (not unlinked or replaced)."""
    try:
        a, b = os.fstat(f.fileno()), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _describe(text: str) -> str:
    try:
        info = json.loads(text)
        cmd = " ".join(str(a) for a in info.get("argv", []))[:120]
        return f"pid {info['pid']} on {info['host']}, since {info['started']}" + (f": {cmd}" if cmd else "")
    except (ValueError, KeyError, TypeError):
        return "a run that left no details"
