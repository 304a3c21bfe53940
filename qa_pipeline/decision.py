"""Decision heads: how a closed question's answer is chosen from the model's own scores.

A small LM's likelihood of "yes" outweighs what a document says: asked about PubMedQA abstracts,
SmolLM2 answers "yes" to 97 of 100. A decision head re-reads the two things the answering pass
already computes and corrects that prior, so scoring stays one call:

    logit_o = a * log p(option o | prompt) + b_o + w_o . (h - mu) / sigma

``h`` is the last layer's state at the prompt's last token, the very vector the LM head turns into
the first answer token, so ``w`` trains the decision token itself, without the ~50 explanation
tokens that follow it in a long answer. ``b`` is per-option (contextual) calibration. Heads are fitted
on cached features of document-grounded training questions with classes balanced
(:func:`fit_option_head`), one head per option set, and saved beside the checkpoint; option sets
without a head keep plain likelihood.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

HEADS_FILE = "decision_heads.json"
WEIGHTS_FILE = "decision_heads.safetensors"
# What ``Answer.recall_score`` is, i.e. the signal an open-answer recall threshold was fitted on:
# the best logit of the pooled passage head ("passage"), or of the late-interaction head ("tokens").
RECALL_SIGNALS = ("passage", "tokens")


def below(name: str, value: float, threshold: float, digits: int = 2) -> str:
    """"<name> <value> is below <threshold>", with as many decimals (from ``digits``, at most 6) as it
    takes for the two numbers to read differently (not "0.34 is below 0.34")."""
    while digits < 6 and f"{value:.{digits}f}" == f"{threshold:.{digits}f}":
        digits += 1
    return f"{name} {value:.{digits}f} is below {threshold:.{digits}f}"


def option_key(options: list[str]) -> tuple[str, ...]:
    """An option set's identity: its normalised labels, in any order."""
    return tuple(sorted(" ".join(o.lower().split()) for o in options))


@dataclass
class OptionHead:
    """One option set's decision head (see the module docstring for the formula)."""

    options: list[str]  # normalised labels, in the order of ``bias`` and the rows of ``weight``
    lm_weight: float
    bias: np.ndarray  # (n,)
    weight: np.ndarray  # (n, d)
    center: np.ndarray  # (d,)
    scale: np.ndarray  # (d,)
    # Confidence (the head's probability of its answer) below which the answer is "not in the
    # document"; fitted on training data, 0 = never.
    threshold: float = 0.0
    info: dict = field(default_factory=dict)  # how it was fitted (data, n, cross-validated scores)

    def logits(self, logprobs: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        """Logits in ``self.options`` order from log-likelihoods in that order and the state h; both
        may carry a leading batch dimension."""
        z = (np.asarray(hidden, dtype=np.float64) - self.center) / self.scale
        return self.lm_weight * np.asarray(logprobs, dtype=np.float64) + self.bias + z @ self.weight.T


class DecisionHeads:
    """The heads of one checkpoint, found by option set."""

    def __init__(
        self,
        heads: list[OptionHead] | None = None,
        open_threshold: float = 0.0,
        open_recall_threshold: float | None = None,
        open_recall_signal: str = "passage",
        open_thresholds: dict[str, float] | None = None,
    ) -> None:
        if open_recall_signal not in RECALL_SIGNALS:
            raise ValueError(f"unknown recall signal {open_recall_signal!r}; one of {', '.join(RECALL_SIGNALS)}")
        self.heads = {option_key(h.options): h for h in heads or []}
        # Open answers with a confidence below this say the document does not seem to say (0: never),
        # in the HMT modes that have no threshold of their own in ``open_thresholds``.
        self.open_threshold = open_threshold
        # Mode -> confidence threshold fitted on that mode's own answers: an answer's confidence reads
        # differently with recalled passages in the prompt (hmt+retrieval) than without (hmt).
        self.open_thresholds = dict(open_thresholds or {})
        # ... and so do those whose recall score (a passage head's best logit for the question, see
        # ``Answer.recall_score``) is below this; a logit, so None (not 0) means never.
        self.open_recall_threshold = open_recall_threshold
        # Which head's logit that threshold was fitted on: the engine computes that one.
        self.open_recall_signal = open_recall_signal

    def __bool__(self) -> bool:
        return (
            bool(self.heads)
            or self.open_threshold > 0
            or any(t > 0 for t in self.open_thresholds.values())
            or self.open_recall_threshold is not None
        )

    def open_threshold_for(self, mode: str | None) -> float:
        """The confidence threshold of open answers in ``mode``: its own, else the shared one."""
        return self.open_thresholds.get(mode, self.open_threshold)

    def open_abstains(
        self, confidence: float | None, recall_score: float | None, mode: str | None = None
    ) -> str | None:
        """Why an open answer of the HMT modes (``mode``, for its own confidence threshold) says the
        document does not seem to say; None when it answers."""
        threshold = self.open_threshold_for(mode)
        if threshold and confidence is not None and confidence < threshold:
            return below("confidence", confidence, threshold)
        if self.open_recall_threshold is not None and recall_score is not None:
            if recall_score < self.open_recall_threshold:
                return (
                    below("recall score", recall_score, self.open_recall_threshold, digits=1)
                    + ": no passage matches the question well"
                )
        return None

    def find(self, options: list[str]) -> tuple[OptionHead, list[int]] | None:
        """The head for ``options`` and, for each of the user's options, its index in the head."""
        head = self.heads.get(option_key(options))
        if head is None:
            return None
        order = [head.options.index(" ".join(o.lower().split())) for o in options]
        return head, order

    def decide(
        self, options: list[str], logprobs: np.ndarray, hidden: np.ndarray
    ) -> tuple[np.ndarray, float] | None:
        """Probabilities of the user's options (their order) and the abstention threshold, or None
        when no head knows this option set."""
        found = self.find(options)
        if found is None:
            return None
        head, order = found
        inv = np.argsort(order)  # head order -> user order
        logits = head.logits(np.asarray(logprobs)[inv], hidden)[order]
        probs = np.exp(logits - logits.max())
        return probs / probs.sum(), head.threshold

    def digest(self) -> str:
        """A short hash of every head and threshold: answers given under other heads differ."""
        h = hashlib.sha256(repr(self.open_threshold).encode())
        if self.open_recall_threshold is not None:  # absent from older digests, which stay valid
            h.update(repr(self.open_recall_threshold).encode())
        if self.open_recall_signal != "passage":  # likewise
            h.update(self.open_recall_signal.encode())
        if self.open_thresholds:  # likewise
            h.update(json.dumps(self.open_thresholds, sort_keys=True).encode())
        for key in sorted(self.heads):
            head = self.heads[key]
            h.update(json.dumps([head.options, head.lm_weight, head.threshold]).encode())
            for name in ("bias", "weight", "center", "scale"):
                h.update(np.ascontiguousarray(getattr(head, name), dtype=np.float32).tobytes())
        return h.hexdigest()[:16]

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        tensors, meta = {}, []
        for i, head in enumerate(self.heads.values()):
            for name in ("bias", "weight", "center", "scale"):
                tensors[f"{i}.{name}"] = np.ascontiguousarray(getattr(head, name), dtype=np.float32)
            meta.append(
                {
                    "options": head.options,
                    "lm_weight": head.lm_weight,
                    "threshold": head.threshold,
                    "info": head.info,
                }
            )
        if tensors:
            save_file(tensors, str(folder / WEIGHTS_FILE))
        body = {
            "heads": meta,
            "open_threshold": self.open_threshold,
            "open_recall_threshold": self.open_recall_threshold,
            "open_recall_signal": self.open_recall_signal,
            "open_thresholds": self.open_thresholds,
        }
        (folder / HEADS_FILE).write_text(json.dumps(body, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> DecisionHeads:
        """The heads saved in ``folder``; none (plain likelihood) when the checkpoint has no heads."""
        folder = Path(folder)
        if not (folder / HEADS_FILE).is_file():
            return cls()
        body = json.loads((folder / HEADS_FILE).read_text())
        meta = body["heads"]
        tensors = load_file(str(folder / WEIGHTS_FILE)) if meta else {}
        heads = []
        for i, m in enumerate(meta):
            arrays = {
                name: tensors[f"{i}.{name}"].astype(np.float64)
                for name in ("bias", "weight", "center", "scale")
            }
            heads.append(
                OptionHead(
                    options=list(m["options"]),
                    lm_weight=float(m["lm_weight"]),
                    threshold=float(m.get("threshold", 0.0)),
                    info=m.get("info", {}),
                    **arrays,
                )
            )
        recall_threshold = body.get("open_recall_threshold")
        return cls(
            heads,
            open_threshold=float(body.get("open_threshold", 0.0)),
            open_recall_threshold=None if recall_threshold is None else float(recall_threshold),
            # Checkpoints saved before there was a choice fitted the pooled passage head's logit.
            open_recall_signal=body.get("open_recall_signal", "passage"),
            # Checkpoints saved before thresholds per mode had one for every HMT mode.
            open_thresholds={m: float(t) for m, t in body.get("open_thresholds", {}).items()},
        )


def fit_option_head(
    options: list[str],
    logprobs: np.ndarray,
    hidden: np.ndarray,
    labels: np.ndarray,
    *,
    l2: float = 1.0,
    use_hidden: bool = True,
    steps: int = 200,
) -> OptionHead:
    """Fit one head by class-balanced cross-entropy (each class weighs the same in the loss).

    Args:
        options: normalised labels; ``labels`` index into them.
        logprobs: (N, n) option log-likelihoods; hidden: (N, d) decision states; labels: (N,).
        l2: penalty on ``w`` (standardised features), as a multiple of the mean loss; the
            calibration terms ``a`` and ``b`` are not penalised.
        use_hidden: False fits calibration only (``a`` and ``b``; ``w`` = 0), for small data.
    """
    logprobs = np.asarray(logprobs, dtype=np.float64)
    hidden = np.asarray(hidden, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    n_options, d = logprobs.shape[1], hidden.shape[1]
    center = hidden.mean(axis=0)
    scale = hidden.std(axis=0) + 1e-6
    z = torch.from_numpy((hidden - center) / scale)
    lp = torch.from_numpy(logprobs)
    y = torch.from_numpy(labels)
    counts = np.bincount(labels, minlength=n_options).astype(np.float64)
    class_weight = torch.from_numpy(
        np.where(counts > 0, len(labels) / (n_options * np.maximum(counts, 1)), 0.0)
    )

    a = torch.ones((), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_options, dtype=torch.float64, requires_grad=True)
    w = torch.zeros(n_options, d, dtype=torch.float64, requires_grad=use_hidden)
    params = [a, b] + ([w] if use_hidden else [])
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = a * lp + b + z @ w.T
        loss = torch.nn.functional.cross_entropy(logits, y, weight=class_weight)
        # A light pull towards plain likelihood keeps separable data from sending a and b to infinity.
        loss = loss + 1e-3 * ((a - 1) ** 2 + (b**2).sum())
        if use_hidden:
            loss = loss + l2 * (w**2).sum() / d
        loss.backward()
        return loss

    opt.step(closure)
    return OptionHead(
        options=list(options),
        lm_weight=float(a.detach()),
        bias=b.detach().numpy().copy(),
        weight=w.detach().numpy().copy(),
        center=center,
        scale=scale,
    )


def head_probs(head: OptionHead, logprobs: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    """(N, n) probabilities of a head on a batch of features (in the head's option order)."""
    logits = head.logits(logprobs, hidden)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def auroc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """Chance that a positive scores above a negative (ties count half): 0.5 means no separation."""
    return float(((positives[:, None] > negatives[None]) + 0.5 * (positives[:, None] == negatives[None])).mean())


def fit_threshold(
    confidence_pos: np.ndarray,
    correct_pos: np.ndarray,
    confidence_neg: np.ndarray,
    *,
    max_abstain: float = 0.1,
    never: float = 0.0,
) -> tuple[float, dict]:
    """The "not in the document" threshold, from questions asked of their own document (positives:
    confidence and whether the answer was right) and of a document that lacks the answer (negatives).

    Most questions a user asks of a document are answerable, so the threshold may turn away at most
    ``max_abstain`` of the positives: it is that quantile of their confidence. What it buys is
    reported beside it: the share of negatives it catches (no better than ``max_abstain`` when
    confidence does not tell the two apart) and the accuracy of the positives it keeps. When it
    catches fewer than twice as many negatives as positives it turns away, it is ``never``: 0 for
    confidences in [0, 1], ``-inf`` for scores of any sign such as logits (reported as None).
    """
    pos, neg = np.asarray(confidence_pos, float), np.asarray(confidence_neg, float)
    correct = np.asarray(correct_pos, bool)
    t = float(np.quantile(pos, max_abstain, method="lower")) if len(pos) else 0.0
    kept = pos >= t
    caught = float((neg < t).mean()) if len(neg) else 0.0
    # A threshold that catches no more unanswerable questions than it turns answerable ones away
    # (twice as many, at least) would only cost answers: then never abstain.
    useful = caught >= 2 * float((~kept).mean()) if len(pos) else False
    info_t = t
    if not useful:
        t, kept = never, np.ones_like(pos, dtype=bool)
    return t, {
        "threshold": t if np.isfinite(t) else None,
        "useful": useful,
        "candidate_threshold": info_t,
        "max_abstain": max_abstain,
        "positives_abstained": float((~kept).mean()) if len(pos) else 0.0,
        "negatives_abstained": float((neg < t).mean()) if len(neg) else 0.0,
        "negatives_below_candidate": caught,
        # How well confidence ranks answerable above unanswerable questions (0.5: not at all).
        "auroc": auroc(pos, neg) if len(pos) and len(neg) else None,
        "accuracy_all_positives": float(correct.mean()) if len(pos) else 0.0,
        "accuracy_kept_positives": float(correct[kept].mean()) if kept.any() else 0.0,
        "n_positive": int(len(pos)),
        "n_negative": int(len(neg)),
    }
