"""Training HMT's recall head on cached features: contrastive (InfoNCE) over a document's segments.

The backbone is frozen here, so what recall reads (pooled query states S, pooled segment contents C)
can be computed once and the head (W_q, W_k, their biases, the scale) trained on them in minutes on
a CPU. Each query is scored against every segment of its own document, the negatives that matter at
answer time, plus the segments of the other documents in the batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .memory import MemoryRecall

logger = logging.getLogger(__name__)


@dataclass
class RecallExamples:
    """Queries and the segments they should recall, as cached features.

    ``positives[i]`` holds global indices into ``contents``; every positive of a query belongs to
    the document ``query_doc[i]``, and ``segment_doc`` says which document each segment is from.
    """

    queries: torch.Tensor  # (Q, d) pooled query states (what ``HMTModel.summarize`` returns)
    query_doc: torch.Tensor  # (Q,) long: document of each query
    positives: list[list[int]]  # per query: indices of its gold segments in ``contents``
    contents: torch.Tensor  # (S, d) pooled segment contents (``SegmentRecord.content``)
    segment_doc: torch.Tensor  # (S,) long: document of each segment

    def __post_init__(self) -> None:
        if len(self.positives) != self.queries.shape[0] or self.query_doc.shape[0] != self.queries.shape[0]:
            raise ValueError("RecallExamples: queries, query_doc and positives differ in length")
        if self.segment_doc.shape[0] != self.contents.shape[0]:
            raise ValueError("RecallExamples: contents and segment_doc differ in length")
        for i, pos in enumerate(self.positives):
            if not pos:
                raise ValueError(f"RecallExamples: query {i} has no positive segment")
            if any(int(self.segment_doc[p]) != int(self.query_doc[i]) for p in pos):
                raise ValueError(f"RecallExamples: a positive of query {i} is not in its document")

    def __len__(self) -> int:
        return self.queries.shape[0]

    def subset(self, rows: list[int]) -> RecallExamples:
        """The examples of the given queries (all segments kept)."""
        index = torch.tensor(rows, dtype=torch.long)
        return RecallExamples(
            self.queries[index], self.query_doc[index], [self.positives[i] for i in rows], self.contents, self.segment_doc
        )


def center_head(recall: MemoryRecall, examples: RecallExamples) -> None:
    """Start from centred cosines: biases that remove the mean query and the mean content.

    A decoder's states share a large common direction, so raw cosines of pooled states are all close
    to 1; subtracting the means (b = -W mu) is the usual cure, and a good start for training.
    """
    with torch.no_grad():
        for lin, feats in ((recall.w_q, examples.queries), (recall.w_k, examples.contents)):
            mean = feats.float().mean(dim=0).to(lin.weight)
            lin.bias.copy_(-(lin.weight @ mean))


def _doc_segments(segment_doc: torch.Tensor) -> dict[int, torch.Tensor]:
    order = torch.argsort(segment_doc, stable=True)
    docs, counts = torch.unique_consecutive(segment_doc[order], return_counts=True)
    return dict(zip(docs.tolist(), torch.split(order, counts.tolist()), strict=True))


def recall_loss(recall: MemoryRecall, examples: RecallExamples, rows: list[int], docs: dict) -> torch.Tensor:
    """Multi-positive InfoNCE of the queries ``rows`` over all segments of their batch's documents."""
    batch_docs = sorted({int(examples.query_doc[i]) for i in rows})
    candidates = torch.cat([docs[d] for d in batch_docs])
    keys = recall.keys(examples.contents[candidates].to(recall.w_k.weight))
    queries = recall.queries(examples.queries[rows].to(recall.w_q.weight))
    logits = (queries.float() @ keys.float().T) * recall.scale()
    position = {int(s): j for j, s in enumerate(candidates.tolist())}
    target = torch.zeros_like(logits, dtype=torch.bool)
    for r, i in enumerate(rows):
        target[r, [position[p] for p in examples.positives[i]]] = True
    positive = torch.logsumexp(logits.masked_fill(~target, float("-inf")), dim=1)
    return (torch.logsumexp(logits, dim=1) - positive).mean()


@torch.no_grad()
def rank_metrics(recall: MemoryRecall, examples: RecallExamples, ks: tuple[int, ...] = (1, 5)) -> dict:
    """hit@k and MRR of each query's ranking of its own document's segments (what recall sees)."""
    docs = _doc_segments(examples.segment_doc)
    hits = {k: 0.0 for k in ks}
    mrr = 0.0
    for i in range(len(examples)):
        segs = docs[int(examples.query_doc[i])]
        keys = recall.keys(examples.contents[segs].to(recall.w_k.weight)).float()
        query = recall.queries(examples.queries[i : i + 1].to(recall.w_q.weight)).float()
        order = segs[torch.argsort((query @ keys.T)[0], descending=True)].tolist()
        gold = set(examples.positives[i])
        first = next(r for r, s in enumerate(order) if s in gold)
        mrr += 1.0 / (first + 1)
        for k in ks:
            hits[k] += float(first < k)
    n = max(1, len(examples))
    return {**{f"hit@{k}": v / n for k, v in hits.items()}, "mrr": mrr / n, "n": len(examples)}


def fit_recall_head(
    recall: MemoryRecall,
    examples: RecallExamples,
    *,
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    center: bool = True,
    seed: int = 0,
    log_every: int = 100,
    on_log: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train the recall head (W_q, W_k, biases, scale) of ``recall`` on cached features.

    The weights are pulled towards where they started (``weight_decay`` applies to W - W_0), so a
    head that starts at the identity stays near the zero-shot cosine unless the data says otherwise.

    Returns:
        The logged points: step, mean loss since the last log, learning rate.
    """
    if recall.kind != "content":
        raise ValueError("fit_recall_head trains recall 'content' (the paper's recall trains end to end)")
    if center:
        center_head(recall, examples)
    params = list(recall.parameter_dict().values())
    start = [p.detach().clone() for p in params]
    for p in params:
        p.requires_grad_(True)
    docs = _doc_segments(examples.segment_doc)
    gen = torch.Generator().manual_seed(seed)

    def step_loss() -> torch.Tensor:
        rows = torch.randint(0, len(examples), (min(batch_size, len(examples)),), generator=gen).tolist()
        loss = recall_loss(recall, examples, rows, docs)
        if weight_decay:
            loss = loss + weight_decay * sum(((p - p0) ** 2).sum() for p, p0 in zip(params, start, strict=True))
        return loss

    log = run_steps(params, step_loss, steps=steps, lr=lr, log_every=log_every, on_log=on_log, name="recall head")
    for p in params:
        p.requires_grad_(False)
    return log


def run_steps(
    params: list[torch.nn.Parameter],
    step_loss: Callable[[], torch.Tensor],
    *,
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    log_every: int = 100,
    on_log: Callable[[dict], None] | None = None,
    name: str = "head",
) -> list[dict]:
    """AdamW over ``params`` on ``step_loss()`` for ``steps`` steps, cosine-decayed learning rate.

    Returns:
        The logged points: step, mean loss since the last log, learning rate.
    """
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    log, running, count = [], 0.0, 0
    for step in range(1, steps + 1):
        loss = step_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running += float(loss.detach())
        count += 1
        if step % log_every == 0 or step == steps:
            point = {"step": step, "loss": running / count, "lr": sched.get_last_lr()[0]}
            log.append(point)
            logger.info("%s step %d loss %.4f", name, step, point["loss"])
            if on_log is not None:
                on_log(point)
            running, count = 0.0, 0
    return log
