"""Loads the QA engine in a background thread, so the page is usable while the model loads."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from qa_pipeline.engine import Engine

from .errors import AppError

logger = logging.getLogger(__name__)


class EngineLoader:
    """Builds one :class:`Engine` with ``factory`` on a daemon thread; callers wait for it.

    Loading starts on the first :meth:`start` (page load, first request or server start), not at
    construction, so importing ``app.py`` costs nothing.
    """

    def __init__(self, factory: Callable[[], Engine], description: str = "") -> None:
        self._factory = factory
        self.description = description
        self._engine: Engine | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._started_at: float | None = None
        self.load_s: float | None = None

    def start(self) -> None:
        """Begin loading (idempotent)."""
        with self._lock:
            if self._thread is not None:
                return
            self._started_at = time.perf_counter()
            self._thread = threading.Thread(target=self._load, name="hmtqa-engine-loader", daemon=True)
            self._thread.start()

    def _load(self) -> None:
        try:
            self._engine = self._factory()
            self.load_s = time.perf_counter() - (self._started_at or time.perf_counter())
            logger.info("model loaded in %.1f s", self.load_s)
        except BaseException as err:  # reported to every waiting request instead of dying silently
            logger.exception("loading the model failed")
            self._error = err
        finally:
            self._done.set()

    @property
    def ready(self) -> bool:
        return self._engine is not None

    @property
    def failed(self) -> bool:
        return self._error is not None

    def status(self) -> str:
        """One of ``idle``, ``loading``, ``ready``, ``failed``."""
        if self._engine is not None:
            return "ready"
        if self._error is not None:
            return "failed"
        return "loading" if self._thread is not None else "idle"

    @property
    def error(self) -> str | None:
        return None if self._error is None else f"{type(self._error).__name__}: {self._error}"

    def get(self, timeout: float | None = None) -> Engine:
        """The engine, waiting for the load to finish (starting it if needed).

        Raises:
            AppError: If loading failed or did not finish within ``timeout`` seconds.
        """
        self.start()
        if not self._done.wait(timeout):
            raise AppError("The model is still loading; try again in a moment.")
        if self._engine is None:
            raise AppError(f"The model could not be loaded ({self.error}). Check the server log.")
        return self._engine
