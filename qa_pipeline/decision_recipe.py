"""``hmtqa train-decision``: fit a checkpoint's decision heads on cached answering-pass features.

Training questions come from training data only: the first 400 PubMedQA questions (never the
held-out 100) and the Evidence Inference articles of the training half. Each is answered by the
engine exactly as ``ask`` answers it (modes hmt and hmt+retrieval), document-grounded: its own
abstract is in the document, among other abstracts, and recall brings it back. The features (each
option's log-likelihood and the decision state) are cached, then one head per option set is fitted
in seconds, its penalty chosen by cross-validated macro-F1 on the training questions themselves.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .datasets import covid_qa, evidence_inference, pubmedqa_fused
from .decision import DecisionHeads, fit_option_head, fit_threshold, head_probs
from .documents import Document
from .engine import Engine
from .metrics import macro_f1, token_f1
from .qa_data import QARow
from .recall_eval import is_train_article
from .store import MemoryStore
from .train_data import PUBMEDQA, PUBMEDQA_TRAIN

logger = logging.getLogger(__name__)

FEATURE_MODES = ("hmt", "hmt+retrieval")
SIGNAL_NAMES = {"passage": "pooled passage head", "tokens": "late-interaction passage head"}
# Open answers: the share of answerable questions a "not in the document" threshold may turn away.
# 0.05 since the late-interaction head's score: on training-half COVID-QA it catches 59% of questions
# asked of another article at 5% (74% at 10%), more than the pooled head's 48% at 10% (the model card).
OPEN_MAX_ABSTAIN = 0.05
L2_GRID = (0.1, 1.0, 10.0, 100.0)


def pubmedqa_training_rows(root: Path, *, group: int = 8, seed: int = 0) -> list[QARow]:
    """The training questions, each asked of a document of ``group`` training abstracts (its own
    among them): one ingest serves ``group`` questions."""
    singles = pubmedqa_fused(root / PUBMEDQA, num_docs=1)[:PUBMEDQA_TRAIN]
    order = list(range(len(singles)))
    random.Random(seed).shuffle(order)
    rows = []
    for g in range(0, len(order), group):
        members = [singles[i] for i in order[g : g + group]]
        texts = [r.document for r in members]
        document = "\n\n".join(texts)
        doc_id = f"pqa-train-g{g // group}"
        pos = 0
        for r, t in zip(members, texts, strict=True):
            rows.append(
                QARow(
                    row_id=r.row_id,
                    question=r.question,
                    document=document,
                    doc_id=doc_id,
                    options=r.options,
                    answer=r.answer,
                    evidence=[(pos, pos + len(t))],
                )
            )
            pos += len(t) + 2
    return rows


def ei_training_rows(root: Path) -> list[QARow]:
    return [r for r in evidence_inference(root / "evidence-inference") if is_train_article(r.document_id())]


def _ingested(engine: Engine, store: MemoryStore, row: QARow) -> str:
    """The store's id of ``row``'s document, ingested first when the store does not hold it."""
    text = row.load_document()
    doc_id = row.document_id(text)
    if doc_id not in store:
        engine.ingest(store, Document(doc_id=doc_id, title=doc_id, text=text, source="train-decision"))
    return doc_id


def extract(
    engine: Engine,
    store: MemoryStore,
    rows: list[QARow],
    modes: tuple[str, ...] = FEATURE_MODES,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Per mode: option log-likelihoods (N, n) in each row's option order, decision states (N, d),
    labels (N,) as indices into the row's options."""
    out = {m: {"logprobs": [], "hidden": [], "labels": []} for m in modes}
    for i, row in enumerate(rows):
        if row.answer is None or not row.options:
            continue
        doc_id = _ingested(engine, store, row)
        label = [o.lower() for o in row.options].index(row.answer.lower())
        for mode in modes:
            ans = engine.ask(store, doc_id, row.question, mode=mode, options=row.options, record=False)
            out[mode]["logprobs"].append(ans.option_logprobs)
            out[mode]["hidden"].append(ans.decision_state)
            out[mode]["labels"].append(label)
        if progress is not None:
            progress(i + 1, len(rows))
    return {m: {k: np.asarray(v) for k, v in d.items()} for m, d in out.items()}


def _folds(groups: np.ndarray, k: int, seed: int = 0) -> list[np.ndarray]:
    """``k`` folds of row indices; rows of one group (one question, asked in several modes) stay together."""
    unique = np.random.default_rng(seed).permutation(np.unique(groups))
    return [np.flatnonzero(np.isin(groups, unique[f::k])) for f in range(k)]


def cross_validate(
    options: list[str],
    logprobs: np.ndarray,
    hidden: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    folds: int = 5,
) -> list[dict]:
    """Cross-validated accuracy and macro-F1 of plain likelihood, calibration only, and the full
    head at each penalty in ``L2_GRID``, with each variant's out-of-fold probabilities (``probs``)."""
    n_opt = len(options)
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    results = []
    variants = [("likelihood", None), ("calibration", 0.0)] + [(f"head l2={l2:g}", l2) for l2 in L2_GRID]
    for name, l2 in variants:
        probs = np.zeros((len(labels), n_opt))
        for test in _folds(groups, folds):
            train = np.setdiff1d(np.arange(len(labels)), test)
            if l2 is None:
                z = logprobs[test] - logprobs[test].max(axis=1, keepdims=True)
                probs[test] = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
                continue
            head = fit_option_head(
                options, logprobs[train], hidden[train], labels[train], l2=l2 or 1.0, use_hidden=l2 != 0.0
            )
            probs[test] = head_probs(head, logprobs[test], hidden[test])
        preds = probs.argmax(axis=1)
        results.append(
            {
                "variant": name,
                "l2": l2,
                "accuracy": float((preds == labels).mean()),
                "macro_f1": macro_f1(preds.tolist(), labels.tolist(), labels=list(range(n_opt))),
                "predicted": np.bincount(preds, minlength=n_opt).tolist(),
                "probs": probs,
            }
        )
    return results


def _pooled(by_mode: dict[str, dict[str, np.ndarray]]) -> tuple[np.ndarray, ...]:
    """Features of every mode stacked, with each row's question index as its group."""
    lp = np.concatenate([d["logprobs"] for d in by_mode.values()])
    hid = np.concatenate([d["hidden"] for d in by_mode.values()])
    y = np.concatenate([d["labels"] for d in by_mode.values()])
    groups = np.concatenate([np.arange(len(d["labels"])) for d in by_mode.values()])
    return lp, hid, y, groups


def fit_heads(
    features: dict[str, dict[str, dict[str, np.ndarray]]],
    options_by_set: dict[str, list[str]],
    negatives: dict[str, dict[str, dict[str, np.ndarray]]] | None = None,
) -> tuple[DecisionHeads, dict]:
    """One head per option set, fitted on the features of every mode pooled; the variant with the
    best cross-validated macro-F1 is kept (plain likelihood when nothing beats it).

    With ``negatives`` (the same questions asked of a document without their answer), each head
    gets a "not in the document" threshold (:func:`fit_threshold`) from the out-of-fold confidence
    of the training questions and the head's confidence on the negatives.
    """
    heads, report = [], {}
    for name, by_mode in features.items():
        options = [" ".join(o.lower().split()) for o in options_by_set[name]]
        lp, hid, y, groups = _pooled(by_mode)
        cv = cross_validate(options, lp, hid, y, groups)
        best = max(cv, key=lambda r: (r["macro_f1"], r["accuracy"]))
        report[name] = {
            "n_questions": int(len(np.unique(groups))),
            "n_rows": int(len(y)),
            "modes": list(by_mode),
            "classes": np.bincount(y, minlength=len(options)).tolist(),
            "cv": [{k: v for k, v in r.items() if k != "probs"} for r in cv],
            "chosen": best["variant"],
        }
        if best["l2"] is None:
            continue
        head = fit_option_head(options, lp, hid, y, l2=best["l2"] or 1.0, use_hidden=best["l2"] != 0.0)
        head.info = {
            "set": name,
            "n_questions": report[name]["n_questions"],
            "modes": list(by_mode),
            "variant": best["variant"],
            "cv_macro_f1": best["macro_f1"],
            "cv_accuracy": best["accuracy"],
        }
        if negatives and name in negatives:
            nlp, nhid, _, _ = _pooled(negatives[name])
            oof = best["probs"]
            head.threshold, report[name]["threshold"] = fit_threshold(
                oof.max(axis=1), oof.argmax(axis=1) == y, head_probs(head, nlp, nhid).max(axis=1)
            )
        heads.append(head)
    return DecisionHeads(heads), report


def negative_rows(rows: list[QARow], limit: int = 100) -> list[QARow]:
    """The first ``limit`` questions, each asked of the next other document of the set (which does
    not hold its answer): what "not in the document" looks like to the model."""
    docs: list[QARow] = []
    for row in rows:
        if row.document_id() not in {d.document_id() for d in docs}:
            docs.append(row)
    out = []
    for row in rows[:limit]:
        i = next(j for j, d in enumerate(docs) if d.document_id() == row.document_id())
        other = docs[(i + 1) % len(docs)]
        out.append(
            dataclasses.replace(
                row,
                row_id=row.row_id + "-neg",
                document=other.document,
                document_path=other.document_path,
                doc_id=other.doc_id,
                evidence=[],
            )
        )
    return out


def open_confidences(
    engine: Engine,
    store: MemoryStore,
    rows: list[QARow],
    mode: str,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Confidence of open answers to ``rows`` in ``mode`` and their token F1 against the gold answer."""
    conf, f1 = [], []
    for i, row in enumerate(rows):
        doc_id = _ingested(engine, store, row)
        ans = engine.ask(store, doc_id, row.question, mode=mode, record=False)
        conf.append(ans.confidence if ans.confidence is not None else 0.0)
        f1.append(token_f1(ans.answer, row.answer or "") if row.evidence else 0.0)
        if progress is not None:
            progress(i + 1, len(rows))
    return np.asarray(conf), np.asarray(f1)


def open_recall_scores(
    engine: Engine,
    store: MemoryStore,
    rows: list[QARow],
    progress: Callable[[int, int], None] | None = None,
    signal: str | None = None,
) -> np.ndarray:
    """``Answer.recall_score`` (of the ``signal`` head) of each row's question on its document (nan
    without passage keys); recall only, no answer is generated."""
    out = []
    for i, row in enumerate(rows):
        doc_id = _ingested(engine, store, row)
        score = engine.recall_score(store, doc_id, row.question, signal)
        out.append(np.nan if score is None else score)
        if progress is not None:
            progress(i + 1, len(rows))
    return np.asarray(out, dtype=np.float64)


def save_features(folder: Path, name: str, feats: dict[str, dict[str, np.ndarray]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for mode, d in feats.items():
        np.savez(folder / f"{name}.{mode.replace('+', '_')}.npz", **d)


def load_features(folder: Path, name: str, modes: tuple[str, ...] = FEATURE_MODES) -> dict | None:
    paths = [folder / f"{name}.{m.replace('+', '_')}.npz" for m in modes]
    if not all(p.is_file() for p in paths):
        return None
    return {m: dict(np.load(p)) for m, p in zip(modes, paths, strict=True)}


OPEN_HALVES = ("training", "evaluation")


def covid_open_rows(root: Path, limit: int, half: str = "training") -> list[QARow]:
    """COVID-QA questions of one half of the articles (``recall_eval.is_train_article``), spread over
    articles: "training" (the articles recall was trained on) or "evaluation" (those it never saw)."""
    from .recall_eval import select_rows

    if half not in OPEN_HALVES:
        raise ValueError(f"unknown half {half!r}; choose one of {', '.join(OPEN_HALVES)}")
    rows = [
        r
        for r in covid_qa(root / "covid-qa" / "covidqa_dev.json")
        if is_train_article(r.document_id()) == (half == "training")
    ]
    return select_rows(rows, limit_docs=None, limit_questions=limit)


def cross_fitted_threshold(
    pos: np.ndarray,
    pos_f1: np.ndarray,
    neg: np.ndarray,
    groups: list[str],
    *,
    folds: int = 2,
    never: float = 0.0,
    max_abstain: float = 0.1,
) -> dict:
    """What a threshold fitted on these questions does to questions it was not fitted on: articles
    dealt into ``folds`` folds, each fold judged by the threshold fitted on the others' questions.

    ``neg[i]`` is question ``i`` asked of another article, so it belongs to question ``i``'s fold.
    """
    if len(neg) != len(pos):
        raise ValueError("each question needs its negative: neg[i] is question i asked of another article")
    articles = sorted(set(groups))
    fold_of = np.array([articles.index(g) % folds for g in groups])
    pos_out, neg_out = np.zeros(len(pos), bool), np.zeros(len(neg), bool)
    thresholds = []
    for f in range(folds):
        here = fold_of == f
        t, _ = fit_threshold(pos[~here], pos_f1[~here] >= 0.3, neg[~here], never=never, max_abstain=max_abstain)
        thresholds.append(t if np.isfinite(t) else None)
        pos_out[here], neg_out[here] = pos[here] < t, neg[here] < t
    return {
        "folds": folds,
        "thresholds": thresholds,
        "positives_abstained": float(pos_out.mean()),
        "negatives_abstained": float(neg_out.mean()),
        # Token F1 of the positives with the turned-away ones scored 0, as `hmtqa eval qa` scores them.
        "mean_token_f1": float(np.where(pos_out, 0.0, pos_f1).mean()),
    }


def run(
    engine: Engine,
    root: Path,
    checkpoint: Path,
    work: Path,
    store: MemoryStore,
    progress=None,
    *,
    negatives: int = 100,
    open_questions: int = 30,
    open_mode: str = "hmt+retrieval",
    open_half: str = "training",
    closed: bool = True,
    open_max_abstain: float = OPEN_MAX_ABSTAIN,
) -> dict:
    """Extract (or reuse cached) features into ``work``, fit the heads and thresholds, and save
    them into the checkpoint folder.

    ``negatives`` questions per set are also asked of another document (for the closed thresholds);
    ``open_questions`` COVID-QA questions of the ``open_half`` articles are answered in ``open_mode``
    of their own and of another article (for that mode's open threshold; 0 skips it and keeps the
    checkpoint's; thresholds of other modes are kept, with their reports). Recall is more sure of
    itself on the articles it was trained on, so a threshold for new documents is fitted on the
    "evaluation" half; its report then carries a cross-fitted estimate
    (:func:`cross_fitted_threshold`), as those questions also measure it. ``closed=False`` keeps the
    checkpoint's closed heads and their report, and fits the open threshold only (after a change that
    touches open answers alone, such as a passage head).
    """
    report_path = checkpoint / "decision_training.json"
    kept_report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    if not closed:
        if not open_questions:
            raise ValueError("nothing to fit: closed heads kept and no open questions")
        heads = DecisionHeads.load(checkpoint)
        return _fit_open(
            engine, root, checkpoint, work, store, heads, kept_report, open_questions, open_mode, open_half,
            progress, open_max_abstain,
        )
    engine.decision_heads = DecisionHeads()  # the model's own scores, not those of older heads
    feature_dir = work / "features"
    sets = {"pubmedqa": pubmedqa_training_rows(root), "evidence-inference": ei_training_rows(root)}
    features, negative_features, options = {}, {}, {}
    for name, rows in sets.items():
        options[name] = rows[0].options
        for tag, todo, bucket in (
            (name, rows, features),
            (f"{name}-negative", negative_rows(rows, negatives), negative_features),
        ):
            cached = load_features(feature_dir, tag)
            if cached is None:
                start = time.perf_counter()
                cached = extract(engine, store, todo, progress=_bar(progress, tag))
                save_features(feature_dir, tag, cached)
                logger.info("%s: features of %d rows in %.0f s", tag, len(todo), time.perf_counter() - start)
            bucket[name] = cached
    heads, report = fit_heads(features, options, negative_features)
    kept = DecisionHeads.load(checkpoint)
    heads.open_threshold, heads.open_recall_threshold = kept.open_threshold, kept.open_recall_threshold
    heads.open_thresholds = dict(kept.open_thresholds)
    # The kept thresholds' reports go with them.
    report.update({k: v for k, v in kept_report.items() if k in ("open", "open_recall", "open_by_mode")})
    heads.open_recall_signal = kept.open_recall_signal  # the head that threshold was fitted on
    return _fit_open(
        engine, root, checkpoint, work, store, heads, report, open_questions, open_mode, open_half,
        progress, open_max_abstain,
    )


def _bar(progress, name: str) -> Callable[[int, int], None] | None:
    """``progress`` for one named bar, or None."""
    return (lambda done, total: progress(name, done, total)) if progress else None


def _cached(path: Path, compute: Callable[[], dict]) -> dict:
    """The arrays saved at ``path``; computed by ``compute`` and saved there first when missing."""
    if path.is_file():
        return dict(np.load(path))
    arrays = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


def _fit_open(
    engine: Engine,
    root: Path,
    checkpoint: Path,
    work: Path,
    store: MemoryStore,
    heads: DecisionHeads,
    report: dict,
    open_questions: int,
    open_mode: str,
    open_half: str = "training",
    progress=None,
    max_abstain: float = OPEN_MAX_ABSTAIN,
) -> dict:
    """Fit the open-answer thresholds (when ``open_questions``), each turning away at most
    ``max_abstain`` of the answerable questions, then save ``heads`` and ``report``."""
    feature_dir = work / "features"
    # Answers as the model gives them, with no threshold: an abstained answer would score token F1 0.
    engine.decision_heads = DecisionHeads()
    if open_questions:
        pos = covid_open_rows(root, open_questions, open_half)
        # Confidences depend on the model, its dtype and the answering settings: the cache is keyed
        # by the engine's answer stamp, so a changed checkpoint never reuses an older one's answers.
        stamp = engine.answer_stamp
        neg = negative_rows(pos, open_questions)

        def answers() -> dict:
            pc, pf = open_confidences(engine, store, pos, open_mode, _bar(progress, "open"))
            nc, _ = open_confidences(engine, store, neg, open_mode, _bar(progress, "open-negative"))
            return {"pos": pc, "pos_f1": pf, "neg": nc}

        tag = f"{open_half}-{open_questions}-{stamp}"
        cached = _cached(feature_dir / f"open-{open_mode.replace('+', '_')}-{tag}.npz", answers)
        # An answer "counts as right" for the report when its token F1 reaches 0.3. The threshold is
        # this mode's own; other modes keep theirs, and their reports stay in "open_by_mode".
        threshold, open_report = fit_threshold(
            cached["pos"], cached["pos_f1"] >= 0.3, cached["neg"], max_abstain=max_abstain
        )
        heads.open_thresholds[open_mode] = threshold
        by_mode = report.setdefault("open_by_mode", {})
        earlier = report.get("open")
        if earlier and earlier.get("mode") not in (None, open_mode):
            by_mode.setdefault(earlier["mode"], earlier)  # fitted before thresholds per mode
        report["open"] = by_mode[open_mode] = open_report
        articles = [r.document_id() for r in pos]
        report["open"].update(
            {
                "mode": open_mode,
                "set": f"covid-qa ({open_half}-half articles)",
                "half": open_half,
                "mean_token_f1": float(cached["pos_f1"].mean()),
                "mean_token_f1_kept": float(
                    np.where(cached["pos"] < threshold, 0.0, cached["pos_f1"]).mean()
                ),
                "cross_fitted": cross_fitted_threshold(
                    cached["pos"], cached["pos_f1"], cached["neg"], articles, max_abstain=max_abstain
                ),
            }
        )
        # The second signal: the best raw score of the head that ranks the passages (Answer.recall_score),
        # which also says how well the best passage matches, not only which passage is best.
        signal = engine.recall_signal
        scores = _cached(
            feature_dir / f"open-recall-score-{signal}-{tag}.npz",
            lambda: {
                "pos": open_recall_scores(engine, store, pos, _bar(progress, "recall score"), signal),
                "neg": open_recall_scores(engine, store, neg, _bar(progress, "recall score-negative"), signal),
            },
        )
        heads.open_recall_signal = signal
        if np.isnan(scores["pos"]).any() or np.isnan(scores["neg"]).any():
            heads.open_recall_threshold = None
            report["open_recall"] = {"useful": False, "threshold": None, "why": "documents without passage keys"}
        else:
            t, report["open_recall"] = fit_threshold(
                scores["pos"], cached["pos_f1"] >= 0.3, scores["neg"], never=-np.inf, max_abstain=max_abstain
            )
            heads.open_recall_threshold = float(t) if np.isfinite(t) else None
            either = (cached["pos"] < threshold) | (scores["pos"] < t)
            report["open_recall"].update(
                {
                    "signal": f"the {SIGNAL_NAMES[signal]}'s best logit for the question (Answer.recall_score)",
                    "recall_signal": signal,
                    # Its threshold is the same in every mode (recall only); what it keeps is this mode's answers.
                    "mode": open_mode,
                    # Token F1 of the positives with every answer either threshold turns away scored
                    # 0, as `hmtqa eval qa` scores them.
                    "mean_token_f1_kept": float(np.where(either, 0.0, cached["pos_f1"]).mean()),
                    "cross_fitted": cross_fitted_threshold(
                        scores["pos"], cached["pos_f1"], scores["neg"], articles, never=-np.inf,
                        max_abstain=max_abstain,
                    ),
                }
            )
    # What the fitted scores came from: thresholds hold for answers made in this dtype.
    report["dtype"] = str(engine.model.dtype).removeprefix("torch.")
    heads.save(checkpoint)
    (checkpoint / "decision_training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
