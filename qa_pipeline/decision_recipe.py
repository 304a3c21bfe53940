"""``hmtqa train-decision``: fit a checkpoint's decision heads on cached answering-pass features.

Training questions come from training data only: the first 400 PubMedQA questions (never the
held-out 100) and the Evidence Inference articles of the training half. Each is answered by the
engine exactly as ``ask`` answers it (modes hmt and hmt+retrieval), document-grounded: its own
abstract is in the document, among other abstracts, and recall brings it back. The features (each
option's log-likelihood and the decision state) are cached, then one head per option set is fitted
in seconds, its penalty chosen by cross-validated macro-F1 on the training questions themselves.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .decision import DecisionHeads, OptionHead, fit_option_head, head_probs, option_key
from .documents import Document
from .engine import Engine
from .metrics import macro_f1
from .qa_data import QARow, evidence_inference, pubmedqa_fused
from .recall_eval import is_train_article
from .store import MemoryStore
from .train_data import PUBMEDQA, PUBMEDQA_TRAIN

logger = logging.getLogger(__name__)

FEATURE_MODES = ("hmt", "hmt+retrieval")
L2_GRID = (1.0, 10.0, 100.0, 1000.0)


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
                    row_id=r.row_id, question=r.question, document=document, doc_id=doc_id,
                    options=r.options, answer=r.answer, evidence=[(pos, pos + len(t))],
                )
            )
            pos += len(t) + 2
    return rows


def ei_training_rows(root: Path) -> list[QARow]:
    return [r for r in evidence_inference(root / "evidence-inference") if is_train_article(r.document_id())]


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
        text = row.load_document()
        doc_id = row.document_id(text)
        if doc_id not in store:
            engine.ingest(store, Document(doc_id=doc_id, title=doc_id, text=text, source="train-decision"))
        label = [o.lower() for o in row.options].index(row.answer.lower())
        for mode in modes:
            ans = engine.ask(store, doc_id, row.question, mode=mode, options=row.options, record=False)
            out[mode]["logprobs"].append(ans.option_logprobs)
            out[mode]["hidden"].append(ans.decision_state)
            out[mode]["labels"].append(label)
        if progress is not None:
            progress(i + 1, len(rows))
    return {m: {k: np.asarray(v) for k, v in d.items()} for m, d in out.items()}


def _folds(n: int, k: int, seed: int = 0) -> list[np.ndarray]:
    idx = np.random.default_rng(seed).permutation(n)
    return [idx[f::k] for f in range(k)]


def cross_validate(
    options: list[str], logprobs: np.ndarray, hidden: np.ndarray, labels: np.ndarray, *, folds: int = 5
) -> list[dict]:
    """Cross-validated accuracy and macro-F1 of plain likelihood, calibration only, and the full
    head at each penalty in ``L2_GRID``."""
    n_opt = len(options)
    results = []
    variants = [("likelihood", None), ("calibration", 0.0)] + [(f"head l2={l2:g}", l2) for l2 in L2_GRID]
    for name, l2 in variants:
        preds = np.zeros(len(labels), dtype=np.int64)
        for test in _folds(len(labels), folds):
            train = np.setdiff1d(np.arange(len(labels)), test)
            if l2 is None:
                preds[test] = logprobs[test].argmax(axis=1)
                continue
            head = fit_option_head(
                options, logprobs[train], hidden[train], labels[train], l2=l2 or 1.0, use_hidden=l2 != 0.0
            )
            preds[test] = head_probs(head, logprobs[test], hidden[test]).argmax(axis=1)
        results.append(
            {
                "variant": name,
                "l2": l2,
                "accuracy": float((preds == labels).mean()),
                "macro_f1": macro_f1(preds.tolist(), labels.tolist(), labels=list(range(n_opt))),
                "predicted": np.bincount(preds, minlength=n_opt).tolist(),
            }
        )
    return results


def fit_heads(features: dict[str, dict[str, dict[str, np.ndarray]]], options_by_set: dict[str, list[str]]) -> tuple[DecisionHeads, dict]:
    """One head per option set, fitted on the features of every mode pooled; the variant with the
    best cross-validated macro-F1 is kept (plain likelihood when nothing beats it)."""
    heads, report = [], {}
    for name, by_mode in features.items():
        options = [" ".join(o.lower().split()) for o in options_by_set[name]]
        lp = np.concatenate([d["logprobs"] for d in by_mode.values()])
        hid = np.concatenate([d["hidden"] for d in by_mode.values()])
        y = np.concatenate([d["labels"] for d in by_mode.values()])
        cv = cross_validate(options, lp, hid, y)
        best = max(cv, key=lambda r: (r["macro_f1"], r["accuracy"]))
        report[name] = {"n": int(len(y)), "classes": np.bincount(y, minlength=len(options)).tolist(), "cv": cv, "chosen": best["variant"]}
        if best["l2"] is None:
            continue
        head = fit_option_head(options, lp, hid, y, l2=best["l2"] or 1.0, use_hidden=best["l2"] != 0.0)
        head.info = {"set": name, "n": int(len(y)), "modes": list(by_mode), "variant": best["variant"], "cv_macro_f1": best["macro_f1"], "cv_accuracy": best["accuracy"]}
        heads.append(head)
    return DecisionHeads(heads), report


def save_features(folder: Path, name: str, feats: dict[str, dict[str, np.ndarray]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for mode, d in feats.items():
        np.savez(folder / f"{name}.{mode.replace('+', '_')}.npz", **d)


def load_features(folder: Path, name: str, modes: tuple[str, ...] = FEATURE_MODES) -> dict | None:
    paths = [folder / f"{name}.{m.replace('+', '_')}.npz" for m in modes]
    if not all(p.is_file() for p in paths):
        return None
    return {m: dict(np.load(p)) for m, p in zip(modes, paths, strict=True)}


__all__ = [
    "OptionHead",
    "cross_validate",
    "ei_training_rows",
    "extract",
    "fit_heads",
    "option_key",
    "pubmedqa_training_rows",
]


def run(engine: Engine, root: Path, checkpoint: Path, work: Path, store: MemoryStore, progress=None) -> dict:
    """Extract (or reuse cached) features for both training sets into ``work``, fit, and save the
    heads into the checkpoint folder (its open-answer threshold is kept)."""
    feature_dir = work / "features"
    sets = {"pubmedqa": pubmedqa_training_rows(root), "evidence-inference": ei_training_rows(root)}
    features, options = {}, {}
    for name, rows in sets.items():
        options[name] = rows[0].options
        cached = load_features(feature_dir, name)
        if cached is None:
            start = time.perf_counter()
            cached = extract(engine, store, rows, progress=(lambda d, t, n=name: progress(n, d, t)) if progress else None)
            save_features(feature_dir, name, cached)
            logger.info("%s: features of %d rows in %.0f s", name, len(rows), time.perf_counter() - start)
        features[name] = cached
    heads, report = fit_heads(features, options)
    heads.open_threshold = DecisionHeads.load(checkpoint).open_threshold
    heads.save(checkpoint)
    (checkpoint / "decision_training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
