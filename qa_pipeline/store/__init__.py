"""Persistent memory store: one folder holding the documents an HMT model has read.

Layout of a store folder::

    <root>/store.sqlite                     meta, documents, segments, answers (WAL mode)
    <root>/docs/<doc dir>/tensors.safetensors   per-segment arrays + document-level state
    <root>/docs/<doc dir>/recall_key.faiss      one inner-product index per indexed array
    <root>/docs/<doc dir>/summary.faiss
    <root>/.tmp/                            private staging area for writes in progress
    <root>/.lock                            advisory write lock (POSIX flock)

``<doc dir>`` is ``<sanitised id>-<hash of id>-<version>``: the id alone can never escape the
store (``../x``, ``a/b`` and ``""`` are all fine), and a new version gets a new folder so that a
replace is a single SQLite update that swaps which folder the row points at.

Writes are crash-safe: a document's folder is written under ``.tmp/``, fsynced and renamed into
``docs/``; only then are its rows inserted in one transaction. Until that commit the document does
not exist for readers; if anything fails the new folder is removed, and any leftovers of a killed
process (staging folders, folders without a row) are removed the next time a store is opened.

The store records a *fingerprint* of the model that wrote it (backbone, HMT checkpoint hash,
widths, segment sizes, mode) and refuses to be opened with another, because memories made by one
model are meaningless to another.

Arrays named ``state.*`` (e.g. ``state.memories``, ``state.keys``) are document-level and may have
any shape; every other array is per-segment and must have one row per segment.

Never pickle: tensors go to safetensors, indexes to ``faiss.write_index``, the rest to SQLite/JSON.

Modules: :mod:`.memory_store` (the :class:`MemoryStore`), :mod:`.catalogue` (SQLite schema and
rows), :mod:`.files` (document folders: durable writes, safetensors arrays, FAISS index files),
:mod:`.locking` (the write lock), :mod:`.records` (errors and record types).
"""

from qa_pipeline.vector_index import build_index, recall_at_k

from .catalogue import DB_NAME, SCHEMA_VERSION
from .files import STATE_PREFIX
from .memory_store import MemoryStore
from .records import (
    DocumentExists,
    DocumentInfo,
    SegmentInfo,
    StoreError,
    StoreMismatch,
    UnknownDocument,
)

__all__ = [
    "SCHEMA_VERSION",
    "DB_NAME",
    "STATE_PREFIX",
    "StoreError",
    "StoreMismatch",
    "UnknownDocument",
    "DocumentExists",
    "SegmentInfo",
    "DocumentInfo",
    "MemoryStore",
    "build_index",
    "recall_at_k",
]
