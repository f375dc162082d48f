"""Stopping a sweep on Ctrl-C or SIGTERM at a safe point, in every phase.

A signal that arrives while torch, a checkpoint or Ray is being loaded must not interrupt native code
(that ends in a C++ abort or a deep traceback). :func:`install` (the CLI does) makes the first SIGINT or
SIGTERM only *request* a stop; the sweep honours it at its next :func:`check` (between preparation phases,
after Ray starts, every loop turn) by raising ``KeyboardInterrupt``, which it handles like Ctrl-C: one line,
exit 130, finished work kept. A second signal interrupts at once. Without :func:`install` (notebooks,
tests) nothing changes.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["install", "uninstall", "keep_ours", "check", "installed"]

_state = {"installed": False, "requested": False}
_previous: dict[int, Any] = {}
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _on_signal(signum: int, frame: Any) -> None:
    if _state["requested"]:
        raise KeyboardInterrupt  # a second signal: stop now
    _state["requested"] = True


def install() -> None:
    """Defer SIGINT/SIGTERM to the next :func:`check` (main thread only; idempotent)."""
    if _state["installed"] or threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        _previous[sig] = signal.signal(sig, _on_signal)
    _state.update(installed=True, requested=False)


def uninstall() -> None:
    """Put the handlers back that :func:`install` replaced."""
    if not _state["installed"]:
        return
    for sig, handler in _previous.items():
        signal.signal(sig, handler)
    _previous.clear()
    _state.update(installed=False, requested=False)


def keep_ours() -> None:
    """Reinstall our handlers where a library (``ray.init``) replaced them."""
    if _state["installed"]:
        for sig in SIGNALS:
            if signal.getsignal(sig) is not _on_signal:
                signal.signal(sig, _on_signal)


def installed() -> bool:
    return bool(_state["installed"])


def check() -> None:
    """Raise ``KeyboardInterrupt`` if a stop was requested."""
    if _state["requested"]:
        raise KeyboardInterrupt
