"""Web-app settings and their command-line flags (shared by ``python app.py`` and ``hmtqa serve``).

Kept free of Gradio imports so that ``hmtqa --help`` stays fast.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qa_pipeline.engine import EngineConfig

# Not imported from hmt: that would pull in torch just to print `hmtqa serve --help`.
DEFAULT_BACKBONE = "smollm2-135m-instruct"


@dataclass(frozen=True)
class AppSettings:
    """Everything the web app needs to start; one field per command-line flag."""

    host: str = "127.0.0.1"
    port: int = 7860
    backbone: str = DEFAULT_BACKBONE
    checkpoint: str | None = "default"  # HMT checkpoint folder; "default" = the committed one; None = untrained
    dtype: str = "bfloat16"
    device: str | None = None
    store: str = "stores/shared"  # the shared memory store every user sees; "" disables it
    max_upload_mb: float = 20.0  # per file and per pasted text
    session_root: str | None = None  # parent folder of the per-session private stores; None = a temp folder
    concurrency: int = 2  # model calls running at once; further requests wait in the queue
    queue_size: int = 64  # requests allowed to wait; beyond that users are told to retry
    session_ttl_s: float = 6 * 3600  # an idle session's private store is deleted after this long
    max_batch_rows: int = 500  # rows one batch upload may hold (a batch holds one queue slot throughout)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def engine_config(self) -> EngineConfig:
        """The pipeline configuration these settings select."""
        from qa_pipeline.engine import EngineConfig

        return EngineConfig(backbone=self.backbone, checkpoint=self.checkpoint, dtype=self.dtype, device=self.device)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the web-app flags to ``parser`` (used by ``app.py`` and ``hmtqa serve``)."""
    d = AppSettings()
    parser.add_argument("--host", default=d.host, help=f"interface to bind (default: {d.host}; 0.0.0.0 = all)")
    parser.add_argument("--port", type=int, default=d.port, help=f"port (default: {d.port})")
    parser.add_argument("--backbone", default=d.backbone, help=f"embedded name, hub id or folder (default: {d.backbone})")
    parser.add_argument(
        "--checkpoint",
        default=d.checkpoint,
        help="HMT checkpoint folder; 'default' = the committed one; 'none' = untrained memory (default: default)",
    )
    parser.add_argument("--dtype", default=d.dtype, help=f"bfloat16 (fast on CPU) or float32 (default: {d.dtype})")
    parser.add_argument("--device", default=d.device, help="cpu, cuda, ... (default: cpu)")
    parser.add_argument(
        "--store", default=d.store, help=f"shared memory store folder, visible to all users; '' = none (default: {d.store})"
    )
    parser.add_argument(
        "--max-upload-mb", type=float, default=d.max_upload_mb, help=f"largest upload in MB (default: {d.max_upload_mb:g})"
    )
    parser.add_argument("--session-root", default=d.session_root, help="folder for per-session private stores (default: a temp folder)")
    parser.add_argument(
        "--concurrency", type=int, default=d.concurrency, help=f"requests served at once; others queue (default: {d.concurrency})"
    )


def settings_from_args(ns: argparse.Namespace) -> AppSettings:
    """Build settings from parsed flags; attributes the namespace lacks keep their defaults."""
    values = {f.name: getattr(ns, f.name) for f in fields(AppSettings) if hasattr(ns, f.name)}
    if isinstance(values.get("checkpoint"), str) and values["checkpoint"].lower() == "none":
        values["checkpoint"] = None
    if values.get("max_upload_mb") is not None and values["max_upload_mb"] <= 0:
        raise ValueError("--max-upload-mb must be positive")
    if values.get("concurrency") is not None and values["concurrency"] < 1:
        raise ValueError("--concurrency must be at least 1")
    return AppSettings(**values)
