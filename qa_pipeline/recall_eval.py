"""Recall evaluation: how well memory recall finds the gold evidence, at the granularity of HMT segments.

For every question the document's HMT segments (as stored by :meth:`Engine.ingest`) are ranked three
ways, over the very same segments:

* ``hmt``: the model's own recall (:meth:`Engine.recall`), by weight;
* ``dense``: cosine similarity of all-MiniLM-L6-v2 embeddings of the question and of each segment's text;
* ``bm25``: BM25 (``bm25s``) of the question against the segments' texts of that document.

A segment is *gold* when its character span overlaps a gold evidence span. Each ranking gives hit@1,
hit@5 and MRR (reciprocal rank of the first gold segment); ``chance`` is the exact expectation of the
same numbers under a uniformly random ranking of the document's segments. Ties in a ranking (BM25 scores
of 0, segments the recall did not reach) are broken by a fixed pseudo-random order per question, so
neither document order nor method order favours a method.

COVID-QA and Evidence Inference articles are split in two halves by a stable hash of their document
id: :func:`is_eval_article` (evaluated here) and :func:`is_train_article` (for training), never both.
Fused PubMedQA uses the held-out questions 401-500 of :func:`qa_pipeline.train_data.pubmedqa_split`.

Over 500 lines: one command's parts (gold segments, exact chance formulas, three rankings of the
same segments: memory recall, dense, BM25, and the tables), each short and used nowhere else.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from .documents import Document
from .metrics import _check_ng, chance_hit_at_k, rank_metrics, spans_overlap
from .qa_data import QARow
from .store import MemoryStore, SegmentInfo, StoreError

logger = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "SETS",
    "KS",
    "is_eval_article",
    "is_train_article",
    "eval_articles",
    "chance_hit_at_k",
    "chance_mrr",
    "chance_metrics",
    "rank_metrics",
    "gold_segments",
    "bm25_scores",
    "rank_by_scores",
    "select_rows",
    "load_set",
    "evaluate_recall",
    "run_recall_eval",
    "format_recall",
]

METHODS = ("hmt", "dense", "bm25")
SETS = ("pubmedqa-8", "pubmedqa-32", "covidqa", "evidence-inference")
KS = (1, 5)
COVIDQA_FILE = "covid-qa/covidqa_dev.json"
EVIDENCE_INFERENCE_DIR = "evidence-inference"


# --------------------------------------------------------------------------------------------------
# Train / eval halves of the article data sets
# --------------------------------------------------------------------------------------------------


def is_eval_article(doc_id: str) -> bool:
    """Whether article ``doc_id`` is in the evaluation half (a stable hash, the same on every machine)."""
    return int(hashlib.sha256(str(doc_id).encode("utf-8")).hexdigest(), 16) % 2 == 1


def is_train_article(doc_id: str) -> bool:
    """Whether article ``doc_id`` is in the training half: exactly the articles not in the eval half."""
    return not is_eval_article(doc_id)


def eval_articles(doc_ids: Iterable[str]) -> set[str]:
    """The eval-half articles among ``doc_ids``."""
    return {d for d in doc_ids if is_eval_article(d)}


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def chance_mrr(n: int, g: int) -> float:
    """Expected reciprocal rank of the first gold segment under a uniformly random ranking.

    The first gold segment is at rank ``r`` with probability ``C(n - r, g - 1) / C(n, g)`` (the other
    ``g - 1`` gold segments lie among the ``n - r`` ranks below it); summed exactly with fractions.
    """
    _check_ng(n, g)
    total = math.comb(n, g)
    return float(sum(Fraction(math.comb(n - r, g - 1), total * r) for r in range(1, n - g + 2)))


def chance_metrics(n: int, g: int, ks: Sequence[int] = KS) -> dict[str, float]:
    """``{"hit@k": ..., "mrr": ...}`` of a uniformly random ranking of ``n`` segments with ``g`` gold."""
    out = {f"hit@{k}": chance_hit_at_k(n, g, k) for k in ks}
    out["mrr"] = chance_mrr(n, g)
    return out


def gold_segments(segments: Sequence[SegmentInfo], evidence: Iterable[Sequence[int]]) -> list[int]:
    """Indices of the segments whose character span overlaps any evidence span (half-open spans)."""
    spans = [(int(s), int(e)) for s, e in evidence]
    return [seg.idx for seg in segments if any(spans_overlap((seg.char_start, seg.char_end), g) for g in spans)]


# --------------------------------------------------------------------------------------------------
# Rankers
# --------------------------------------------------------------------------------------------------


def _tie_order(key: str, n: int) -> np.ndarray:
    """A fixed pseudo-random permutation of ``range(n)`` for ``key`` (the tie-break)."""
    seed = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:16], 16)
    return np.random.default_rng(seed).permutation(n)


def rank_by_scores(scores: Sequence[float] | np.ndarray, tie_key: str = "") -> list[int]:
    """Positions of ``scores`` from highest to lowest; equal scores in a fixed pseudo-random order.

    ``nan`` counts as the lowest score.
    """
    s = np.asarray(scores, dtype=np.float64)
    s = np.where(np.isnan(s), -np.inf, s)
    tie = _tie_order(tie_key, len(s))
    return [int(i) for i in np.lexsort((tie, -s))]


_BM25_OPTS = {"stopwords": "en", "return_ids": False, "show_progress": False}


def _bm25s():
    """``bm25s``, imported with its logger quietened: it sets itself to DEBUG on import, which would
    print a line per index built whatever the application's logging level."""
    import bm25s

    bm25_logger = logging.getLogger("bm25s")
    if bm25_logger.level == logging.DEBUG:
        bm25_logger.setLevel(logging.WARNING)
    return bm25s


class _BM25:
    """BM25 over the segment texts of one document."""

    def __init__(self, texts: Sequence[str]) -> None:
        bm25s = _bm25s()

        self.n = len(texts)
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize(list(texts), **_BM25_OPTS), show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        bm25s = _bm25s()

        tokens = bm25s.tokenize([query], **_BM25_OPTS)[0]
        if not tokens:  # nothing but stopwords / punctuation: every segment ties
            return np.zeros(self.n, dtype=np.float32)
        return np.asarray(self.retriever.get_scores(tokens), dtype=np.float32)


def bm25_scores(texts: Sequence[str], query: str) -> np.ndarray:
    """BM25 score of ``query`` against each of ``texts`` (lowercased word tokens, English stopwords out)."""
    return _BM25(texts).scores(query)


# --------------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------------


def select_rows(rows: Sequence[QARow], *, limit_docs: int | None, limit_questions: int | None) -> list[QARow]:
    """A deterministic sample: the first ``limit_docs`` documents (file order) that have rows with
    evidence, and up to ``limit_questions`` of their questions, dealt round-robin over the documents
    (each document's first question, then each one's second, ...) so that questions spread over
    documents. Returned in file order. ``None`` means no limit.
    """
    by_doc: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        if not row.evidence:
            continue
        key = row.document_id()
        if key not in by_doc and limit_docs is not None and len(by_doc) >= limit_docs:
            continue
        by_doc.setdefault(key, []).append(i)
    picked: list[int] = []
    depth = 0
    while limit_questions is None or len(picked) < limit_questions:
        layer = [ids[depth] for ids in by_doc.values() if depth < len(ids)]
        if not layer:
            break
        room = len(layer) if limit_questions is None else limit_questions - len(picked)
        picked += layer[:room]
        depth += 1
    return [rows[i] for i in sorted(picked)]


def load_set(
    name: str, root: str | Path, *, limit_docs: int | None = 40, limit_questions: int | None = 100
) -> list[QARow]:
    """The evaluation rows of set ``name`` (one of :data:`SETS`), sampled by :func:`select_rows`.

    Raises:
        ValueError: unknown set name. FileNotFoundError / QADataError: data missing or malformed.
    """
    from .datasets import covid_qa, evidence_inference
    from .train_data import pubmedqa_split

    root = Path(root)
    if name.startswith("pubmedqa-"):
        try:
            fuse = int(name.split("-", 1)[1])
        except ValueError:
            raise ValueError(f"unknown recall set {name!r}; choose from {', '.join(SETS)}") from None
        rows = pubmedqa_split(root, num_docs=fuse)[1]  # held-out questions 401-500
    elif name == "covidqa":
        rows = [r for r in covid_qa(root / COVIDQA_FILE) if is_eval_article(r.document_id())]
    elif name == "evidence-inference":
        path = root / EVIDENCE_INFERENCE_DIR
        if not path.is_dir():
            raise FileNotFoundError(f"Evidence Inference data not found: {path}")
        rows = [r for r in evidence_inference(path) if is_eval_article(r.document_id())]
    else:
        raise ValueError(f"unknown recall set {name!r}; choose from {', '.join(SETS)}")
    return select_rows(rows, limit_docs=limit_docs, limit_questions=limit_questions)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


@dataclass
class _Doc:
    doc_id: str
    segments: list[SegmentInfo]
    texts: list[str]
    dense: np.ndarray | None = None
    bm25: _BM25 | None = None


def _ensure_ingested(engine: Any, store: MemoryStore, doc_id: str, text: str, source: str) -> None:
    """Ingest the document unless the store already holds it (with the same text)."""
    if doc_id in store:
        if store.get_text(doc_id) != text:
            raise StoreError(
                f"the store {store.root} already holds a different document under id {doc_id!r}; "
                "use another store"
            )
        return
    engine.ingest(store, Document(doc_id=doc_id, title=doc_id, text=text, source=source))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def evaluate_recall(
    engine: Any,
    rows: Sequence[QARow],
    store: MemoryStore,
    *,
    methods: Sequence[str] = METHODS,
    dense_embedder: Any = None,
    ks: Sequence[int] = KS,
    details: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Rank every row's document segments by each method and score the rankings against the gold evidence.

    Args:
        engine: A loaded :class:`~qa_pipeline.engine.Engine` (its ``ingest`` and ``recall`` are used).
        rows: The questions; rows with the same ``doc_id`` share a document. Documents missing from
            ``store`` are ingested into it.
        store: A store opened with ``engine.open_store``.
        methods: Any of :data:`METHODS`.
        dense_embedder: Anything with ``encode(list[str]) -> (n, d)`` unit-norm rows; default the
            engine's dense model (``engine.config.dense_model``), loaded only when ``"dense"`` is asked for.
        ks: The cut-offs of hit@k.
        details: Also return per-question rankings (top 5 per method) and gold segments.
        progress: Called with (questions done, questions total).

    Returns:
        ``{"n_questions", "n_documents", "segments_per_doc", "gold_per_question", "skipped_no_gold",
        "skipped_errors", "metrics": {"chance"|method: {"hit@k"..., "mrr"}}}``, plus ``"questions"``
        with ``details``. Metrics are means over the scored questions (None when there are none).

    Raises:
        ValueError: unknown method. StoreError: the store holds another text under a row's doc_id.
    """
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown recall method(s) {bad}; choose from {', '.join(METHODS)}")
    methods = tuple(methods)
    if "dense" in methods and dense_embedder is None:
        from .dense import DenseEmbedder

        dense_embedder = DenseEmbedder(engine.config.dense_model, device=engine.config.device)

    groups: dict[str, list[tuple[QARow, str]]] = {}
    texts: dict[str, str] = {}
    for row in rows:
        text = row.load_document()
        doc_id = row.document_id(text)
        if doc_id in texts and texts[doc_id] != text:
            raise ValueError(f"rows give two different documents the id {doc_id!r}")
        texts[doc_id] = text
        groups.setdefault(doc_id, []).append((row, text))

    names = ("chance", *methods)
    scores: dict[str, dict[str, list[float]]] = {m: {} for m in names}
    questions: list[dict] = []
    seg_counts: list[int] = []
    gold_counts: list[int] = []
    skipped_no_gold = skipped_errors = done = 0
    total = sum(len(g) for g in groups.values())

    for doc_id, doc_rows in groups.items():
        text = texts[doc_id]
        source = doc_rows[0][0].document_path or "recall-eval"
        try:
            _ensure_ingested(engine, store, doc_id, text, source)
        except ValueError as err:  # QAError: an empty document
            logger.warning("document %s: %s; its %d question(s) skipped", doc_id, err, len(doc_rows))
            skipped_errors += len(doc_rows)
            done += len(doc_rows)
            if progress is not None:
                progress(done, total)
            continue
        segments = store.segments(doc_id)
        doc = _Doc(doc_id, segments, [text[s.char_start : s.char_end] for s in segments])
        scored_here = 0
        for row, _ in doc_rows:
            done += 1
            gold = gold_segments(segments, row.evidence)
            if not gold:
                skipped_no_gold += 1
                logger.info("row %s: its evidence overlaps no segment of %s; skipped", row.row_id, doc_id)
            else:
                try:
                    record = _score_question(engine, store, doc, row, gold, methods, dense_embedder, ks)
                except (ValueError, StoreError) as err:  # QAError (empty question), UnknownDocument...
                    skipped_errors += 1
                    logger.warning("row %s: %s", row.row_id, err)
                    record = None
                if record is not None:
                    scored_here += 1
                    gold_counts.append(len(gold))
                    for m in names:
                        for key, value in record["metrics"][m].items():
                            scores[m].setdefault(key, []).append(value)
                    if details:
                        questions.append(record)
            if progress is not None:
                progress(done, total)
        if scored_here:
            seg_counts.append(len(segments))

    metric_keys = [f"hit@{k}" for k in ks] + ["mrr"]
    return {
        "n_questions": len(gold_counts),
        "n_documents": len(seg_counts),
        "segments_per_doc": _mean([float(c) for c in seg_counts]),
        "gold_per_question": _mean([float(c) for c in gold_counts]),
        "skipped_no_gold": skipped_no_gold,
        "skipped_errors": skipped_errors,
        "metrics": {m: {k: _mean(scores[m].get(k, [])) for k in metric_keys} for m in names},
        **({"questions": questions} if details else {}),
    }


def _score_question(
    engine: Any,
    store: MemoryStore,
    doc: _Doc,
    row: QARow,
    gold: list[int],
    methods: tuple[str, ...],
    dense_embedder: Any,
    ks: Sequence[int],
) -> dict:
    n = len(doc.segments)
    pos = {s.idx: i for i, s in enumerate(doc.segments)}  # segment id -> position in doc.segments
    tie_key = f"{doc.doc_id}\x00{row.row_id}\x00{row.question}"
    record: dict[str, Any] = {
        "row_id": row.row_id,
        "doc_id": doc.doc_id,
        "question": row.question,
        "n_segments": n,
        "gold": gold,
        "metrics": {"chance": chance_metrics(n, len(gold), ks)},
        "top": {},
        "first_gold_rank": {},
    }
    for method in methods:
        if method == "hmt":
            s = np.full(n, -np.inf)
            for idx, weight in engine.recall(store, doc.doc_id, row.question):
                if idx in pos:
                    s[pos[idx]] = weight
        elif method == "dense":
            if doc.dense is None:
                doc.dense = np.asarray(dense_embedder.encode(doc.texts), dtype=np.float32)
            q = np.asarray(dense_embedder.encode([row.question]), dtype=np.float32)[0]
            s = doc.dense @ q
        else:
            if doc.bm25 is None:
                doc.bm25 = _BM25(doc.texts)
            s = doc.bm25.scores(row.question)
        order = rank_by_scores(s, tie_key)
        ranking = [doc.segments[i].idx for i in order]
        record["metrics"][method] = rank_metrics(ranking, gold, ks)
        record["top"][method] = [
            [doc.segments[i].idx, float(s[i]) if np.isfinite(s[i]) else None] for i in order[:5]
        ]
        gold_set = set(gold)
        record["first_gold_rank"][method] = next(r for r, idx in enumerate(ranking, 1) if idx in gold_set)
    return record


def run_recall_eval(
    engine: Any,
    root: str | Path,
    store: MemoryStore,
    *,
    sets: Sequence[str] = SETS,
    limit_docs: int | None = 40,
    limit_questions: int | None = 100,
    methods: Sequence[str] = METHODS,
    dense_embedder: Any = None,
    details: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """:func:`evaluate_recall` on each named set of the shared data folder ``root``.

    ``progress`` is called with (set name, questions done, questions total).

    Returns:
        ``{"sets": {name: evaluate_recall result + "rows_selected"}, "limit_docs", "limit_questions", "methods"}``.
    """
    bad = [s for s in sets if s not in SETS and not s.startswith("pubmedqa-")]
    if bad:
        raise ValueError(f"unknown recall set(s) {bad}; choose from {', '.join(SETS)}")
    if "dense" in methods and dense_embedder is None:
        from .dense import DenseEmbedder

        dense_embedder = DenseEmbedder(engine.config.dense_model, device=engine.config.device)
    out: dict[str, Any] = {}
    for name in sets:
        rows = load_set(name, root, limit_docs=limit_docs, limit_questions=limit_questions)
        cb = None if progress is None else (lambda d, t, name=name: progress(name, d, t))
        result = evaluate_recall(
            engine, rows, store, methods=methods, dense_embedder=dense_embedder, details=details, progress=cb
        )
        out[name] = {"rows_selected": len(rows), **result}
    return {
        "sets": out,
        "limit_docs": limit_docs,
        "limit_questions": limit_questions,
        "methods": list(methods),
    }


def _fmt(v: Any) -> str:
    return f"{v:>8.3f}" if isinstance(v, float) else f"{'-':>8}"


def format_recall(result: dict) -> str:
    """A readable table: one block per set, rows chance and each method, columns hit@k and MRR."""
    blocks = []
    sets = result["sets"] if "sets" in result else {"rows": result}
    for name, r in sets.items():
        skipped = r["skipped_no_gold"] + r["skipped_errors"]
        head = (
            f"{name}: {r['n_questions']} questions, {r['n_documents']} documents, "
            f"{_fmt(r['segments_per_doc']).strip()} segments/doc, "
            f"{_fmt(r['gold_per_question']).strip()} gold segments/question"
        )
        if skipped:
            head += f" ({r['skipped_no_gold']} skipped: no gold segment, {r['skipped_errors']} errors)"
        metrics = r["metrics"]
        cols = list(next(iter(metrics.values())).keys()) if metrics else []
        lines = [head, f"  {'method':<8}" + "".join(f"{c.upper() if c == 'mrr' else c:>8}" for c in cols) + f"{'n':>6}"]
        for method, m in metrics.items():
            lines.append(f"  {method:<8}" + "".join(_fmt(m[c]) for c in cols) + f"{r['n_questions']:>6}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def recall_markdown(result: dict) -> str:
    """One Markdown table for the README: per set, hit@1 / hit@5 / MRR of chance and each method."""
    sets = result["sets"]
    methods = ["chance", *result.get("methods", METHODS)]
    head = "| set | questions (docs) | segments/doc | " + " | ".join(f"{m} hit@1 / hit@5 / MRR" for m in methods) + " |"
    lines = [head, "|---|---:|---:|" + "---:|" * len(methods)]
    for name, r in sets.items():
        cells = []
        for m in methods:
            v = r["metrics"].get(m)
            cells.append(" / ".join(f"{v[k]:.2f}" for k in ("hit@1", "hit@5", "mrr")) if v else "–")
        lines.append(
            f"| {name} | {r['n_questions']} ({r['n_documents']}) | {r['segments_per_doc']:.1f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)
