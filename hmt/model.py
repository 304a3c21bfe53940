"""HMTModel: the Hierarchical Memory Transformer as a plug-in around a Hugging Face causal LM.

Per segment n with token ids x_n (paper section 3, eqs. 1-5):
  1. S_n = BBM([T, E(x_n[:j]), T])[-1]               summary; memory-independent, batched over segments
  2. P_n = softmax((S_n W_q)(C W_k)^T / sqrt(d_h)) C    recall over the cache C of the last N memories
  3. H   = BBM([P_n, E(last k ids of x_{n-1}), E(x_n), P_n])
  4. logits from the x_n positions; M_n = H[-1] is pushed into C (FIFO).
With ``HMTConfig.recall="content"`` (the default) steps 1-2 read pooled states instead: S_n is the
mean of the summary pass's states over x_n[:j], and each memory's key is made from the mean of H over
the x_n positions; the value recalled is still M_n (see ``MemoryRecall``).

Over 500 lines on purpose: the segment step (paper eqs. 1-5: sensory memory, representation
extraction, memory recall, memory encoding) is shared by reading, training, generation and option
scoring, and keeping them in one file beside the paper's equation numbers lets a reader check the
model against the paper in one place (DESIGN.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from .config import HMTConfig
from .memory import MemoryRecall, MemoryState
from .token_recall import TokenRecall

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
WEIGHTS_NAME = "hmt.safetensors"
CONFIG_NAME = "config.json"


@dataclass
class SegmentRecord:
    """What reading one segment left behind (for the memory store, evidence and plots)."""

    index: int  # global segment index within the sequence
    token_start: int  # token span [token_start, token_end) in the whole sequence
    token_end: int
    summary: torch.Tensor | None  # (B, d) S_n; None when the mode has no recall
    memory: torch.Tensor | None  # (B, d) M_n; None in modes window/none
    recall_key: torch.Tensor | None  # (B, d_h) the key M_n is recalled by
    content: torch.Tensor | None  # (B, d) mean of H over the segment's tokens (keys of recall "content")
    recall_weights: torch.Tensor | None  # (B, n) float32 weights over the cache before this segment
    recall_segment_ids: torch.Tensor | None  # (B, n) which segment wrote each recalled memory
    valid: torch.Tensor  # (B,) bool: the sequence had tokens in this segment
    # (B, P, d) means of H over runs of ``passage_length`` tokens, and (B, P) their real-token counts:
    # finer units than the segment that the recall head can score like memories (``read_segments``).
    passage_contents: torch.Tensor | None = None
    passage_tokens: torch.Tensor | None = None
    # With ``passage_length``: (B, L, d) the last-layer states of the segment's tokens (what the
    # late-interaction passage head reads; cached to train it), and (B, L, token_recall_dim) their keys
    # when the model has that head (``HMTModel.token_recall``).
    token_states: torch.Tensor | None = None
    token_keys: torch.Tensor | None = None


@dataclass
class HMTOutput:
    loss: torch.Tensor | None = None  # mean cross-entropy over labelled tokens
    logits: torch.Tensor | None = None  # (B, T, V) for the segment positions only
    memory_state: MemoryState | None = None
    records: list[SegmentRecord] = field(default_factory=list)
    num_label_tokens: int = 0
    # (summed cross-entropy, labelled tokens) per segment: perplexity by position without logits
    segment_losses: list[tuple[float, int]] = field(default_factory=list)


@dataclass
class _DecodeState:
    """The backbone's KV cache for the segment being generated."""

    past: object = None
    mask: torch.Tensor | None = None  # (B, len) attention mask of everything in ``past``
    segment_ids: list[torch.Tensor] = field(default_factory=list)  # (B,) token ids of this segment
    content_sum: torch.Tensor | None = None  # (B, d) float32 sum of the segment tokens' last-layer states


class HMTModel(nn.Module):
    """HMT around any causal LM that accepts ``inputs_embeds`` (Llama, GPT-2, Qwen2, ... styles).

    New parameters are exactly T (``summary_prompt``), M_init (``memory_init``), W_q and W_k
    (``recall.w_q``, ``recall.w_k``): 2d + 2*d*d_h in all.
    """

    def __init__(self, backbone: PreTrainedModel, config: HMTConfig | None = None) -> None:
        super().__init__()
        config = config or HMTConfig()
        if config.backbone is None:
            config = config.replace(backbone=_backbone_name(backbone))
        self.config = config
        self.backbone = backbone
        embeddings = self._causal_lm().get_input_embeddings()
        self.hidden_size = embeddings.embedding_dim
        self.recall_dim = config.recall_dim or self.hidden_size
        weight = embeddings.weight
        std = weight.detach().float().std().item()
        # Both prompts start on the scale of real token embeddings (as in the paper's code).
        self.summary_prompt = nn.Parameter(torch.randn(1, self.hidden_size) * std)  # T
        self.memory_init = nn.Parameter(torch.randn(1, self.hidden_size) * std)  # M_init
        self.recall = MemoryRecall(self.hidden_size, self.recall_dim, config.recall)
        self.passage_recall = (
            MemoryRecall(self.hidden_size, self.recall_dim, "content") if config.passage_recall else None
        )
        self.token_recall = (
            TokenRecall(self.hidden_size, config.token_recall_dim) if config.token_recall_dim else None
        )
        self.summary_prompt.data = self.summary_prompt.data.to(weight)
        self.memory_init.data = self.memory_init.data.to(weight)
        self.recall.to(device=weight.device, dtype=weight.dtype)
        if self.passage_recall is not None:
            self.passage_recall.to(device=weight.device, dtype=weight.dtype)
        if self.token_recall is not None:
            self.token_recall.to(device=weight.device, dtype=weight.dtype)
        self.tokenizer = None  # set by from_pretrained for convenience; not part of the module state

    # ------------------------------------------------------------------ backbone plumbing
    def _causal_lm(self) -> PreTrainedModel:
        """The transformers CausalLM, unwrapped from a PEFT wrapper if any (LoRA layers live inside)."""
        model = self.backbone
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def _decoder(self) -> nn.Module:
        """The transformer body without its LM head: it returns hidden states, never vocabulary logits."""
        return self._causal_lm().base_model

    def _lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._causal_lm().get_output_embeddings()(hidden)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self._causal_lm().get_input_embeddings()(ids)

    def _run_backbone(
        self,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        past: object = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, object]:
        if position_ids is None:
            # Positions count real tokens only, so right padding leaves the real positions unchanged.
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        # ``past`` is a transformers Cache (a DynamicCache the backbone creates on the first call);
        # transformers 5.24 renamed the forward argument and output field past_key_values -> cache.
        out = self._decoder()(
            inputs_embeds=embeds,
            attention_mask=mask.long(),
            position_ids=position_ids,
            cache=past,
            use_cache=use_cache,
        )
        return out.last_hidden_state, out.cache if use_cache else None

    @property
    def device(self) -> torch.device:
        return self.memory_init.device

    @property
    def dtype(self) -> torch.dtype:
        return self.memory_init.dtype

    def hmt_parameters(self) -> list[nn.Parameter]:
        """The parameters HMT adds to the backbone."""
        return list(self.hmt_state_dict().values())

    # ------------------------------------------------------------------ memory state
    def init_memory(self, batch_size: int = 1) -> MemoryState:
        """An empty memory for ``batch_size`` sequences."""
        dev, dt = self.device, self.dtype
        return MemoryState(
            memories=torch.zeros(batch_size, 0, self.hidden_size, device=dev, dtype=dt),
            keys=torch.zeros(batch_size, 0, self.recall_dim, device=dev, dtype=dt),
            valid=torch.zeros(batch_size, 0, device=dev, dtype=torch.bool),
            segment_ids=torch.zeros(batch_size, 0, device=dev, dtype=torch.long),
            key_sources=(
                torch.zeros(batch_size, 0, self.hidden_size, device=dev, dtype=dt)
                if self.config.recall == "content"
                else None
            ),
        )

    def memory_from_cache(
        self,
        memories: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
    ) -> MemoryState:
        """A state whose cache holds the given memories (B, n, d), e.g. the top-k found by FAISS."""
        memories = memories.to(device=self.device, dtype=self.dtype)
        b, n, _ = memories.shape
        if keys is None:
            keys = self.recall.keys(memories)
        if segment_ids is None:
            segment_ids = torch.arange(n, device=self.device).expand(b, n)
        return MemoryState(
            memories=memories,
            keys=keys.to(device=self.device, dtype=self.dtype),
            valid=torch.ones(b, n, device=self.device, dtype=torch.bool),
            segment_ids=segment_ids.to(self.device).long(),
            segments_seen=int(segment_ids.max().item()) + 1 if n else 0,
        )

    # ------------------------------------------------------------------ summaries (eq. 1)
    def summarize(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """S_n for every segment of ``input_ids`` (B, T): returns (B, n_segments, d).

        This pass does not depend on memory, so all segments go through the backbone together, in
        chunks of ``config.summary_batch_size``.
        """
        cfg = self.config
        b, t = input_ids.shape
        mask = _ones_if_none(attention_mask, input_ids)
        n = math.ceil(t / cfg.segment_length)
        j = cfg.summary_length
        ids = F.pad(input_ids, (0, n * cfg.segment_length - t)).view(b, n, cfg.segment_length)[:, :, :j]
        msk = F.pad(mask, (0, n * cfg.segment_length - t)).view(b, n, cfg.segment_length)[:, :, :j]
        ids, msk = ids.reshape(b * n, -1), msk.reshape(b * n, -1)
        # Drop trailing columns that are padding in every row (a short question would otherwise be
        # read as j positions).
        width = int(msk.any(dim=0).nonzero().max()) + 1 if bool(msk.any()) else 1
        ids, msk = ids[:, :width], msk[:, :width]
        out = []
        for start in range(0, b * n, cfg.summary_batch_size):
            out.append(
                self._summary_pass(
                    ids[start : start + cfg.summary_batch_size], msk[start : start + cfg.summary_batch_size]
                )
            )
        return torch.cat(out).view(b, n, self.hidden_size)

    def query_token_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, m, d) last-layer states of a question's own tokens (``input_ids`` (B, m), at most
        ``summary_length``) in the summary pass ``summarize`` runs for it: what the late-interaction
        passage head matches token by token (``summarize`` returns their mean)."""
        ids = input_ids[:, : self.config.summary_length]
        return self._summary_states(ids, torch.ones_like(ids))[:, 1:-1]

    def _summary_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows = ids.shape[0]
        prompt = self.summary_prompt.expand(rows, 1, -1)
        embeds = torch.cat([prompt, self._embed(ids), prompt], dim=1)  # (rows, j + 2, d)
        one = mask.new_ones(rows, 1)
        hidden, _ = self._run_backbone(embeds, torch.cat([one, mask, one], dim=1))
        return hidden

    def _summary_pass(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self._summary_states(ids, mask)
        if self.config.recall == "content":
            return _masked_mean(hidden[:, 1:-1], mask)
        return hidden[:, -1]  # output at the trailing T

    # ------------------------------------------------------------------ one segment (eqs. 2-5)
    def _memory_token(
        self, summary: torch.Tensor | None, state: MemoryState
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """P_n for this segment and the recall weights behind it."""
        cfg = self.config
        b = state.batch_size
        init = self.memory_init.expand(b, -1)
        if cfg.uses_recall:
            recalled, weights, has_memory = self.recall(summary, state.keys, state.memories, state.valid)
            return torch.where(has_memory[:, None], recalled, init), weights
        if cfg.uses_memory_token:
            return (state.carried if state.carried is not None else init), None
        return None, None

    def _prefix(
        self, memory_token: torch.Tensor | None, state: MemoryState
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Embeddings and mask placed before the segment tokens: [P_n, sensory tokens]."""
        b = state.batch_size
        parts, masks = [], []
        if memory_token is not None:
            parts.append(memory_token[:, None])
            masks.append(torch.ones(b, 1, device=self.device, dtype=torch.long))
        if self.config.uses_sensory and state.sensory_ids is not None:
            parts.append(self._embed(state.sensory_ids))
            masks.append(state.sensory_mask.long())
        return parts, masks

    def _advance(
        self,
        state: MemoryState,
        seg_ids: torch.Tensor,
        seg_mask: torch.Tensor,
        new_memory: torch.Tensor | None,
        content: torch.Tensor | None = None,
    ) -> tuple[MemoryState, torch.Tensor | None]:
        """State after a segment: push M_n (recalled by the key of ``content`` in recall "content"),
        carry it (rmt / stage 1), keep the last k ids."""
        cfg = self.config
        state = dataclasses.replace(state, extra=dict(state.extra))  # never mutate the caller's state
        seg_valid = seg_mask.bool().any(dim=1)
        key = None
        if new_memory is not None:
            by_content = cfg.recall == "content"
            key = self.recall.keys(content if by_content else new_memory)
            prev = (
                state.carried if state.carried is not None else self.memory_init.expand(state.batch_size, -1)
            )
            carried = torch.where(seg_valid[:, None], new_memory, prev)
            state = state.push(
                new_memory,
                key,
                seg_valid,
                state.segments_seen,
                cfg.num_cached,
                content if by_content else None,
            )
            state.carried = carried
        if cfg.uses_sensory:
            state.sensory_ids, state.sensory_mask = _last_valid(
                state.sensory_ids, state.sensory_mask, seg_ids, seg_mask.long(), cfg.sensory_length
            )
        state.segments_seen += 1
        state.tokens_seen += seg_ids.shape[1]
        return state, key

    def _segment_step(
        self,
        seg_ids: torch.Tensor,
        seg_mask: torch.Tensor,
        summary: torch.Tensor | None,
        state: MemoryState,
        passage_length: int | None = None,
    ) -> tuple[torch.Tensor, MemoryState, SegmentRecord]:
        length = seg_ids.shape[1]
        memory_token, weights = self._memory_token(summary, state)
        recall_ids = state.segment_ids if weights is not None else None
        parts, masks = self._prefix(memory_token, state)
        offset = sum(p.shape[1] for p in parts)
        seg_embeds = self._embed(seg_ids)
        parts.append(seg_embeds)
        masks.append(seg_mask.long())
        if memory_token is not None:  # the write token: its output becomes M_n
            parts.append(memory_token[:, None])
            masks.append(masks[0])
        hidden, _ = self._run_backbone(torch.cat(parts, dim=1), torch.cat(masks, dim=1))
        new_memory = hidden[:, -1] if memory_token is not None else None
        content = (
            _masked_mean(hidden[:, offset : offset + length], seg_mask) if memory_token is not None else None
        )
        index, start = state.segments_seen, state.tokens_seen
        state, key = self._advance(state, seg_ids, seg_mask, new_memory, content)
        record = SegmentRecord(
            index=index,
            token_start=start,
            token_end=start + length,
            summary=summary,
            memory=new_memory,
            recall_key=key,
            content=content,
            recall_weights=weights,
            recall_segment_ids=recall_ids,
            valid=seg_mask.bool().any(dim=1),
        )
        if passage_length and content is not None:
            record.passage_contents, record.passage_tokens = _run_means(
                hidden[:, offset : offset + length], seg_mask, passage_length
            )
            record.token_states = hidden[:, offset : offset + length]
            if self.token_recall is not None:
                record.token_keys = self.token_recall.keys(seg_embeds, record.token_states)
        return hidden[:, offset : offset + length], state, record

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        memory_state: MemoryState | None = None,
        return_logits: bool = True,
        return_records: bool = False,
        summary_mask: torch.Tensor | None = None,
        query_ids: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
        passage_length: int | None = None,
    ) -> HMTOutput:
        """Read ``input_ids`` (B, T) segment by segment.

        Args:
            input_ids: token ids; any length. Right padding is marked by ``attention_mask``.
            attention_mask: 1 for real tokens, 0 for padding.
            labels: same shape as ``input_ids``; -100 is ignored (so answer-only loss works). As in
                transformers, logits at position t are scored against ``labels[t + 1]``.
            memory_state: continue from an earlier call (streaming); None starts empty.
            return_logits: keep (B, T, V) logits; turn off for long inputs, the loss does not need it.
            return_records: keep a ``SegmentRecord`` per segment.
            summary_mask: 0 marks tokens the summary pass (the recall query) must not see, e.g. the
                answer that follows a question in the same segment during training, since at answer
                time the query is made from the question alone. None: the attention mask.
            query_ids, query_mask: (B, q) tokens that make the first segment's recall query instead of
                its own first tokens, e.g. the question alone before its chat prompt and answer.
            passage_length: also pool each segment's states over runs of this many tokens
                (``SegmentRecord.passage_contents``; mode hmt with records only).

        Returns:
            HMTOutput with loss (mean over labelled tokens), logits, the memory state after the last
            segment, and per-segment records.
        """
        cfg = self.config
        b, t = input_ids.shape
        mask = _ones_if_none(attention_mask, input_ids)
        state = memory_state if memory_state is not None else self.init_memory(b)
        summaries = None
        if cfg.uses_recall:
            seen = mask if summary_mask is None else mask * summary_mask.to(mask.dtype)
            summaries = self.summarize(input_ids, seen)
            if query_ids is not None:
                j = cfg.summary_length
                first = self.summarize(query_ids[:, :j], None if query_mask is None else query_mask[:, :j])[
                    :, 0
                ]
                summaries = torch.cat([first[:, None], summaries[:, 1:]], dim=1)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        n_label = 0
        logits, records, segment_losses = [], [], []
        for i, start in enumerate(range(0, t, cfg.segment_length)):
            end = min(t, start + cfg.segment_length)
            if cfg.bptt_depth is not None and state.segments_seen % cfg.bptt_depth == 0:
                state = state.detach()  # truncated BPTT: no gradient crosses this boundary ...
                # ... but W_k still learns from the older memories: their keys are made again.
                sources = state.memories if cfg.recall == "paper" else state.key_sources
                if sources is not None:
                    state.keys = self.recall.keys(sources)
            summary = summaries[:, i] if summaries is not None else None
            hidden, state, record = self._segment_step(
                input_ids[:, start:end], mask[:, start:end], summary, state, passage_length
            )
            if labels is not None:
                target = labels[:, start + 1 : end + 1]
                picked = target != -100
                seg_loss = torch.zeros((), device=self.device)
                if picked.any():
                    scores = self._lm_head(hidden[:, : target.shape[1]][picked])
                    seg_loss = F.cross_entropy(scores.float(), target[picked], reduction="sum")
                    loss_sum = loss_sum + seg_loss
                    n_label += int(picked.sum())
                segment_losses.append((float(seg_loss.detach()), int(picked.sum())))
            if return_logits:
                logits.append(self._lm_head(hidden))
            if return_records:
                records.append(record)
        return HMTOutput(
            loss=loss_sum / n_label if n_label else None,
            logits=torch.cat(logits, dim=1) if logits else None,
            memory_state=state,
            records=records,
            num_label_tokens=n_label,
            segment_losses=segment_losses,
        )

    def read_segments(
        self,
        input_ids: torch.Tensor,
        memory_state: MemoryState | None = None,
        attention_mask: torch.Tensor | None = None,
        passage_length: int | None = None,
    ) -> tuple[list[SegmentRecord], MemoryState]:
        """Streaming ingestion: feed one block of segments, get its records and the new state.

        Feeding a document block by block equals one forward over it when every block but the last
        is a whole number of segments. Memory use is bounded by N cached memories, not the document.
        ``passage_length``: records also carry pooled states of passages that long (see ``forward``).
        """
        out = self.forward(
            input_ids,
            attention_mask,
            memory_state=memory_state,
            return_logits=False,
            return_records=True,
            passage_length=passage_length,
        )
        return out.records, out.memory_state

    # ------------------------------------------------------------------ answering
    def _open_segment(
        self, state: MemoryState, query_ids: torch.Tensor
    ) -> tuple[torch.Tensor | None, list, list]:
        """P for a new segment recalled by ``query_ids`` (its first tokens, or the question alone),
        plus the prefix before it."""
        query_ids = query_ids[:, : self.config.summary_length]
        summary = self.summarize(query_ids)[:, 0] if self.config.uses_recall else None
        memory_token, _ = self._memory_token(summary, state)
        parts, masks = self._prefix(memory_token, state)
        return memory_token, parts, masks

    @torch.no_grad()
    def query_recall(
        self,
        input_ids: torch.Tensor,
        memory_state: MemoryState,
        query_ids: torch.Tensor | None = None,
        whole_prompt: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """What a question (the next segment) recalls: (S_q (B, d), weights (B, n), segment ids (B, n)).

        Weights and ids are None in modes without recall. Long questions are read through memory
        first, as ``generate`` does (unless ``whole_prompt``); ``query_ids`` as in ``generate``.
        """
        state, tail = self._split_prompt(input_ids, _clone_state(memory_state), whole_prompt)
        summary = self.summarize((tail if query_ids is None else query_ids)[:, : self.config.summary_length])[
            :, 0
        ]
        if not self.config.uses_recall:
            return summary, None, None
        _, weights = self._memory_token(summary, state)
        return summary, weights, state.segment_ids

    def _split_prompt(
        self, input_ids: torch.Tensor, memory_state: MemoryState | None, whole_prompt: bool = False
    ) -> tuple[MemoryState, torch.Tensor]:
        """Read all whole segments but the last through memory; return the state and the tail.

        ``whole_prompt`` keeps the whole prompt as the tail: one answering segment wider than L (the
        backbone's window is the limit), e.g. recalled passages given as text beside the question.
        """
        L = self.config.segment_length
        state = memory_state if memory_state is not None else self.init_memory(input_ids.shape[0])
        head = 0 if whole_prompt else (input_ids.shape[1] - 1) // L * L
        if head:
            _, state = self.read_segments(input_ids[:, :head], state)
        return state, input_ids[:, head:]

    @torch.no_grad()
    def score_options(
        self,
        input_ids: torch.Tensor,
        options: list[torch.Tensor],
        memory_state: MemoryState | None = None,
        query_ids: torch.Tensor | None = None,
        whole_prompt: bool = False,
        return_hidden: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """Log-likelihood of each option continuing the prompt (closed questions).

        Args:
            input_ids: (1, T) prompt ids; earlier segments are read through memory.
            options: 1-D id tensors, one per option.
            memory_state: memory of the document read before the prompt.
            query_ids, whole_prompt: as in ``iter_generate``.
            return_hidden: also return (2, d): the last layer's state at the prompt's last token (what
                the LM head reads to choose the first answer token) and its mean over the prompt's
                own tokens (what the prompt's text says, memory and sensory tokens left out): a
                decision head's inputs.

        Returns:
            (sum of log-probabilities (n_options,), number of option tokens (n_options,)[, hidden (d,)]).
        """
        if input_ids.shape[0] != 1:
            raise ValueError("score_options takes one prompt at a time (batch size 1)")
        if not options or any(o.numel() == 0 for o in options):
            raise ValueError("score_options needs at least one non-empty option")
        state, tail = self._split_prompt(input_ids, _clone_state(memory_state), whole_prompt)
        memory_token, parts, masks = self._open_segment(state, tail if query_ids is None else query_ids)
        prefix = torch.cat(parts + [self._embed(tail)], dim=1) if parts else self._embed(tail)
        prefix_mask = torch.cat(masks + [torch.ones_like(tail)], dim=1)
        n, width = len(options), max(o.numel() for o in options)
        opt_ids = torch.zeros(n, width, dtype=torch.long, device=self.device)
        opt_mask = torch.zeros(n, width, dtype=torch.long, device=self.device)
        for i, o in enumerate(options):
            opt_ids[i, : o.numel()] = o.to(self.device)
            opt_mask[i, : o.numel()] = 1
        p = prefix.shape[1]
        if width == 1:
            # One token per option (yes/no/maybe): one pass over the prompt scores them all.
            hidden, _ = self._run_backbone(prefix, prefix_mask)
            logprobs = torch.log_softmax(self._lm_head(hidden[:, p - 1]).float(), dim=-1)[0]
            token_lp = logprobs[opt_ids[:, 0]][:, None] * opt_mask
        else:
            # The prompt once (its KV cache shared by every option), then all options in one batch.
            hidden, past = self._run_backbone(prefix, prefix_mask, use_cache=True)
            first = torch.log_softmax(self._lm_head(hidden[:, p - 1]).float(), dim=-1)[0][opt_ids[:, 0]]
            past.batch_repeat_interleave(n)
            rest_mask = torch.cat([prefix_mask.expand(n, -1), opt_mask[:, :-1]], dim=1)
            positions = (rest_mask.long().cumsum(-1) - 1).clamp(min=0)[:, p:]
            rest, _ = self._run_backbone(
                self._embed(opt_ids[:, :-1]), rest_mask, position_ids=positions, past=past, use_cache=True
            )
            later = (
                torch.log_softmax(self._lm_head(rest).float(), dim=-1)
                .gather(-1, opt_ids[:, 1:, None])
                .squeeze(-1)
            )
            token_lp = torch.cat([first[:, None], later], dim=1) * opt_mask
        out = (token_lp.sum(dim=1), opt_mask.sum(dim=1))
        if not return_hidden:
            return out
        t = tail.shape[1]
        return (*out, torch.stack([hidden[0, p - 1], hidden[0, p - t : p].mean(dim=0)]).float())

    @torch.no_grad()
    def iter_generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 64,
        memory_state: MemoryState | None = None,
        eos_token_id: int | list[int] | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        query_ids: torch.Tensor | None = None,
        whole_prompt: bool = False,
        no_repeat_ngram_size: int = 0,
        token_logprobs: list[torch.Tensor] | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield new token ids (B,) one step at a time.

        The prompt's whole segments are read through memory; the last (partial) segment opens the
        segment being generated: [P_n, sensory tokens, tail] in the backbone's KV cache. When that
        segment reaches L tokens it is closed as in training (its trailing P gives M_n, pushed into
        the cache) and a new segment opens with a fresh KV cache, so answers can be any length.
        For a generated segment the recall query is the summary of the closing segment's last j
        tokens: its own first tokens do not exist yet.

        ``query_ids`` (B, q), when given, make the answering segment's recall query instead of the
        prompt's tail (the question alone, as in training); ``whole_prompt`` opens one answering
        segment with the whole prompt, however long, instead of reading its head through memory.
        ``no_repeat_ngram_size`` n > 0: no n-gram of the generated tokens occurs twice (a small
        model's greedy answers otherwise loop on a phrase until the token limit).
        ``token_logprobs``, when a list, receives each step's (B,) log-probability of the chosen token.
        """
        if max_new_tokens <= 0:
            return
        cfg = self.config
        eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        eos = torch.tensor(eos_ids, dtype=torch.long, device=self.device)
        state, tail = self._split_prompt(input_ids, _clone_state(memory_state), whole_prompt)
        b = input_ids.shape[0]
        memory_token, parts, masks = self._open_segment(state, tail if query_ids is None else query_ids)
        dec = _DecodeState(mask=torch.zeros(b, 0, dtype=torch.long, device=self.device))
        dec.segment_ids = list(tail.unbind(dim=1))
        prompt_mask = torch.cat(masks + [torch.ones_like(tail)], dim=1)
        hidden = self._feed(dec, torch.cat(parts + [self._embed(tail)], dim=1), prompt_mask, tail.shape[1])
        finished = torch.zeros(b, dtype=torch.bool, device=self.device)
        # A whole-prompt segment may be wider than L; its answer still gets L tokens before it closes.
        limit = tail.shape[1] + cfg.segment_length if whole_prompt else cfg.segment_length
        generated: list[list[int]] = [[] for _ in range(b)]
        for _ in range(max_new_tokens):
            logits = self._lm_head(hidden).float()
            if no_repeat_ngram_size > 0:
                _ban_repeated_ngrams(logits, generated, no_repeat_ngram_size)
            next_ids = _pick(logits, do_sample, temperature, top_p, generator)
            if token_logprobs is not None:
                token_logprobs.append(torch.log_softmax(logits, dim=-1).gather(-1, next_ids[:, None])[:, 0])
            for row, token in zip(generated, next_ids.tolist(), strict=True):
                row.append(token)
            yield next_ids
            finished |= torch.isin(next_ids, eos)
            if bool(finished.all()):
                return
            if len(dec.segment_ids) >= limit:
                memory_token, dec, state = self._close_and_open(dec, memory_token, state)
                limit = cfg.segment_length
            dec.segment_ids.append(next_ids)
            hidden = self._feed(dec, self._embed(next_ids[:, None]), counted=1)

    def _close_and_open(
        self, dec: _DecodeState, memory_token: torch.Tensor | None, state: MemoryState
    ) -> tuple[torch.Tensor | None, _DecodeState, MemoryState]:
        """Finish the generated segment (M_n from its trailing P) and open the next one."""
        seg_ids = torch.stack(dec.segment_ids, dim=1)
        content = None
        if dec.content_sum is not None:
            content = (dec.content_sum / max(1, seg_ids.shape[1])).to(self.dtype)
        new_memory = self._feed(dec, memory_token[:, None]) if memory_token is not None else None
        state, _ = self._advance(state, seg_ids, torch.ones_like(seg_ids), new_memory, content)
        query = seg_ids[:, -self.config.summary_length :]
        memory_token, parts, masks = self._open_segment(state, query)
        fresh = _DecodeState(mask=torch.zeros(seg_ids.shape[0], 0, dtype=torch.long, device=self.device))
        if parts:
            self._feed(fresh, torch.cat(parts, dim=1), torch.cat(masks, dim=1))
        return memory_token, fresh, state

    def _feed(
        self, dec: _DecodeState, embeds: torch.Tensor, mask: torch.Tensor | None = None, counted: int = 0
    ) -> torch.Tensor:
        """Append embeddings to the KV cache; return the last position's hidden state (B, d).

        The states of the last ``counted`` positions (segment tokens) are summed into
        ``dec.content_sum``: a generated segment's pooled content, as the main pass pools it.
        """
        b, t, _ = embeds.shape
        mask = mask if mask is not None else torch.ones(b, t, dtype=torch.long, device=self.device)
        start = dec.mask.long().sum(dim=1, keepdim=True)
        positions = start + (mask.cumsum(-1) - 1).clamp(min=0)
        dec.mask = torch.cat([dec.mask, mask.long()], dim=1)
        hidden, dec.past = self._run_backbone(embeds, dec.mask, positions, past=dec.past, use_cache=True)
        if counted:
            part = hidden[:, -counted:].float().sum(dim=1)
            dec.content_sum = part if dec.content_sum is None else dec.content_sum + part
        return hidden[:, -1]

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 64,
        memory_state: MemoryState | None = None,
        eos_token_id: int | list[int] | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        streamer: Callable[[torch.Tensor], None] | None = None,
        query_ids: torch.Tensor | None = None,
        whole_prompt: bool = False,
        no_repeat_ngram_size: int = 0,
    ) -> torch.Tensor:
        """Generate up to ``max_new_tokens`` after ``input_ids``; returns only the new ids (B, n)."""
        steps = []
        for ids in self.iter_generate(
            input_ids,
            max_new_tokens,
            memory_state,
            eos_token_id,
            do_sample,
            temperature,
            top_p,
            generator,
            query_ids=query_ids,
            whole_prompt=whole_prompt,
            no_repeat_ngram_size=no_repeat_ngram_size,
        ):
            steps.append(ids)
            if streamer is not None:
                streamer(ids)
        if not steps:
            return input_ids.new_zeros(input_ids.shape[0], 0)
        return torch.stack(steps, dim=1)

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, path: str | os.PathLike, save_backbone: bool = False) -> None:
        """Write config.json + hmt.safetensors (HMT parameters only), adapters if PEFT-wrapped.

        Args:
            path: target folder; replaced atomically.
            save_backbone: also write the full backbone (after full fine-tuning).
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is meant to be shared
        try:
            tensors = {name: p.detach().contiguous().cpu() for name, p in self.hmt_state_dict().items()}
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            meta = {
                "format_version": CHECKPOINT_FORMAT,
                "hmt_config": self.config.to_dict(),
                "hidden_size": self.hidden_size,
                "recall_dim": self.recall_dim,
                "backbone": self.config.backbone,
                "has_adapter": hasattr(self.backbone, "peft_config"),
                "has_backbone": save_backbone,
            }
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
            if meta["has_adapter"]:
                self.backbone.save_pretrained(tmp / "adapter")
                _name_adapter_base(tmp / "adapter", self.config.backbone)
            if save_backbone:
                from .backbone import quiet_loading

                with quiet_loading():
                    self._causal_lm().save_pretrained(tmp / "backbone")  # safetensors
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def hmt_state_dict(self) -> dict[str, torch.Tensor]:
        passage = self.passage_recall.parameter_dict("passage_recall") if self.passage_recall is not None else {}
        tokens = self.token_recall.parameter_dict("token_recall") if self.token_recall is not None else {}
        return {
            "summary_prompt": self.summary_prompt,
            "memory_init": self.memory_init,
            **self.recall.parameter_dict(),
            **passage,
            **tokens,
        }

    @property
    def passage_head(self) -> MemoryRecall:
        """The head that ranks passages (``SegmentRecord.passage_contents``) against a summary: the
        passage head when the config has one, else the segment recall itself."""
        return self.passage_recall if self.passage_recall is not None else self.recall

    def load_hmt_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.hmt_state_dict()
        missing = set(own) - set(tensors)
        if missing:
            raise ValueError(f"HMT checkpoint lacks {sorted(missing)}")
        for name, param in own.items():
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise ValueError(
                    f"HMT checkpoint tensor {name} has shape {tuple(tensors[name].shape)}, "
                    f"this model expects {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(tensors[name].to(param))

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        backbone: PreTrainedModel | None = None,
        *,
        dtype: str | torch.dtype | None = "float32",
        device: str | torch.device | None = None,
        merge_adapter: bool = True,
        **config_overrides: object,
    ) -> HMTModel:
        """Load a checkpoint written by ``save_pretrained``.

        Args:
            path: the checkpoint folder.
            backbone: the backbone to wrap; None loads the one named in the checkpoint (and sets
                ``model.tokenizer``).
            dtype, device: used when the backbone is loaded here.
            merge_adapter: fold LoRA adapters into the backbone weights (fast inference); False keeps
                them separate and trainable (resuming training).
            config_overrides: HMTConfig fields to change at load time (e.g. ``num_cached``).

        Raises:
            ValueError: the checkpoint was made for a backbone of another width.
        """
        from .backbone import load_backbone

        path = Path(path)
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{path} is not an HMT checkpoint (no {CONFIG_NAME})")
        meta = json.loads((path / CONFIG_NAME).read_text())
        # Checkpoints written before recall kinds existed used the paper's recall.
        config = HMTConfig.from_dict({"recall": "paper", **meta["hmt_config"], **config_overrides})
        tokenizer = None
        if backbone is None:
            source = str(path / "backbone") if meta.get("has_backbone") else meta.get("backbone")
            if not source:
                raise ValueError(f"{path} does not name its backbone; pass backbone=")
            backbone, tokenizer = load_backbone(source, dtype=dtype, device=device)
        width = backbone.get_input_embeddings().embedding_dim
        if width != meta["hidden_size"]:
            raise ValueError(
                f"HMT checkpoint {path} was made for a backbone of width {meta['hidden_size']} "
                f"({meta.get('backbone')}); this backbone has width {width}. Load it with its own backbone."
            )
        if meta.get("has_adapter") and (path / "adapter").is_dir() and not hasattr(backbone, "peft_config"):
            from peft import PeftModel

            from .backbone import quiet_peft

            with quiet_peft():
                backbone = PeftModel.from_pretrained(
                    backbone, str(path / "adapter"), is_trainable=not merge_adapter
                )
            if merge_adapter:
                # Folding LoRA into the weights makes inference as fast as the plain backbone.
                backbone = backbone.merge_and_unload()
        model = cls(backbone, config)
        model.load_hmt_state_dict(load_file(str(path / WEIGHTS_NAME)))  # cast to the backbone's dtype
        model.tokenizer = tokenizer
        return model


def _backbone_name(backbone: PreTrainedModel) -> str | None:
    cfg = getattr(backbone, "config", None)
    return getattr(cfg, "hmt_backbone_name", None) or getattr(cfg, "_name_or_path", None) or None


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where ``mask`` is 1: (B, t, d) -> (B, d), in float32 then cast back."""
    weights = mask.to(torch.float32)[..., None]
    pooled = (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    return pooled.to(hidden.dtype)


def _run_means(hidden: torch.Tensor, mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Means over consecutive runs of ``width`` positions: (B, t, d) -> (B, ceil(t / width), d), with
    each run's count of real tokens (B, P); a run of padding only is all zeros with count 0."""
    b, t, d = hidden.shape
    runs = -(-t // width)
    pad = runs * width - t
    weights = F.pad(mask.to(torch.float32), (0, pad)).view(b, runs, width)
    sums = (F.pad(hidden.float(), (0, 0, 0, pad)).view(b, runs, width, d) * weights[..., None]).sum(dim=2)
    counts = weights.sum(dim=2)
    return (sums / counts.clamp_min(1.0)[..., None]).to(hidden.dtype), counts.long()


def _ones_if_none(mask: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(ids) if mask is None else mask.to(ids.device).long()


def _clone_state(state: MemoryState | None) -> MemoryState | None:
    """Answering must not change the caller's document memory."""
    return None if state is None else state.detach()


def _ban_repeated_ngrams(logits: torch.Tensor, generated: list[list[int]], n: int) -> None:
    """Set to -inf, in place, each token that would repeat an n-gram of that row's generated tokens."""
    for row, tokens in enumerate(generated):
        if len(tokens) < n:
            continue
        prefix = tuple(tokens[len(tokens) - n + 1 :])
        banned = [
            tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i : i + n - 1]) == prefix
        ]
        if banned:
            logits[row, banned] = float("-inf")


def _pick(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Greedy or nucleus sampling over (B, V) logits."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / max(temperature, 1e-5), dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _last_valid(
    prev_ids: torch.Tensor | None,
    prev_mask: torch.Tensor | None,
    ids: torch.Tensor,
    mask: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The last ``k`` real tokens of [previous sensory tokens, segment] per row, padding in front.

    A row whose segment is short or all padding (its sequence ended earlier in a right-padded
    batch) keeps its own last real tokens, exactly as if it had been read alone.
    """
    if prev_ids is not None:
        ids, mask = torch.cat([prev_ids, ids], dim=1), torch.cat([prev_mask, mask], dim=1)
    if bool(mask.all()):  # the common case: nothing to move
        return ids[:, -k:], mask[:, -k:]
    n = ids.shape[1]
    pos = torch.arange(n, device=ids.device).expand_as(ids)
    # Stable order with padding first and real tokens last, each in reading order.
    order = torch.argsort(torch.where(mask.bool(), pos + n, pos), dim=1)[:, -k:]
    return ids.gather(1, order), mask.gather(1, order)


def _name_adapter_base(adapter_dir: Path, backbone: str | None) -> None:
    """Record the backbone's name, not the local folder it was loaded from, as the adapter's base.

    peft writes the load path (e.g. a cache folder under the trainer's home), which means nothing on
    another machine; ``from_pretrained`` takes the backbone from the caller or the HMT config anyway.
    """
    config_path = adapter_dir / "adapter_config.json"
    if backbone and config_path.is_file():
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = backbone
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
