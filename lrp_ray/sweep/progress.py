"""Progress of a sweep: a tqdm bar on a terminal, or a log line every 10 s (Ray job logs, files)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["TextProgress", "make_progress"]


class TextProgress:
    """Progress as log lines (maps done/total, maps per second, ETA) for non-terminal output."""

    def __init__(self, total: int, initial: int, log_fn: Callable[[str], None], every: float = 10.0) -> None:
        self.total, self.n, self.log, self.every = total, initial, log_fn, every
        self.start_n, self.t0 = initial, time.monotonic()
        self.last = self.t0
        self.first: tuple[float, int] | None = None

    def update(self, n: int) -> None:
        self.n += n
        now = time.monotonic()
        if self.first is None:
            self.first = (now, self.n)
        if now - self.last >= self.every or self.n >= self.total:
            self.last = now
            self.log(self.line(now))

    def line(self, now: float) -> str:
        """Done/total, and a rate and ETA measured from the first finished item on (actor start-up and
        model loading would make an early ETA meaningless: it shows ``?`` until two items are in)."""
        if self.first is None or self.n == self.first[1]:
            rate, eta = 0.0, float("nan")
        else:
            rate = (self.n - self.first[1]) / max(now - self.first[0], 1e-9)
            eta = (self.total - self.n) / rate
        eta_txt = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        return (f"progress: {self.n}/{self.total} maps ({100.0 * self.n / max(self.total, 1):.1f}%), "
                f"{rate:.1f} maps/s, ETA {eta_txt}")

    def clear(self) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


def make_progress(total: int, initial: int, show: bool | None,
                  log_fn: Callable[[str], None]) -> tuple[Any, Callable[[str], None]]:
    """A progress reporter (or None) and a log function that keeps a terminal bar intact."""
    if show is False:
        return None, log_fn
    if not sys.stderr.isatty():
        return TextProgress(total, initial, log_fn), log_fn
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, unit="maps", desc="relevance maps", file=sys.stderr,
               dynamic_ncols=True, smoothing=0.1, mininterval=0.5)

    def log(line: str) -> None:
        bar.clear()
        log_fn(line)
        bar.refresh()

    return bar, log
