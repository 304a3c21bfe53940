"""QA and retrieval metrics: accuracy, macro-F1, SQuAD EM/F1, evidence hit@k and a batch summary.

All functions are pure. Closed-question labels are compared after :func:`normalize_label`
(case-folded, surrounding whitespace and trailing punctuation removed), so ``"Yes."`` matches
``"yes"``; open answers use the SQuAD normalisation of :func:`normalize_answer`.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

Span = tuple[int, int]

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_label(label: Any) -> str:
    """Normalise a closed-question label for comparison.

    Args:
        label: A label or prediction (None counts as the empty string).

    Returns:
        The label case-folded, whitespace-collapsed and without trailing ``.!?,;:``.
    """
    if label is None:
        return ""
    return " ".join(str(label).casefold().split()).rstrip(".!?,;:").strip()


def normalize_answer(text: str) -> str:
    """SQuAD answer normalisation: lowercase, drop punctuation and articles, collapse whitespace.

    Args:
        text: The answer text.

    Returns:
        The normalised text.
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_list(golds: str | Sequence[str]) -> list[str]:
    return [golds] if isinstance(golds, str) else list(golds)


def accuracy(preds: Sequence[Any], golds: Sequence[Any]) -> float:
    """Share of predictions equal to their gold label (after :func:`normalize_label`).

    Args:
        preds: Predicted labels.
        golds: Gold labels, same length.

    Returns:
        Accuracy in [0, 1]; NaN for empty input.

    Raises:
        ValueError: If the lengths differ.
    """
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions but {len(golds)} gold labels")
    if not golds:
        return math.nan
    return sum(normalize_label(p) == normalize_label(g) for p, g in zip(preds, golds, strict=True)) / len(
        golds
    )


def macro_f1(preds: Sequence[Any], golds: Sequence[Any], labels: Iterable[Any] | None = None) -> float:
    """Unweighted mean of per-label F1.

    Labels default to the union of gold and predicted labels (as in scikit-learn). A label that
    occurs neither among the golds nor the predictions is left out of the mean: it carries no
    information, and counting it as F1 = 0 would make the score depend on how many unused options a
    question offers. A prediction outside ``labels`` still counts as a miss for its gold label.

    Args:
        preds: Predicted labels.
        golds: Gold labels, same length.
        labels: Labels to average over.

    Returns:
        Macro-F1 in [0, 1]; NaN for empty input.

    Raises:
        ValueError: If the lengths differ.
    """
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions but {len(golds)} gold labels")
    if not golds:
        return math.nan
    p = [normalize_label(x) for x in preds]
    g = [normalize_label(x) for x in golds]
    label_set = (
        list(dict.fromkeys(normalize_label(x) for x in labels))
        if labels is not None
        else sorted(set(g) | set(p))
    )
    present = set(p) | set(g)
    scores = []
    for label in label_set:
        if label not in present:
            continue
        tp = sum(1 for a, b in zip(p, g, strict=True) if a == label and b == label)
        fp = sum(1 for a, b in zip(p, g, strict=True) if a == label and b != label)
        fn = sum(1 for a, b in zip(p, g, strict=True) if a != label and b == label)
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return float(sum(scores) / len(scores)) if scores else math.nan


def exact_match(pred: str | None, golds: str | Sequence[str]) -> float:
    """SQuAD exact match, max over the gold answers.

    Args:
        pred: Predicted answer (None counts as empty).
        golds: One gold answer or a list of them.

    Returns:
        1.0 if the normalised prediction equals any normalised gold answer, else 0.0.
    """
    p = normalize_answer(pred or "")
    return float(any(p == normalize_answer(g) for g in _as_list(golds)))


def _token_f1_single(pred: str, gold: str) -> float:
    p = normalize_answer(pred).split()
    g = normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)  # both empty counts as a match, as in SQuAD v2
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(p)
    recall = same / len(g)
    return 2 * precision * recall / (precision + recall)


def token_f1(pred: str | None, golds: str | Sequence[str]) -> float:
    """SQuAD token-overlap F1, max over the gold answers.

    Args:
        pred: Predicted answer (None counts as empty).
        golds: One gold answer or a list of them.

    Returns:
        The best F1 in [0, 1] (0.0 when there is no gold answer).
    """
    golds = _as_list(golds)
    return max((_token_f1_single(pred or "", g) for g in golds), default=0.0)


def spans_overlap(a: Span, b: Span) -> bool:
    """Whether half-open character spans share a character (touching spans do not)."""
    return max(a[0], b[0]) < min(a[1], b[1])


def merge_spans(spans: Iterable[Sequence[int]]) -> list[Span]:
    """Character spans in order with those that overlap or touch joined."""
    out: list[list[int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


def _check_ng(n: int, g: int) -> None:
    if n < 1 or not 1 <= g <= n:
        raise ValueError(f"need 1 <= gold ({g}) <= segments ({n})")


def chance_hit_at_k(n: int, g: int, k: int) -> float:
    """P(some gold segment in the top ``k``) for a uniformly random ranking of ``n`` segments, ``g`` gold.

    ``1 - C(n - g, k) / C(n, k)`` (with ``k`` capped at ``n``).
    """
    _check_ng(n, g)
    if k < 1:
        raise ValueError("k must be >= 1")
    k = min(k, n)
    return float(1 - Fraction(math.comb(n - g, k), math.comb(n, k)))


def rank_metrics(ranking: Sequence[int], gold: Iterable[int], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """hit@k and reciprocal rank of one ranking (segment ids, best first) against the gold segments.

    A ranking without any gold segment scores 0 everywhere.
    """
    gold = set(gold)
    first = next((r for r, idx in enumerate(ranking, 1) if idx in gold), None)
    out = {f"hit@{k}": float(first is not None and first <= k) for k in ks}
    out["mrr"] = 0.0 if first is None else 1.0 / first
    return out


def _mean(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def summarize(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-mode metrics of batch-QA results.

    Each record is a dict with (all optional except ``prediction``):

    * ``mode``: the system that answered (``"default"`` when missing);
    * ``prediction``: the predicted answer (None, e.g. after an error, counts as wrong);
    * ``answer``: the gold answer (a string, or a list of acceptable answers); ``answers`` may
      hold more acceptable answers for open questions;
    * ``options``: the options of a closed question (a record with options is closed, otherwise open);
    * ``segments_ranked``: the retrieved evidence as the document's HMT segment ids, best first
      (None where the mode does not rank, e.g. ``none``); ``gold_segments``: the segments that overlap
      gold evidence; ``n_segments``: the document's segment count (for the chance level);
    * ``latency_s``: seconds spent on the question.

    Records without a gold answer count only towards latency and hit@k; records without gold
    evidence or without a ranking do not count towards hit@k. ``chance_hit@k`` is the mean over the
    same records of a uniformly random ranking's hit@k. A metric with no records to compute it on is None.

    Args:
        records: The result records.

    Returns:
        ``{mode: {"n", "n_closed", "accuracy", "macro_f1", "n_open", "exact_match", "token_f1",
        "n_evidence", "hit@1", "hit@5", "chance_hit@1", "chance_hit@5", "n_latency", "latency_mean_s", "latency_p50_s",
        "latency_p95_s"}}``, modes in order of first appearance.
    """
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for rec in records:
        groups[str(rec.get("mode") or "default")].append(rec)

    out: dict[str, dict[str, Any]] = {}
    for mode, recs in groups.items():
        closed_p: list[Any] = []
        closed_g: list[Any] = []
        labels: dict[str, None] = {}
        em: list[float] = []
        f1: list[float] = []
        hit1: list[bool] = []
        hit5: list[bool] = []
        chance1: list[float] = []
        chance5: list[float] = []
        lat: list[float] = []
        for rec in recs:
            gold = rec.get("answer")
            options = rec.get("options")
            if gold not in (None, "", []):
                if options:
                    closed_p.append(rec.get("prediction"))
                    closed_g.append(gold[0] if isinstance(gold, (list, tuple)) else gold)
                    labels.update(dict.fromkeys(normalize_label(o) for o in options))
                else:
                    golds = _as_list(gold) + [a for a in rec.get("answers") or [] if isinstance(a, str)]
                    em.append(exact_match(rec.get("prediction"), golds))
                    f1.append(token_f1(rec.get("prediction"), golds))
            # Evidence is scored at one granularity, the document's HMT segments, whatever spans the
            # mode retrieved (segments, 800-character chunks, one window): see batch.segment_ranking.
            ranked, gold_seg, n_seg = rec.get("segments_ranked"), rec.get("gold_segments"), rec.get("n_segments")
            if ranked is not None and gold_seg and n_seg:
                hits = rank_metrics(ranked, gold_seg)
                hit1.append(bool(hits["hit@1"]))
                hit5.append(bool(hits["hit@5"]))
                chance1.append(chance_hit_at_k(int(n_seg), len(gold_seg), 1))
                chance5.append(chance_hit_at_k(int(n_seg), len(gold_seg), 5))
            latency = rec.get("latency_s")
            if isinstance(latency, (int, float)) and not isinstance(latency, bool) and math.isfinite(latency):
                lat.append(float(latency))
        out[mode] = {
            "n": len(recs),
            "n_closed": len(closed_g),
            "accuracy": accuracy(closed_p, closed_g) if closed_g else None,
            "macro_f1": macro_f1(closed_p, closed_g, labels=list(labels)) if closed_g else None,
            "n_open": len(em),
            "exact_match": _mean(em),
            "token_f1": _mean(f1),
            "n_evidence": len(hit1),
            "hit@1": _mean([float(h) for h in hit1]),
            "hit@5": _mean([float(h) for h in hit5]),
            "chance_hit@1": _mean(chance1),
            "chance_hit@5": _mean(chance5),
            "n_latency": len(lat),
            "latency_mean_s": _mean(lat),
            "latency_p50_s": float(np.percentile(lat, 50)) if lat else None,
            "latency_p95_s": float(np.percentile(lat, 95)) if lat else None,
        }
    return out
