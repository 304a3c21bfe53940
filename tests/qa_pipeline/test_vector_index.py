"""Tests of the FAISS helpers: exact vs approximate index choice, recall@k, save/load."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from qa_pipeline.vector_index import (
    HNSW_EF_SEARCH,
    build_index,
    knn,
    read_index_file,
    recall_at_k,
    write_index_file,
)

D = 16


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def test_build_index_picks_flat_then_hnsw() -> None:
    vecs = _vectors(300)
    flat = build_index(vecs, exact_limit=300)
    hnsw = build_index(vecs, exact_limit=299)
    assert isinstance(flat, faiss.IndexFlatIP)
    assert isinstance(hnsw, faiss.IndexHNSWFlat)
    assert hnsw.metric_type == faiss.METRIC_INNER_PRODUCT
    assert hnsw.hnsw.efSearch == HNSW_EF_SEARCH
    assert flat.ntotal == hnsw.ntotal == 300


def test_flat_scores_are_exact_inner_products() -> None:
    vecs, q = _vectors(50), _vectors(3, seed=1)
    scores, labels = knn(build_index(vecs), q, 5)
    exact = q @ vecs.T
    np.testing.assert_array_equal(labels, np.argsort(-exact, axis=1)[:, :5])
    np.testing.assert_allclose(scores, np.take_along_axis(exact, labels, axis=1), rtol=1e-5, atol=1e-5)


def test_recall_at_k() -> None:
    vecs, q = _vectors(2000), _vectors(50, seed=1)
    _, exact = knn(build_index(vecs), q, 10)
    _, exact2 = knn(build_index(vecs), q, 10)
    assert recall_at_k(exact2, exact, 10) == 1.0
    _, approx = knn(build_index(vecs, exact_limit=100), q, 10)
    assert recall_at_k(approx, exact, 10) >= 0.9
    assert recall_at_k(np.array([[1, 2, 3]]), np.array([[1, 4, 3]]), 3) == pytest.approx(2 / 3)
    # -1 means "no neighbour": only real exact neighbours count.
    assert recall_at_k(np.array([[5, -1]]), np.array([[5, -1]]), 2) == 1.0
    with pytest.raises(ValueError):
        recall_at_k(np.array([[1]]), np.array([[1]]), 2)


def test_write_read_round_trip(tmp_path) -> None:
    vecs = _vectors(200)
    index = build_index(vecs, exact_limit=10)
    path = tmp_path / "x.faiss"
    write_index_file(index, path)
    back = read_index_file(path)
    assert isinstance(back, faiss.IndexHNSWFlat) and back.hnsw.efSearch == HNSW_EF_SEARCH
    assert [p.name for p in tmp_path.iterdir()] == ["x.faiss"]  # no temp file left
    np.testing.assert_array_equal(knn(back, vecs[:3], 4)[1], knn(index, vecs[:3], 4)[1])
    with pytest.raises(FileNotFoundError):
        read_index_file(tmp_path / "missing.faiss")


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        build_index(np.zeros(D, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        build_index(np.full((2, D), np.nan))
    empty = build_index(np.zeros((0, D), np.float32))
    assert empty.ntotal == 0 and empty.d == D
    with pytest.raises(ValueError, match="width"):
        knn(build_index(_vectors(4)), np.zeros(D + 1), 1)
