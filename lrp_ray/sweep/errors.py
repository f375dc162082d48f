"""How a sweep ends: exit codes and the errors that stop it (each is one line for the user)."""

from __future__ import annotations

from .indices import BadRequest

__all__ = ["BadRequest", "SweepFailed", "OutputError", "ItemOutOfMemory", "one_line", "EXIT_OK",
           "EXIT_IMAGES_FAILED", "EXIT_BAD_REQUEST", "EXIT_INCOMPLETE", "EXIT_OUTPUT", "EXIT_INTERRUPTED"]

EXIT_OK, EXIT_IMAGES_FAILED, EXIT_BAD_REQUEST, EXIT_INCOMPLETE, EXIT_OUTPUT = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130


def one_line(exc: BaseException, limit: int = 400) -> str:
    """An exception's message on one line, cut at ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


class SweepFailed(RuntimeError):
    """The sweep could not finish (no actors left, or stalled)."""


class OutputError(RuntimeError):
    """OUT could not be written (disk full, read-only, a file where a folder must go): exit code 4.

    Every result file is written to a temp name and renamed, and a failed write removes its temp file, so
    what OUT holds stays complete; the same command resumes once the cause is fixed.
    """

    def __init__(self, exc: BaseException, what: str = "results") -> None:
        self.cause = exc
        super().__init__(f"cannot write {what} ({one_line(exc, 300)}); files already in OUT are complete "
                         "and nothing partial was left: free space or fix OUT, then run the same command "
                         "again to resume")


class ItemOutOfMemory(RuntimeError):
    """A work item ran out of memory on its actor (raised by the actor, recognised by type): the item is
    retried like a lost worker, after the actor freed its other caches; its chunking never changes."""
