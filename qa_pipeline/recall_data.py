"""Training data for HMT's recall head: queries paired with the segments that answer them.

Two kinds of pairs, both scored against every segment of their document:

- labelled questions with gold evidence (PubMedQA questions 1-400, the training half of the COVID-QA
  and Evidence Inference articles; the other half and PubMedQA 401-500 stay for ``hmtqa eval recall``);
- inverse-cloze pairs: a sentence of a long text as the query, the segment(s) it lies in as the
  positive (kept in its segment), from PLOS articles and the same training documents.

Features are what the model's recall reads, from the model itself: each document is read through
HMT as at ingestion (pooled segment contents), each query through the summary pass (pooled states).
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hmt import HMTModel
from hmt.recall_head import RecallExamples

from .datasets import covid_qa, evidence_inference
from .documents import load_documents
from .qa_data import QARow
from .recall_eval import is_train_article
from .train_data import PUBMEDQA, PUBMEDQA_TRAIN, segments_overlapping

logger = logging.getLogger(__name__)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\[])")


@dataclass
class RecallDoc:
    """A document and the queries about it, each with its gold character spans."""

    doc_id: str
    text: str
    group: str  # documents of one group are scored together (fused PubMedQA abstracts share one)
    queries: list[tuple[str, list[tuple[int, int]], str]] = field(default_factory=list)  # (text, spans, kind)


def sentence_spans(text: str, min_words: int = 6, max_words: int = 40) -> list[tuple[int, int]]:
    """Character spans of the sentences of ``text`` with a usable length for a cloze query."""
    spans, start = [], 0
    for match in [*_SENTENCE_END.finditer(text), None]:
        end = match.start() if match else len(text)
        piece = text[start:end]
        words = len(piece.split())
        if min_words <= words <= max_words and "\n" not in piece.strip():
            lead = len(piece) - len(piece.lstrip())
            spans.append((start + lead, start + len(piece.rstrip())))
        start = match.end() if match else len(text)
    return spans


def add_cloze_queries(doc: RecallDoc, rng: random.Random, per_1k_chars: float) -> None:
    """Inverse-cloze queries: sentences of the document, about ``per_1k_chars`` per 1,000 characters."""
    spans = sentence_spans(doc.text)
    want = min(len(spans), max(1, round(len(doc.text) / 1000 * per_1k_chars)))
    for s, e in sorted(rng.sample(spans, want)):
        doc.queries.append((doc.text[s:e], [(s, e)], "cloze"))


def rows_by_document(rows: list[QARow]) -> dict[str, list[QARow]]:
    out: dict[str, list[QARow]] = {}
    for row in rows:
        out.setdefault(row.document_id(), []).append(row)
    return out


def training_docs(root: Path, *, plos_docs: int = 30, cloze_per_1k: float = 1.0, seed: int = 0) -> list[RecallDoc]:
    """Every training document with its queries; nothing from the evaluation split.

    PubMedQA abstracts 1-400 are documents of their own, grouped eight to a group (a fused-8
    document's segments, without reading them as one text).
    """
    rng = random.Random(seed)
    docs: list[RecallDoc] = []
    pqa = json.loads((root / PUBMEDQA).read_text(encoding="utf-8"))
    for i, (pmid, entry) in enumerate(list(pqa.items())[:PUBMEDQA_TRAIN]):
        text = " ".join(c.strip() for c in entry["CONTEXTS"])
        doc = RecallDoc(f"pqa-{pmid}", text, group=f"pqa-group-{i // 8}")
        doc.queries.append((entry["QUESTION"].strip(), [(0, len(text))], "question"))
        add_cloze_queries(doc, rng, cloze_per_1k)
        docs.append(doc)
    for source, rows in (
        ("covidqa", covid_qa(root / "covid-qa" / "covidqa_dev.json")),
        ("evidence-inference", evidence_inference(root / "evidence-inference")),
    ):
        for doc_id, doc_rows in rows_by_document(rows).items():
            if not is_train_article(doc_id):
                continue
            text = doc_rows[0].load_document()
            doc = RecallDoc(f"{source}-{doc_id}", text, group=f"{source}-{doc_id}")
            for row in doc_rows:
                if row.evidence:
                    doc.queries.append((row.question, list(row.evidence), "question"))
            add_cloze_queries(doc, rng, cloze_per_1k)
            docs.append(doc)
    plos = sorted((root / "pmc-oa" / "plos").glob("*.xml"))[:plos_docs]
    for path in plos:
        for document in load_documents(path):
            doc = RecallDoc(f"plos-{document.doc_id}", document.text, group=f"plos-{document.doc_id}")
            add_cloze_queries(doc, rng, cloze_per_1k)
            docs.append(doc)
    return docs


@dataclass
class RecallFeatures:
    """Cached recall features of a list of ``RecallDoc`` (numpy, float32)."""

    contents: np.ndarray  # (S, d) pooled main-pass states per segment
    segment_doc: np.ndarray  # (S,) group index per segment
    queries: np.ndarray  # (Q, d) pooled summary-pass states per query
    query_doc: np.ndarray  # (Q,) group index per query
    positives: list[list[int]]
    query_kind: list[str]
    groups: list[str]
    # Read with ``passage_length``: pooled states of each segment's passages (only those holding
    # tokens), their group, and per query the passages with a gold token (indices into these rows).
    passage_contents: np.ndarray | None = None  # (P, d)
    passage_doc: np.ndarray | None = None  # (P,)
    passage_positives: list[list[int]] | None = None

    def examples(self, kinds: tuple[str, ...] | None = None, *, passages: bool = False) -> RecallExamples:
        """Queries (of ``kinds``; all by default) against segments, or against passages."""
        rows = [i for i, k in enumerate(self.query_kind) if kinds is None or k in kinds]
        if passages and self.passage_contents is None:
            raise ValueError("these features were read without passages (passage_length)")
        contents, doc, positives = (
            (self.passage_contents, self.passage_doc, self.passage_positives)
            if passages
            else (self.contents, self.segment_doc, self.positives)
        )
        return RecallExamples(
            torch.from_numpy(self.queries[rows]),
            torch.from_numpy(self.query_doc[rows]),
            [positives[i] for i in rows],
            torch.from_numpy(contents),
            torch.from_numpy(doc),
        )

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        arrays = {"contents": self.contents, "segment_doc": self.segment_doc, "queries": self.queries,
                  "query_doc": self.query_doc}
        meta = {"positives": self.positives, "query_kind": self.query_kind, "groups": self.groups}
        if self.passage_contents is not None:
            arrays.update(passage_contents=self.passage_contents, passage_doc=self.passage_doc)
            meta["passage_positives"] = self.passage_positives
        np.savez(path / "features.npz", **arrays)
        (path / "features.json").write_text(json.dumps(meta))

    @staticmethod
    def exists(path: Path) -> bool:
        return (path / "features.npz").is_file()

    @classmethod
    def load(cls, path: Path) -> RecallFeatures:
        arrays = np.load(path / "features.npz")
        meta = json.loads((path / "features.json").read_text())
        passages = "passage_contents" in arrays.files
        return cls(arrays["contents"], arrays["segment_doc"], arrays["queries"], arrays["query_doc"],
                   meta["positives"], meta["query_kind"], meta["groups"],
                   arrays["passage_contents"] if passages else None, arrays["passage_doc"] if passages else None,
                   meta.get("passage_positives"))


@torch.inference_mode()
def extract_features(
    model: HMTModel,
    tokenizer,
    docs: list[RecallDoc],
    *,
    block_segments: int = 16,
    query_batch: int = 64,
    passage_length: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RecallFeatures:
    """Read every document through ``model`` as ingestion does and every query as ``ask`` does.

    ``passage_length`` (a divisor of the segment length): also keep each segment's passages as
    ingestion stores them, with each query's gold passages.
    """
    L = model.config.segment_length
    if passage_length and L % passage_length:
        raise ValueError(f"passage_length {passage_length} does not divide the segment length {L}")
    groups: dict[str, int] = {}
    contents, segment_doc, query_texts, query_doc, positives, kinds = [], [], [], [], [], []
    passages, passage_doc, passage_positives = [], [], []
    for n, doc in enumerate(docs):
        group = groups.setdefault(doc.group, len(groups))
        enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor([enc.input_ids], dtype=torch.long, device=model.device)
        first, first_passage = len(contents), len(passages)
        state = model.init_memory(1)
        for pos in range(0, ids.shape[1], block_segments * L):
            records, state = model.read_segments(ids[:, pos : pos + block_segments * L], state,
                                                 passage_length=passage_length)
            contents.extend(r.content[0].float().cpu().numpy().copy() for r in records)
            if passage_length:
                # Runs tile each segment in order, so a passage's row is first_passage + token // width.
                for r in records:
                    real = r.passage_tokens[0] > 0
                    passages.extend(r.passage_contents[0][real].float().cpu().numpy().copy())
        segment_doc.extend([group] * (len(contents) - first))
        passage_doc.extend([group] * (len(passages) - first_passage))
        for text, spans, kind in doc.queries:
            gold = segments_overlapping(enc.offset_mapping, spans, L)
            if gold:
                query_texts.append(text)
                query_doc.append(group)
                positives.append([first + g for g in gold])
                kinds.append(kind)
                if passage_length:
                    gold_passages = segments_overlapping(enc.offset_mapping, spans, passage_length)
                    passage_positives.append([first_passage + g for g in gold_passages])
        if progress is not None:
            progress(n + 1, len(docs))
    queries = []
    for start in range(0, len(query_texts), query_batch):
        batch = [tokenizer(t, add_special_tokens=False).input_ids[: model.config.summary_length]
                 for t in query_texts[start : start + query_batch]]
        width = max(len(b) for b in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, b in enumerate(batch):
            ids[i, : len(b)] = torch.tensor(b)
            mask[i, : len(b)] = 1
        summary = model.summarize(ids.to(model.device), mask.to(model.device))[:, 0]
        queries.append(summary.float().cpu().numpy())
    return RecallFeatures(
        contents=np.stack(contents).astype(np.float32),
        segment_doc=np.asarray(segment_doc, dtype=np.int64),
        queries=np.concatenate(queries).astype(np.float32) if queries else np.zeros((0, model.hidden_size), np.float32),
        query_doc=np.asarray(query_doc, dtype=np.int64),
        positives=positives,
        query_kind=kinds,
        groups=list(groups),
        passage_contents=np.stack(passages).astype(np.float32) if passages else None,
        passage_doc=np.asarray(passage_doc, dtype=np.int64) if passage_length else None,
        passage_positives=passage_positives if passage_length else None,
    )
