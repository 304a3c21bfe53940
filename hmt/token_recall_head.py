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
    lr: float = 2e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    log_every: int = 100,
    on_log: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Fit ``head`` so that each question ranks its gold passages first among its document's.

    ``embeddings``: the backbone's input embedding matrix (V, d), frozen.

    Returns:
        The logged points: step, mean loss since the last log, learning rate.
    """
    if not queries:
        raise ValueError("fit_token_recall: no questions to fit on")
    params = list(head.parameter_dict().values())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    embeddings = embeddings.detach().float()
    log, running, count = [], 0.0, 0
    for step in range(1, steps + 1):
        rows = torch.randint(0, len(queries), (min(batch_size, len(queries)),), generator=gen).tolist()
        by_doc: dict[int, list[TokenQuery]] = {}
        for i in rows:
            by_doc.setdefault(queries[i].doc, []).append(queries[i])
        losses = []
        for d, qs in by_doc.items():
            for q, logits in zip(qs, _passage_logits(head, embeddings, docs[d], qs, width), strict=True):
                gold = torch.tensor([p for p in q.positives if p < logits.shape[0]], dtype=torch.long)
                losses.append(torch.logsumexp(logits, 0) - torch.logsumexp(logits[gold], 0))
        loss = torch.stack(losses).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running += float(loss.detach())
        count += 1
        if step % log_every == 0 or step == steps:
            point = {"step": step, "loss": running / count, "lr": sched.get_last_lr()[0]}
            log.append(point)
            logger.info("token recall step %d loss %.4f", step, point["loss"])
            if on_log is not None:
                on_log(point)
            running, count = 0.0, 0
    for p in params:
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
