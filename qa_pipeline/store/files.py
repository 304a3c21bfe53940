"""Document folders: durable writes, safetensors arrays, FAISS index files, removal.

A document's files live in ``<root>/docs/<doc dir>/`` (see :mod:`qa_pipeline.store`); they are
written under ``<root>/.tmp/`` first and renamed into place by :class:`~.memory_store.MemoryStore`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import faiss
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from qa_pipeline.vector_index import fsync_path, read_index_file, write_index_file

from .records import StoreError

logger = logging.getLogger(__name__)

DOCS_DIR = "docs"
TMP_DIR = ".tmp"
TENSORS_NAME = "tensors.safetensors"
INDEX_SUFFIX = ".faiss"
STATE_PREFIX = "state."
DEFAULT_INDEXED = ("recall_key",)  # what the engine searches; other arrays are stored, not indexed
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def _doc_dir_name(doc_id: str) -> str:
    """A folder name for ``doc_id`` that cannot escape ``docs/`` and is unique per version."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", doc_id)[:48].strip("._-") or "doc"
    digest = hashlib.sha256(doc_id.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    # The version suffix gives a replaced document a fresh folder, so the swap is one SQL update.
    return f"{slug}-{digest}-{uuid.uuid4().hex[:8]}"


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


def indexed_names(arrays: Mapping[str, np.ndarray], indexed: Iterable[str] | None) -> list[str]:
    """The arrays to build a FAISS index for: ``indexed``, or by default those of
    :data:`DEFAULT_INDEXED` present; each must be a plain per-segment 2-D float32 array."""
    names = [n for n in DEFAULT_INDEXED if n in arrays] if indexed is None else list(dict.fromkeys(indexed))
    for name in names:
        if name not in arrays:
            raise ValueError(
                f"cannot index array {name!r}: not among the arrays given ({', '.join(arrays) or 'none'})"
            )
        if not _SAFE_NAME.match(name) or name.startswith(STATE_PREFIX):
            raise ValueError(f"cannot index array {name!r}: indexed arrays need a plain per-segment name")
        if arrays[name].ndim != 2 or arrays[name].dtype != np.float32:
            raise ValueError(f"cannot index array {name!r}: need a 2-D float array, got {arrays[name].shape}")
    return names


def write_document_files(
    folder: Path,
    arrays: dict[str, np.ndarray],
    indexes: Mapping[str, faiss.Index],
    metadata: dict[str, str],
) -> None:
    """Create ``folder`` and write a document's arrays and indexes into it, fsynced, ready to rename."""
    folder.mkdir()
    _write_bytes_durably(folder / TENSORS_NAME, lambda p: save_file(arrays, str(p), metadata=metadata))
    for name, index in indexes.items():
        write_index_file(index, folder / f"{name}{INDEX_SUFFIX}", atomic=False)
    fsync_path(folder, directory=True)


def read_arrays(folder: Path, doc_id: str, names: list[str] | None) -> dict[str, np.ndarray]:
    """Load arrays ``names`` (all when None) of the document in ``folder``.

    Raises:
        FileNotFoundError: If the folder's tensors file is gone (the document was replaced).
        KeyError: If a requested name was not stored for this document.
    """
    path = folder / TENSORS_NAME
    if not path.is_file():
        raise FileNotFoundError(path)
    with safe_open(str(path), framework="np") as f:
        keys = list(f.keys())
        missing = [n for n in (names or []) if n not in keys]
        if missing:
            raise KeyError(
                f"document {doc_id!r} has no array {missing[0]!r}; stored: {', '.join(sorted(keys)) or 'none'}"
            )
        return {n: f.get_tensor(n) for n in (keys if names is None else names)}


def prepare_root(root: Path, db_name: str, *, create: bool) -> None:
    """Check that ``root`` is a store folder (or may become one) and create it if missing.

    Raises:
        StoreError: If ``root`` is a file, a folder with other files in it, or missing when not ``create``.
    """
    db_path = root / db_name
    if root.exists() and not root.is_dir():
        raise StoreError(f"{root} is a file, not a memory store folder; use another --store folder")
    if not db_path.exists():
        # Another process may be creating this store right now: its database (and SQLite's side
        # files, then the store's folders) can appear between the check above and this listing.
        ours = {db_name, f"{db_name}-wal", f"{db_name}-shm", f"{db_name}-journal", DOCS_DIR, TMP_DIR}
        if root.is_dir() and any(p.name not in ours for p in root.iterdir()):
            raise StoreError(
                f"{root} is not a memory store (it has files but no {db_name}); refusing to write "
                "into it. Use an empty or new --store folder."
            )
        if not create:
            raise StoreError(f"no memory store at {root}")
        root.mkdir(parents=True, exist_ok=True)


def remove_leftovers(root: Path, known_dirs: Callable[[], set[str]]) -> None:
    """Remove staging folders, then document folders that no row points at (``known_dirs()``).

    Only call this holding the write lock: another writer's staging folders are not leftovers.
    """
    for entry in (root / TMP_DIR).iterdir():
        logger.info("removing leftover staging folder %s", entry)
        _remove_path(entry)
    known = known_dirs()
    for entry in (root / DOCS_DIR).iterdir():
        if entry.name not in known:
            logger.info("removing document folder with no catalogue row: %s", entry)
            _remove_path(entry)


def discard_folder(root: Path, dir_name: str) -> None:
    """Remove a document folder that no row points at any more (rename first, so it vanishes at once)."""
    src = root / DOCS_DIR / dir_name
    trash = root / TMP_DIR / f"{dir_name}.deleted.{uuid.uuid4().hex[:8]}"
    try:
        os.replace(src, trash)
    except FileNotFoundError:
        return
    except OSError as exc:
        logger.warning("could not move %s away (%s); it will be removed on the next open", src, exc)
        return
    _remove_path(trash)


class IndexCache:
    """The FAISS indexes of a store's documents, read from disk and kept in an LRU cache.

    Keyed by (document folder, index name); the folder changes on replace, so a cached index is
    never stale.
    """

    def __init__(self, root: Path, size: int, lock: threading.RLock) -> None:
        self._root = root
        self._size = max(0, size)
        self._lock = lock
        self._cache: OrderedDict[tuple[str, str], faiss.Index] = OrderedDict()

    def get(self, dir_name: str, name: str) -> faiss.Index:
        """The index ``name`` of the document in folder ``dir_name``, from the cache or from disk."""
        key = (dir_name, name)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        index = read_index_file(self._root / DOCS_DIR / dir_name / f"{name}{INDEX_SUFFIX}")
        with self._lock:
            if self._size:
                self._cache[key] = index
                while len(self._cache) > self._size:
                    self._cache.popitem(last=False)
        return index

    def drop(self, dir_name: str) -> None:
        """Forget the indexes of folder ``dir_name``."""
        with self._lock:
            for key in [k for k in self._cache if k[0] == dir_name]:
                del self._cache[key]

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
