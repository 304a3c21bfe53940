"""The :class:`MemoryStore`: one folder of documents, tying together the SQLite catalogue
(:mod:`.catalogue`), the document folders (:mod:`.files`) and the write lock (:mod:`.locking`).

Just over 500 lines because it is one class, the store's whole public API with its docstrings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import faiss
import numpy as np

from qa_pipeline.vector_index import DEFAULT_EXACT_LIMIT, build_index, fsync_path, knn

from . import catalogue
from .catalogue import DB_NAME, SCHEMA_VERSION
from .files import (
    DOCS_DIR,
    TMP_DIR,
    IndexCache,
    _doc_dir_name,
    _prepare_arrays,
    _remove_path,
    discard_folder,
    indexed_names,
    prepare_root,
    read_arrays,
    remove_leftovers,
    write_document_files,
)
from .locking import LOCK_NAME, _WriteLock
from .records import (
    DocumentExists,
    DocumentInfo,
    SegmentInfo,
    StoreError,
    UnknownDocument,
    _as_int,
    _coerce_segment,
    _DocRow,
)

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

_MAX_FOLLOW = 20  # replaces of one document a single read may follow


class MemoryStore:
    """A folder of documents read by one HMT model: texts, segment spans, memories and indexes.

    Open with :meth:`open`. Instances are thread-safe (one lock per instance); several processes
    may use the same folder (SQLite WAL lets readers run while one process writes; writers are
    serialised by SQLite and by a file lock).
    """

    def __init__(
        self,
        root: Path,
        conn: sqlite3.Connection,
        fingerprint: dict[str, Any] | None,
        *,
        writable: bool,
        cache_size: int,
    ) -> None:
        """Use :meth:`MemoryStore.open` instead; this only wires an already opened database."""
        self._root = root
        self._fingerprint = fingerprint
        self._writable = writable
        self._lock = threading.RLock()
        self._indexes = IndexCache(root, cache_size, self._lock)
        self._write_lock = _WriteLock(root / LOCK_NAME)
        self._catalogue = catalogue.Catalogue(conn, root, self._lock)

    # ---------------------------------------------------------------------------- opening

    @classmethod
    def open(
        cls,
        root: str | os.PathLike[str],
        fingerprint: Mapping[str, Any] | None = None,
        create: bool = True,
        *,
        cache_size: int = 32,
    ) -> MemoryStore:
        """Open (or create) the store in folder ``root``.

        Args:
            root: The store folder. It may be missing or empty (a new store is made when
                ``create``), or an existing store; any other non-empty folder is refused.
            fingerprint: JSON-able description of the model that writes memories. A new store
                records it; an existing one must match it exactly. ``None`` skips the check and
                opens the store for reading (listing, search, answers, deletion) but not for
                :meth:`add_document`. A store created without a fingerprint adopts the first one
                it is opened with.
            create: Create the store if it does not exist yet.
            cache_size: How many opened FAISS indexes to keep in memory (LRU).

        Returns:
            The opened store.

        Raises:
            StoreMismatch: If the store was written by a model with a different fingerprint.
            StoreError: If ``root`` is not a store (or missing and ``create`` is False), or the
                store was written by a newer version of this code.
        """
        root = Path(root)
        wanted = None if fingerprint is None else catalogue.normalise_fingerprint(fingerprint)
        db_path = root / DB_NAME
        prepare_root(root, DB_NAME, create=create)
        existed = db_path.exists()
        conn = catalogue.connect(db_path)
        try:
            # A reader of an existing store only reads: no write lock, so it never waits for a writer.
            stored = catalogue.init_or_check(conn, root, wanted, read_only=existed and wanted is None)
        except BaseException:
            conn.close()
            raise
        writable = wanted is not None
        if writable or not existed:
            (root / DOCS_DIR).mkdir(exist_ok=True)
            (root / TMP_DIR).mkdir(exist_ok=True)
        store = cls(root, conn, stored, writable=writable, cache_size=cache_size)
        if writable:  # a reader leaves what it finds: cleaning up is a writer's job
            store._recover()
        return store

    def _recover(self) -> None:
        """Remove staging folders and document folders without a row, left by a killed writer."""
        try:
            with self._write_lock.hold(blocking=False) as held:
                if not held:
                    # Another process is writing right now; its staging folders are not leftovers.
                    logger.debug("store %s busy; skipping leftover cleanup", self._root)
                    return
                remove_leftovers(self._root, self._catalogue.dirs)
        except OSError as exc:  # e.g. a read-only mount: reading still works
            logger.warning("could not clean up store %s: %s", self._root, exc)

    # ---------------------------------------------------------------------------- properties

    @property
    def root(self) -> Path:
        """The store folder."""
        return self._root

    @property
    def fingerprint(self) -> dict[str, Any] | None:
        """The fingerprint recorded in the store (a copy), or None if none was recorded yet."""
        return None if self._fingerprint is None else json.loads(json.dumps(self._fingerprint))

    @property
    def writable(self) -> bool:
        """Whether :meth:`add_document` is allowed (the store was opened with a fingerprint)."""
        return self._writable

    # ---------------------------------------------------------------------------- writing

    def add_document(
        self,
        doc_id: str,
        *,
        title: str = "",
        source: str = "",
        text: str,
        metadata: Mapping[str, Any] | None = None,
        segments: Sequence[SegmentInfo | Sequence[int] | Mapping[str, int]],
        arrays: Mapping[str, np.ndarray],
        indexed: Iterable[str] | None = None,
        replace: bool = False,
        n_tokens: int | None = None,
        exact_limit: int = DEFAULT_EXACT_LIMIT,
    ) -> DocumentInfo:
        """Store a document, its segment spans, its memory arrays and their FAISS indexes.

        All or nothing: if this raises (or the process dies) the store is as it was before.

        Args:
            doc_id: The document id (any string; the folder name is derived safely from it).
            title: Human-readable title.
            source: Where the document came from (path, dataset name).
            text: The full text; segment character spans index into it.
            metadata: Extra JSON-serialisable information.
            segments: One entry per HMT segment, numbered 0..n-1 in order: :class:`SegmentInfo`,
                a mapping with its fields, or a tuple ``(token_start, token_end, char_start,
                char_end)`` / ``(idx, token_start, ...)``.
            arrays: Named arrays. Per-segment arrays (e.g. ``summary``, ``memory``,
                ``recall_key``) must have ``len(segments)`` rows; ``state.*`` arrays may have any
                shape. Floats are stored as float32, integers as int64.
            indexed: Per-segment 2-D arrays to build an inner-product FAISS index for. Default:
                ``recall_key`` when present; names given explicitly must be present.
            replace: Replace an existing document with this id (atomically) instead of raising.
            n_tokens: Token count of the document; default the largest segment ``token_end``.
            exact_limit: Passed to :func:`build_index` (exact flat index up to this many segments).

        Returns:
            The stored document's :class:`DocumentInfo`.

        Raises:
            DocumentExists: If ``doc_id`` is stored and ``replace`` is False.
            ValueError: On inconsistent input (array rows vs segments, bad spans, bad names).
            StoreError: If the store was opened without a fingerprint.
        """
        if not isinstance(doc_id, str):
            raise ValueError(f"doc_id must be a string; got {type(doc_id).__name__}")
        if not isinstance(text, str):
            raise ValueError(f"text of document {doc_id!r} must be a string")
        if not self._writable:
            raise StoreError(
                f"memory store at {self._root} was opened without a model fingerprint; it is read-only "
                "(open it with the fingerprint of the model that writes memories)"
            )
        if not replace and doc_id in self:  # cheap early answer; re-checked under the write lock
            raise DocumentExists(
                f"document {doc_id!r} is already in the store; pass replace=True to overwrite it"
            )
        segs = [_coerce_segment(s, doc_id, i) for i, s in enumerate(segments)]
        for s in segs:
            if s.char_end > len(text):
                raise ValueError(
                    f"segment {s.idx} ends at character {s.char_end}, past the text ({len(text)} chars)"
                )
        arrs = _prepare_arrays(arrays, len(segs))
        names = indexed_names(arrs, indexed)
        n_tok = (
            max((s.token_end for s in segs), default=0) if n_tokens is None else _as_int(n_tokens, "n_tokens")
        )
        meta_json = catalogue.dumps(dict(metadata or {}), f"metadata of document {doc_id!r}")
        # Build indexes before touching the disk, so bad input fails with nothing to clean up.
        indexes = {name: build_index(arrs[name], exact_limit=exact_limit) for name in names}
        created = catalogue.now()
        info = DocumentInfo(doc_id, str(title), str(source), n_tok, len(segs), created, json.loads(meta_json))

        with self._lock, self._write_lock.hold():
            old = self._catalogue.find_row(doc_id)
            if old is not None and not replace:
                raise DocumentExists(
                    f"document {doc_id!r} is already in the store; pass replace=True to overwrite it"
                )
            dir_name = _doc_dir_name(doc_id)
            staging = self._root / TMP_DIR / f"{dir_name}.{uuid.uuid4().hex[:8]}"
            final = self._root / DOCS_DIR / dir_name
            renamed = False
            try:
                meta = {"doc_id": doc_id, "format": f"hmt-qa-store/{SCHEMA_VERSION}"}
                write_document_files(staging, arrs, indexes, meta)
                os.replace(staging, final)
                renamed = True
                fsync_path(final.parent, directory=True)
                with self._catalogue.transaction() as conn:
                    self._catalogue.insert_rows(
                        conn, info, text, segs, dir_name, names, replacing=old is not None
                    )
            except BaseException:
                if not renamed:
                    _remove_path(staging)
                elif not self._row_points_at(doc_id, dir_name):
                    # Only remove the new folder if the commit did not happen (an interrupt can
                    # arrive after COMMIT returned but before we got here).
                    _remove_path(final)
                raise
            if old is not None:
                self._indexes.drop(old.dir)
                discard_folder(self._root, old.dir)
        logger.info(
            "stored document %r (%d segments, indexes: %s)", doc_id, len(segs), ", ".join(names) or "none"
        )
        return dataclasses.replace(info, version=dir_name)

    def delete_document(self, doc_id: str) -> None:
        """Delete a document, its segments, answers and files.

        The rows go in one transaction; the folder is removed afterwards (a crash in between
        leaves only an orphan folder, which the next open removes).

        Raises:
            UnknownDocument: If ``doc_id`` is not stored.
        """
        with self._lock, self._write_lock.hold():
            row = self._row(doc_id)
            self._catalogue.delete(doc_id)
            self._indexes.drop(row.dir)
            discard_folder(self._root, row.dir)
        logger.info("deleted document %r", doc_id)

    def add_answer(self, doc_id: str, question: str, mode: str, answer: Mapping[str, Any]) -> int:
        """Record an answer given about a stored document.

        Args:
            doc_id: The document asked about.
            question: The question text.
            mode: How it was answered (e.g. "hmt", "rag").
            answer: JSON-serialisable answer record (text, evidence, recall weights, ...).

        Returns:
            The answer's id.

        Raises:
            UnknownDocument: If ``doc_id`` is not stored.
            ValueError: If ``answer`` is not JSON-serialisable.
        """
        payload = catalogue.dumps(dict(answer), "answer")
        with self._lock:
            self._row(doc_id)
            return self._catalogue.add_answer(doc_id, question, mode, payload)

    # ---------------------------------------------------------------------------- reading

    def _row_points_at(self, doc_id: str, dir_name: str) -> bool:
        try:
            row = self._catalogue.find_row(doc_id)
        except (sqlite3.Error, StoreError):
            return False
        return row is not None and row.dir == dir_name

    def _row(self, doc_id: str) -> _DocRow:
        row = self._catalogue.find_row(doc_id)
        if row is None:
            raise self._catalogue.unknown(doc_id)
        return row

    def _with_files(self, doc_id: str, fn: Callable[[_DocRow], _T], row: _DocRow | None = None) -> _T:
        """Run ``fn(row)``, following the row if another process replaces the document meanwhile.

        A writer removes the old folder right after committing a replace, so a reader that looked
        the row up just before can find the files gone; it then re-reads the row and tries again.
        Once a file is open, its removal no longer matters (POSIX keeps unlinked open files).
        """
        row = row or self._row(doc_id)
        for _ in range(_MAX_FOLLOW):
            try:
                return fn(row)
            except FileNotFoundError:
                fresh = self._row(doc_id)  # UnknownDocument if it was deleted meanwhile
                if fresh.dir == row.dir:
                    raise StoreError(
                        f"files of document {doc_id!r} are missing from {self._root / DOCS_DIR / row.dir}; "
                        "delete it and ingest it again"
                    ) from None
                row = fresh
        raise StoreError(f"document {doc_id!r} is being replaced too often to read; try again")

    def __contains__(self, doc_id: object) -> bool:
        return isinstance(doc_id, str) and self._catalogue.find_row(doc_id) is not None

    def __len__(self) -> int:
        return self._catalogue.count()

    def list_documents(self) -> list[DocumentInfo]:
        """All stored documents, oldest first (texts are not loaded)."""
        return self._catalogue.list_documents()

    def get_document(self, doc_id: str) -> DocumentInfo:
        """The catalogue entry of ``doc_id``.

        Raises:
            UnknownDocument: With a message listing (up to 10) known ids.
        """
        info = self._catalogue.get_document(doc_id)
        if info is None:
            raise self._catalogue.unknown(doc_id)
        return info

    def get_text(self, doc_id: str) -> str:
        """The full text of ``doc_id`` (segment character spans index into it)."""
        text = self._catalogue.get_text(doc_id)
        if text is None:
            raise self._catalogue.unknown(doc_id)
        return text

    def segments(self, doc_id: str) -> list[SegmentInfo]:
        """The segments of ``doc_id`` in order."""
        with self._lock:
            self._row(doc_id)
            return self._catalogue.segments(doc_id)

    def arrays(self, doc_id: str, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Load stored arrays of ``doc_id``.

        Args:
            doc_id: The document.
            names: Which arrays; default all.

        Returns:
            Name -> array (float32 or int64).

        Raises:
            UnknownDocument: If ``doc_id`` is not stored.
            KeyError: If a requested name was not stored for this document.
        """
        wanted = None if names is None else list(names)

        def load(row: _DocRow) -> dict[str, np.ndarray]:
            return read_arrays(self._root / DOCS_DIR / row.dir, doc_id, wanted)

        return self._with_files(doc_id, load)

    def index(self, doc_id: str, name: str = "recall_key") -> faiss.Index:
        """The (cached) FAISS index ``name`` of ``doc_id``; label ``i`` is segment ``i``.

        Raises:
            UnknownDocument: If ``doc_id`` is not stored.
            StoreError: If the document has no such index.
        """
        row = self._row(doc_id)
        if name not in row.indexes:
            raise StoreError(
                f"document {doc_id!r} has no {name!r} index; indexed: {', '.join(row.indexes) or 'none'}"
            )
        return self._with_files(doc_id, lambda r: self._indexes.get(r.dir, name), row)

    def search(
        self,
        query: np.ndarray,
        *,
        index: str = "recall_key",
        doc_id: str | None = None,
        k: int = 10,
    ) -> list[tuple[str, int, float]] | list[list[tuple[str, int, float]]]:
        """Find the segments whose ``index`` vectors have the largest inner product with ``query``.

        With ``index="recall_key"`` and the recall query the scores are HMT's recall logits
        before the recall's scale (``Engine.recall_scale``).

        Args:
            query: One query ``(d,)`` or a batch ``(q, d)``.
            index: Which indexed array to search.
            doc_id: Search one document; ``None`` searches every document that has this index and
                merges the per-document top-``k`` lists.
            k: Number of results per query.

        Returns:
            For a 1-D query, ``[(doc_id, segment idx, score), ...]`` best first (ties by doc id,
            then segment); for a 2-D query, one such list per query row.

        Raises:
            UnknownDocument: If ``doc_id`` is given and not stored.
            StoreError: If ``doc_id`` is given and has no such index.
            ValueError: If ``k < 1`` or the query is malformed or of the wrong width.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}")
        q = np.asarray(query)
        single = q.ndim == 1
        if q.ndim not in (1, 2):
            raise ValueError(f"query must have shape (d,) or (q, d); got {q.shape}")
        q2 = q[None, :] if single else q
        if doc_id is not None:
            rows = [self._row(doc_id)]
            if index not in rows[0].indexes:
                raise StoreError(
                    f"document {doc_id!r} has no {index!r} index; indexed: {', '.join(rows[0].indexes) or 'none'}"
                )
        else:
            rows = [r for r in self._catalogue.rows() if index in r.indexes]
        hits: list[list[tuple[str, int, float]]] = [[] for _ in range(q2.shape[0])]
        for row in rows:
            try:
                idx = self._with_files(row.doc_id, lambda r: self._indexes.get(r.dir, index), row)
            except UnknownDocument:
                if doc_id is not None:
                    raise
                continue  # deleted by another process while we searched
            if idx.ntotal == 0:
                if idx.d != q2.shape[1]:
                    raise ValueError(f"query width {q2.shape[1]} does not match the {index!r} width {idx.d}")
                continue
            scores, labels = knn(idx, q2, min(k, idx.ntotal))
            for qi in range(q2.shape[0]):
                hits[qi].extend(
                    (row.doc_id, int(lab), float(sc))
                    for sc, lab in zip(scores[qi], labels[qi], strict=True)
                    if lab >= 0
                )
        merged = [sorted(h, key=lambda t: (-t[2], t[0], t[1]))[:k] for h in hits]
        return merged[0] if single else merged

    def answers(self, doc_id: str | None = None) -> list[dict[str, Any]]:
        """Recorded answers, oldest first, optionally only those about ``doc_id``.

        Returns:
            Dicts with keys ``id, doc_id, question, mode, answer, created_at``.
        """
        return self._catalogue.answers(doc_id)

    # ---------------------------------------------------------------------------- closing

    def close(self) -> None:
        """Close the database and drop cached indexes (idempotent)."""
        with self._lock:
            self._indexes.clear()
            self._catalogue.close()

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._catalogue.closed else ("writable" if self._writable else "read-only")
        return f"MemoryStore({str(self._root)!r}, {state})"
