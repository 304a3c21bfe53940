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
    dtype: str = "auto"
    device: str | None = None
    # Writes open answers from the recalled passages (EngineConfig.reader); "default": the default
    # backbone's reader; None: the memory model answers.
    reader: str | None = "default"
    store: str = "stores/shared"  # the shared memory store every user sees; "" disables it
    max_upload_mb: float = 20.0  # per file and per pasted text
    session_root: str | None = None  # parent folder of the per-session private stores; None = a temp folder
    concurrency: int = 2  # model calls running at once; further requests wait in the queue
    queue_size: int = 64  # requests allowed to wait; beyond that users are told to retry
    session_ttl_s: float = 6 * 3600  # an idle session's private store is deleted after this long
    max_batch_rows: int = 500  # rows one batch upload may hold (a batch holds one queue slot throughout)
    # Files one ingest request may carry, and documents read from them (one XML file can hold several).
    max_files_per_request: int = 20
    # Longest document one request may ingest, in the model's tokens. Memory stays flat however long a
    # document is, but reading holds a queue slot: HMT reads about 270 tokens/s on one CPU thread
    # (bench/results/ingest_speed*.json), so 200k tokens (a whole book; a PMC article is 10-30k) is
    # about 12 minutes there and under a minute on a GPU. Raise it with --max-document-tokens.
    max_document_tokens: int = 200_000
    # Gradio's upload cache (every uploaded file is copied there) is emptied of files older than this;
    # an upload is read during its request, a batch's results file is downloadable this long.
    upload_cache_ttl_s: int = 3600
    # Writing to the shared store is opt-in (--allow-shared-writes): everything saved there is shown
    # to every user. When on, the store holds at most this many documents and megabytes.
    allow_shared_writes: bool = False
    shared_max_documents: int = 200
    shared_max_mb: float = 1024.0

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def shared_max_bytes(self) -> int:
        return int(self.shared_max_mb * 1024 * 1024)

    @property
    def delete_cache(self) -> tuple[int, int]:
        """Gradio's ``delete_cache`` (how often to look, how old a file may get), both in seconds.

        The age stays under a day: Gradio 5 compares ages by ``timedelta.seconds``, which wraps at a day.
        """
        age = max(1, min(int(self.upload_cache_ttl_s), 86_399))
        return min(age, 600), age

    def engine_config(self) -> EngineConfig:
        """The pipeline configuration these settings select."""
        from qa_pipeline.engine import EngineConfig

        return EngineConfig(
            backbone=self.backbone, checkpoint=self.checkpoint, dtype=self.dtype, device=self.device, reader=self.reader
        )


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
    parser.add_argument("--dtype", default=d.dtype, help=f"auto (bfloat16 where the CPU or GPU computes it natively, else float32), bfloat16 or float32 (default: {d.dtype})")
    parser.add_argument("--device", default=d.device, help="cpu, cuda, ... (default: cpu)")
    parser.add_argument(
        "--reader",
        default=d.reader,
        help="chat model that writes open answers from the recalled passages: an embedded name "
        "(qwen2.5-coder-0.5b-instruct), hub id or folder; 'default': that one with the default backbone; "
        "'none': the memory model answers (default: default)",
    )
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
    parser.add_argument(
        "--max-files-per-request",
        type=int,
        default=d.max_files_per_request,
        help=f"files (and documents in them) one ingest may carry (default: {d.max_files_per_request})",
    )
    parser.add_argument(
        "--max-document-tokens",
        type=int,
        default=d.max_document_tokens,
        help=f"longest document users may ingest, in tokens (default: {d.max_document_tokens:,})",
    )
    parser.add_argument(
        "--allow-shared-writes",
        action="store_true",
        default=d.allow_shared_writes,
        help="let users save documents to the shared store, which every user sees (default: off, read-only)",
    )
    parser.add_argument(
        "--shared-max-documents",
        type=int,
        default=d.shared_max_documents,
        help=f"with --allow-shared-writes: most documents the shared store may hold (default: {d.shared_max_documents})",
    )
    parser.add_argument(
        "--shared-max-mb",
        type=float,
        default=d.shared_max_mb,
        help=f"with --allow-shared-writes: largest size of the shared store in MB (default: {d.shared_max_mb:g})",
    )


def settings_from_args(ns: argparse.Namespace) -> AppSettings:
    """Build settings from parsed flags; attributes the namespace lacks keep their defaults."""
    values = {f.name: getattr(ns, f.name) for f in fields(AppSettings) if hasattr(ns, f.name)}
    for name in ("checkpoint", "reader"):
        if isinstance(values.get(name), str) and values[name].lower() == "none":
            values[name] = None
    if values.get("max_upload_mb") is not None and values["max_upload_mb"] <= 0:
        raise ValueError("--max-upload-mb must be positive")
    for name in ("concurrency", "max_files_per_request", "max_document_tokens", "shared_max_documents"):
        if values.get(name) is not None and values[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if values.get("shared_max_mb") is not None and values["shared_max_mb"] <= 0:
        raise ValueError("--shared-max-mb must be positive")
    return AppSettings(**values)
