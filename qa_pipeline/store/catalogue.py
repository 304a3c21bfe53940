"""The store's SQLite catalogue (``store.sqlite``): schema, model fingerprint, and the rows of
documents, segments and answers. Files and indexes live in document folders (:mod:`.files`)."""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .records import DocumentInfo, SegmentInfo, StoreError, StoreMismatch, UnknownDocument, _DocRow

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DB_NAME = "store.sqlite"
BUSY_TIMEOUT_S = 30.0
_MAX_LISTED_IDS = 10

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


def now() -> str:
    """The catalogue's clock: UTC, whole seconds (``created_at`` of documents and answers)."""
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


def dumps(obj: Any, what: str) -> str:
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


def normalise_fingerprint(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """Round-trip through JSON so that tuples vs lists or int keys compare like the stored copy."""
    if not isinstance(fingerprint, Mapping):
        raise TypeError(f"fingerprint must be a dict; got {type(fingerprint).__name__}")
    return json.loads(dumps(dict(fingerprint), "fingerprint"))


def _fingerprint_diff(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    missing = object()
    lines = []
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key, missing), wanted.get(key, missing)
        if a != b:
            sa = "<missing>" if a is missing else json.dumps(a)
            sb = "<missing>" if b is missing else json.dumps(b)
            line = f"{key}: store has {sa}, requested {sb}"
            if key == "dtype" and a is not missing:
                # The default dtype, auto, differs by machine: the store's own is one flag away.
                line += f" (open it with --dtype {a})"
            lines.append(line)
    return lines


def connect(db_path: Path) -> sqlite3.Connection:
    """Open the catalogue database: WAL mode, busy timeout, full sync, secure delete."""
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


def init_or_check(
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
                    (None if wanted is None else dumps(wanted, "fingerprint"),),
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
                        (dumps(wanted, "fingerprint"),),
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


def _info(r: Sequence[Any]) -> DocumentInfo:
    return DocumentInfo(r[0], r[1], r[2], int(r[3]), int(r[4]), r[5], json.loads(r[6]), r[7])


def _doc_row(r: Sequence[Any]) -> _DocRow:
    return _DocRow(r[0], r[1], tuple(json.loads(r[2])))


class Catalogue:
    """The rows of one open store database: documents, segments and answers.

    ``lock`` is the store's lock: every query takes it, and the store holds it across several
    calls where they must see one state. Each write is one transaction.
    """

    _INFO_COLS = "doc_id, title, source, n_tokens, n_segments, created_at, metadata, dir"

    def __init__(self, conn: sqlite3.Connection, root: Path, lock: threading.RLock) -> None:
        self._conn: sqlite3.Connection | None = conn
        self._root = root
        self._lock = lock

    @property
    def closed(self) -> bool:
        return self._conn is None

    def close(self) -> None:
        """Close the database (idempotent)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"memory store at {self._root} is closed")
        return self._conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
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

    # ---------------------------------------------------------------------------- reading

    def find_row(self, doc_id: str) -> _DocRow | None:
        """Where the files of ``doc_id`` live, or None if it is not stored."""
        with self._lock:
            r = (
                self._db()
                .execute("SELECT doc_id, dir, indexes FROM documents WHERE doc_id = ?", (doc_id,))
                .fetchone()
            )
        return None if r is None else _doc_row(r)

    def rows(self) -> list[_DocRow]:
        """Where the files of every document live, oldest document first."""
        with self._lock:
            raw = self._db().execute("SELECT doc_id, dir, indexes FROM documents ORDER BY rowid").fetchall()
        return [_doc_row(r) for r in raw]

    def dirs(self) -> set[str]:
        """The folder names that rows point at."""
        with self._lock:
            return {r[0] for r in self._db().execute("SELECT dir FROM documents")}

    def unknown(self, doc_id: str) -> UnknownDocument:
        """The error for a missing ``doc_id``, listing (up to 10) known ids."""
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

    def count(self) -> int:
        with self._lock:
            return int(self._db().execute("SELECT COUNT(*) FROM documents").fetchone()[0])

    def list_documents(self) -> list[DocumentInfo]:
        with self._lock:
            rows = self._db().execute(f"SELECT {self._INFO_COLS} FROM documents ORDER BY rowid").fetchall()
        return [_info(r) for r in rows]

    def get_document(self, doc_id: str) -> DocumentInfo | None:
        with self._lock:
            r = (
                self._db()
                .execute(f"SELECT {self._INFO_COLS} FROM documents WHERE doc_id = ?", (doc_id,))
                .fetchone()
            )
        return None if r is None else _info(r)

    def get_text(self, doc_id: str) -> str | None:
        with self._lock:
            r = self._db().execute("SELECT text FROM documents WHERE doc_id = ?", (doc_id,)).fetchone()
        return None if r is None else r[0]

    def segments(self, doc_id: str) -> list[SegmentInfo]:
        with self._lock:
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

    def answers(self, doc_id: str | None = None) -> list[dict[str, Any]]:
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

    # ---------------------------------------------------------------------------- writing

    def insert_rows(
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
        """Write a document's catalogue rows (runs inside the caller's :meth:`transaction`)."""
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
                dumps(info.metadata, "metadata"),
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

    def delete(self, doc_id: str) -> None:
        """Delete the rows of ``doc_id`` (document, segments, answers) and scrub them from the WAL."""
        with self._lock:
            with self.transaction() as conn:
                conn.execute("DELETE FROM segments WHERE doc_id = ?", (doc_id,))
                conn.execute("DELETE FROM answers WHERE doc_id = ?", (doc_id,))
                conn.execute("DELETE FROM documents WHERE doc_id = ?", (doc_id,))
            # The WAL still holds the pages as they were before the delete: fold it into the database
            # (where secure_delete zeroed them) and empty it. A reader in another process can make
            # this a partial checkpoint; the next delete or close finishes it.
            self._db().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()

    def add_answer(self, doc_id: str, question: str, mode: str, payload: str) -> int:
        """Insert an answer row (``payload`` is its JSON); returns its id."""
        with self._lock, self.transaction() as conn:
            cur = conn.execute(
                "INSERT INTO answers (doc_id, question, mode, answer, created_at) VALUES (?, ?, ?, ?, ?)",
                (doc_id, str(question), str(mode), payload, now()),
            )
            return int(cur.lastrowid)
