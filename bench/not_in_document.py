"""Does "not in the document" work when the document is about the question's subject?

The open-answer threshold on the recall score (``DecisionHeads.open_recall_threshold``) was fitted
with other articles as the unanswerable case. A user's unanswerable question is more often about the
document's own subject. This benchmark makes such questions from COVID-QA dev questions of the
evaluation-half articles (those recall never trained on): each question is asked of its article
(answerable), of the same article with the answer cut out (every sentence that overlaps the gold
evidence or contains the gold answer removed, the rest as it was), and of the next article (the
fit's own negative). Each is answered as ``hmtqa ask`` answers it (mode hmt+retrieval, not recorded).

    python -m bench.not_in_document --data-dir ../shared/data --dtype float32 --questions 60

Reported per kind: the share the product turned away (either threshold), the share below the
recall-score threshold, and the AUROC between answerable and unanswerable of the recall score, of the
confidence and of a signal the product does not use yet, grounding: how much likelier the document
made the sentence the model wrote (its mean token log-likelihood as written, minus the same tokens'
after the question alone, no document, no memory). 95% bootstrap intervals over questions (pairs
resampled together).
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import apply_threads, base_parser, machine_info, print_table, write_results
from qa_pipeline.decision import auroc
from qa_pipeline.decision_recipe import covid_open_rows
from qa_pipeline.documents import Document
from qa_pipeline.engine import Engine, EngineConfig
from qa_pipeline.metrics import token_f1
from qa_pipeline.prompts import question_prompt
from qa_pipeline.qa_eval import bootstrap_ci
from qa_pipeline.support import sentences
from qa_pipeline.train_data import data_dir

MODE = "hmt+retrieval"  # the default answer mode, the one the threshold was fitted for
MIN_ANSWER_CHARS = 4  # shorter answers ("2", "UK") would cut sentences that merely share a token


def cut_answer(text: str, evidence: list[tuple[int, int]], answer: str) -> str:
    """``text`` without the sentences that overlap ``evidence`` or contain ``answer`` (case-insensitive)."""
    needle = answer.strip().lower() if len(answer.strip()) >= MIN_ANSWER_CHARS else None
    kept, pos = [], 0
    for s, e in sentences(text, 0, len(text)):
        overlaps = any(s < b and a < e for a, b in evidence)
        if overlaps or (needle and needle in text[s:e].lower()):
            kept.append(text[pos:s])
            pos = e
    kept.append(text[pos:])
    return re.sub(r"[ \t]{2,}", " ", "".join(kept))


def prior_logprob(engine: Engine, question: str, sentence: str) -> float:
    """Mean log-likelihood of ``sentence``'s tokens after the question's prompt alone (no document,
    no memory): what the model would find likely without reading anything."""
    tok = engine.tokenizer
    prompt = torch.tensor([tok(question_prompt(tok, question), add_special_tokens=False).input_ids])
    ids = torch.tensor(tok(sentence, add_special_tokens=False).input_ids)
    with torch.inference_mode():
        total, count = engine.model.score_options(prompt, [ids], None)[:2]
    return float(total[0] / count[0])


def summary_table(asked: dict[str, list[dict]], threshold: float) -> list[dict]:
    """One row per kind of question: turned away, below the recall threshold, and how well each signal
    tells answerable (the first kind) from this kind (AUROC; 0.5 is no better than a coin)."""
    pos = asked["answerable"]
    table = []
    for kind, got in asked.items():
        abstained = np.asarray([a["abstained"] for a in got], float)
        row = {
            "questions": kind,
            "n": len(got),
            "abstained": float(abstained.mean()),
            "abstained_ci": list(bootstrap_ci(abstained)),
            "below_recall_threshold": float(np.mean([a["recall_score"] < threshold for a in got])),
            "median_recall_score": float(np.median([a["recall_score"] for a in got])),
            "median_grounding": float(np.median([a["grounding"] for a in got])),
            "guess_token_f1": float(np.mean([a["token_f1"] for a in got])),
        }
        row["abstained_95"] = "[{:.2f}, {:.2f}]".format(*row["abstained_ci"])
        if got is not pos:
            for signal in ("recall_score", "confidence", "grounding"):
                p = np.asarray([a[signal] for a in pos], float)
                n = np.asarray([a[signal] for a in got], float)
                row[f"auroc_{signal}"] = auroc(p, n)
                # Resampled by question: a question's three askings stay together.
                row[f"auroc_{signal}_ci"] = list(
                    bootstrap_ci(n=len(p), statistic=lambda rows, p=p, n=n: [auroc(p[i], n[i]) for i in rows])
                )
                row[f"auroc_{signal}_95"] = "[{:.2f}, {:.2f}]".format(*row[f"auroc_{signal}_ci"])
        table.append(row)
    return table


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=60, help="COVID-QA evaluation-half questions (spread over articles)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--checkpoint", default="default")
    p.add_argument("--store", default=None, help="store of the whole articles to reuse (else a temporary one)")
    args = p.parse_args(argv)
    if args.quick:
        args.questions = min(args.questions, 4)
    threads = apply_threads(args.threads)
    rows = [r for r in covid_open_rows(data_dir(args.data_dir), args.questions, half="evaluation") if r.answer]
    engine = Engine(EngineConfig(dtype=args.dtype, checkpoint=args.checkpoint, device=args.device))
    threshold = engine.decision_heads.open_recall_threshold
    if threshold is None:
        sys.exit("the checkpoint has no recall-score threshold (open_recall_threshold); nothing to measure")
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        whole = engine.open_store(args.store or Path(tmp) / "whole")
        cut = engine.open_store(Path(tmp) / "cut")
        doc_ids = []
        for row in rows:
            text = row.load_document()
            doc_ids.append(row.document_id(text))
            if doc_ids[-1] not in whole:
                engine.ingest(whole, Document(doc_id=doc_ids[-1], title=doc_ids[-1], text=text, source="bench"))
        articles = list(dict.fromkeys(doc_ids))
        kinds = ("answerable", "answer cut out", "other article")
        asked: dict[str, list[dict]] = {k: [] for k in kinds}
        removed = []
        for i, (row, doc_id) in enumerate(zip(rows, doc_ids, strict=True)):
            text = row.load_document()
            shorter = cut_answer(text, row.evidence, row.answer)
            removed.append(1 - len(shorter) / len(text))
            cut_id = f"{row.row_id}-cut"
            engine.ingest(cut, Document(doc_id=cut_id, title=cut_id, text=shorter, source="bench"))
            other = articles[(articles.index(doc_id) + 1) % len(articles)]
            for kind, store, target in (("answerable", whole, doc_id), ("answer cut out", cut, cut_id), ("other article", whole, other)):
                ans = engine.ask(store, target, row.question, mode=MODE, record=False)
                written = ans.sentence or ""
                grounding = (
                    ans.answer_logprob - prior_logprob(engine, row.question, written)
                    if written.strip() and ans.answer_logprob is not None
                    else 0.0
                )
                asked[kind].append(
                    {
                        "recall_score": ans.recall_score,
                        "confidence": ans.confidence,
                        "grounding": grounding,
                        "abstained": ans.abstained,
                        "answer": ans.best_guess if ans.abstained else ans.answer,
                        "token_f1": token_f1(ans.best_guess if ans.abstained else ans.answer, row.answer),
                    }
                )
            print(
                f"{i + 1}/{len(rows)} {row.row_id}: "
                + ", ".join(f"{k} {v[-1]['recall_score']:.2f}" for k, v in asked.items()),
                file=sys.stderr,
            )
        whole.close()
        cut.close()
    table = summary_table(asked, threshold)
    print_table(
        table,
        [
            ("questions", "asked of", "s"),
            ("n", "n", "d"),
            ("abstained", "turned away", ".2f"),
            ("abstained_95", "95% CI", "s"),
            ("below_recall_threshold", f"recall score < {threshold:.2f}", ".2f"),
            ("median_recall_score", "median recall score", ".2f"),
            ("auroc_recall_score", "AUROC recall score", ".3f"),
            ("auroc_recall_score_95", "95% CI", "s"),
            ("auroc_confidence", "AUROC confidence", ".3f"),
            ("auroc_confidence_95", "95% CI", "s"),
            ("auroc_grounding", "AUROC grounding", ".3f"),
            ("auroc_grounding_95", "95% CI", "s"),
            ("median_grounding", "median grounding", ".2f"),
            ("guess_token_f1", "token F1 of the answer or guess", ".3f"),
        ],
        title=f"'Not in the document', mode {MODE}: COVID-QA evaluation-half questions ({len(articles)} articles)",
    )
    print(f"text cut out per question: median {100 * np.median(removed):.1f}% of the article")
    write_results(
        "not_in_document",
        {
            "machine": machine_info(device=args.device, dtype=args.dtype, threads=threads),
            "settings": vars(args),
            "threshold": threshold,
            "articles": len(articles),
            "rows": [r.row_id for r in rows],
            "answers": asked,
            "share_cut_out_median": float(np.median(removed)),
            "table": table,
            "seconds": time.perf_counter() - began,
        },
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
