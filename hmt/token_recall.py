"""Late-interaction passage recall: a question's tokens matched one by one against a passage's tokens.

The pooled heads (``MemoryRecall``) compare one mean vector per query with one per passage. On
long biomedical articles that mean washes out the rare words a question turns on (a drug, a
country, a number), and recall fell below a word-count ranker (BM25) there; see docs/recall.md.
Here every token keeps a small key, made from the backbone's own input embedding of the token and
the last-layer state the ingestion pass computed for it, and a passage scores

    score(q, p) = scale * sum_i w_i * max_{j in p} <q_i, k_j>

(ColBERT's MaxSim, with a learned weight w_i per question token, softmax over the question, so
that "what", "the" and "of" count less than the words that name things). Keys are unit vectors of
``dim`` entries, stored per token at ingestion; the score needs no backbone call beyond the
question's summary pass, which answering runs anyway.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class TokenRecall(nn.Module):
    """Token keys k_j = norm(E x_j W_e + H_j W_h + b) and weighted MaxSim passage scores."""

    def __init__(self, hidden_size: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.w_e = nn.Linear(hidden_size, dim)  # of the token's input embedding (which word it is)
        self.w_h = nn.Linear(hidden_size, dim, bias=False)  # of its last-layer state (the word in context)
        self.w_weight = nn.Linear(hidden_size, 1)  # a question token's weight, from its state
        with torch.no_grad():
            self.w_h.weight.zero_()
            self.w_weight.weight.zero_()
            self.w_weight.bias.zero_()
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def init_from_embeddings(self, embeddings: torch.Tensor) -> None:
        """Start at the cosine of centred input embeddings in their top ``dim`` principal directions:
        untrained, the head already matches a question's words to the passage's (docs/recall.md)."""
        emb = embeddings.detach().float()
        mean = emb.mean(0)
        _, _, v = torch.linalg.svd(emb - mean, full_matrices=False)
        proj = v[: self.dim]  # (dim, d)
        with torch.no_grad():
            self.w_e.weight.copy_(proj.to(self.w_e.weight))
            self.w_e.bias.copy_((-(proj @ mean)).to(self.w_e.bias))

    def parameter_dict(self, prefix: str = "token_recall") -> dict[str, nn.Parameter]:
        return {
            f"{prefix}.w_e.weight": self.w_e.weight,
            f"{prefix}.w_e.bias": self.w_e.bias,
            f"{prefix}.w_h.weight": self.w_h.weight,
            f"{prefix}.w_weight.weight": self.w_weight.weight,
            f"{prefix}.w_weight.bias": self.w_weight.bias,
            f"{prefix}.log_scale": self.log_scale,
        }

    def keys(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """(..., T, d) input embeddings and last-layer states of tokens -> (..., T, dim) unit keys."""
        keys = self.w_e(embeds) + self.w_h(hidden)
        return F.normalize(keys.float(), dim=-1)

    def queries(
        self, embeds: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A question's (..., m, d) tokens -> unit keys (..., m, dim) and weights (..., m) summing to 1
        over its real tokens (``mask``)."""
        logits = self.w_weight(hidden).squeeze(-1).float()
        if mask is not None:
            logits = logits.masked_fill(~mask.bool(), float("-inf"))
        return self.keys(embeds, hidden), torch.softmax(logits, dim=-1)

    def scores(
        self, queries: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor
    ) -> torch.Tensor:
        """One question's scores against passages: ``queries`` (m, dim), ``weights`` (m,), ``keys``
        (P, W, dim) with ``key_mask`` (P, W) marking real tokens -> (P,) logits. A passage without
        tokens scores -inf."""
        sim = torch.einsum("md,pwd->pmw", queries.float(), keys.float())
        sim = sim.masked_fill(~key_mask.bool()[:, None, :], float("-inf"))
        empty = ~key_mask.bool().any(dim=-1)
        best = sim.max(dim=-1).values.masked_fill(empty[:, None], 0.0)  # (P, m): each token's best match
        logits = self.log_scale.float().exp() * (best * weights.float()[None]).sum(-1)
        return logits.masked_fill(empty, float("-inf"))
