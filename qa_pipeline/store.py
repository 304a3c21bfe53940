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
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import operator
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import faiss
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from qa_pipeline.vector_index import (
    DEFAULT_EXACT_LIMIT,
    build_index,
    fsync_path,
    knn,
    read_index_file,
    recall_at_k,
    write_index_file,
)

try:  # POSIX only; elsewhere writes are not guarded against a concurrent opener's cleanup
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

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

SCHEMA_VERSION = 1
DB_NAME = "store.sqlite"
DOCS_DIR = "docs"
TMP_DIR = ".tmp"
LOCK_NAME = ".lock"
TENSORS_NAME = "tensors.safetensors"
INDEX_SUFFIX = ".faiss"
STATE_PREFIX = "state."
DEFAULT_INDEXED = ("recall_key",)  # what the engine searches; other arrays are stored, not indexed
BUSY_TIMEOUT_S = 30.0
_MAX_LISTED_IDS = 10
_MAX_FOLLOW = 20  # replaces of one document a single read may follow
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT
);
CREATE TABLE IF NOT EXISTS documents (
    doc_id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    source TEXT NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    n_tokens INTEGER NOT NULL,
    n_segments INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    dir TEXT NOT NULL UNIQUE,
    indexes TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS segments (
    doc_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    token_start INTEGER NOT NULL,
    token_end INTEGER NOT NULL,
    char_start INTEGER NOT NULL,
    char_end INTEGER NOT NULL,
    PRIMARY KEY (doc_id, idx)
);
CREATE TABLE IF NOT EXISTS answers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_id TEXT NOT NULL,
    question TEXT NOT NULL,
    mode TEXT NOT NULL,
    answer TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS answers_doc ON answers (doc_id);
"""


# --------------------------------------------------------------------------------------------
# Errors and records
# --------------------------------------------------------------------------------------------


class StoreError(Exception):
    """Any problem with a memory store; the message is meant to be shown to the user as is."""


class StoreMismatch(StoreError):
    """The store was written by a different model (fingerprint differs)."""


class UnknownDocument(StoreError, KeyError):
    """No document with that id in the store."""

    def __str__(self) -> str:
        # KeyError.__str__ would wrap the message in quotes; show it like any other error.
        return str(self.args[0]) if self.args else ""


class DocumentExists(StoreError):
    """A document with that id is already stored and ``replace`` was not requested."""


@dataclass
class SegmentInfo:
    """Where one HMT segment lies in its document (token and character half-open spans)."""

    doc_id: str
    idx: int
    token_start: int
    token_end: int
    char_start: int
    char_end: int


@dataclass
class DocumentInfo:
    """A stored document's catalogue entry (without its text)."""

    doc_id: str
    title: str
    source: str
    n_tokens: int
    n_segments: int
    created_at: str
    metadata: dict = field(default_factory=dict)
    # Changes whenever the document is written (its folder's name): a cache key that a replace in
    # the same second, by another process, still changes.
    version: str = ""


@dataclass(frozen=True)
class _DocRow:
    """Where a document's files live (internal)."""

    doc_id: str
    dir: str
    indexes: tuple[str, ...]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _json_default(obj: Any) -> Any:
    """Let numpy scalars/arrays through json.dumps, since callers build answers from model outputs."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _dumps(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, default=_json_default, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable: {exc}") from exc


def _set_wal(conn: sqlite3.Connection) -> str:
    """Switch to WAL; returns the journal mode in force.

    Several processes opening one new store at once can be told "database is locked" here without
    SQLite's busy handler being asked, so wait and retry within the busy timeout.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _normalise_fingerprint(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """Round-trip through JSON so that tuples vs lists or int keys compare like the stored copy."""
    if not isinstance(fingerprint, Mapping):
        raise TypeError(f"fingerprint must be a dict; got {type(fingerprint).__name__}")
    return json.loads(_dumps(dict(fingerprint), "fingerprint"))


def _fingerprint_diff(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    missing = object()
    lines = []
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key, missing), wanted.get(key, missing)
        if a != b:
            sa = "<missing>" if a is missing else json.dumps(a)
            sb = "<missing>" if b is missing else json.dumps(b)
            lines.append(f"{key}: store has {sa}, requested {sb}")
    return lines


def _doc_dir_name(doc_id: str) -> str:
    """A folder name for ``doc_id`` that cannot escape ``docs/`` and is unique per version."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", doc_id)[:48].strip("._-") or "doc"
    digest = hashlib.sha256(doc_id.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    # The version suffix gives a replaced document a fresh folder, so the swap is one SQL update.
    return f"{slug}-{digest}-{uuid.uuid4().hex[:8]}"


def _as_int(value: Any, what: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer; got {value!r}") from None


def _coerce_segment(seg: Any, doc_id: str, position: int) -> SegmentInfo:
    """Accept a SegmentInfo, a mapping or a tuple and return a validated SegmentInfo.

    Tuples may be ``(token_start, token_end, char_start, char_end)`` (idx = position),
    ``(idx, token_start, token_end, char_start, char_end)`` or the six SegmentInfo fields.
    """
    names = ("idx", "token_start", "token_end", "char_start", "char_end")
    if isinstance(seg, SegmentInfo):
        if seg.doc_id not in ("", doc_id):
            raise ValueError(f"segment {position} belongs to document {seg.doc_id!r}, not {doc_id!r}")
        raw: Sequence[Any] = (seg.idx, seg.token_start, seg.token_end, seg.char_start, seg.char_end)
    elif isinstance(seg, Mapping):
        try:
            raw = [seg.get("idx", position)] + [seg[n] for n in names[1:]]
        except KeyError as exc:
            raise ValueError(f"segment {position} lacks field {exc.args[0]!r}") from None
    else:
        try:
            tup = tuple(seg)
        except TypeError:
            raise ValueError(f"segment {position} must be a SegmentInfo or a tuple; got {seg!r}") from None
        if len(tup) == 4:
            raw = (position, *tup)
        elif len(tup) == 5:
            raw = tup
        elif len(tup) == 6:
            if tup[0] not in ("", doc_id):
                raise ValueError(f"segment {position} belongs to document {tup[0]!r}, not {doc_id!r}")
            raw = tup[1:]
        else:
            raise ValueError(f"segment {position} must have 4, 5 or 6 fields; got {len(tup)}")
    idx, ts, te, cs, ce = (_as_int(v, f"segment {position} {n}") for v, n in zip(raw, names, strict=True))
    if idx != position:
        # Row i of every per-segment array is segment i, so indices must be 0..n-1 in order.
        raise ValueError(
            f"segment at position {position} has idx {idx}; segments must be numbered 0..n-1 in order"
        )
    if not 0 <= ts <= te:
        raise ValueError(f"segment {idx} has a bad token span [{ts}, {te})")
    if not 0 <= cs <= ce:
        raise ValueError(f"segment {idx} has a bad character span [{cs}, {ce})")
    return SegmentInfo(doc_id, idx, ts, te, cs, ce)


def _prepare_arrays(arrays: Mapping[str, np.ndarray], n_segments: int) -> dict[str, np.ndarray]:
    """Validate and convert arrays: floats become float32, integers int64; row counts checked."""
    out: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"array names must be non-empty strings; got {name!r}")
        arr = np.asarray(value)
        if np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float32)
            if not np.isfinite(arr).all():
                raise ValueError(f"array {name!r} contains NaN or infinite values")
        elif np.issubdtype(arr.dtype, np.integer):
            arr = arr.astype(np.int64)
        elif arr.dtype != np.bool_:
            raise ValueError(f"array {name!r} has unsupported dtype {arr.dtype}")
        if not name.startswith(STATE_PREFIX) and (arr.ndim == 0 or arr.shape[0] != n_segments):
            raise ValueError(
                f"array {name!r} has shape {arr.shape} but the document has {n_segments} segments; "
                f"per-segment arrays need one row per segment (name it '{STATE_PREFIX}...' for "
                "document-level state of any shape)"
            )
        out[name] = np.ascontiguousarray(arr)
    return out


def _write_bytes_durably(path: Path, writer: Callable[[Path], object]) -> None:
    """Write a file through ``writer`` and flush it, so the later rename publishes complete data."""
    writer(path)
    fsync_path(path)


def _remove_path(path: Path) -> None:
    """Remove a file or folder tree; failures are logged, since leftovers are retried on next open."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("could not remove %s: %s", path, exc)


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


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


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
        self._conn: sqlite3.Connection | None = conn
        self._fingerprint = fingerprint
        self._writable = writable
        self._cache_size = max(0, cache_size)
        self._index_cache: OrderedDict[tuple[str, str], faiss.Index] = OrderedDict()
        self._lock = threading.RLock()
        self._write_lock = _WriteLock(root / LOCK_NAME)

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
        wanted = None if fingerprint is None else _normalise_fingerprint(fingerprint)
        db_path = root / DB_NAME
        if root.exists() and not root.is_dir():
            raise StoreError(f"{root} is a file, not a memory store folder; use another --store folder")
        if not db_path.exists():
            # Another process may be creating this store right now: its database (and SQLite's side
            # files, then the store's folders) can appear between the check above and this listing.
            ours = {DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", f"{DB_NAME}-journal", DOCS_DIR, TMP_DIR}
            if root.is_dir() and any(p.name not in ours for p in root.iterdir()):
                raise StoreError(
                    f"{root} is not a memory store (it has files but no {DB_NAME}); refusing to write "
                    "into it. Use an empty or new --store folder."
                )
            if not create:
                raise StoreError(f"no memory store at {root}")
            root.mkdir(parents=True, exist_ok=True)
        existed = db_path.exists()
        conn = cls._connect(db_path)
        try:
            # A reader of an existing store only reads: no write lock, so it never waits for a writer.
            stored = cls._init_or_check(conn, root, wanted, read_only=existed and wanted is None)
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

    @staticmethod
    def _connect(db_path: Path) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves so a document is one transaction.
        conn = sqlite3.connect(
            str(db_path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            # WAL: readers in other processes keep working while one process writes.
            mode = _set_wal(conn)
            if mode.lower() != "wal":
                logger.warning(
                    "SQLite refused WAL mode for %s (got %s); readers may block writers", db_path, mode
                )
            conn.execute("PRAGMA synchronous = FULL")
            # Deleted rows (a document's text, its answers) are overwritten, not just unlinked.
            conn.execute("PRAGMA secure_delete = ON")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(f"{db_path} is not a readable SQLite database: {exc}") from exc
        return conn

    @staticmethod
    def _init_or_check(
        conn: sqlite3.Connection, root: Path, wanted: dict[str, Any] | None, *, read_only: bool = False
    ) -> dict[str, Any] | None:
        """Create the schema on a fresh database, or check version and fingerprint of an old one."""
        try:
            conn.execute("BEGIN" if read_only else "BEGIN IMMEDIATE")
            try:
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if not tables:
                    # Schema and fingerprint in one transaction: a crash here leaves an empty database,
                    # which the next open initialises again.
                    # Statement by statement: executescript() would COMMIT our transaction first.
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(
                        "INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                    )
                    conn.execute(
                        "INSERT INTO meta (key, value) VALUES ('fingerprint', ?)",
                        (None if wanted is None else _dumps(wanted, "fingerprint"),),
                    )
                    conn.execute("COMMIT")
                    logger.info("created memory store at %s", root)
                    return wanted
                if "meta" not in tables:
                    raise StoreError(f"{root / DB_NAME} is not a memory store database (no meta table)")
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
                version = int(meta.get("schema_version") or 0)
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"memory store at {root} has schema version {version}, newer than this code "
                        f"supports ({SCHEMA_VERSION}); upgrade hmt-qa"
                    )
                if version < 1:
                    raise StoreError(f"{root / DB_NAME} is not a memory store database (no schema version)")
                raw = meta.get("fingerprint")
                stored = None if raw is None else json.loads(raw)
                if wanted is not None:
                    if stored is None:
                        conn.execute(
                            "INSERT OR REPLACE INTO meta (key, value) VALUES ('fingerprint', ?)",
                            (_dumps(wanted, "fingerprint"),),
                        )
                        stored = wanted
                    elif stored != wanted:
                        diff = "; ".join(_fingerprint_diff(stored, wanted))
                        raise StoreMismatch(
                            f"memory store at {root} was made by a different model ({diff}). Memories of "
                            "different models cannot be mixed: use another --store folder (or the model "
                            "that made this store)."
                        )
                conn.execute("COMMIT")
                return stored
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open memory store at {root}: {exc}") from exc

    def _recover(self) -> None:
        """Remove staging folders and document folders without a row, left by a killed writer."""
        try:
            with self._write_lock.hold(blocking=False) as held:
                if not held:
                    # Another process is writing right now; its staging folders are not leftovers.
                    logger.debug("store %s busy; skipping leftover cleanup", self._root)
                    return
                for entry in (self._root / TMP_DIR).iterdir():
                    logger.info("removing leftover staging folder %s", entry)
                    _remove_path(entry)
                with self._lock:
                    known = {r[0] for r in self._db().execute("SELECT dir FROM documents")}
                for entry in (self._root / DOCS_DIR).iterdir():
                    if entry.name not in known:
                        logger.info("removing document folder with no catalogue row: %s", entry)
                        _remove_path(entry)
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

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"memory store at {self._root} is closed")
        return self._conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            # A failed COMMIT can leave the transaction open; roll back so the connection stays usable.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

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
                whichever of ``recall_key`` and ``summary`` are present; names given explicitly
                must be present.
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
        names = [n for n in DEFAULT_INDEXED if n in arrs] if indexed is None else list(dict.fromkeys(indexed))
        for name in names:
            if name not in arrs:
                raise ValueError(
                    f"cannot index array {name!r}: not among the arrays given ({', '.join(arrs) or 'none'})"
                )
            if not _SAFE_NAME.match(name) or name.startswith(STATE_PREFIX):
                raise ValueError(f"cannot index array {name!r}: indexed arrays need a plain per-segment name")
            if arrs[name].ndim != 2 or arrs[name].dtype != np.float32:
                raise ValueError(
                    f"cannot index array {name!r}: need a 2-D float array, got {arrs[name].shape}"
                )
        n_tok = (
            max((s.token_end for s in segs), default=0) if n_tokens is None else _as_int(n_tokens, "n_tokens")
        )
        meta_json = _dumps(dict(metadata or {}), f"metadata of document {doc_id!r}")
        # Build indexes before touching the disk, so bad input fails with nothing to clean up.
        indexes = {name: build_index(arrs[name], exact_limit=exact_limit) for name in names}
        created = _now()
        info = DocumentInfo(doc_id, str(title), str(source), n_tok, len(segs), created, json.loads(meta_json))

        with self._lock, self._write_lock.hold():
            old = self._find_row(doc_id)
            if old is not None and not replace:
                raise DocumentExists(
                    f"document {doc_id!r} is already in the store; pass replace=True to overwrite it"
                )
            dir_name = _doc_dir_name(doc_id)
            staging = self._root / TMP_DIR / f"{dir_name}.{uuid.uuid4().hex[:8]}"
            final = self._root / DOCS_DIR / dir_name
            renamed = False
            try:
                staging.mkdir()
                meta = {"doc_id": doc_id, "format": f"hmt-qa-store/{SCHEMA_VERSION}"}
                _write_bytes_durably(staging / TENSORS_NAME, lambda p: save_file(arrs, str(p), metadata=meta))
                for name, index in indexes.items():
                    write_index_file(index, staging / f"{name}{INDEX_SUFFIX}", atomic=False)
                fsync_path(staging, directory=True)
                os.replace(staging, final)
                renamed = True
                fsync_path(final.parent, directory=True)
                with self._transaction() as conn:
                    self._insert_rows(conn, info, text, segs, dir_name, names, replacing=old is not None)
            except BaseException:
                if not renamed:
                    _remove_path(staging)
                elif not self._row_points_at(doc_id, dir_name):
                    # Only remove the new folder if the commit did not happen (an interrupt can
                    # arrive after COMMIT returned but before we got here).
                    _remove_path(final)
                raise
            if old is not None:
                self._drop_cached(old.dir)
                self._discard_folder(old.dir)
        logger.info(
            "stored document %r (%d segments, indexes: %s)", doc_id, len(segs), ", ".join(names) or "none"
        )
        return dataclasses.replace(info, version=dir_name)

    def _insert_rows(
        self,
        conn: sqlite3.Connection,
        info: DocumentInfo,
        text: str,
        segs: list[SegmentInfo],
        dir_name: str,
        indexed: list[str],
        *,
        replacing: bool,
    ) -> None:
        """Write a document's catalogue rows (runs inside the caller's transaction)."""
        if replacing:
            conn.execute("DELETE FROM segments WHERE doc_id = ?", (info.doc_id,))
        # Upsert rather than delete + insert: a replaced document keeps its place in the listing.
        conn.execute(
            "INSERT INTO documents (doc_id, title, source, text, metadata, n_tokens, n_segments, created_at, dir, indexes)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (doc_id) DO UPDATE SET title = excluded.title,"
            " source = excluded.source, text = excluded.text, metadata = excluded.metadata,"
            " n_tokens = excluded.n_tokens, n_segments = excluded.n_segments, created_at = excluded.created_at,"
            " dir = excluded.dir, indexes = excluded.indexes",
            (
                info.doc_id,
                info.title,
                info.source,
                text,
                _dumps(info.metadata, "metadata"),
                info.n_tokens,
                info.n_segments,
                info.created_at,
                dir_name,
                json.dumps(indexed),
            ),
        )
        conn.executemany(
            "INSERT INTO segments (doc_id, idx, token_start, token_end, char_start, char_end) VALUES (?, ?, ?, ?, ?, ?)",
            [(s.doc_id, s.idx, s.token_start, s.token_end, s.char_start, s.char_end) for s in segs],
        )

    def _discard_folder(self, dir_name: str) -> None:
        """Remove a document folder that no row points at any more (rename first, so it vanishes at once)."""
        src = self._root / DOCS_DIR / dir_name
        trash = self._root / TMP_DIR / f"{dir_name}.deleted.{uuid.uuid4().hex[:8]}"
        try:
            os.replace(src, trash)
        except FileNotFoundError:
            return
        except OSError as exc:
            logger.warning("could not move %s away (%s); it will be removed on the next open", src, exc)
            return
        _remove_path(trash)

    def delete_document(self, doc_id: str) -> None:
        """Delete a document, its segments, answers and files.

        The rows go in one transaction; the folder is removed afterwards (a crash in between
        leaves only an orphan folder, which the next open removes).

        Raises:
            UnknownDocument: If ``doc_id`` is not stored.
        """
        with self._lock, self._write_lock.hold():
            row = self._row(doc_id)
            with self._transaction() as conn:
                conn.execute("DELETE FROM segments WHERE doc_id = ?", (doc_id,))
                conn.execute("DELETE FROM answers WHERE doc_id = ?", (doc_id,))
                conn.execute("DELETE FROM documents WHERE doc_id = ?", (doc_id,))
            # The WAL still holds the pages as they were before the delete: fold it into the database
            # (where secure_delete zeroed them) and empty it. A reader in another process can make
            # this a partial checkpoint; the next delete or close finishes it.
            self._db().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            self._drop_cached(row.dir)
            self._discard_folder(row.dir)
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
        payload = _dumps(dict(answer), "answer")
        with self._lock:
            self._row(doc_id)
            with self._transaction() as conn:
                cur = conn.execute(
                    "INSERT INTO answers (doc_id, question, mode, answer, created_at) VALUES (?, ?, ?, ?, ?)",
                    (doc_id, str(question), str(mode), payload, _now()),
                )
                return int(cur.lastrowid)

    # ---------------------------------------------------------------------------- reading

    def _find_row(self, doc_id: str) -> _DocRow | None:
        with self._lock:
            r = (
                self._db()
                .execute("SELECT doc_id, dir, indexes FROM documents WHERE doc_id = ?", (doc_id,))
                .fetchone()
            )
        return None if r is None else _DocRow(r[0], r[1], tuple(json.loads(r[2])))

    def _row_points_at(self, doc_id: str, dir_name: str) -> bool:
        try:
            row = self._find_row(doc_id)
        except (sqlite3.Error, StoreError):
            return False
        return row is not None and row.dir == dir_name

    def _row(self, doc_id: str) -> _DocRow:
        row = self._find_row(doc_id)
        if row is None:
            raise self._unknown(doc_id)
        return row

    def _unknown(self, doc_id: str) -> UnknownDocument:
        with self._lock:
            ids = [
                r[0]
                for r in self._db().execute(
                    "SELECT doc_id FROM documents ORDER BY rowid LIMIT ?", (_MAX_LISTED_IDS + 1,)
                )
            ]
            total = self._db().execute("SELECT COUNT(*) FROM documents").fetchone()[0]
        if not ids:
            return UnknownDocument(f"unknown document id {doc_id!r}; known: none (the store is empty)")
        shown = ", ".join(ids[:_MAX_LISTED_IDS])
        more = f", ... ({total - _MAX_LISTED_IDS} more)" if total > _MAX_LISTED_IDS else ""
        return UnknownDocument(f"unknown document id {doc_id!r}; known: {shown}{more}")

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
        return isinstance(doc_id, str) and self._find_row(doc_id) is not None

    def __len__(self) -> int:
        with self._lock:
            return int(self._db().execute("SELECT COUNT(*) FROM documents").fetchone()[0])

    @staticmethod
    def _info(r: Sequence[Any]) -> DocumentInfo:
        return DocumentInfo(r[0], r[1], r[2], int(r[3]), int(r[4]), r[5], json.loads(r[6]), r[7])

    _INFO_COLS = "doc_id, title, source, n_tokens, n_segments, created_at, metadata, dir"

    def list_documents(self) -> list[DocumentInfo]:
        """All stored documents, oldest first (texts are not loaded)."""
        with self._lock:
            rows = self._db().execute(f"SELECT {self._INFO_COLS} FROM documents ORDER BY rowid").fetchall()
        return [self._info(r) for r in rows]

    def get_document(self, doc_id: str) -> DocumentInfo:
        """The catalogue entry of ``doc_id``.

        Raises:
            UnknownDocument: With a message listing (up to 10) known ids.
        """
        with self._lock:
            r = (
                self._db()
                .execute(f"SELECT {self._INFO_COLS} FROM documents WHERE doc_id = ?", (doc_id,))
                .fetchone()
            )
        if r is None:
            raise self._unknown(doc_id)
        return self._info(r)

    def get_text(self, doc_id: str) -> str:
        """The full text of ``doc_id`` (segment character spans index into it)."""
        with self._lock:
            r = self._db().execute("SELECT text FROM documents WHERE doc_id = ?", (doc_id,)).fetchone()
        if r is None:
            raise self._unknown(doc_id)
        return r[0]

    def segments(self, doc_id: str) -> list[SegmentInfo]:
        """The segments of ``doc_id`` in order."""
        with self._lock:
            self._row(doc_id)
            rows = (
                self._db()
                .execute(
                    "SELECT doc_id, idx, token_start, token_end, char_start, char_end FROM segments "
                    "WHERE doc_id = ? ORDER BY idx",
                    (doc_id,),
                )
                .fetchall()
            )
        return [SegmentInfo(*r) for r in rows]

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
            path = self._root / DOCS_DIR / row.dir / TENSORS_NAME
            if not path.is_file():
                raise FileNotFoundError(path)
            with safe_open(str(path), framework="np") as f:
                keys = list(f.keys())
                missing = [n for n in (wanted or []) if n not in keys]
                if missing:
                    raise KeyError(
                        f"document {doc_id!r} has no array {missing[0]!r}; stored: {', '.join(sorted(keys)) or 'none'}"
                    )
                return {n: f.get_tensor(n) for n in (keys if wanted is None else wanted)}

        return self._with_files(doc_id, load)

    def _drop_cached(self, dir_name: str) -> None:
        with self._lock:
            for key in [k for k in self._index_cache if k[0] == dir_name]:
                del self._index_cache[key]

    def _index(self, row: _DocRow, name: str) -> faiss.Index:
        """The FAISS index ``name`` of a document, from the LRU cache or from disk."""
        key = (row.dir, name)
        with self._lock:
            cached = self._index_cache.get(key)
            if cached is not None:
                self._index_cache.move_to_end(key)
                return cached
        # Keyed by folder, which changes on replace, so a cached index is never stale.
        index = read_index_file(self._root / DOCS_DIR / row.dir / f"{name}{INDEX_SUFFIX}")
        with self._lock:
            if self._cache_size:
                self._index_cache[key] = index
                while len(self._index_cache) > self._cache_size:
                    self._index_cache.popitem(last=False)
        return index

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
        return self._with_files(doc_id, lambda r: self._index(r, name), row)

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
            with self._lock:
                raw = (
                    self._db().execute("SELECT doc_id, dir, indexes FROM documents ORDER BY rowid").fetchall()
                )
            rows = [_DocRow(r[0], r[1], tuple(json.loads(r[2]))) for r in raw]
            rows = [r for r in rows if index in r.indexes]
        hits: list[list[tuple[str, int, float]]] = [[] for _ in range(q2.shape[0])]
        for row in rows:
            try:
                idx = self._with_files(row.doc_id, lambda r: self._index(r, index), row)
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
        sql = "SELECT id, doc_id, question, mode, answer, created_at FROM answers"
        with self._lock:
            if doc_id is None:
                rows = self._db().execute(sql + " ORDER BY id").fetchall()
            else:
                rows = self._db().execute(sql + " WHERE doc_id = ? ORDER BY id", (doc_id,)).fetchall()
        return [
            {
                "id": r[0],
                "doc_id": r[1],
                "question": r[2],
                "mode": r[3],
                "answer": json.loads(r[4]),
                "created_at": r[5],
            }
            for r in rows
        ]

    # ---------------------------------------------------------------------------- closing

    def close(self) -> None:
        """Close the database and drop cached indexes (idempotent)."""
        with self._lock:
            self._index_cache.clear()
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else ("writable" if self._writable else "read-only")
        return f"MemoryStore({str(self._root)!r}, {state})"
