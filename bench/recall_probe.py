"""Probe: which frozen representations rank the gold segment first, before any recall training.

On the evaluation data (held-out PubMedQA questions 401-500 with their abstracts grouped eight to a
document, the evaluation halves of COVID-QA and Evidence Inference), each document is read through
HMT as ingestion reads it and each segment also alone by the plain backbone. Candidate segment
representations: M_n (the memory), S_n (the paper's summary: trailing T of [T, x[:j], T]), the mean of
the main pass's last-layer states over the segment (recall "content" keys), and means of the states
of the segment read alone at several depths. Query representations: the question alone or the
whole chat prompt, as S_q (trailing T) or pooled. Each pair is scored three ways: raw cosine,
cosine after removing the mean query and the mean segment, and a linear head (W, b as in recall
"content") fitted on one half of the documents and tested on the other (two folds). The checkpoint's
own trained paper recall (S_q of the chat prompt, keys W_k M_n) is the reference row.

    python -m bench.recall_probe --data-dir ../shared/data --out bench/results/recall_probe.json
"""

from __future__ import annotations

import json
import sys
import time

import torch

from bench.common import apply_threads, base_parser, machine_info, write_results
from hmt import HMTModel, load_backbone
from hmt.memory import MemoryRecall
from hmt.recall_head import RecallExamples, center_head, fit_recall_head, rank_metrics
from qa_pipeline.datasets import covid_qa, evidence_inference
from qa_pipeline.prompts import question_prompt
from qa_pipeline.recall_data import RecallDoc, rows_by_document
from qa_pipeline.recall_eval import chance_metrics, is_eval_article
from qa_pipeline.recall_recipe import content_model
from qa_pipeline.train_data import PUBMEDQA, PUBMEDQA_TRAIN, data_dir, segments_overlapping

DEPTHS = (0, 3, 6, 12, 18, 24, 30)


def eval_docs(root, max_articles: int) -> dict[str, list[RecallDoc]]:
    pqa = json.loads((root / PUBMEDQA).read_text(encoding="utf-8"))
    sets: dict[str, list[RecallDoc]] = {"pubmedqa-8": []}
    for i, (pmid, entry) in enumerate(list(pqa.items())[PUBMEDQA_TRAIN:]):
        text = " ".join(c.strip() for c in entry["CONTEXTS"])
        doc = RecallDoc(f"pqa-{pmid}", text, group=f"pqa-group-{i // 8}")
        doc.queries.append((entry["QUESTION"].strip(), [(0, len(text))], "question"))
        sets["pubmedqa-8"].append(doc)
    for name, rows in (
        ("covidqa", covid_qa(root / "covid-qa" / "covidqa_dev.json")),
        ("evidence-inference", evidence_inference(root / "evidence-inference")),
    ):
        docs = []
        for doc_id, doc_rows in rows_by_document(rows).items():
            if is_eval_article(doc_id) and len(docs) < max_articles:
                doc = RecallDoc(doc_id, doc_rows[0].load_document(), group=doc_id)
                doc.queries = [(r.question, list(r.evidence), "question") for r in doc_rows if r.evidence]
                docs.append(doc)
        sets[name] = docs
    return sets


def _pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    w = mask.float()[..., None]
    return (states.float() * w).sum(1) / w.sum(1).clamp_min(1)


@torch.inference_mode()
def features(model: HMTModel, paper: HMTModel, tokenizer, docs: list[RecallDoc]) -> dict:
    """Every candidate representation of every segment and query of ``docs``."""
    L, j = model.config.segment_length, model.config.summary_length
    seg: dict[str, list] = {"memory": [], "paper S_n": [], "content (main pass)": []}
    seg.update({f"alone, depth {d}": [] for d in DEPTHS})
    qry: dict[str, list] = {"question, pooled": [], "question, S_q": [], "prompt, pooled": [], "prompt, S_q": []}
    qry.update({f"question alone, depth {d}": [] for d in DEPTHS})
    groups, segment_doc, query_doc, positives = {}, [], [], []
    for doc in docs:
        group = groups.setdefault(doc.group, len(groups))
        enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor([enc.input_ids])
        first = len(segment_doc)
        records, _ = model.read_segments(ids)
        seg["memory"] += [r.memory[0].float() for r in records]
        seg["content (main pass)"] += [r.content[0].float() for r in records]
        seg["paper S_n"] += list(paper.summarize(ids)[0].float())
        for start in range(0, ids.shape[1], L):
            out = model.backbone(input_ids=ids[:, start : start + L], output_hidden_states=True)
            for d in DEPTHS:
                seg[f"alone, depth {d}"].append(out.hidden_states[d][0].float().mean(0))
        segment_doc += [group] * len(records)
        for text, spans, _ in doc.queries:
            gold = segments_overlapping(enc.offset_mapping, spans, L)
            if not gold:
                continue
            q = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids[:j]])
            p = torch.tensor([tokenizer(question_prompt(tokenizer, text, None), add_special_tokens=False).input_ids[-j:]])
            qry["question, pooled"].append(model.summarize(q)[0, 0].float())
            qry["question, S_q"].append(paper.summarize(q)[0, 0].float())
            qry["prompt, pooled"].append(model.summarize(p)[0, 0].float())
            qry["prompt, S_q"].append(paper.summarize(p)[0, 0].float())
            out = model.backbone(input_ids=q, output_hidden_states=True)
            for d in DEPTHS:
                qry[f"question alone, depth {d}"].append(out.hidden_states[d][0].float().mean(0))
            query_doc.append(group)
            positives.append([first + g for g in gold])
    return {
        "segments": {k: torch.stack(v) for k, v in seg.items()},
        "queries": {k: torch.stack(v) for k, v in qry.items()},
        "segment_doc": torch.tensor(segment_doc),
        "query_doc": torch.tensor(query_doc),
        "positives": positives,
    }


def _examples(f: dict, qkey: str, skey: str) -> RecallExamples:
    return RecallExamples(f["queries"][qkey], f["query_doc"], f["positives"], f["segments"][skey], f["segment_doc"])


def _head(width: int) -> MemoryRecall:
    return MemoryRecall(width, width, "content")


def score_pair(f: dict, qkey: str, skey: str, steps: int) -> dict:
    ex = _examples(f, qkey, skey)
    width = ex.queries.shape[1]
    raw = _head(width)
    centred = _head(width)
    center_head(centred, ex)
    groups = sorted(set(ex.query_doc.tolist()))
    folds = [set(groups[0::2]), set(groups[1::2])]
    linear = {"hit@1": 0.0, "hit@5": 0.0, "mrr": 0.0}
    for fold in folds:
        fit_rows = [i for i, g in enumerate(ex.query_doc.tolist()) if g not in fold]
        test_rows = [i for i, g in enumerate(ex.query_doc.tolist()) if g in fold]
        head = _head(width)
        torch.manual_seed(0)
        fit_recall_head(head, ex.subset(fit_rows), steps=steps, batch_size=32, lr=1e-3, weight_decay=1e-4)
        m = rank_metrics(head, ex.subset(test_rows))
        for k in linear:
            linear[k] += m[k] * len(test_rows) / len(ex)
    return {"cosine": rank_metrics(raw, ex), "centred cosine": rank_metrics(centred, ex), "linear (2-fold)": linear}


def trained_paper(f: dict, base: HMTModel) -> dict:
    """The checkpoint's own recall: S_q of the chat prompt against W_k M_n (what answered before)."""
    return rank_metrics(base.recall.float(), _examples(f, "prompt, S_q", "memory"))


def chance(f: dict) -> dict:
    counts = torch.bincount(f["segment_doc"])
    per = [chance_metrics(int(counts[int(d)]), len(p)) for d, p in zip(f["query_doc"].tolist(), f["positives"], strict=True)]
    return {k: sum(c[k] for c in per) / len(per) for k in per[0]}


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--max-articles", type=int, default=12, help="evaluation articles per COVID-QA / Evidence Inference")
    p.add_argument("--steps", type=int, default=600, help="steps of each linear fit")
    p.add_argument("--checkpoint", default="default")
    ns = p.parse_args(argv)
    threads = apply_threads(ns.threads)
    began = time.perf_counter()
    root = data_dir(ns.data_dir)
    backbone, tokenizer = load_backbone("smollm2-135m-instruct", dtype="float32")
    from qa_pipeline.engine import DEFAULT_CHECKPOINT

    path = DEFAULT_CHECKPOINT if ns.checkpoint == "default" else ns.checkpoint
    base = HMTModel.from_pretrained(path, backbone=backbone, recall="paper")
    model = content_model(base).to(torch.bfloat16).eval()
    paper = HMTModel(model.backbone, model.config.replace(recall="paper")).eval()
    paper.load_hmt_state_dict(base.hmt_state_dict())
    paper.to(torch.bfloat16)
    sets = eval_docs(root, 4 if ns.quick else ns.max_articles)
    if ns.quick:
        sets = {k: v[:16] for k, v in sets.items()}
    results = {}
    for name, docs in sets.items():
        t0 = time.perf_counter()
        f = features(model, paper, tokenizer, docs)
        table = {"chance": chance(f), "checkpoint's trained paper recall": trained_paper(f, base)}
        pairs = [(q, "content (main pass)") for q in ("question, pooled", "prompt, pooled", "question, S_q")]
        pairs += [("question, S_q", "paper S_n"), ("prompt, S_q", "paper S_n"), ("question, pooled", "memory")]
        pairs += [(f"question alone, depth {d}", f"alone, depth {d}") for d in DEPTHS]
        for q, s in pairs:
            table[f"{q} -> {s}"] = score_pair(f, q, s, 100 if ns.quick else ns.steps)
        results[name] = {"queries": len(f["positives"]), "segments": int(f["segment_doc"].numel()),
                         "documents": int(f["segment_doc"].max()) + 1, "table": table,
                         "seconds": time.perf_counter() - t0}
        print(format_set(name, results[name]), flush=True)
    payload = {
        "results": results,
        "settings": {"quick": ns.quick, "max_articles": ns.max_articles, "steps": ns.steps, "checkpoint": str(path)},
        "machine": machine_info(device="cpu", dtype="bfloat16", threads=threads),
        "seconds": time.perf_counter() - began,
    }
    write_results("recall_probe", payload, ns.out)
    return 0


def format_set(name: str, res: dict) -> str:
    lines = [f"{name}: {res['queries']} questions, {res['documents']} documents, {res['segments']} segments (hit@1)"]
    lines.append(f"  {'query -> segment':62s} {'cosine':>8s} {'centred':>8s} {'linear':>8s}")
    for row, value in res["table"].items():
        if "hit@1" in value:
            lines.append(f"  {row:62s} {value['hit@1']:8.3f}")
        else:
            lines.append(f"  {row:62s} " + " ".join(f"{value[k]['hit@1']:8.3f}" for k in value))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
