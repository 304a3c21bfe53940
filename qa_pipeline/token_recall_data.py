"""Cached token features for the late-interaction passage head (``hmt.token_recall``).

Each document is read through HMT as ingestion reads it, keeping every token's id and last-layer
state; each query goes through the summary pass ``ask`` runs for it, keeping its tokens' states.
The same documents and queries as the pooled heads' (``recall_data.RecallDoc``); a query's
positives are the passages (runs of ``width`` tokens) holding a gold token.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hmt import HMTModel
from hmt.token_recall_head import TokenDoc, TokenQuery

from .recall_data import RecallDoc
from .train_data import segments_overlapping


@dataclass
class TokenFeatures:
    """Token ids and states of documents and queries, concatenated, with offsets (numpy)."""

    doc_ids: np.ndarray  # (T,) int64
    doc_states: np.ndarray  # (T, d) float16
    doc_offsets: np.ndarray  # (D + 1,) document n owns rows doc_offsets[n]:doc_offsets[n + 1]
    query_ids: np.ndarray  # (M,) int64
    query_states: np.ndarray  # (M, d) float16
    query_offsets: np.ndarray  # (Q + 1,)
    query_doc: np.ndarray  # (Q,) int64
    positives: list[list[int]]  # per query: passage indices within its document
    query_kind: list[str]
    doc_names: list[str]
    width: int

    def examples(self, kinds: tuple[str, ...] | None = None) -> tuple[list[TokenDoc], list[TokenQuery]]:
        """Documents and the queries of ``kinds`` (all by default) as the head's trainer takes them."""
        docs = [
            TokenDoc(torch.from_numpy(self.doc_ids[a:b]), torch.from_numpy(self.doc_states[a:b]))
            for a, b in zip(self.doc_offsets[:-1], self.doc_offsets[1:], strict=True)
        ]
        queries = []
        for i, (a, b) in enumerate(zip(self.query_offsets[:-1], self.query_offsets[1:], strict=True)):
            if kinds is None or self.query_kind[i] in kinds:
                queries.append(
                    TokenQuery(int(self.query_doc[i]), torch.from_numpy(self.query_ids[a:b]),
                               torch.from_numpy(self.query_states[a:b]), list(self.positives[i]))
                )
        return docs, queries

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        np.savez(
            path / "token_features.npz",
            doc_ids=self.doc_ids, doc_states=self.doc_states, doc_offsets=self.doc_offsets,
            query_ids=self.query_ids, query_states=self.query_states, query_offsets=self.query_offsets,
            query_doc=self.query_doc,
        )
        meta = {"positives": self.positives, "query_kind": self.query_kind, "doc_names": self.doc_names,
                "width": self.width}
        (path / "token_features.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, path: Path) -> TokenFeatures:
        arrays = np.load(path / "token_features.npz")
        meta = json.loads((path / "token_features.json").read_text())
        return cls(
            arrays["doc_ids"], arrays["doc_states"], arrays["doc_offsets"], arrays["query_ids"],
            arrays["query_states"], arrays["query_offsets"], arrays["query_doc"], meta["positives"],
            meta["query_kind"], meta["doc_names"], meta["width"],
        )

    @staticmethod
    def exists(path: Path) -> bool:
        return (path / "token_features.npz").is_file() and (path / "token_features.json").is_file()


@torch.inference_mode()
def extract_token_features(
    model: HMTModel,
    tokenizer,
    docs: list[RecallDoc],
    *,
    width: int,
    block_segments: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> TokenFeatures:
    """Read every document through ``model`` as ingestion does (passages of ``width`` tokens) and
    every query through its summary pass, keeping the token states."""
    L = model.config.segment_length
    if L % width:
        raise ValueError(f"passage width {width} does not divide the segment length {L}")
    doc_ids, doc_states, doc_offsets = [], [], [0]
    query_ids, query_states, query_offsets = [], [], [0]
    query_doc, positives, kinds = [], [], []
    for n, doc in enumerate(docs):
        enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor([enc.input_ids], dtype=torch.long, device=model.device)
        state = model.init_memory(1)
        for pos in range(0, ids.shape[1], block_segments * L):
            records, state = model.read_segments(ids[:, pos : pos + block_segments * L], state, passage_length=width)
            for r in records:
                real = r.passage_tokens[0].sum().item()  # the segment's real tokens (the last may be short)
                doc_states.append(r.token_states[0, : int(real)].float().cpu().numpy().astype(np.float16))
        doc_ids.append(np.asarray(enc.input_ids, dtype=np.int64))
        doc_offsets.append(doc_offsets[-1] + len(enc.input_ids))
        for text, spans, kind in doc.queries:
            gold = segments_overlapping(enc.offset_mapping, spans, width)
            q = tokenizer(text, add_special_tokens=False).input_ids[: model.config.summary_length]
            if not gold or not q:
                continue
            states = model.query_token_states(torch.tensor([q], device=model.device))[0]
            query_ids.append(np.asarray(q, dtype=np.int64))
            query_states.append(states.float().cpu().numpy().astype(np.float16))
            query_offsets.append(query_offsets[-1] + len(q))
            query_doc.append(n)
            positives.append(list(gold))
            kinds.append(kind)
        if progress is not None:
            progress(n + 1, len(docs))
    d = model.hidden_size
    return TokenFeatures(
        doc_ids=np.concatenate(doc_ids) if doc_ids else np.zeros(0, np.int64),
        doc_states=np.concatenate(doc_states) if doc_states else np.zeros((0, d), np.float16),
        doc_offsets=np.asarray(doc_offsets, dtype=np.int64),
        query_ids=np.concatenate(query_ids) if query_ids else np.zeros(0, np.int64),
        query_states=np.concatenate(query_states) if query_states else np.zeros((0, d), np.float16),
        query_offsets=np.asarray(query_offsets, dtype=np.int64),
        query_doc=np.asarray(query_doc, dtype=np.int64),
        positives=positives,
        query_kind=kinds,
        doc_names=[doc.doc_id for doc in docs],
        width=width,
    )
