"""FAISS helpers shared by the memory store and the index benchmark.

HMT's recall logits are inner products between a query ``q`` and the recall keys ``K_n`` (times the
recall's scale; see ``hmt.memory.MemoryRecall``), so every index here uses the inner-product metric: a
search then returns exactly the (unscaled) recall logits. Small collections use an exact flat index; past ``exact_limit``
vectors an HNSW graph keeps query time sub-linear at a small recall cost, measured with
:func:`recall_at_k`.

Indexes are saved with :func:`faiss.write_index` (FAISS's own format, never pickle).
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import faiss
import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_EXACT_LIMIT",
    "HNSW_M",
    "HNSW_EF_SEARCH",
    "as_float32_matrix",
    "build_index",
    "knn",
    "recall_at_k",
    "fsync_path",
    "write_index_file",
    "read_index_file",
]

DEFAULT_EXACT_LIMIT = 200_000
HNSW_M = 32  # graph degree: FAISS's usual default, a good recall / memory trade-off for d ~ 500
HNSW_EF_SEARCH = 128  # beam width at query time; FAISS's default of 16 gives poor recall@10


def as_float32_matrix(vectors: np.ndarray, *, what: str = "vectors") -> np.ndarray:
    """Return ``vectors`` as a C-contiguous finite float32 matrix (FAISS's only input layout).

    Args:
        vectors: Array of shape ``(n, d)``.
        what: Name used in error messages.

    Returns:
        The same data as a C-contiguous ``float32`` array of shape ``(n, d)``.

    Raises:
        ValueError: If the array is not 2-D, has ``d == 0`` or holds NaN / infinity.
    """
    arr = np.asarray(vectors)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (n, d); got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise ValueError(f"{what} must have at least one column; got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{what} must be numeric; got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return arr


def build_index(vectors: np.ndarray, *, exact_limit: int = DEFAULT_EXACT_LIMIT) -> faiss.Index:
    """Build an inner-product index over ``vectors``, exact or approximate depending on size.

    Up to ``exact_limit`` vectors an ``IndexFlatIP`` gives exact results (brute force is fast
    enough there and needs no tuning). Past it an ``IndexHNSWFlat`` with ``M = 32`` and
    ``efSearch = 128`` is used; ``efSearch`` is saved with the index by ``faiss.write_index``.

    Args:
        vectors: Array of shape ``(n, d)``; ``n`` may be 0.
        exact_limit: Largest ``n`` that still gets an exact flat index.

    Returns:
        A FAISS index with the vectors added; vector ``i`` has label ``i``.

    Raises:
        ValueError: On a bad array (see :func:`as_float32_matrix`) or a negative ``exact_limit``.
    """
    if exact_limit < 0:
        raise ValueError(f"exact_limit must be >= 0; got {exact_limit}")
    arr = as_float32_matrix(vectors)
    n, d = arr.shape
    if n <= exact_limit:
        index: faiss.Index = faiss.IndexFlatIP(d)
    else:
        hnsw = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efSearch = HNSW_EF_SEARCH
        index = hnsw
        logger.info("building HNSW index over %d vectors of dim %d (exact_limit %d)", n, d, exact_limit)
    if n:
        index.add(arr)
    return index


def knn(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Search ``index`` for the ``k`` best inner products of each query.

    Args:
        index: A FAISS index.
        queries: Array of shape ``(d,)`` or ``(q, d)``.
        k: Number of neighbours per query (>= 1). Missing neighbours (fewer than ``k`` vectors)
            come back with label -1, as FAISS returns them.

    Returns:
        ``(scores, labels)``, both of shape ``(q, k)``, best first.

    Raises:
        ValueError: If ``k < 1`` or the query width differs from the index's.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None, :]
    q = as_float32_matrix(q, what="queries")
    if q.shape[1] != index.d:
        raise ValueError(f"query width {q.shape[1]} does not match the index width {index.d}")
    scores, labels = index.search(q, k)
    return scores, labels


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean fraction of the exact top-``k`` neighbours that the approximate search also found.

    Args:
        approx: Labels from the approximate index, shape ``(q, >=k)`` (or ``(k,)`` for one query).
        exact: Labels from an exact index for the same queries, same layout.
        k: Cut-off.

    Returns:
        Recall@k in ``[0, 1]``, averaged over queries. Label -1 (no neighbour) is ignored; a query
        whose exact list has fewer than ``k`` real neighbours is scored against those it has.

    Raises:
        ValueError: If ``k < 1``, the shapes differ in number of queries or have fewer than ``k``
            columns.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    a = np.atleast_2d(np.asarray(approx))
    e = np.atleast_2d(np.asarray(exact))
    if a.shape[0] != e.shape[0]:
        raise ValueError(f"approx has {a.shape[0]} queries but exact has {e.shape[0]}")
    if a.shape[1] < k or e.shape[1] < k:
        raise ValueError(f"need at least k={k} labels per query; got {a.shape[1]} and {e.shape[1]}")
    if a.shape[0] == 0:
        return 1.0
    total = 0.0
    for row_a, row_e in zip(a[:, :k], e[:, :k], strict=True):
        truth = {int(x) for x in row_e if x >= 0}
        if not truth:
            total += 1.0  # nothing to find: any answer is complete
            continue
        found = {int(x) for x in row_a if x >= 0}
        total += len(truth & found) / len(truth)
    return total / a.shape[0]


def fsync_path(path: str | os.PathLike[str], *, directory: bool = False) -> None:
    """Flush a file (or directory entry table) to disk; a no-op where the OS does not allow it."""
    flags = os.O_RDONLY
    if directory and hasattr(os, "O_DIRECTORY"):
        flags |= os.O_DIRECTORY
    try:
        fd = os.open(path, flags)
    except OSError:
        return  # Windows cannot open directories; durability there relies on the OS
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_index_file(index: faiss.Index, path: str | os.PathLike[str], *, atomic: bool = True) -> None:
    """Write ``index`` with :func:`faiss.write_index` and flush it to disk.

    Args:
        index: The index to save.
        path: Destination file.
        atomic: Write to a temporary name next to ``path`` and rename it into place, so that a
            crash leaves either the old file or the new one, never half of one. Callers that
            already write inside a private temporary folder can pass ``False``.
    """
    path = Path(path)
    target = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp") if atomic else path
    try:
        faiss.write_index(index, str(target))
        fsync_path(target)
        if atomic:
            os.replace(target, path)
            fsync_path(path.parent, directory=True)
    except BaseException:
        if atomic:
            target.unlink(missing_ok=True)
        raise


def read_index_file(path: str | os.PathLike[str]) -> faiss.Index:
    """Read an index written by :func:`write_index_file`.

    Raises:
        FileNotFoundError: If ``path`` does not exist (FAISS itself would raise a bare
            RuntimeError).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no FAISS index at {path}")
    try:
        return faiss.read_index(str(path))
    except RuntimeError:
        if not os.path.isfile(path):  # removed between the check and the read
            raise FileNotFoundError(f"no FAISS index at {path}") from None
        raise
