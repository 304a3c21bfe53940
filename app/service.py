"""What the web app does, without Gradio: sessions, uploads, ingestion, answers, batch, memory views.

Every method takes the caller's :class:`UserSession`; documents a session uploads go to its own
private store (a folder under the session root) and are never listed for anyone else. The shared
store is read by everyone and written only when a user asks to save a document there, and only
on a server started with ``--allow-shared-writes`` (then within a quota).

Over 500 lines: one class, :class:`QAService`, every action of the app without Gradio, with the
session, upload, limit and quota checks each action needs; the page is in ``ui.py``.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qa_pipeline.batch import load_records, run_batch
from qa_pipeline.documents import Document, DocumentError, load_documents, load_text
from qa_pipeline.engine import ANSWER_MODES, DEFAULT_MODE, Answer, Engine, QAError
from qa_pipeline.metrics import summarize
from qa_pipeline.qa_data import QADataError, QARow
from qa_pipeline.store import MemoryStore, SegmentInfo, StoreError, StoreMismatch, UnknownDocument

from . import views
from .errors import AppError
from .loader import EngineLoader
from .query import query_vector, recall_weights
from .settings import AppSettings

logger = logging.getLogger(__name__)

UPLOAD_SUFFIXES = (".txt", ".md", ".pdf", ".nxml", ".xml")
PRIVATE, SHARED = "yours", "shared"
SESSION_PREFIX, ROOT_PREFIX = "session-", "hmtqa-sessions-"

IngestProgress = Callable[[str, int, int, float], None]  # (doc title, segments done, total, tokens/s)


@dataclass
class DocEntry:
    """A document the session can ask about."""

    doc_id: str
    title: str
    n_tokens: int
    n_segments: int
    where: str  # PRIVATE (the session's own upload) or SHARED

    @property
    def label(self) -> str:
        title = self.title if self.title and self.title != self.doc_id else ""
        name = f"{title[:60]} ({self.doc_id})" if title else self.doc_id
        return f"{name} · {self.n_segments} segments · {self.where}"


@dataclass
class MemoryView:
    """One document's memory, for the Memory tab."""

    doc_id: str
    title: str
    text: str
    segments: list[SegmentInfo]
    memory: np.ndarray  # (n, d) memory embeddings M_n
    recall_key: np.ndarray  # (n, d_h) recall keys K_n (see hmt.memory.MemoryRecall)


class UserSession:
    """One browser tab or API client: a private store in its own folder, and the last answer."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.last_answer: Answer | None = None
        self._store: MemoryStore | None = None
        self._lock = threading.Lock()
        self.closed = False

    def store(self, engine: Engine) -> MemoryStore:
        """The private store (created on first use)."""
        with self._lock:
            if self.closed:
                raise AppError("This session has expired; reload the page.")
            if self._store is None:
                self._store = engine.open_store(self.folder / "store")
            return self._store

    def existing_store(self) -> MemoryStore | None:
        return self._store

    def close(self) -> None:
        """Delete the private store and everything else the session wrote."""
        with self._lock:
            self.closed = True
            if self._store is not None:
                self._store.close()
                self._store = None
        shutil.rmtree(self.folder, ignore_errors=True)
        logger.info("session folder %s removed", self.folder)


def _loaded(engine: Engine) -> Engine:
    """The engine with its reader loaded too: the page says "ready" once a first answer needs no load."""
    _ = engine.reader
    return engine


class QAService:
    """The web app's operations over one shared :class:`Engine` and the stores."""

    def __init__(self, settings: AppSettings, engine_factory: Callable[[], Engine] | None = None) -> None:
        self.settings = settings
        factory = engine_factory or (lambda: _loaded(Engine(settings.engine_config())))
        self.loader = EngineLoader(factory, description=f"{settings.backbone}")
        self._shared: MemoryStore | None = None
        self._shared_readonly: MemoryStore | None = None
        self.shared_error: str | None = None
        self._shared_lock = threading.Lock()
        self._session_root: Path | None = None
        self._own_session_root = False
        self._sessions: weakref.WeakSet[UserSession] = weakref.WeakSet()
        self._root_lock = threading.Lock()
        self._downloads: Path | None = None
        self._shared_write_lock = threading.Lock()
        self.sweep_stale_sessions()

    # ------------------------------------------------------------------ engine, stores, sessions
    def engine(self) -> Engine:
        return self.loader.get()

    def new_session(self) -> UserSession:
        """A fresh session with its own folder under the session root."""
        with self._root_lock:
            if self._session_root is None:
                if self.settings.session_root:
                    self._session_root = Path(self.settings.session_root)
                else:
                    self._session_root = Path(tempfile.mkdtemp(prefix=ROOT_PREFIX))
                    self._own_session_root = True
            # Again every time: another server's sweep may have taken a root idle for longer than the TTL.
            self._session_root.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix=SESSION_PREFIX, dir=self._session_root))
        session = UserSession(folder)
        self._sessions.add(session)
        return session

    def sweep_stale_sessions(self) -> list[Path]:
        """Remove session folders nothing has touched for longer than the session TTL (run at start).

        A server that was killed, or a request that died, leaves them behind; a live session is
        deleted after the same idle time anyway. With ``--session-root`` the sweep covers that
        folder's ``session-*`` folders; with the default temporary root, earlier servers' roots.
        """
        now, ttl = time.time(), self.settings.session_ttl_s
        if self.settings.session_root:
            parent, prefix = Path(self.settings.session_root), SESSION_PREFIX
        else:
            parent, prefix = Path(tempfile.gettempdir()), ROOT_PREFIX
        removed = []
        try:
            candidates = [p for p in parent.iterdir() if p.name.startswith(prefix)]
        except OSError:  # no root yet
            return removed
        for path in candidates:
            if path.is_symlink() or not path.is_dir() or path == self._session_root:
                continue
            if now - _last_modified(path) > ttl:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        if removed:
            logger.info("removed %d stale session folder(s) under %s", len(removed), parent)
        return removed

    def shared_store(self, *, wait: bool = True) -> MemoryStore | None:
        """The shared store opened for writing (needs the model), or None if disabled or unusable.

        With ``wait=False`` and the model still loading, a read-only handle is returned instead, so
        the document picker can list shared documents before the model is ready.
        """
        if not self.settings.store:
            return None
        if not wait and not self.loader.ready:
            return self._shared_for_reading()
        engine = self.engine()
        with self._shared_lock:
            if self._shared is None and self.shared_error is None:
                try:
                    self._shared = engine.open_store(self.settings.store)
                except StoreMismatch as err:
                    self.shared_error = (
                        f"The shared store {self.settings.store} was made by another model and is not used: {err}"
                    )
                except (StoreError, OSError) as err:
                    self.shared_error = f"The shared store {self.settings.store} cannot be opened: {err}"
                if self.shared_error:
                    logger.warning("%s", self.shared_error)
            return self._shared

    def _shared_for_reading(self) -> MemoryStore | None:
        path = Path(self.settings.store)
        if not (path / "store.sqlite").is_file():
            return None
        with self._shared_lock:
            if self._shared_readonly is None:
                try:
                    self._shared_readonly = MemoryStore.open(path, fingerprint=None, create=False)
                except (StoreError, OSError) as err:
                    logger.warning("cannot list the shared store %s: %s", path, err)
                    return None
            return self._shared_readonly

    def downloadable(self, path: Path) -> Path:
        """``path`` itself if Gradio may hand it out (under the temp folder or the working folder), else a copy.

        Gradio only serves returned files from those two places; adding the session root to
        ``allowed_paths`` instead would expose every session's store to anyone guessing paths.
        """
        resolved = path.resolve()
        if any(resolved.is_relative_to(root) for root in _servable_roots()):
            return path
        with self._root_lock:
            if self._downloads is None:
                self._downloads = Path(tempfile.mkdtemp(prefix="hmtqa-downloads-"))
        copy = Path(tempfile.mkdtemp(dir=self._downloads)) / path.name
        shutil.copyfile(path, copy)
        return copy

    def close(self) -> None:
        """Close the stores and remove every session folder (server shutdown)."""
        for session in list(self._sessions):
            session.close()
        with self._shared_lock:
            for store in (self._shared, self._shared_readonly):
                if store is not None:
                    store.close()
            self._shared = self._shared_readonly = None
        if self._own_session_root and self._session_root is not None:
            shutil.rmtree(self._session_root, ignore_errors=True)
        if self._downloads is not None:
            shutil.rmtree(self._downloads, ignore_errors=True)

    # ------------------------------------------------------------------ documents
    def documents(self, session: UserSession | None, *, wait: bool = True) -> list[DocEntry]:
        """Documents the session may ask about: its own first, then the shared ones."""
        entries: list[DocEntry] = []
        seen: set[str] = set()
        stores: list[tuple[MemoryStore | None, str]] = []
        if session is not None:
            stores.append((session.existing_store(), PRIVATE))
        stores.append((self.shared_store(wait=wait), SHARED))
        for store, where in stores:
            if store is None:
                continue
            for info in store.list_documents():
                if info.doc_id in seen:
                    continue  # the session's own copy wins
                seen.add(info.doc_id)
                entries.append(DocEntry(info.doc_id, info.title, info.n_tokens, info.n_segments, where))
        return entries

    def resolve(self, session: UserSession | None, doc_id: str) -> tuple[MemoryStore, str]:
        """The store holding ``doc_id`` for this session (its private store first) and which one."""
        doc_id = (doc_id or "").strip()
        if not doc_id:
            raise AppError("Pick a document first, or add one with Ingest.")
        self.engine()  # waits for the model (and reports a failed load) as every action does
        # Only a store the session already has: looking a document up must not create one.
        private = session.existing_store() if session is not None else None
        if private is not None and doc_id in private:
            return private, PRIVATE
        shared = self.shared_store()
        if shared is not None and doc_id in shared:
            return shared, SHARED
        known = [e.doc_id for e in self.documents(session)]
        hint = f"Known: {', '.join(known[:10])}." if known else "No documents yet: ingest one first."
        raise AppError(f"Unknown document {doc_id!r}. {hint}")

    def load_uploads(self, paths: list[str], text: str | None, names: list[str] | None = None) -> list[Document]:
        """Read uploaded files and pasted text into documents; everything is checked before any ingest.

        Raises:
            AppError: Naming the file for an empty, binary, oversize or unsupported upload.
        """
        limit = self.settings.max_upload_bytes
        limit_text = f"{self.settings.max_upload_mb:g} MB"
        max_files = self.settings.max_files_per_request
        if len(paths) > max_files:
            raise AppError(
                f"{len(paths)} files at once; this server takes up to {max_files} per ingest: send them in parts."
            )
        docs: list[Document] = []
        names = names or [Path(p).name for p in paths]
        for path, name in zip(paths, names, strict=True):
            p = Path(path)
            suffix = p.suffix.lower()
            if suffix not in UPLOAD_SUFFIXES:
                raise AppError(f"{name}: unsupported file type {suffix or '(none)'!r}; use {', '.join(UPLOAD_SUFFIXES)}.")
            try:
                size = p.stat().st_size
            except OSError:
                raise AppError(f"{name}: the upload did not arrive; try again.") from None
            if size > limit:
                raise AppError(f"{name} is {size / 1024 / 1024:.1f} MB; the upload limit is {limit_text}.")
            try:
                loaded = load_documents(p, max_bytes=limit)
            except DocumentError as err:
                # The loader names the server-side temp path; users know their file by its name.
                raise AppError(str(err).replace(str(p), name)) from None
            for doc in loaded:
                doc.source = f"upload:{name}"
            docs.extend(loaded)
        text = text or ""
        if text.strip():
            if len(text.encode("utf-8")) > limit:
                raise AppError(f"The pasted text is over the {limit_text} limit; upload it as a file or shorten it.")
            if "\x00" in text:
                raise AppError("The pasted text contains NUL bytes; paste plain text.")
            doc = load_text(text, source="pasted")
            # Titled from the loaded text: load_text has already dropped a byte-order mark.
            doc.title = doc.text.strip().splitlines()[0].strip().lstrip("#").strip()[:80]
            docs.append(doc)
        if not docs:
            raise AppError("Nothing to ingest: upload a file or paste some text first.")
        if len(docs) > max_files:
            raise AppError(
                f"These uploads hold {len(docs)} documents; this server takes up to {max_files} per ingest: send them in parts."
            )
        return docs

    def check_document_tokens(self, engine: Engine, docs: list[Document]) -> None:
        """Refuse a document longer than ``max_document_tokens`` (counted with the model's tokenizer).

        A token covers at least one byte of the text, so only texts with more bytes than the limit
        are tokenized here, and only until the count passes it.
        """
        limit = self.settings.max_document_tokens
        for doc in docs:
            if len(doc.text.encode("utf-8")) <= limit:
                continue
            n_tokens = engine.count_tokens(doc.text, stop_after=limit)
            if n_tokens > limit:
                raise AppError(
                    f"{doc.title or doc.doc_id} is more than {limit:,} tokens long, the longest document this "
                    "server reads; upload the part you need (or split it into several documents)."
                )

    def ingest(
        self,
        session: UserSession,
        docs: list[Document],
        *,
        save_shared: bool = False,
        progress: IngestProgress | None = None,
    ) -> list[dict]:
        """Read documents through HMT into the session's private store (and the shared one if asked)."""
        if save_shared:
            self._check_shared_writes()  # before the (long) read, not after it
        engine = self.engine()
        self.check_document_tokens(engine, docs)  # every document before any is read
        store = session.store(engine)
        results = []
        for doc in docs:
            record = {"doc_id": doc.doc_id, "title": doc.title, "source": doc.source}
            if doc.doc_id in store and store.get_text(doc.doc_id) == doc.text:
                info = store.get_document(doc.doc_id)
                record.update(status="already ingested", tokens=info.n_tokens, segments=info.n_segments)
            else:
                def report(done: int, total: int, tps: float, title: str = doc.title or doc.doc_id) -> None:
                    if progress is not None:
                        progress(title, done, total, tps)

                try:
                    info, timing = engine.ingest(store, doc, replace=True, progress=report)
                except (QAError, StoreError, ValueError) as err:
                    raise AppError(f"{doc.title or doc.doc_id}: {err}") from None
                record.update(
                    status="ingested",
                    tokens=info.n_tokens,
                    segments=info.n_segments,
                    seconds=round(timing["total_s"], 3),
                    tokens_per_s=round(timing["tokens_per_s"], 1),
                )
            if save_shared:
                record["shared"] = self.save_to_shared(session, doc.doc_id)
            results.append(record)
        return results

    def save_to_shared(self, session: UserSession, doc_id: str) -> str:
        """Copy one of the session's documents (text, segments, memories) into the shared store."""
        self._check_shared_writes()
        shared = self.shared_store()
        if shared is None:
            raise AppError(self.shared_error or "This server has no shared store (started with --store '').")
        store, where = self.resolve(session, doc_id)
        if where == SHARED:
            return f"{doc_id} is already in the shared store."
        text = store.get_text(doc_id)
        if doc_id in shared:
            if shared.get_text(doc_id) == text:
                return f"{doc_id} is already in the shared store."
            raise AppError(
                f"The shared store already has a different document called {doc_id!r}; rename your file and ingest it again."
            )
        info = store.get_document(doc_id)
        arrays = store.arrays(doc_id)
        with self._shared_write_lock:  # the quota check and the write, one save at a time
            new_bytes = len(text.encode("utf-8")) + sum(a.nbytes for a in arrays.values())
            self._check_shared_quota(shared, new_bytes)
            try:
                # Same model fingerprint on both stores, so the memories can be copied as they are.
                shared.add_document(
                    doc_id,
                    title=info.title,
                    source=info.source,
                    text=text,
                    metadata=info.metadata,
                    segments=store.segments(doc_id),
                    arrays=arrays,
                    n_tokens=info.n_tokens,
                )
            except StoreError as err:
                raise AppError(f"Saving {doc_id} to the shared store failed: {err}") from None
        return f"{doc_id} saved to the shared store; every user can now pick it."

    def _check_shared_writes(self) -> None:
        if not self.settings.allow_shared_writes:
            raise AppError(
                "Saving to the shared store is turned off on this server (it is read-only for users; "
                "the operator can start it with --allow-shared-writes)."
            )

    def _check_shared_quota(self, shared: MemoryStore, new_bytes: int) -> None:
        n_docs, max_docs = len(shared.list_documents()), self.settings.shared_max_documents
        if n_docs >= max_docs:
            raise AppError(
                f"The shared store is full ({n_docs} documents, the limit is {max_docs}); nothing was saved."
            )
        used, max_bytes = _folder_bytes(Path(self.settings.store)), self.settings.shared_max_bytes
        if used + new_bytes > max_bytes:
            raise AppError(
                f"The shared store is full: this document ({new_bytes / 2**20:.1f} MB) would take it past its "
                f"{self.settings.shared_max_mb:g} MB limit ({used / 2**20:.1f} MB used); nothing was saved."
            )

    # ------------------------------------------------------------------ answers
    @staticmethod
    def parse_options(options: str | list[str] | None) -> list[str] | None:
        """Comma-separated options (a list passes through); None for an open question."""
        if not options:
            return None
        items = options if isinstance(options, list) else str(options).split(",")
        items = [o.strip() for o in items if o and o.strip()]
        if len(items) == 1:
            raise AppError("Give at least two comma-separated options (e.g. yes, no, maybe), or none.")
        return items or None

    def ask(
        self,
        session: UserSession | None,
        doc_id: str,
        question: str,
        *,
        mode: str = DEFAULT_MODE,
        options: str | list[str] | None = None,
        on_token: Callable[[str], None] | None = None,
    ) -> Answer:
        """Answer ``question`` about ``doc_id``; the session remembers the answer for the Memory tab."""
        if mode not in ANSWER_MODES:
            raise AppError(f"Unknown mode {mode!r}; choose one of {', '.join(ANSWER_MODES)}.")
        if not (question or "").strip():
            raise AppError("Type a question first.")
        opts = self.parse_options(options)
        store, where = self.resolve(session, doc_id)
        try:
            # Questions about shared documents are not recorded there: other users would see them.
            answer = self.engine().ask(
                store, doc_id.strip(), question, mode=mode, options=opts, on_token=on_token, record=where == PRIVATE
            )
        except UnknownDocument as err:
            raise AppError(str(err)) from None
        except (QAError, StoreError, DocumentError) as err:
            raise AppError(str(err)) from None
        if session is not None:
            session.last_answer = answer
        return answer

    def ask_stream(
        self,
        session: UserSession | None,
        doc_id: str,
        question: str,
        *,
        mode: str = DEFAULT_MODE,
        options: str | list[str] | None = None,
    ) -> Iterator[tuple[str, Answer | None]]:
        """Yield ``(text so far, None)`` while the answer is generated, then ``(answer, Answer)``.

        The engine streams through a callback, so it runs on a worker thread that feeds a queue.
        If the consumer stops early (the user left), the next token aborts the generation.
        """
        updates: queue.Queue[tuple[str, object]] = queue.Queue()
        stop = threading.Event()

        class _Stopped(Exception):
            pass

        def on_token(text: str) -> None:
            if stop.is_set():
                raise _Stopped
            updates.put(("token", text))

        def work() -> None:
            try:
                updates.put(("done", self.ask(session, doc_id, question, mode=mode, options=options, on_token=on_token)))
            except _Stopped:
                updates.put(("stopped", None))
            except BaseException as err:  # handed to the consumer, which shows or raises it
                updates.put(("error", err))

        worker = threading.Thread(target=work, name="hmtqa-ask", daemon=True)
        worker.start()
        try:
            while True:
                kind, value = updates.get()
                # Skip to the newest partial text: the browser need not see every intermediate step.
                while kind == "token" and not updates.empty():
                    kind, value = updates.get()
                if kind == "token":
                    yield str(value), None
                elif kind == "done":
                    assert isinstance(value, Answer)
                    yield value.answer, value
                    return
                elif kind == "error":
                    if isinstance(value, (AppError, KeyboardInterrupt)):
                        raise value
                    logger.error("answering failed", exc_info=value)  # type: ignore[arg-type]
                    raise AppError(f"Answering failed: {type(value).__name__}: {value}")
                else:
                    return
        finally:
            stop.set()

    # ------------------------------------------------------------------ memory
    def memory_view(self, session: UserSession | None, doc_id: str) -> MemoryView:
        store, _ = self.resolve(session, doc_id)
        arrays = store.arrays(doc_id, ["memory", "recall_key"])
        title = store.get_document(doc_id).title
        return MemoryView(
            doc_id, title, store.get_text(doc_id), store.segments(doc_id), arrays["memory"], arrays["recall_key"]
        )

    def search(self, session: UserSession | None, doc_id: str, text: str, k: int = 5) -> list[dict]:
        """Segments of ``doc_id`` whose recall keys best match ``text`` asked as a question (FAISS)."""
        store, _ = self.resolve(session, doc_id)
        q = query_vector(self.engine(), text)
        keys = store.arrays(doc_id, ["recall_key"])["recall_key"]
        weights = recall_weights(keys, q, self.engine().recall_scale)
        hits = store.search(q, index="recall_key", doc_id=doc_id, k=max(1, min(int(k), len(keys))))
        segments = {s.idx: s for s in store.segments(doc_id)}
        full = store.get_text(doc_id)
        rows = []
        for rank, (_, idx, score) in enumerate(hits, start=1):
            s = segments[idx]
            rows.append(
                {
                    "rank": rank,
                    "segment": idx,
                    "score": round(score, 4),
                    "recall_weight": round(float(weights[idx]), 4),
                    "chars": f"{s.char_start}-{s.char_end}",
                    "snippet": views.snippet(full[s.char_start : s.char_end], 200),
                }
            )
        return rows

    # ------------------------------------------------------------------ batch
    def run_batch(
        self,
        session: UserSession,
        rows: list[QARow],
        modes: list[str],
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[list[dict], dict, Path]:
        """Answer every row in every mode into the session's store; (records, metrics, results file)."""
        modes = [m for m in modes if m]
        if not modes:
            raise AppError("Choose at least one answer mode.")
        bad = [m for m in modes if m not in ANSWER_MODES]
        if bad:
            raise AppError(f"Unknown mode(s) {bad}; choose from {', '.join(ANSWER_MODES)}.")
        engine = self.engine()
        store = session.store(engine)
        out = session.folder / f"batch-{time.strftime('%Y%m%d-%H%M%S')}-{time.perf_counter_ns() % 10**6}.jsonl"
        try:
            run_batch(engine, rows, out, store, modes=tuple(modes), progress=progress)
        except (QAError, QADataError, StoreError) as err:
            raise AppError(f"The batch failed: {err}") from None
        records = load_records(out)
        return records, summarize(records), out


def _last_modified(folder: Path) -> float:
    """The newest modification time of ``folder`` and anything in it (a store's writes touch only its files)."""
    newest = folder.lstat().st_mtime
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
            except OSError:
                continue
    return newest


def _folder_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


def _servable_roots() -> list[Path]:
    """Where Gradio accepts files returned by handlers without extra ``allowed_paths``."""
    return [Path(tempfile.gettempdir()).resolve(), Path.cwd().resolve()]


def entry_dicts(entries: list[DocEntry]) -> list[dict]:
    return [asdict(e) | {"label": e.label} for e in entries]


__all__ = ["QAService", "UserSession", "DocEntry", "MemoryView", "PRIVATE", "SHARED", "entry_dicts"]
