"""``hmtqa eval qa``: answers on three dev sets, every answer mode side by side, with 95% bootstrap
intervals and the majority-class and chance lines.

Sets (:data:`SETS`):

* ``pubmedqa``: the held-out fused PubMedQA questions 401-500 (:func:`qa_pipeline.train_data.pubmedqa_split`),
  closed (yes / no / maybe): accuracy and macro-F1;
* ``covid-qa``: COVID-QA dev questions on the eval half of the articles
  (:func:`qa_pipeline.recall_eval.is_eval_article`), open: token F1 and exact match (SQuAD, max over
  the gold answers);
* ``evidence-inference``: Evidence Inference prompts on the eval half of the articles, closed (three
  options): accuracy and macro-F1.

Answers come from :func:`qa_pipeline.batch.run_batch` (one resumable JSONL per set); everything else
here is pure statistics on the rows and their records:

* a record with an ``error`` counts as wrong (F1 0) and is reported in ``n_errors``; a (row, mode) with
  no record at all counts the same way;
* a record with ``abstained: true`` is a prediction of :data:`NOT_IN_DOCUMENT`: wrong on a closed set,
  F1 0 on an open one; the abstention rate is reported per mode;
* CIs are 95% percentile bootstrap intervals over rows (the same resampled rows for every mode, so
  modes are compared on the same draws); macro-F1's interval recomputes macro-F1 on each resample;
* majority class: always answer the most frequent gold label of the evaluated rows (ties go to the
  earlier option); chance: a uniformly random option per row, accuracy the mean of ``1 / n_options``
  and the *exact* expected macro-F1 when every row has the same options and each option is some row's
  gold label (then macro-F1 is a mean of per-label F1s whose true and false positives are independent
  binomials), else a seeded simulation (the result says which);
* closed sets again at the class balance of their training questions (:func:`training_prior`): each
  row weighted by its gold label's share there over its share here, the majority line at that
  balance beside them. 100 dev rows can be balanced quite unlike the data (PubMedQA 401-500: 45% "no";
  1-400: 58% "yes"), and a head that looks above the majority on one balance may not be on the other.

Over 500 lines: one command's parts (three data sets, per-set scoring, the bootstrap, majority and
chance lines, the Markdown table), each short and used nowhere else.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .answer_text import answer_phrase
from .metrics import exact_match, macro_f1, merge_spans, normalize_label, spans_overlap, token_f1
from .qa_data import QARow

__all__ = [
    "SETS",
    "NOT_IN_DOCUMENT",
    "load_eval_set",
    "repeats_ngram",
    "bootstrap_ci",
    "macro_f1_matrix",
    "majority_line",
    "prior_weights",
    "training_prior",
    "chance_line",
    "expected_chance_macro_f1",
    "latest_records",
    "evaluate_set",
    "run_qa_eval",
    "format_markdown",
]

SETS = ("pubmedqa", "covid-qa", "evidence-inference")
NOT_IN_DOCUMENT = "not in the document"
BASELINE = "dense-rag"  # open answers are compared with it row by row
COVIDQA_FILE = "covid-qa/covidqa_dev.json"
EVIDENCE_INFERENCE_DIR = "evidence-inference"
CLOSED_METRICS = ("accuracy", "macro_f1")
OPEN_METRICS = ("token_f1", "exact_match")
LEVEL = 0.95
CHANCE_DRAWS = 20_000  # simulated guesses when the chance macro-F1 cannot be computed exactly

# Pseudo-labels of closed predictions that are none of the options.
ABSTAINED = "(not in document)"
ERROR = "(error)"
OTHER = "(other)"


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def load_eval_set(
    name: str, root: str | Path, *, limit: int | None, fuse: int = 8, seed: int = 0
) -> list[QARow]:
    """The evaluation rows of set ``name`` (one of :data:`SETS`), at most ``limit`` of them.

    PubMedQA and Evidence Inference keep the first ``limit`` rows; COVID-QA deals its ``limit``
    questions round-robin over the articles (:func:`qa_pipeline.recall_eval.select_rows`).

    Raises:
        ValueError: unknown set. FileNotFoundError / QADataError: data missing or malformed.
    """
    from .datasets import covid_qa, evidence_inference
    from .recall_eval import is_eval_article, select_rows
    from .train_data import pubmedqa_split

    root = Path(root)
    limit = limit if limit and limit > 0 else None
    if name == "pubmedqa":
        rows = pubmedqa_split(root, num_docs=fuse, seed=seed)[1]
        return rows[:limit]
    if name == "covid-qa":
        path = root / COVIDQA_FILE
        if not path.is_file():
            raise FileNotFoundError(f"COVID-QA data not found: {path}")
        rows = [r for r in covid_qa(path) if is_eval_article(r.document_id())]
        return select_rows(rows, limit_docs=None, limit_questions=limit)
    if name == "evidence-inference":
        path = root / EVIDENCE_INFERENCE_DIR
        if not path.is_dir():
            raise FileNotFoundError(f"Evidence Inference data not found: {path}")
        rows = [r for r in evidence_inference(path) if is_eval_article(r.document_id())]
        return rows[:limit]
    raise ValueError(f"unknown set {name!r}; choose from {', '.join(SETS)}")


def training_prior(name: str, root: str | Path) -> dict[str, Any] | None:
    """The class balance of set ``name``'s training questions (those the decision heads were fitted
    on; never evaluated), or None for an open set.

    Dev rows are few and their balance can differ from the training questions': PubMedQA questions
    401-500 are 45% "no" where questions 1-400 (and PubMedQA as a whole) are 58% (55%) "yes". Accuracy
    reweighted to the training balance (:func:`evaluate_set`, ``prior``) says what to expect on data
    labelled like the training questions, beside the dev rows' own figure.

    Returns:
        ``{"source", "n", "shares"}``, shares by normalised label.
    """
    from .datasets import evidence_inference
    from .recall_eval import is_train_article
    from .train_data import pubmedqa_split

    root = Path(root)
    if name == "pubmedqa":
        rows = pubmedqa_split(root, num_docs=1)[0]
        source = f"PubMedQA questions 1-{len(rows)}"
    elif name == "evidence-inference":
        path = root / EVIDENCE_INFERENCE_DIR
        rows = [r for r in evidence_inference(path) if is_train_article(r.document_id())]
        source = "Evidence Inference questions of the training-half articles"
    else:
        return None
    counts = Counter(normalize_label(r.answer) for r in rows)
    return {"source": source, "n": len(rows), "shares": {lab: c / len(rows) for lab, c in counts.items()}}


# --------------------------------------------------------------------------------------------------
# Statistics (pure)
# --------------------------------------------------------------------------------------------------


def repeats_ngram(text: str | None, n: int = 8) -> bool:
    """Whether some run of ``n`` whitespace tokens occurs twice in ``text`` (overlaps allowed)."""
    tokens = (text or "").split()
    seen: set[tuple[str, ...]] = set()
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i : i + n])
        if gram in seen:
            return True
        seen.add(gram)
    return False


def _resample_index(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentile_ci(stats: np.ndarray, level: float) -> tuple[float, float] | None:
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return None
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_ci(
    values: Sequence[float] | None = None,
    *,
    n: int | None = None,
    statistic: Callable[[np.ndarray], np.ndarray] | None = None,
    resamples: int = 1000,
    seed: int = 0,
    level: float = LEVEL,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval over rows.

    Either ``values`` (per-row scores; the statistic is their mean) or ``n`` rows and a vectorised
    ``statistic`` that maps a ``(resamples, n)`` array of row indices to one value per resample.
    Draws come from ``numpy.random.default_rng(seed)``, so equal inputs give equal intervals.

    Returns:
        ``(lo, hi)``, or None with no rows or ``resamples < 1``.
    """
    if values is not None:
        arr = np.asarray(values, dtype=float)
        n = arr.size

        def statistic(idx: np.ndarray) -> np.ndarray:
            return arr[idx].mean(axis=1)

    if statistic is None or not n or resamples < 1:
        return None
    return _percentile_ci(np.asarray(statistic(_resample_index(n, resamples, seed)), dtype=float), level)


def _encode(
    preds: Sequence[Any], golds: Sequence[Any], labels: Sequence[Any]
) -> tuple[np.ndarray, np.ndarray, int]:
    """Labels as ints 0..K-1 (normalised); anything else (abstention, error, other text) is K."""
    index = {lab: i for i, lab in enumerate(dict.fromkeys(normalize_label(x) for x in labels))}
    k = len(index)
    p = np.array([index.get(normalize_label(x), k) for x in preds], dtype=np.int64)
    g = np.array([index.get(normalize_label(x), k) for x in golds], dtype=np.int64)
    return p, g, k


def macro_f1_matrix(p: np.ndarray, g: np.ndarray, k: int, w: np.ndarray | None = None) -> np.ndarray:
    """Macro-F1 of each row of encoded predictions ``p`` and golds ``g`` (same shape, ``(B, n)``).

    Labels are ``0..k-1``; ``k`` stands for any non-label. A label neither predicted nor gold in a row
    is left out of that row's mean, exactly as :func:`qa_pipeline.metrics.macro_f1` does. ``w`` (same
    shape, optional) weighs each question in the counts of true and false positives and negatives.
    """
    p = np.atleast_2d(p)
    g = np.atleast_2d(g)
    w = np.ones(p.shape) if w is None else np.broadcast_to(np.atleast_2d(w), p.shape)
    total = np.zeros(p.shape[0])
    present = np.zeros(p.shape[0])
    for label in range(k):
        pk, gk = p == label, g == label
        tp = ((pk & gk) * w).sum(axis=1)
        fp = ((pk & ~gk) * w).sum(axis=1)
        fn = ((~pk & gk) * w).sum(axis=1)
        denom = 2 * tp + fp + fn
        has = denom > 0
        total += np.where(has, 2 * tp / np.where(has, denom, 1), 0.0)
        present += has
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(present > 0, total / np.maximum(present, 1), np.nan)


def _counts(golds: Sequence[Any], labels: Sequence[Any]) -> dict[str, int]:
    order = list(dict.fromkeys(normalize_label(x) for x in labels))
    c = Counter(normalize_label(x) for x in golds)
    return {lab: c.get(lab, 0) for lab in order} | {lab: n for lab, n in c.items() if lab not in order}


def majority_line(golds: Sequence[Any], labels: Sequence[Any]) -> dict[str, Any]:
    """Always answering the most frequent gold label (ties: the earlier one in ``labels``).

    Returns:
        ``{"label", "accuracy", "macro_f1"}`` (macro-F1 over ``labels``, as :func:`metrics.macro_f1`).
    """
    if not golds:
        return {"label": None, "accuracy": None, "macro_f1": None}
    counts = _counts(golds, labels)
    label = max(counts, key=lambda lab: counts[lab])  # max keeps the first of equal counts
    preds = [label] * len(golds)
    return {
        "label": label,
        "accuracy": counts[label] / len(golds),
        "macro_f1": macro_f1(preds, golds, labels=labels),
    }


def labels_without_rows(golds: Sequence[Any], shares: Mapping[str, float]) -> list[str]:
    """The labels with a share in ``shares`` that no row has as its gold label."""
    counts = Counter(normalize_label(x) for x in golds)
    return [lab for lab, share in shares.items() if share > 0 and not counts.get(lab)]


def prior_weights(golds: Sequence[Any], shares: Mapping[str, float]) -> np.ndarray | None:
    """Per-row weights that give the rows the class balance ``shares``: a row of gold label c weighs
    share(c) / (the rows' share of c). None when some label with a share has no row (no weighting
    can stand in for it: :func:`labels_without_rows`)."""
    if not golds or labels_without_rows(golds, shares):
        return None
    counts = Counter(normalize_label(x) for x in golds)
    n = len(golds)
    return np.array([shares.get(lab, 0.0) * n / counts[lab] for lab in map(normalize_label, golds)])


def _binom_pmf(n: int, p: float) -> np.ndarray:
    if p >= 1:
        out = np.zeros(n + 1)
        out[n] = 1.0
        return out
    k = np.arange(n + 1)
    logc = np.array([math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in k])
    return np.exp(logc + k * math.log(p) + (n - k) * math.log1p(-p))


def expected_chance_macro_f1(gold_counts: Sequence[int]) -> float:
    """Exact expected macro-F1 of uniformly random guesses among ``K = len(gold_counts)`` labels.

    Needs every label to be some row's gold label (every count > 0): then every label is present in
    every draw, macro-F1 is the mean of the per-label F1 = 2 TP / (n_k + TP + FP), and TP ~ Bin(n_k, 1/K)
    and FP ~ Bin(n - n_k, 1/K) are independent, so each expectation is a double sum.
    """
    counts = [int(c) for c in gold_counts]
    if not counts or min(counts) < 1:
        raise ValueError("exact chance macro-F1 needs every label among the golds")
    n, k = sum(counts), len(counts)
    p = 1 / k
    f1s = []
    for n_k in counts:
        tp = np.arange(n_k + 1)[:, None]
        fp = np.arange(n - n_k + 1)[None, :]
        weight = _binom_pmf(n_k, p)[:, None] * _binom_pmf(n - n_k, p)[None, :]
        f1s.append(float((weight * (2 * tp / (n_k + tp + fp))).sum()))
    return float(np.mean(f1s))


def chance_line(
    golds: Sequence[Any],
    options: Sequence[Sequence[Any]],
    *,
    draws: int = CHANCE_DRAWS,
    seed: int = 0,
) -> dict[str, Any]:
    """Uniformly random guessing among each row's ``options``.

    Returns:
        ``{"accuracy", "macro_f1", "macro_f1_method"}``: accuracy is the exact expectation (mean of
        ``1 / len(options)``); macro-F1 is exact (:func:`expected_chance_macro_f1`) when all rows share
        one option set and every option is some gold label, else the mean over ``draws`` seeded
        simulated guesses (method ``"simulation (N draws, seed S)"``).
    """
    if not golds:
        return {"accuracy": None, "macro_f1": None, "macro_f1_method": None}
    labels = list(dict.fromkeys(normalize_label(o) for opts in options for o in opts))
    accuracy = float(np.mean([1 / len(opts) for opts in options]))
    same = len({tuple(normalize_label(o) for o in opts) for opts in options}) == 1
    counts = _counts(golds, labels)
    if same and all(counts.get(lab, 0) > 0 for lab in labels) and len(counts) == len(labels):
        return {
            "accuracy": accuracy,
            "macro_f1": expected_chance_macro_f1([counts[lab] for lab in labels]),
            "macro_f1_method": "exact",
        }
    _, g, k = _encode([], golds, labels)
    rng = np.random.default_rng(seed)
    row_opts = [np.array([labels.index(normalize_label(o)) for o in opts]) for opts in options]
    p = np.stack([opts[rng.integers(0, len(opts), size=draws)] for opts in row_opts], axis=1)
    sims = macro_f1_matrix(p, np.broadcast_to(g, p.shape), k)
    return {
        "accuracy": accuracy,
        "macro_f1": float(np.nanmean(sims)),
        "macro_f1_method": f"simulation ({draws} draws, seed {seed})",
    }


# --------------------------------------------------------------------------------------------------
# Records -> per-set result
# --------------------------------------------------------------------------------------------------


def latest_records(path: str | Path) -> dict[tuple[str, str], dict]:
    """The last record of each (row id, mode) in a run_batch JSONL (torn lines skipped)."""
    out: dict[tuple[str, str], dict] = {}
    path = Path(path)
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
            out[(str(rec["row_id"]), str(rec["mode"]))] = rec
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return out


def _golds(row: QARow) -> list[str]:
    extra = [a for a in (row.metadata or {}).get("answers") or [] if isinstance(a, str)]
    return list(dict.fromkeys([row.answer or "", *extra]))


def _doc_count(rows: Sequence[QARow]) -> int:
    ids = set()
    for row in rows:
        try:
            ids.add(row.document_id())
        except (OSError, ValueError):
            ids.add(row.doc_id or row.document_path or row.row_id)
    return len(ids)


def _prediction(rec: Mapping[str, Any] | None) -> tuple[str | None, str]:
    """(prediction text, status) with status ``ok``, ``error`` (or no record) or ``abstained``."""
    if rec is None or rec.get("error"):
        return None, "error"
    if rec.get("abstained") is True:
        return NOT_IN_DOCUMENT, "abstained"
    pred = rec.get("prediction")
    return (None if pred is None else str(pred)), "ok"


def _metric(value: float | None, ci: tuple[float, float] | None) -> dict[str, Any]:
    v = None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
    return {"value": v, "ci": list(ci) if ci is not None and v is not None else None}


def evaluate_set(
    rows: Sequence[QARow],
    records: Mapping[tuple[str, str], Mapping[str, Any]],
    modes: Sequence[str],
    *,
    resamples: int = 1000,
    seed: int = 0,
    prior: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Per-mode metrics with bootstrap CIs, plus the majority and chance lines, for one set.

    A set is closed when its rows have options (accuracy, macro-F1 over the union of the options,
    predicted-option counts) and open otherwise (token F1, exact match against the answer and
    ``metadata["answers"]``, share of answers repeating an 8-token phrase). ``records`` maps
    ``(row_id, mode)`` to a run_batch record; see the module doc for errors and abstentions.

    ``prior`` (closed sets; :func:`training_prior`) adds ``at_prior``: accuracy and macro-F1 with the
    rows reweighted to that class balance (:func:`prior_weights`), per mode and for the majority
    class at that balance, with intervals from the same resampled rows.
    """
    closed = any(row.options for row in rows)
    n = len(rows)
    result: dict[str, Any] = {
        "kind": "closed" if closed else "open",
        "n": n,
        "n_documents": _doc_count(rows),
        "bootstrap": {"resamples": resamples, "seed": seed, "level": LEVEL},
        "modes": {},
    }
    if closed:
        labels = list(dict.fromkeys(normalize_label(o) for row in rows for o in row.options or []))
        golds = [row.answer for row in rows]
        result["options"] = labels
        result["gold_counts"] = _counts(golds, labels)
        result["majority"] = majority_line(golds, labels)
        result["chance"] = chance_line(golds, [row.options or labels for row in rows], seed=seed)
        weights = prior_weights(golds, prior["shares"]) if prior else None
        if prior:
            result["prior"] = dict(prior) | {
                "applied": weights is not None,
                "missing": labels_without_rows(golds, prior["shares"]),
            }
        if weights is not None:
            label = max(prior["shares"], key=lambda lab: prior["shares"][lab])
            always, g, k = _encode([label] * n, golds, labels)
            result["prior"]["majority"] = {
                "label": label,
                "accuracy": float(np.average(always == g, weights=weights)),
                "macro_f1": float(macro_f1_matrix(always, g, k, weights)[0]),
            }
    else:
        result["majority"] = None
        result["chance"] = None

    per_row: dict[str, np.ndarray] = {}  # open sets: token F1 per row without the threshold
    for mode in modes:
        preds, status = (
            zip(*(_prediction(records.get((row.row_id, mode))) for row in rows), strict=True)
            if rows
            else ((), ())
        )
        n_err = status.count("error")
        n_abs = status.count("abstained")
        m: dict[str, Any] = {
            "n": n,
            "n_errors": n_err,
            "n_abstained": n_abs,
            "abstention_rate": n_abs / n if n else None,
        }
        if closed:
            p, g, k = _encode(preds, golds, labels)
            correct = (p == g) & (p < k)
            acc = float(correct.mean()) if n else None
            mf1 = float(macro_f1_matrix(p, g, k)[0]) if n else None
            m["metrics"] = {
                "accuracy": _metric(acc, bootstrap_ci(correct.astype(float), resamples=resamples, seed=seed)),
                "macro_f1": _metric(
                    mf1,
                    bootstrap_ci(
                        n=n,
                        statistic=lambda idx, p=p, g=g, k=k: macro_f1_matrix(p[idx], g[idx], k),
                        resamples=resamples,
                        seed=seed,
                    ),
                ),
            }
            if weights is not None:
                m["at_prior"] = _at_prior(correct, p, g, k, weights, resamples, seed)
            predicted = {lab: 0 for lab in labels} | {ABSTAINED: 0, ERROR: 0, OTHER: 0}
            for pred, st in zip(preds, status, strict=True):
                key = ERROR if st == "error" else ABSTAINED if st == "abstained" else normalize_label(pred)
                predicted[key if key in predicted else OTHER] += 1
            m["predicted"] = predicted
        else:
            f1 = np.array(
                [
                    0.0 if st != "ok" else token_f1(pr, _golds(row))
                    for pr, st, row in zip(preds, status, rows, strict=True)
                ]
            )
            em = np.array(
                [
                    0.0 if st != "ok" else exact_match(pr, _golds(row))
                    for pr, st, row in zip(preds, status, rows, strict=True)
                ]
            )
            answered = [pr for pr, st in zip(preds, status, strict=True) if st == "ok" and pr is not None]
            m["metrics"] = {
                "token_f1": _metric(
                    float(f1.mean()) if n else None, bootstrap_ci(f1, resamples=resamples, seed=seed)
                ),
                "exact_match": _metric(
                    float(em.mean()) if n else None, bootstrap_ci(em, resamples=resamples, seed=seed)
                ),
            }
            # Quoted answers: what the model's own words would have scored (--no-quote-answers gives
            # exactly these answers; abstentions stay wrong).
            recs = [records.get((row.row_id, mode)) or {} for row in rows]
            if any(rec.get("quoted") for rec in recs):
                own = np.array(
                    [
                        0.0 if st != "ok" else token_f1(answer_phrase(rec.get("sentence") or "", row.question), _golds(row))
                        for st, row, rec in zip(status, rows, recs, strict=True)
                    ]
                )
                m["metrics"]["token_f1_own_words"] = _metric(
                    float(own.mean()), bootstrap_ci(own, resamples=resamples, seed=seed)
                )
            # Without the "not in the document" threshold: an abstained answer scored by the short
            # answer of the sentence the model wrote (the best guess the CLI and UI show).
            per_row[mode] = _f1_no_threshold(f1, status, rows, records, mode) if n_abs else f1
            if n_abs:
                m["metrics"]["token_f1_no_threshold"] = _metric(
                    float(per_row[mode].mean()), bootstrap_ci(per_row[mode], resamples=resamples, seed=seed)
                )
            m["n_answered"] = len(answered)
            # Repetition is the generation's: the sentence the model wrote, of which the prediction
            # is the short answer (records from before short answers have the prediction alone).
            written = [
                (records.get((row.row_id, mode)) or {}).get("sentence") or pr
                for pr, st, row in zip(preds, status, rows, strict=True)
                if st == "ok" and pr is not None
            ]
            m["n_repeats_8gram"] = sum(repeats_ngram(a, 8) for a in written)
            m["repeats_8gram"] = m["n_repeats_8gram"] / len(answered) if answered else None
        # Where the answer's supporting sentence lies in the gold evidence (rows with evidence only).
        supported = [
            any(spans_overlap(tuple(rec["support"]), tuple(ev)) for ev in row.evidence)
            for row in rows
            if row.evidence
            for rec in [records.get((row.row_id, mode)) or {}]
            if rec.get("support")
        ]
        m["support_in_evidence"] = sum(supported) / len(supported) if supported else None
        if not closed:
            m["gold_in_prompt"] = _gold_in_prompt(rows, records, mode)
        m["n_support"] = len(supported)
        result["modes"][mode] = m
    # Open answers against the usual RAG script on the same questions (thresholds off: dense-rag has none).
    if BASELINE in per_row:
        for mode, scores in per_row.items():
            if mode != BASELINE:
                diff = scores - per_row[BASELINE]
                ci = bootstrap_ci(diff, resamples=resamples, seed=seed)
                result["modes"][mode]["vs_dense_rag"] = _metric(float(diff.mean()) if n else None, ci)
    return result


def _at_prior(correct, p, g, k, w, resamples: int, seed: int) -> dict[str, Any]:
    """Accuracy and macro-F1 with rows weighted by ``w``, each with its bootstrap interval."""
    return {
        "accuracy": _metric(
            float(np.average(correct, weights=w)),
            bootstrap_ci(
                n=len(w),
                statistic=lambda idx: np.average(correct[idx], weights=w[idx], axis=-1),
                resamples=resamples,
                seed=seed,
            ),
        ),
        "macro_f1": _metric(
            float(macro_f1_matrix(p, g, k, w)[0]),
            bootstrap_ci(
                n=len(w),
                statistic=lambda idx: macro_f1_matrix(p[idx], g[idx], k, w[idx]),
                resamples=resamples,
                seed=seed,
            ),
        ),
    }


def _f1_no_threshold(f1: np.ndarray, status, rows, records, mode: str) -> np.ndarray:
    """Token F1 per row with each abstained answer replaced by its best guess."""
    out = f1.copy()
    for i, (st, row) in enumerate(zip(status, rows, strict=True)):
        rec = records.get((row.row_id, mode)) or {}
        if st != "abstained":
            continue
        if rec.get("best_guess"):
            out[i] = token_f1(rec["best_guess"], _golds(row))
        elif rec.get("sentence"):  # records written before batch kept the best guess
            out[i] = token_f1(answer_phrase(rec["sentence"], row.question), _golds(row))
    return out


def _gold_in_prompt(rows: Sequence[QARow], records: Mapping, mode: str) -> float | None:
    """Share of rows whose gold answer span lies inside one piece of the text put into the prompt
    (the record's ``prompt_spans``); None when the mode puts in no text."""
    inside = []
    for row in rows:
        rec = records.get((row.row_id, mode)) or {}
        k = rec.get("prompt_passages")
        if not k or not row.evidence or rec.get("error"):
            continue
        spans = rec.get("prompt_spans")
        if spans is None:  # recorded by an older version: its evidence, touching items joined
            spans = merge_spans(rec.get("evidence_ranked", [])[:k])
        inside.append(any(s <= gs and ge <= e for s, e in spans for gs, ge in row.evidence))
    return sum(inside) / len(inside) if inside else None


# --------------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------------


def run_qa_eval(
    sets: Mapping[str, Sequence[QARow]],
    out_dir: str | Path,
    modes: Sequence[str],
    *,
    engine_factory: Callable[[], Any] | None,
    store_dir: str | Path,
    resamples: int = 1000,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
    meta: Mapping[str, Any] | None = None,
    priors: Mapping[str, Mapping[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """Answer every set's rows in every mode (resuming ``<out_dir>/<set>.jsonl``) and evaluate them.

    With ``engine_factory``, the model is loaded (``engine_factory()``) and the answers already in
    ``<out_dir>`` must carry its stamp (``ForeignAnswers`` otherwise), even when none is missing; without
    it, only finished files are summed up, as they are. ``meta`` (run settings) is added to the result;
    ``priors`` gives a closed set the class balance of its training questions (:func:`training_prior`).
    Writes ``<out_dir>/summary.json`` and ``<out_dir>/summary.md`` and returns the summary.
    """
    from .batch import batch_metrics, check_stamps, pending, run_batch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    modes = tuple(modes)
    engine = store = None
    result: dict[str, Any] = {
        "sets": {},
        "modes": list(modes),
        "bootstrap": {"resamples": resamples, "seed": seed, "level": LEVEL},
    }
    try:
        for name, rows in sets.items():
            path = out_dir / f"{name}.jsonl"
            missing = bool(rows) and pending(rows, path, modes)
            if missing and engine_factory is None:
                raise ValueError(f"{path} lacks answers and no model was given")
            if engine_factory is not None and (missing or path.is_file()):
                # Even with nothing to answer the model loads: only it knows its stamp, and a file of
                # another model's answers must not be summed up as this one's.
                if engine is None:
                    engine = engine_factory()
                check_stamps(path, engine.answer_stamp)
            if missing:
                if store is None:
                    store = engine.open_store(str(store_dir))
                cb = (
                    None if progress is None else (lambda done, total, name=name: progress(name, done, total))
                )
                run_batch(engine, list(rows), path, store, modes=modes, progress=cb)
            res = evaluate_set(
                rows, latest_records(path), modes, resamples=resamples, seed=seed, prior=(priors or {}).get(name)
            )
            extra = batch_metrics(path, rows, modes) if path.is_file() else {}
            for mode, m in res["modes"].items():
                b = extra.get(mode, {})
                m.update({k: b.get(k) for k in ("hit@1", "hit@5", "chance_hit@1", "chance_hit@5", "latency_p50_s")})
            res["out"] = str(path)
            result["sets"][name] = res
    finally:
        if store is not None:
            store.close()
    result.update(meta or {})
    (out_dir / "summary.json").write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    (out_dir / "summary.md").write_text(format_markdown(result) + "\n", encoding="utf-8")
    return result


# --------------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------------

_COLUMNS = (
    ("accuracy", "accuracy"),
    ("macro_f1", "macro-F1"),
    ("token_f1", "token F1"),
    ("exact_match", "EM"),
)


def _cell(metric: Mapping[str, Any] | None) -> str:
    if not metric or metric.get("value") is None:
        return "–"
    text = f"{metric['value']:.3f}"
    if metric.get("ci"):
        lo, hi = metric["ci"]
        text += f" [{lo:.3f}, {hi:.3f}]"
    return text


def _num(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}"


def _hits(m: Mapping[str, Any]) -> str:
    """Evidence hit@1 / hit@5 on the document's HMT segments, with a random ranking's in brackets."""
    if m.get("hit@1") is None:
        return "– (no ranking)"
    return f"{m['hit@1']:.2f} / {m['hit@5']:.2f} ({m['chance_hit@1']:.2f} / {m['chance_hit@5']:.2f})"


def format_markdown(result: Mapping[str, Any]) -> str:
    """One Markdown table: per set and mode the metrics with their 95% CI, then majority and chance."""
    head = [
        "set",
        "mode",
        "n (docs)",
        *(label + " [95% CI]" for _, label in _COLUMNS),
        "evidence hit@1 / hit@5 (chance)",
        "errors",
        "abstained",
        "answers",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|" + "---:|" * (len(_COLUMNS) + 3) + "---|"]
    methods: list[str] = []
    for name, s in result["sets"].items():
        n = f"{s['n']} ({s['n_documents']})"
        for mode, m in s["modes"].items():
            cells = [_cell(m["metrics"].get(key)) for key, _ in _COLUMNS]
            if s["kind"] == "closed":
                answers = ", ".join(
                    f"{k} {v}" for k, v in m["predicted"].items() if v or not k.startswith("(")
                )
            else:
                r = m.get("repeats_8gram")
                answers = f"8-gram repeats {'–' if r is None else f'{100 * r:.0f}%'}"
                if m["metrics"].get("token_f1_own_words"):
                    answers += f"; token F1 of the model's own words (not quoted) {_cell(m['metrics']['token_f1_own_words'])}"
                if m["metrics"].get("token_f1_no_threshold"):
                    answers += f"; token F1 without the threshold {_cell(m['metrics']['token_f1_no_threshold'])}"
                if m.get("vs_dense_rag"):
                    answers += f"; paired vs {BASELINE} (no threshold) {_cell(m['vs_dense_rag'])}"
            if m.get("gold_in_prompt") is not None:
                answers += f"; gold answer in the prompt's text {100 * m['gold_in_prompt']:.0f}%"
            if m.get("support_in_evidence") is not None:
                answers += f"; support in gold evidence {100 * m['support_in_evidence']:.0f}%"
            rate = m.get("abstention_rate")
            lines.append(
                f"| {name} | `{mode}` | {n} | "
                + " | ".join(cells)
                + f" | {_hits(m)} | {m['n_errors']} | {'–' if rate is None else f'{100 * rate:.0f}%'} | {answers} |"
            )
        if s["kind"] == "closed":
            maj, ch = s["majority"], s["chance"]
            lines.append(
                f"| {name} | majority ({maj['label']}) | {n} | {_num(maj['accuracy'])} | "
                f"{_num(maj['macro_f1'])} | – | – | – | – | – | gold: "
                + ", ".join(f"{k} {v}" for k, v in s["gold_counts"].items())
                + " |"
            )
            lines.append(
                f"| {name} | chance (uniform) | {n} | {_num(ch['accuracy'])} | {_num(ch['macro_f1'])} "
                f"| – | – | – | – | – | macro-F1 {ch['macro_f1_method']} |"
            )
            if ch["macro_f1_method"] and ch["macro_f1_method"] not in methods:
                methods.append(ch["macro_f1_method"])
        else:
            lines.append(
                f"| {name} | majority / chance | {n} | n/a | n/a | n/a | n/a | – | – | – | open answers |"
            )
    b = result.get("bootstrap", {})
    at_prior = _prior_table(result)
    note = (
        f"95% percentile bootstrap over rows ({b.get('resamples')} resamples, seed {b.get('seed')}); "
        "errors and abstentions count as wrong (F1 0); evidence hit@k: a gold segment among the top k of "
        "the document's HMT segments, the same granularity in every mode; chance macro-F1: "
        + (", ".join(methods) or "n/a")
        + "."
    )
    return "\n".join(lines) + "\n\n" + note + (f"\n\n{at_prior}" if at_prior else "")


def _prior_table(result: Mapping[str, Any]) -> str:
    """The closed sets again, their rows reweighted to the class balance of the training questions."""
    lines, skipped = [], []
    for name, s in result["sets"].items():
        prior = s.get("prior")
        if prior and not prior.get("applied"):
            skipped.append(f"{name} (no row answered {', '.join(prior.get('missing', []))})")
        if not prior or not prior.get("applied"):
            continue
        shares = ", ".join(f"{lab} {100 * v:.0f}%" for lab, v in prior["shares"].items())
        for mode, m in s["modes"].items():
            a = m["at_prior"]
            lines.append(f"| {name} | `{mode}` | {_cell(a['accuracy'])} | {_cell(a['macro_f1'])} | |")
        maj = prior["majority"]
        lines.append(
            f"| {name} | majority ({maj['label']}) | {_num(maj['accuracy'])} | {_num(maj['macro_f1'])} |"
            f" {prior['source']} (n = {prior['n']}): {shares} |"
        )
    note = (
        "Not at the class balance of the training questions: " + "; ".join(skipped) + "."
        if skipped
        else ""
    )
    if not lines:
        return note
    head = (
        "At the class balance of the training questions (each dev row weighted by its gold label's share "
        "there over its share here):\n\n| set | mode | accuracy [95% CI] | macro-F1 [95% CI] | training balance |\n"
        "|---|---|---:|---:|---|"
    )
    return head + "\n" + "\n".join(lines) + (f"\n\n{note}" if note else "")
