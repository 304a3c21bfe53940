"""Training the late-interaction passage head (``TokenRecall``) on cached token features.

As for the pooled heads (``recall_head``), the backbone is frozen: each document's tokens (their ids
and the last-layer states of the ingestion pass) and each question's tokens (ids and summary-pass
states) are computed once; the head is then fitted with a multi-positive InfoNCE loss over all
passages of the question's document, in minutes on a CPU.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .recall_head import run_steps
from .token_recall import TokenRecall

logger = logging.getLogger(__name__)


@dataclass
class TokenDoc:
    """A document as the passage head sees it: its token ids (T,) and last-layer states (T, d)."""

    ids: torch.Tensor
    hidden: torch.Tensor


@dataclass
class TokenQuery:
    """A question: its token ids (m,), summary-pass states (m, d), document and gold passages."""

    doc: int
    ids: torch.Tensor
    hidden: torch.Tensor
    positives: list[int]


def passage_grid(values: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, k) per-token rows -> (P, width, k) passages of ``width`` tokens and their (P, width) mask.

    Passages tile the document from its first token, as ingestion's passages tile its segments
    when ``width`` divides the segment length."""
    t = values.shape[0]
    p = max(1, math.ceil(t / width))
    pad = p * width - t
    grid = torch.nn.functional.pad(values, (0, 0, 0, pad)).view(p, width, -1)
    mask = torch.ones(p * width, dtype=torch.bool, device=values.device)
    if pad:
        mask[t:] = False
    return grid, mask.view(p, width)


def _passage_logits(
    head: TokenRecall, embeddings: torch.Tensor, doc: TokenDoc, queries: list[TokenQuery], width: int
) -> list[torch.Tensor]:
    keys = head.keys(embeddings[doc.ids], doc.hidden.float())
    grid, mask = passage_grid(keys, width)
    out = []
    for q in queries:
        qk, qw = head.queries(embeddings[q.ids], q.hidden.float())
        out.append(head.scores(qk, qw, grid, mask))
    return out


def fit_token_recall(
    head: TokenRecall,
    embeddings: torch.Tensor,
    docs: list[TokenDoc],
    queries: list[TokenQuery],
    *,
    width: int,
    steps: int = 600,
    batch_size: int = 32,
    docs_per_step: int = 4,
    trainable: tuple[str, ...] | None = None,
    lr: float = 2e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    log_every: int = 100,
    on_log: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Fit ``head`` so that each question ranks its gold passages first among its document's.

    ``embeddings``: the backbone's input embedding matrix (V, d), frozen. Each step takes
    ``batch_size`` questions from ``docs_per_step`` documents: a document's token keys (thousands of
    tokens) are the costly part, so they are made once per step for several of its questions.

    Returns:
        The logged points: step, mean loss since the last log, learning rate.
    """
    if not queries:
        raise ValueError("fit_token_recall: no questions to fit on")
    # ``trainable``: which parts move ("w_e", "w_h", "w_weight", "log_scale"; all by default). On a
    # few hundred questions the key maps overfit; the question-token weights and the scale do not.
    named = {name.lstrip(".").split(".")[0]: None for name in head.parameter_dict("")}
    unknown = set(trainable or ()) - set(named)
    if unknown:
        raise ValueError(f"fit_token_recall: no part {sorted(unknown)} (parts: {', '.join(named)})")
    params = []
    for name, p in head.parameter_dict("").items():
        train = trainable is None or name.lstrip(".").split(".")[0] in trainable
        p.requires_grad_(train)
        if train:
            params.append(p)
    gen = torch.Generator().manual_seed(seed)
    embeddings = embeddings.detach().float()
    per_query_doc: dict[int, list[TokenQuery]] = {}
    for q in queries:
        per_query_doc.setdefault(q.doc, []).append(q)
    doc_list = sorted(per_query_doc)

    def step_loss() -> torch.Tensor:
        picked = torch.randperm(len(doc_list), generator=gen)[:docs_per_step].tolist()
        per_doc = max(1, batch_size // len(picked))
        losses = []
        for j in picked:
            own = per_query_doc[doc_list[j]]
            qs = [own[i] for i in torch.randint(0, len(own), (per_doc,), generator=gen).tolist()]
            for q, logits in zip(qs, _passage_logits(head, embeddings, docs[doc_list[j]], qs, width), strict=True):
                gold = torch.tensor([p for p in q.positives if p < logits.shape[0]], dtype=torch.long)
                losses.append(torch.logsumexp(logits, 0) - torch.logsumexp(logits[gold], 0))
        return torch.stack(losses).mean()

    log = run_steps(params, step_loss, steps=steps, lr=lr, weight_decay=weight_decay, log_every=log_every,
                    on_log=on_log, name="token recall")
    for p in head.parameters():
        p.requires_grad_(False)
    return log


@torch.no_grad()
def token_rank_metrics(
    head: TokenRecall,
    embeddings: torch.Tensor,
    docs: list[TokenDoc],
    queries: list[TokenQuery],
    *,
    width: int,
    ks: tuple[int, ...] = (1, 5),
) -> dict:
    """hit@k and MRR of each question's ranking of its own document's passages."""
    hits = {k: 0.0 for k in ks}
    mrr = 0.0
    embeddings = embeddings.float()
    by_doc: dict[int, list[TokenQuery]] = {}
    for q in queries:
        by_doc.setdefault(q.doc, []).append(q)
    for d, qs in by_doc.items():
        for q, logits in zip(qs, _passage_logits(head, embeddings, docs[d], qs, width), strict=True):
            order = torch.argsort(logits, descending=True, stable=True).tolist()
            first = min(order.index(p) for p in q.positives if p < len(order))
            mrr += 1.0 / (first + 1)
            for k in ks:
                hits[k] += float(first < k)
    n = max(1, len(queries))
    return {**{f"hit@{k}": v / n for k, v in hits.items()}, "mrr": mrr / n, "n": len(queries)}
