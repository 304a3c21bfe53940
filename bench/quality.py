"""Quality of the committed checkpoint: perplexity by context length, and QA on three biomedical sets.

Three parts, one model load (the QA engine's HMT model also serves the perplexity pass):

(a) perplexity: :func:`qa_pipeline.evaluate.ppl_by_context` -- the same function ``hmtqa eval ppl``
    runs -- on the held-out part of WikiText-2 and the PG-19 book (the training recipe never reads it),
    for contexts X = 2048 ... 32768 and modes none, window, rmt, hmt and full (the plain backbone over
    all X + L tokens, only where that fits in its 8192 positions). ``--max-windows 1`` (one window of
    X_max + L tokens per text) bounds the time.

(b) question answering: :func:`qa_pipeline.batch.run_batch` -- what ``hmtqa batch`` runs -- over
    ``--rows`` rows (default 10) of each data set, in all four answer modes side by side:

    * fused PubMedQA (``--fuse`` 8 abstracts per document), HELD-OUT rows only:
      ``pubmedqa_split(root, num_docs=8)[1]`` -- the first 400 questions train the checkpoint;
    * COVID-QA (open questions over whole articles): SQuAD exact match and token F1;
    * Evidence Inference 2.0 (closed three-way questions over clinical-trial articles).

    ``--pick spread`` (default) takes rows round-robin over documents (the first question of every
    document, then the second, ...), so 10 rows cover up to 10 articles instead of the first one or
    two; ``--pick first`` takes the first rows in file order. Metrics: accuracy and macro-F1 (closed
    questions), exact match and token F1 (open), evidence hit@1 / hit@5 (any of the top-k evidence
    spans overlaps gold evidence), and the median answer latency. Latency is the answer's alone: before
    a document's questions, its HMT memories (ingestion) and its MiniLM index (for dense-rag) are built,
    and both costs are reported apart, as a deployment would index a document before questions come.

(c) recall: :func:`qa_pipeline.recall_eval.run_recall_eval` -- what ``hmtqa eval recall`` runs -- on
    the held-out sets: hit@1, hit@5 and MRR of HMT's recall, the dense retriever and BM25 over the same
    HMT segments, beside chance (``--recall-docs`` documents and ``--recall-questions`` questions per set).

Answers and the memory store go to ``--work-dir`` (default ``bench/results/quality-work/``), in a
subfolder named after the model (backbone, checkpoint hash, dtype, window of mode ``none``, answer
length), so answers of different models never mix. A run resumes there: rows already answered are
not answered again (as with ``hmtqa batch``), and the perplexity table is reused when its settings
match; ``--fresh`` starts over. ``--quick`` always starts fresh.

Everything goes to ``bench/results/quality.json``, and the tables are printed as Markdown for the README.

    python -m bench.quality [--quick] [--parts ppl,qa,recall] [--rows 10] [--fresh] [--threads 1]

Over 500 lines: one benchmark (every answer mode on the dev sets, with its tables), used nowhere else.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

# bench.common sorts before hmt/qa_pipeline, so its offline environment is set before transformers loads.
from bench.common import (
    RESULTS_DIR,
    apply_threads,
    base_parser,
    finish_machine_info,
    machine_info,
    write_results,
)
from hmt import DEFAULT_BACKBONE
from qa_pipeline.batch import batch_metrics, pending, run_batch
from qa_pipeline.datasets import load_batch_data
from qa_pipeline.documents import Document
from qa_pipeline.engine import ANSWER_MODES, DEFAULT_CHECKPOINT, Engine, EngineConfig
from qa_pipeline.evaluate import PPL_MODES, ppl_by_context
from qa_pipeline.qa_data import QARow
from qa_pipeline.store import StoreError
from qa_pipeline.train_data import data_dir, pubmedqa_split, text_splits

NAME = "quality"
DATASETS = ("pubmedqa", "covidqa", "evidence-inference")
DATASET_TITLES = {
    "pubmedqa": "PubMedQA (fused, held-out)",
    "covidqa": "COVID-QA",
    "evidence-inference": "Evidence Inference",
}


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--backbone", default=None, help=f"default {DEFAULT_BACKBONE}; --quick: tiny-random")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="HMT checkpoint folder, 'default' (the committed checkpoints/smollm2-135m-instruct-hmt; an "
        "error if it is missing) or 'none' (untrained memory). Default 'default'; --quick: none",
    )
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--parts", default="ppl,qa,recall", help="what to run: ppl, qa, recall (default all three)")
    # (a) perplexity
    p.add_argument("--contexts", default=None, help="X values (default 2048,...,32768; --quick: 512,1024)")
    p.add_argument("--ppl-modes", default=",".join(PPL_MODES), help=f"default {','.join(PPL_MODES)}")
    p.add_argument(
        "--max-windows", type=int, default=1, help="windows per held-out text (default 1; 0 = all)"
    )
    p.add_argument("--texts", default=None, help="subset of wikitext-2,pg19 (default both)")
    # (b) QA
    p.add_argument("--datasets", default=",".join(DATASETS), help=f"default {','.join(DATASETS)}")
    p.add_argument("--modes", default=",".join(ANSWER_MODES), help="answer modes (default all four)")
    p.add_argument("--rows", type=int, default=None, help="rows per data set (default 10; --quick: 2)")
    p.add_argument(
        "--pick",
        choices=["spread", "first"],
        default="spread",
        help="spread: round-robin over documents (default); first: file order",
    )
    p.add_argument("--fuse", type=int, default=8, help="abstracts per fused PubMedQA document")
    p.add_argument(
        "--full-context-tokens",
        type=int,
        default=EngineConfig.full_context_tokens,
        help="window of answer mode 'none' (default: the engine's, 2048 tokens, which keeps a CPU run "
        "near half an hour; 8192 is SmolLM2's whole window)",
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit (open questions)")
    p.add_argument(
        "--work-dir",
        default=str(RESULTS_DIR / "quality-work"),
        help="answers (JSONL) and the memory store; resumable",
    )
    # (c) recall
    p.add_argument("--recall-sets", default="pubmedqa-8,pubmedqa-32,covidqa,evidence-inference")
    p.add_argument("--recall-docs", type=int, default=None, help="documents per recall set (default 20; --quick: 2)")
    p.add_argument("--recall-questions", type=int, default=100, help="questions per recall set (default 100)")
    p.add_argument("--fresh", action="store_true", help="discard earlier answers of the same model first")
    args = p.parse_args(argv)
    if args.backbone is None:
        args.backbone = "tiny-random" if args.quick else DEFAULT_BACKBONE
    if args.checkpoint is None:
        args.checkpoint = "none" if args.quick else "default"
    if args.contexts is None:
        args.contexts = "512,1024" if args.quick else "2048,4096,8192,16384,32768"
    if args.rows is None:
        args.rows = 2 if args.quick else 10
    if args.recall_docs is None:
        args.recall_docs = 2 if args.quick else 20
    args.recall_sets = _csv(args.recall_sets)
    args.parts = _csv(args.parts)
    args.contexts = tuple(int(x) for x in _csv(args.contexts))
    args.ppl_modes = tuple(_csv(args.ppl_modes))
    args.datasets = _csv(args.datasets)
    args.modes = tuple(_csv(args.modes))
    for name, values, allowed in (
        ("--parts", args.parts, ("ppl", "qa", "recall")),
        ("--ppl-modes", args.ppl_modes, PPL_MODES),
        ("--datasets", args.datasets, DATASETS),
        ("--modes", args.modes, ANSWER_MODES),
    ):
        bad = [v for v in values if v not in allowed]
        if bad:
            p.error(f"{name}: unknown {bad}; choose from {', '.join(allowed)}")
    return args


def resolve_checkpoint(arg: str, backbone: str) -> str | None:
    """'none' -> None; 'default' -> the committed checkpoint, which must exist (untrained numbers are
    not what this benchmark reports); anything else is a folder."""
    if arg.lower() == "none":
        return None
    if arg == "default":
        if backbone != DEFAULT_BACKBONE or not DEFAULT_CHECKPOINT.is_dir():
            raise SystemExit(
                f"[{NAME}] the committed checkpoint {DEFAULT_CHECKPOINT} is missing (or --backbone is not "
                f"{DEFAULT_BACKBONE}); train it first, or pass --checkpoint PATH, or --checkpoint none for "
                "untrained memory parameters"
            )
        return str(DEFAULT_CHECKPOINT)
    if not Path(arg).is_dir():
        raise SystemExit(f"[{NAME}] checkpoint folder {arg} not found")
    return arg


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def work_folder(args: argparse.Namespace, engine: Engine) -> Path:
    """This model's folder under ``--work-dir`` (wiped with --fresh or --quick)."""
    name = _slug(
        f"{Path(args.backbone).name}-{engine.checkpoint_id}-{args.dtype}-fc{args.full_context_tokens}"
        f"-new{args.max_new_tokens}"
    )
    folder = Path(args.work_dir) / name
    if (args.fresh or args.quick) and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def log(msg: str) -> None:
    sys.stderr.write(f"[{NAME}] {msg}\n")
    sys.stderr.flush()


# ---------------------------------------------------------------------------------------- (a) perplexity
def run_ppl(engine: Engine, root: Path, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    settings = {
        "contexts": list(args.contexts),
        "modes": list(args.ppl_modes),
        "max_windows": args.max_windows or None,
        "texts": args.texts or "wikitext-2,pg19",
        "checkpoint": engine.checkpoint_id,
    }
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    cache = folder / f"ppl-{key}.json"
    if cache.is_file():
        log(f"perplexity: reusing {cache} (--fresh to recompute)")
        return json.loads(cache.read_text())
    wanted = _csv(args.texts) if args.texts else None
    splits = [s for s in text_splits(root) if wanted is None or s.name in wanted]
    tokenizer = engine.tokenizer
    token_ids = [tokenizer(s.heldout, add_special_tokens=False).input_ids for s in splits]
    log(
        f"perplexity: held-out {', '.join(f'{s.name} ({len(t)} tokens)' for s, t in zip(splits, token_ids, strict=True))}"
    )
    start = time.perf_counter()
    result = ppl_by_context(
        engine.model,
        token_ids,
        contexts=args.contexts,
        modes=args.ppl_modes,
        max_windows=args.max_windows or None,
        progress=lambda msg: log(f"perplexity: {msg}"),
    )
    result.update(settings)
    result["texts_tokens"] = {s.name: len(t) for s, t in zip(splits, token_ids, strict=True)}
    result["wall_s"] = time.perf_counter() - start
    cache.write_text(json.dumps(result, indent=2))
    return result


# ---------------------------------------------------------------------------------------- (b) QA
def spread(rows: list[QARow], n: int) -> list[QARow]:
    """``n`` rows round-robin over documents (in order of first appearance), each document's rows in order."""
    by_doc: dict[str, list[QARow]] = {}
    for row in rows:
        by_doc.setdefault(row.doc_id or row.document_path or row.row_id, []).append(row)
    out: list[QARow] = []
    depth = 0
    while len(out) < n and any(len(v) > depth for v in by_doc.values()):
        for doc_rows in by_doc.values():
            if depth < len(doc_rows) and len(out) < n:
                out.append(doc_rows[depth])
        depth += 1
    return out


def dataset_rows(name: str, root: Path, args: argparse.Namespace) -> list[QARow]:
    if name == "pubmedqa":
        # Held-out questions only: the first 400 (pubmedqa_split's train part) train the checkpoint.
        _, heldout = pubmedqa_split(root, num_docs=args.fuse)
        rows = heldout
    elif name == "covidqa":
        rows = load_batch_data(f"covidqa:{root / 'covid-qa' / 'covidqa_dev.json'}")
    else:
        rows = load_batch_data(f"evidence-inference:{root / 'evidence-inference'}")
    return spread(rows, args.rows) if args.pick == "spread" else rows[: args.rows]


def prepare_document(engine: Engine, store: Any, row: QARow, dense: bool) -> dict[str, float]:
    """Index a document the way a deployment would before any question: HMT memories (``Engine.ingest``,
    as ``run_batch`` would do on the document's first row) and, for mode dense-rag, its MiniLM index.

    Without this, dense-rag's first answer per document would include embedding the whole document
    while HMT's ingestion is excluded from answer latency (``run_batch`` times the answer only). The
    dense index is built through the engine's own cache (keyed like ``Engine.ask`` keys it); if that
    key ever changes, this only costs a rebuild at answer time, never a wrong answer.
    """
    out = {"ingest_s": 0.0, "ingest_tokens": 0, "dense_index_s": 0.0}
    if not row.doc_id:
        return out  # run_batch names such documents itself
    try:
        text = row.load_document()
        if row.doc_id not in store:
            _, ingest = engine.ingest(
                store,
                Document(doc_id=row.doc_id, title=row.doc_id, text=text, source=row.document_path or "batch"),
            )
            out["ingest_s"], out["ingest_tokens"] = ingest["total_s"], ingest["tokens"]
        if dense:
            info = store.get_document(row.doc_id)
            if store.get_text(row.doc_id) == text:
                version = (info.created_at, info.n_tokens, info.n_segments, len(text))
                start = time.perf_counter()
                engine._dense_evidence(store, row.doc_id, text, "warm-up", version)
                out["dense_index_s"] = time.perf_counter() - start
    except (ValueError, OSError, StoreError) as err:  # run_batch records the row's error itself
        log(f"{row.row_id}: not prepared ({type(err).__name__}: {err})")
    return out


def run_qa(engine: Engine, root: Path, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    store = engine.open_store(folder / "store")
    try:
        for name in args.datasets:
            rows = dataset_rows(name, root, args)
            path = folder / f"{name}.jsonl"
            groups: dict[str, list[QARow]] = {}
            for row in rows:
                groups.setdefault(row.doc_id or row.row_id, []).append(row)
            log(f"{name}: {len(rows)} rows over {len(groups)} documents x {len(args.modes)} modes")
            start, last = time.perf_counter(), time.perf_counter()
            prep = {"ingest_s": 0.0, "ingest_tokens": 0, "dense_index_s": 0.0}
            for g, group in enumerate(groups.values()):
                # One document at a time: the engine keeps only the last 16 dense indexes.
                if pending(group, path, args.modes):
                    for key, value in prepare_document(
                        engine, store, group[0], "dense-rag" in args.modes
                    ).items():
                        prep[key] += value
                    run_batch(engine, group, path, store, modes=args.modes)
                if time.perf_counter() - last > 30 or g + 1 == len(groups):
                    log(f"{name}: {g + 1}/{len(groups)} documents ({time.perf_counter() - start:.0f} s)")
                    last = time.perf_counter()
            wall = time.perf_counter() - start
            metrics = batch_metrics(path, rows, args.modes)
            out[name] = {
                "rows": len(rows),
                "documents": len(groups),
                "answers": len(rows) * len(args.modes),
                "row_ids": [r.row_id for r in rows],
                "wall_s_this_run": wall,
                # Indexing cost of this run (documents already in the store from an earlier run: 0).
                "hmt_ingest_s": prep["ingest_s"],
                "hmt_ingest_tokens": prep["ingest_tokens"],
                "dense_index_s": prep["dense_index_s"],
                "metrics": metrics,
                "results_jsonl": str(path),
            }
    finally:
        store.close()
    return out


# ---------------------------------------------------------------------------------------- tables
def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def _k(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def ppl_markdown(result: dict[str, Any]) -> str:
    xs = [str(x) for x in result["contexts"]]
    lines = [
        f"Perplexity of the {result['segment_length']}-token segment after X tokens of context "
        f"(held-out {result['texts']}, {result['windows']} window(s); `full` = plain backbone over all "
        "X + L tokens, only where that fits in 8192 positions):",
        "",
        "| mode | " + " | ".join(_k(int(x)) for x in xs) + " |",
        "|---|" + "---:|" * len(xs),
    ]
    for mode, row in result["ppl"].items():
        lines.append(f"| `{mode}` | " + " | ".join(_fmt(row.get(x), ".2f") for x in xs) + " |")
    return "\n".join(lines)


def qa_markdown(qa: dict[str, Any], modes: tuple[str, ...]) -> str:
    lines = [
        "| data set | mode | n | accuracy | macro-F1 | EM | token F1 | hit@1 | hit@5 | p50 latency (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, res in qa.items():
        for mode in modes:
            m = res["metrics"].get(mode, {})
            errors = m.get("n_errors") or 0
            n = f"{m.get('n', 0)}" + (f" ({errors} errors)" if errors else "")
            lines.append(
                f"| {DATASET_TITLES[name]} | `{mode}` | {n} | {_fmt(m.get('accuracy'))} | {_fmt(m.get('macro_f1'))} "
                f"| {_fmt(m.get('exact_match'))} | {_fmt(m.get('token_f1'))} | {_fmt(m.get('hit@1'), '.2f')} "
                f"| {_fmt(m.get('hit@5'), '.2f')} | {_fmt(m.get('latency_p50_s'), '.2f')} |"
            )
    return "\n".join(lines)


def headline_markdown(qa: dict[str, Any], modes: tuple[str, ...]) -> str:
    """One line per data set and metric, the modes side by side."""
    lines = [
        "| data set | metric | " + " | ".join(f"`{m}`" for m in modes) + " |",
        "|---|---|" + "---:|" * len(modes),
    ]
    for name, res in qa.items():
        metric_names = (
            [("token_f1", "token F1"), ("exact_match", "EM")]
            if name == "covidqa"
            else [("accuracy", "accuracy"), ("macro_f1", "macro-F1")]
        )
        for key, label in [*metric_names, ("hit@1", "evidence hit@1"), ("latency_p50_s", "p50 latency (s)")]:
            spec = ".2f" if key in ("hit@1", "latency_p50_s") else ".3f"
            cells = [_fmt(res["metrics"].get(m, {}).get(key), spec) for m in modes]
            lines.append(f"| {DATASET_TITLES[name]} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = apply_threads(args.threads)
    info = machine_info(device=args.device, dtype=args.dtype, threads=threads)
    try:
        root = data_dir(args.data_dir)
    except FileNotFoundError as err:
        raise SystemExit(f"[{NAME}] {err}") from err
    checkpoint = resolve_checkpoint(args.checkpoint, args.backbone)
    start = time.perf_counter()
    engine = Engine(
        EngineConfig(
            backbone=args.backbone,
            checkpoint=checkpoint,
            dtype=args.dtype,
            device=args.device,
            full_context_tokens=args.full_context_tokens,
            max_new_tokens=args.max_new_tokens,
        )
    )
    folder = work_folder(args, engine)
    log(
        f"model {args.backbone} ({engine.checkpoint_id}, {args.dtype}) loaded in "
        f"{time.perf_counter() - start:.1f} s; work folder {folder}"
    )
    timings: dict[str, float] = {}
    ppl = qa = recall = None
    markdown: dict[str, str] = {}
    if "ppl" in args.parts:
        t = time.perf_counter()
        ppl = run_ppl(engine, root, args, folder)
        timings["ppl_s"] = time.perf_counter() - t
        markdown["ppl"] = ppl_markdown(ppl)
    if "qa" in args.parts:
        t = time.perf_counter()
        qa = run_qa(engine, root, args, folder)
        timings["qa_s"] = time.perf_counter() - t
        markdown["qa_headline"] = headline_markdown(qa, args.modes)
        markdown["qa"] = qa_markdown(qa, args.modes)
    if "recall" in args.parts:
        from qa_pipeline.recall_eval import recall_markdown, run_recall_eval

        t = time.perf_counter()
        store = engine.open_store(folder / "recall-store")
        recall = run_recall_eval(
            engine, root, store, sets=args.recall_sets, limit_docs=args.recall_docs,
            limit_questions=args.recall_questions,
        )
        timings["recall_s"] = time.perf_counter() - t
        markdown["recall"] = recall_markdown(recall)
    timings["total_s"] = time.perf_counter() - start

    model_line = (
        f"Model: {args.backbone} + HMT checkpoint {engine.checkpoint_id} ({args.dtype}); answer mode `none` "
        f"reads the first {args.full_context_tokens} tokens; answers up to {args.max_new_tokens} tokens."
    )
    print(f"\n{model_line}")
    for key, title in (
        ("ppl", "Perplexity"),
        ("qa_headline", "QA, modes side by side"),
        ("qa", "QA, all metrics"),
        ("recall", "Recall of the gold segment (HMT segments; chance = random ranking)"),
    ):
        if key in markdown:
            print(f"\n### {title}\n\n{markdown[key]}")
    if qa is not None:
        print(
            f"\n{args.rows} rows per data set ({args.pick}); PubMedQA: held-out fused rows (fuse {args.fuse}), "
            "never the 400 training questions. Latency: the answer only; each document's HMT memories and "
            "MiniLM index are built before its questions and not counted. hit@k: a top-k "
            "evidence span overlaps gold evidence (mode `none`: its one span is the truncated window)."
        )
        for name, res in qa.items():
            print(
                f"indexing {DATASET_TITLES[name]} this run: HMT ingestion {res['hmt_ingest_s']:.1f} s for "
                f"{res['hmt_ingest_tokens']} tokens, MiniLM index {res['dense_index_s']:.1f} s"
            )
    sys.stdout.flush()
    payload = {
        "benchmark": NAME,
        "machine": finish_machine_info(info),
        "settings": {
            "backbone": args.backbone,
            "checkpoint": engine.checkpoint_id,
            "checkpoint_path": checkpoint,
            "dtype": args.dtype,
            "segment_length": engine.model.config.segment_length,
            "parts": args.parts,
            "contexts": list(args.contexts),
            "ppl_modes": list(args.ppl_modes),
            "max_windows": args.max_windows or None,
            "datasets": args.datasets,
            "modes": list(args.modes),
            "rows_per_dataset": args.rows,
            "pick": args.pick,
            "fuse": args.fuse,
            "full_context_tokens": args.full_context_tokens,
            "max_new_tokens": args.max_new_tokens,
            "data_dir": str(root),
            "work_dir": str(folder),
            "quick": args.quick,
            "recall_sets": args.recall_sets,
            "recall_docs": args.recall_docs,
            "recall_questions": args.recall_questions,
        },
        "timings": timings,
        "ppl": ppl,
        "qa": qa,
        "recall": recall,
        "markdown": markdown,
        "model_line": model_line,
    }
    write_results(NAME, payload, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
