"""The hmt-qa web UI (Gradio): a thin layer over :mod:`qa_pipeline`.

``build_demo(settings, engine_factory)`` builds the Blocks app; ``app.server.serve`` runs it.
Attributes are imported lazily so that ``app.settings`` (used by ``hmtqa --help``) stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AppSettings", "build_app", "build_demo", "serve"]


def __getattr__(name: str) -> Any:
    if name == "AppSettings":
        from .settings import AppSettings

        return AppSettings
    if name in ("build_app", "build_demo"):
        from . import ui

        return getattr(ui, name)
    if name == "serve":
        from .server import serve

        return serve
    raise AttributeError(f"module 'app' has no attribute {name!r}")
