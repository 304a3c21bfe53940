"""HMTConfig: the one object that says how the memory wrapper reads a sequence."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

MODES = ("hmt", "rmt", "window", "none")
RECALLS = ("content", "paper")


@dataclass
class HMTConfig:
    """Configuration of the Hierarchical Memory Transformer wrapper (He et al., arXiv 2405.06067).

    Paper notation in brackets. The backbone sees ``segment_length + sensory_length + 2`` positions
    per segment in mode ``"hmt"``.
    """

    segment_length: int = 256  # [L] new tokens per segment
    sensory_length: int = 32  # [k] tokens of the previous segment prepended (sensory memory)
    summary_fraction: float = 0.5  # [j/L] leading share of a segment read for its summary S_n
    num_cached: int = 300  # [N] memory embeddings kept in the FIFO long-term cache
    recall_dim: int | None = None  # [d_h] width of the recall projections W_q, W_k; None -> backbone width
    # "hmt": full model; "rmt": one memory token carried forward, no recall, no sensory memory;
    # "window": each segment also sees the previous k tokens, no memory (sliding-window baseline);
    # "none": independent segments.
    mode: str = "hmt"
    # How memories are recalled. "paper": eqs. 2-3 as published, query S_n W_q (S_n = the summary pass's
    # output at its trailing T), keys M_n W_k, scale 1/sqrt(d_h). "content": query and key are mean-pooled
    # last-layer states (over the summary pass's tokens, and over the segment's tokens in the main pass)
    # through W_q, W_k with bias, L2-normalised, times a learned scale; the value recalled stays M_n.
    # One position's state barely tells segments apart (see docs/recall.md); pooled states do.
    recall: str = "content"
    # A second head of recall "content" (its own W_q, W_k, biases and scale) that ranks passages, runs of
    # a segment's tokens, for prompts that quote the document (``HMTModel.passage_head``); trained on
    # passage-level features apart from the segment head. False: passages are scored by the segment head.
    passage_recall: bool = False
    # Width of the late-interaction passage head (``hmt.token_recall.TokenRecall``): every token of a
    # passage keeps a key this wide and a question's tokens are matched to them one by one (MaxSim).
    # When set, it ranks the passages instead of the pooled passage head. 0: no such head.
    token_recall_dim: int = 0
    # False gives the paper's training stage 1 (memory token carried forward, sensory memory, no recall).
    use_recall: bool = True
    # Truncated BPTT: gradients cross at most this many segment boundaries; None = full BPTT.
    bptt_depth: int | None = None
    # Segments per batched call of the memory-independent summary pass (representation extraction).
    summary_batch_size: int = 64
    # Name or path of the backbone this wrapper was built for; recorded in checkpoints.
    backbone: str | None = None

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, why: str) -> None:
            if not cond:
                raise ValueError(f"HMTConfig.{name} {why} (got {getattr(self, name)!r})")

        need(
            isinstance(self.segment_length, int) and self.segment_length >= 2,
            "segment_length",
            "must be an int >= 2",
        )
        need(
            isinstance(self.sensory_length, int) and self.sensory_length >= 0,
            "sensory_length",
            "must be an int >= 0",
        )
        need(
            self.sensory_length <= self.segment_length,
            "sensory_length",
            f"must not exceed segment_length={self.segment_length}",
        )
        need(
            isinstance(self.summary_fraction, (int, float)) and 0.0 < self.summary_fraction <= 1.0,
            "summary_fraction",
            "must be in (0, 1]",
        )
        need(isinstance(self.num_cached, int) and self.num_cached >= 1, "num_cached", "must be an int >= 1")
        need(
            self.recall_dim is None or (isinstance(self.recall_dim, int) and self.recall_dim >= 1),
            "recall_dim",
            "must be None or an int >= 1",
        )
        need(self.mode in MODES, "mode", f"must be one of {MODES}")
        need(self.recall in RECALLS, "recall", f"must be one of {RECALLS}")
        need(isinstance(self.use_recall, bool), "use_recall", "must be a bool")
        need(
            isinstance(self.token_recall_dim, int) and self.token_recall_dim >= 0,
            "token_recall_dim",
            "must be an int >= 0",
        )
        need(
            not self.passage_recall or self.recall == "content",
            "passage_recall",
            "needs recall 'content' (a passage's key is made from its pooled states)",
        )
        need(
            self.bptt_depth is None or (isinstance(self.bptt_depth, int) and self.bptt_depth >= 1),
            "bptt_depth",
            "must be None or an int >= 1",
        )
        need(
            isinstance(self.summary_batch_size, int) and self.summary_batch_size >= 1,
            "summary_batch_size",
            "must be an int >= 1",
        )

    @property
    def summary_length(self) -> int:
        """[j] tokens of a segment read by the summary pass."""
        return max(1, round(self.segment_length * self.summary_fraction))

    @property
    def uses_memory_token(self) -> bool:
        """Whether a memory embedding is prepended/appended to each segment (hmt and rmt)."""
        return self.mode in ("hmt", "rmt")

    @property
    def uses_sensory(self) -> bool:
        return self.mode in ("hmt", "window") and self.sensory_length > 0

    @property
    def uses_recall(self) -> bool:
        return self.mode == "hmt" and self.use_recall

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HMTConfig:
        """Build from a dict, ignoring keys this version does not know (forward compatibility)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def replace(self, **changes: Any) -> HMTConfig:
        return dataclasses.replace(self, **changes)
