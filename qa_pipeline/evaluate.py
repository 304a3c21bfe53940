"""``hmtqa eval``: perplexity by context length, and QA on held-out fused PubMedQA.

Perplexity "after X tokens" is the perplexity of the segment that starts at token X of a
held-out text, as in the paper's plots (spec section 2.6). One pass over X_max + L tokens gives
every X at once, because the model reports the loss of each segment separately.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch

from hmt import HMTModel

logger = logging.getLogger(__name__)

PPL_MODES = ("none", "window", "rmt", "hmt", "full")


def mode_view(model: HMTModel, mode: str) -> HMTModel:
    """The same backbone and memory parameters read in another mode (no copy of the weights)."""
    view = HMTModel.__new__(HMTModel)
    view.__dict__.update(model.__dict__)
    view.config = model.config.replace(mode=mode)
    return view


def ppl_by_context(
    model: HMTModel,
    token_ids: list[list[int]],
    *,
    contexts: tuple[int, ...] = (2048, 4096, 8192, 16384, 32768),
    modes: tuple[str, ...] = PPL_MODES,
    max_positions: int = 8192,
    max_windows: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Perplexity of the segment after X tokens of context, per mode, pooled over texts.

    Args:
        model: a (trained) HMTModel; its segment length L fixes the evaluated segment.
        token_ids: held-out texts, already tokenized; each contributes windows of X_max + L tokens.
        contexts: the X values (multiples of L).
        modes: HMT modes, plus "full": the plain backbone over all X + L tokens, only where that
            fits in ``max_positions``.
        max_windows: at most this many windows per text (None: all).
    """
    L = model.config.segment_length
    bad = [x for x in contexts if x % L]
    if bad:
        raise ValueError(f"contexts {bad} are not multiples of the segment length {L}")
    span = max(contexts) + L
    windows = [
        ids[s : s + span]
        for ids in token_ids
        for s in list(range(0, len(ids) - span + 1, span))[:max_windows]
    ]
    if not windows:
        raise ValueError(f"no held-out text is {span} tokens long; lower the largest context")
    sums = {m: {x: [0.0, 0] for x in contexts} for m in modes}
    seconds = dict.fromkeys(modes, 0.0)
    for w, window in enumerate(windows):
        ids = torch.tensor([window], device=model.device)
        for mode in modes:
            start = time.perf_counter()
            with torch.inference_mode():
                if mode == "full":
                    for x in contexts:
                        if x + L <= max_positions:
                            _add_full(model, ids[:, : x + L], x, sums[mode][x])
                else:
                    out = mode_view(model, mode)(ids, labels=ids, return_logits=False)
                    for x in contexts:
                        loss, count = out.segment_losses[x // L]
                        # The segment's own last token has no target inside it: count what was scored.
                        sums[mode][x][0] += loss
                        sums[mode][x][1] += count
            seconds[mode] += time.perf_counter() - start
            if progress is not None:
                progress(f"window {w + 1}/{len(windows)} mode {mode}: {time.perf_counter() - start:.0f}s")
    table = {
        mode: {str(x): (math.exp(s / n) if n else None) for x, (s, n) in per_x.items()} for mode, per_x in sums.items()
    }
    return {"segment_length": L, "windows": len(windows), "ppl": table, "seconds": seconds}


def _add_full(model: HMTModel, ids: torch.Tensor, x: int, acc: list) -> None:
    """Plain backbone over all of ``ids``; add the loss of predicting tokens x+1 .. end from x .. end-1,

    the same targets the segmented modes score for the segment starting at x.
    """
    hidden = model._decoder()(input_ids=ids).last_hidden_state
    logits = model._lm_head(hidden[0, x:-1]).float()
    acc[0] += float(torch.nn.functional.cross_entropy(logits, ids[0, x + 1 :], reduction="sum"))
    acc[1] += ids.shape[1] - x - 1


def format_ppl(result: dict) -> str:
    table = result["ppl"]
    xs = list(next(iter(table.values())))
    lines = [f"perplexity of the {result['segment_length']}-token segment after X tokens ({result['windows']} windows)"]
    lines.append("mode    " + "".join(f"{_k(int(x)):>9}" for x in xs))
    for mode, row in table.items():
        lines.append(f"{mode:<8}" + "".join(f"{'-':>9}" if row[x] is None else f"{row[x]:>9.2f}" for x in xs))
    return "\n".join(lines)


def _k(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)
