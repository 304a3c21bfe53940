"""Long-term memory of HMT: the FIFO cache of memory embeddings and recall by cross-attention."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


class MemoryRecall(nn.Module):
    """Memory search: P = softmax(scale * q K^T) C, a convex combination of cached memories C.

    Cross-attention without value or output projection, so P stays a convex combination of cached
    memories. Two kinds (``HMTConfig.recall``):

    - ``"paper"`` (eqs. 2-3): q = S W_q, K = M W_k, scale 1/sqrt(d_h), in training and generation
      alike (the official code divides by d_h for wide models in training only).
    - ``"content"``: q = norm(S W_q + b_q), K = norm(C W_k + b_k) with S and C mean-pooled states of
      the query's and the segment's tokens, scale = exp(log_scale) learned; scores are cosines times
      the scale, so FAISS inner-product search over K ranks exactly as recall does. W_q, W_k start
      as the identity (when d_h = d): untrained, recall is the cosine of pooled states.
    """

    def __init__(self, hidden_size: int, recall_dim: int, kind: str = "paper") -> None:
        super().__init__()
        self.kind = kind
        self.recall_dim = recall_dim
        content = kind == "content"
        self.w_q = nn.Linear(hidden_size, recall_dim, bias=content)
        self.w_k = nn.Linear(hidden_size, recall_dim, bias=content)
        if content:
            with torch.no_grad():
                for lin in (self.w_q, self.w_k):
                    if recall_dim == hidden_size:
                        lin.weight.copy_(torch.eye(hidden_size))
                    lin.bias.zero_()
            # Cosines lie in [-1, 1]: a scale of ~20 lets softmax pick one segment among hundreds.
            self.log_scale = nn.Parameter(torch.tensor(math.log(20.0)))

    def parameter_dict(self, prefix: str = "recall") -> dict[str, nn.Parameter]:
        """The recall parameters by checkpoint name (``prefix``.w_q.weight, ...)."""
        params = {f"{prefix}.w_q.weight": self.w_q.weight, f"{prefix}.w_k.weight": self.w_k.weight}
        if self.kind == "content":
            params.update(
                {
                    f"{prefix}.w_q.bias": self.w_q.bias,
                    f"{prefix}.w_k.bias": self.w_k.bias,
                    f"{prefix}.log_scale": self.log_scale,
                }
            )
        return params

    def keys(self, memories: torch.Tensor) -> torch.Tensor:
        """Recall keys, computed once per memory when it enters the cache.

        ``memories`` is M_n in kind "paper" and the segment's pooled content C_n in kind "content".
        """
        keys = self.w_k(memories)
        return F.normalize(keys.float(), dim=-1).to(keys.dtype) if self.kind == "content" else keys

    def queries(self, summaries: torch.Tensor) -> torch.Tensor:
        queries = self.w_q(summaries)
        return F.normalize(queries.float(), dim=-1).to(queries.dtype) if self.kind == "content" else queries

    def scale(self) -> torch.Tensor | float:
        if self.kind == "content":
            return self.log_scale.float().exp()
        return 1.0 / math.sqrt(self.recall_dim)

    def attend(
        self,
        query: torch.Tensor,  # (B, d_h)
        keys: torch.Tensor,  # (B, n, d_h)
        memories: torch.Tensor,  # (B, n, d)
        valid: torch.Tensor,  # (B, n) bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (P (B, d), weights (B, n) float32, has_memory (B,) bool).

        Rows with no valid memory get zero weights and ``has_memory`` False; the caller then uses
        the learned initial memory instead.
        """
        scores = torch.einsum("bh,bnh->bn", query.float(), keys.float()) * self.scale()
        scores = scores.masked_fill(~valid, float("-inf"))
        has_memory = valid.any(dim=1)
        # A row with nothing to recall would be all -inf (NaN softmax); give it finite scores, zeroed below.
        scores = torch.where(has_memory[:, None], scores, torch.zeros_like(scores))
        weights = torch.softmax(scores, dim=-1) * has_memory[:, None]
        # float32, then cast back: on CPU a bf16 (1, n) x (n, d) product caches a ~0.65 MB kernel for
        # every new n, and n grows by one per segment up to N (~200 MB at N = 300, never freed).
        recalled = torch.einsum("bn,bnd->bd", weights, memories.float()).to(memories.dtype)
        return recalled, weights, has_memory

    def forward(
        self, summaries: torch.Tensor, keys: torch.Tensor, memories: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.attend(self.queries(summaries), keys, memories, valid)


@dataclass
class MemoryState:
    """Everything HMT carries from one segment to the next, for a batch of B sequences.

    Kept explicit (not hidden in the module) so that a document can be read in pieces, saved, and
    resumed, and so that several documents can be read side by side.
    """

    memories: torch.Tensor  # (B, n, d) cached memory embeddings M, oldest first, n <= N
    keys: torch.Tensor  # (B, n, d_h) their recall keys M W_k
    valid: torch.Tensor  # (B, n) bool: False where a sequence had no tokens in that segment
    segment_ids: torch.Tensor  # (B, n) long: global index of the segment that wrote each memory
    carried: torch.Tensor | None = None  # (B, d) last memory, fed forward directly in rmt / stage-1 mode
    sensory_ids: torch.Tensor | None = None  # (B, k) last k token ids of the previous segment
    sensory_mask: torch.Tensor | None = None  # (B, k) their attention mask
    segments_seen: int = 0
    tokens_seen: int = 0
    extra: dict = field(default_factory=dict)
    # (B, n, d) the pooled contents that recall "content" made the keys from, so that a truncated-BPTT
    # cut can re-derive the keys and W_k still learns from memories older than the cut (the paper's
    # keys are re-derived from ``memories``). None for the paper's recall, and when the cache was
    # rebuilt from stored keys (answering).
    key_sources: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.memories.shape[0]

    @property
    def num_cached(self) -> int:
        return self.memories.shape[1]

    def detach(self) -> MemoryState:
        """Cut the autograd graph here (truncated BPTT, or streaming inference)."""

        def d(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach()

        return MemoryState(
            memories=self.memories.detach(),
            keys=self.keys.detach(),
            valid=self.valid,
            segment_ids=self.segment_ids,
            carried=d(self.carried),
            sensory_ids=self.sensory_ids,
            sensory_mask=self.sensory_mask,
            segments_seen=self.segments_seen,
            tokens_seen=self.tokens_seen,
            extra=dict(self.extra),
            key_sources=d(self.key_sources),
        )

    def push(
        self,
        memory: torch.Tensor,
        key: torch.Tensor,
        valid: torch.Tensor,
        segment_id: int,
        capacity: int,
        key_source: torch.Tensor | None = None,
    ) -> MemoryState:
        """Append one memory per sequence and evict the oldest beyond ``capacity`` (FIFO)."""
        ids = torch.full_like(valid, segment_id, dtype=torch.long)
        sources = None
        if self.key_sources is not None and key_source is not None:
            sources = torch.cat([self.key_sources, key_source[:, None]], dim=1)[:, -capacity:]
        return MemoryState(
            memories=torch.cat([self.memories, memory[:, None]], dim=1)[:, -capacity:],
            keys=torch.cat([self.keys, key[:, None]], dim=1)[:, -capacity:],
            valid=torch.cat([self.valid, valid[:, None]], dim=1)[:, -capacity:],
            segment_ids=torch.cat([self.segment_ids, ids[:, None]], dim=1)[:, -capacity:],
            carried=self.carried,
            sensory_ids=self.sensory_ids,
            sensory_mask=self.sensory_mask,
            segments_seen=self.segments_seen,
            tokens_seen=self.tokens_seen,
            extra=self.extra,
            key_sources=sources,
        )
