"""The store's inter-process write lock (POSIX ``flock`` on ``<root>/.lock``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

try:  # POSIX only; elsewhere writes are not guarded against a concurrent opener's cleanup
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


class _WriteLock:
    """Inter-process advisory lock on ``<root>/.lock`` (flock; released if the process dies)."""

    def __init__(self, path: Path) -> None:
        self._path = path

    @contextlib.contextmanager
    def hold(self, *, blocking: bool = True) -> Iterator[bool]:
        """Hold the lock; yields False instead of waiting when ``blocking`` is False and it is taken."""
        if fcntl is None:  # pragma: no cover - Windows
            yield True
            return
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
