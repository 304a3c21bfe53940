"""Answer latency after ingestion: time to first token and total time of a 64-token answer, per mode.

One long document (default: a PLOS article cut to 8192 tokens; ``--source pg19`` reads Pride and
Prejudice instead; synthetic text when no data folder is found) is ingested once into a temporary
store. Then the same open question is answered in every mode of :meth:`qa_pipeline.engine.Engine.ask`:

* ``hmt``            -- the question recalls the document's memories; prompt = question only;
* ``hmt+retrieval``  -- as hmt, plus the raw text of the top recalled segments in the prompt;
* ``dense-rag``      -- the plain backbone with the top all-MiniLM-L6-v2 chunks in the prompt;
* ``none``           -- the plain backbone reading the document up to ``--full-context-tokens``
  (default 8192, SmolLM2's whole window): the "full context" baseline.

What is timed is ``Engine.ask`` itself, unmodified: memory rebuild from the store, FAISS recall,
dense retrieval, prompt construction, prefill and decoding, exactly as the CLI, batch and web app
run it. Its own ``timings`` give the numbers: ``first_token_s`` (from the start of the answer to the
first generated token) and ``total_s``.

Fixed answer length: every mode must generate exactly ``--new-tokens`` tokens, or a mode whose answer
happens to stop early would look faster. ``ask`` stops at the tokenizer's end-of-sequence token, so
for the duration of the measurement the end-of-sequence logit is set to -inf on the two model
instances the engine answers with (``engine.model`` and ``engine.plain``). This is what
``min_new_tokens`` does in Hugging Face's ``generate``: the greedy pick simply never chooses EOS, and
every other step of ``ask`` runs unchanged. The patch is a per-instance attribute (the class is not
touched) removed afterwards, and a counting wrapper around ``iter_generate`` checks that every timed
answer really produced ``--new-tokens`` tokens and records the prompt length of each mode.

With a reader (``--reader``, by default the default backbone's: Qwen2.5-Coder-0.5B-Instruct), the
open answers of the modes with text in the prompt are written by the reader, as they are in use: its
answer ends with its first sentence (the short answer), so those rows time real answers, not
``--new-tokens`` ones; their generated tokens are counted and reported (``new_tokens``). The budget
for them is an answer in 10 s or less (``READER_BUDGET_S``).

Protocol: one untimed warm-up answer per mode (loads the MiniLM embedder, builds the dense index,
fills the engine's caches, grows the allocator), then ``--repeats`` timed rounds (default 3); each
round answers once in every mode, in alternating order, so that load from other jobs on a shared
machine slows all modes alike. Reported: medians over the rounds, and the ratio
``hmt total / dense-rag total`` (target: <= 1.0, HMT no slower than the RAG baseline).

    python -m bench.answer_latency [--quick] [--source plos|pg19|synthetic] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# bench.common sorts before hmt/qa_pipeline, so its offline environment is set before transformers loads.
from bench.common import (
    apply_threads,
    base_parser,
    data_dir,
    finish_machine_info,
    machine_info,
    median,
    print_table,
    write_results,
)
from hmt import HMTModel
from qa_pipeline.documents import Document, load_documents
from qa_pipeline.engine import ANSWER_MODES, Engine, EngineConfig

NAME = "answer_latency"
TARGET_RATIO = 1.0  # hmt total / dense-rag total
READER_BUDGET_S = 10.0  # an answer written by a reader, after ingestion, on 2 CPU cores
QUESTIONS = {
    "plos": "What was the main finding of this study, and how was it obtained?",
    "pg19": "How do Elizabeth Bennet and Mr. Darcy first meet, and what does she think of him?",
    "synthetic": "What is this document about?",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = EngineConfig()
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--backbone", default=None, help=f"default {defaults.backbone}; --quick: tiny-random")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="HMT checkpoint folder, 'default' (the committed one if present, else untrained) or 'none'; "
        "latency does not depend on the parameter values. Default 'default'; --quick: none",
    )
    p.add_argument("--dtype", default=defaults.dtype)
    p.add_argument(
        "--reader",
        default=defaults.reader,
        help="reader of the modes with text in the prompt ('default': the default backbone's; 'none')",
    )
    p.add_argument(
        "--full-context-tokens",
        type=int,
        default=8192,
        help="window of mode 'none' (default 8192 = SmolLM2's whole window, the full-context baseline)",
    )
    p.add_argument("--source", choices=["plos", "pg19", "synthetic"], default="plos", help="the document")
    p.add_argument(
        "--doc-tokens", type=int, default=None, help="document length (default 8192; --quick: 1024)"
    )
    p.add_argument("--new-tokens", type=int, default=None, help="answer length (default 64; --quick: 8)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up (median reported)")
    p.add_argument("--modes", default=",".join(ANSWER_MODES), help="comma-separated answer modes")
    p.add_argument("--question", default=None, help="the question (default: one that fits --source)")
    args = p.parse_args(argv)
    if args.backbone is None:
        args.backbone = "tiny-random" if args.quick else defaults.backbone
    if args.checkpoint is None:
        args.checkpoint = "none" if args.quick else "default"
    if args.doc_tokens is None:
        args.doc_tokens = 1024 if args.quick else 8192
    if args.new_tokens is None:
        args.new_tokens = 8 if args.quick else 64
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in ANSWER_MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {', '.join(ANSWER_MODES)}")
    return args


# ---------------------------------------------------------------------------------------- document
def pick_plos_article(root: Path, min_words: int) -> Path | None:
    """The first PLOS research article (by file name) with at least ``min_words`` body words, else the longest."""
    import csv

    table = root / "pmc-oa" / "ARTICLES.tsv"
    if not table.is_file():
        return None
    with table.open(encoding="utf-8", newline="") as fh:
        rows = [
            r
            for r in csv.DictReader(fh, delimiter="\t")
            if r.get("article_type") == "research-article" and (root / r["file"]).is_file()
        ]
    if not rows:
        return None
    rows.sort(key=lambda r: r["file"])
    words = {r["file"]: int(r.get("body_words") or 0) for r in rows}
    chosen = next((r["file"] for r in rows if words[r["file"]] >= min_words), None)
    return root / (chosen or max(words, key=words.get))


def synthetic_text(n_words: int) -> str:
    """Deterministic English-looking filler (no data folder): sentences over a small vocabulary."""
    import random

    rng = random.Random(0)
    vocab = (
        "patients trial dose outcome placebo cohort mortality risk analysis treatment group baseline "
        "follow-up randomised significant increase decrease control study measured blood pressure week"
    ).split()
    sentences = []
    while sum(len(s.split()) for s in sentences) < n_words:
        sentences.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(8, 20))).capitalize() + ".")
    return " ".join(sentences)


def load_document(args: argparse.Namespace, tokenizer: Any) -> tuple[Document, str, str]:
    """(document cut to ``--doc-tokens`` tokens, description of its origin, source kind actually used)."""
    root = data_dir(args.data_dir)
    source, text, title, origin = args.source, None, "", ""
    if root is not None and source == "plos":
        path = pick_plos_article(root, min_words=args.doc_tokens)  # ~1.3 tokens per word: long enough
        if path is not None:
            doc = load_documents(path)[0]
            text, title, origin = doc.text, doc.title, str(path.relative_to(root))
    if root is not None and source == "pg19" and (root / "pg19" / "pg1342_pride_and_prejudice.txt").is_file():
        rel = "pg19/pg1342_pride_and_prejudice.txt"
        text, title, origin = (root / rel).read_text(encoding="utf-8"), "Pride and Prejudice", rel
    if text is None:
        source, title, origin = "synthetic", "synthetic", "synthetic filler text (no data folder)"
        text = synthetic_text(args.doc_tokens)
    enc = tokenizer(text[: args.doc_tokens * 12], add_special_tokens=False, return_offsets_mapping=True)
    n = min(args.doc_tokens, len(enc.input_ids))
    cut = enc.offset_mapping[n - 1][1] if n else 0
    if n < args.doc_tokens:
        print(
            f"[{NAME}] note: the document has only {n} tokens (asked for {args.doc_tokens})", file=sys.stderr
        )
    doc = Document(doc_id="latency-doc", title=title, text=text[:cut], source=origin)
    return doc, f"{origin}, first {n} tokens", source


# ---------------------------------------------------------------------------------------- measurement
@contextlib.contextmanager
def fixed_length_answers(engine: Engine) -> Iterator[list[dict[str, int]]]:
    """Make ``Engine.ask`` generate exactly ``max_new_tokens`` tokens; yield per-answer generation stats.

    On both answering instances (``engine.model``, ``engine.plain``) the EOS logit is set to -inf
    (``min_new_tokens``), and ``iter_generate`` is wrapped to count the tokens it yields and note the
    prompt length. Both are instance attributes, deleted on exit (back to the class methods).
    """
    eos = engine.tokenizer.eos_token_id
    stats: list[dict[str, int]] = []
    models = [engine.model] if engine.plain is engine.model else [engine.model, engine.plain]

    def patch(model: HMTModel) -> None:
        lm_head, iter_generate = model._lm_head, model.iter_generate

        def no_eos_head(hidden: torch.Tensor) -> torch.Tensor:
            logits = lm_head(hidden)
            if eos is not None:
                logits[..., eos] = float("-inf")
            return logits

        def counting_generate(input_ids: torch.Tensor, *a: Any, **kw: Any) -> Iterator[torch.Tensor]:
            entry = {"prompt_tokens": int(input_ids.shape[1]), "new_tokens": 0}
            stats.append(entry)
            for step in iter_generate(input_ids, *a, **kw):
                entry["new_tokens"] += 1
                yield step

        model._lm_head = no_eos_head  # type: ignore[method-assign]
        model.iter_generate = counting_generate  # type: ignore[method-assign]

    for m in models:
        patch(m)
    reader = engine.reader
    if reader is not None:  # its answers are timed as written: count their prompt, not their length
        prompt_ids = reader.prompt_ids

        def counting_prompt(question: str, context: str | None) -> torch.Tensor:
            ids = prompt_ids(question, context)
            stats.append({"prompt_tokens": int(ids.shape[1]), "new_tokens": None})
            return ids

        reader.prompt_ids = counting_prompt  # type: ignore[method-assign]
    try:
        yield stats
    finally:
        for m in models:
            del m._lm_head, m.iter_generate
        if reader is not None:
            del reader.prompt_ids


def answer_once(
    engine: Engine,
    store: Any,
    doc_id: str,
    question: str,
    mode: str,
    new_tokens: int,
    stats: list[dict[str, int]],
) -> dict[str, Any]:
    n_before = len(stats)
    wall, cpu = time.perf_counter(), time.process_time()
    ans = engine.ask(store, doc_id, question, mode=mode, max_new_tokens=new_tokens, record=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    gen = stats[n_before:]
    if ans.reader and len(gen) == 1 and gen[0]["new_tokens"] is None:
        gen[0]["new_tokens"] = len(engine.reader.tokenizer(ans.sentence or "", add_special_tokens=False).input_ids)
    elif len(gen) != 1 or gen[0]["new_tokens"] != new_tokens:
        raise RuntimeError(f"mode {mode}: expected one generation of {new_tokens} tokens, got {gen}")
    return {
        "ttft_s": ans.timings["first_token_s"],
        "total_s": ans.timings["total_s"],
        "recall_s": ans.timings["recall_s"],
        "call_wall_s": wall,
        "call_cpu_s": cpu,
        "prompt_tokens": gen[0]["prompt_tokens"],
        "new_tokens": gen[0]["new_tokens"],
        "reader": ans.reader,
        "answer": ans.answer,
    }


def measure(
    engine: Engine, store: Any, doc_id: str, question: str, args: argparse.Namespace
) -> dict[str, list]:
    """Warm-up once per mode, then ``repeats`` round-robin rounds (order flips every other round)."""
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.modes}
    with fixed_length_answers(engine) as stats:
        for mode in args.modes:
            start = time.perf_counter()
            answer_once(engine, store, doc_id, question, mode, args.new_tokens, stats)
            print(f"[{NAME}] warm-up {mode}: {time.perf_counter() - start:.2f} s", flush=True)
        for r in range(args.repeats):
            for mode in args.modes if r % 2 == 0 else args.modes[::-1]:
                runs[mode].append(answer_once(engine, store, doc_id, question, mode, args.new_tokens, stats))
            done = ", ".join(f"{m} {runs[m][-1]['total_s']:.2f}s" for m in args.modes)
            print(f"[{NAME}] round {r + 1}/{args.repeats}: {done}", flush=True)
    return runs


def summarise(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for mode, rs in runs.items():
        ttft, total = median([r["ttft_s"] for r in rs]), median([r["total_s"] for r in rs])
        # Decode rate: the tokens after the first, over the time after the first token.
        decode = median([(r["total_s"] - r["ttft_s"]) / max(r["new_tokens"] - 1, 1) for r in rs])
        rows.append(
            {
                "mode": mode,
                "reader": rs[0]["reader"] or "-",
                "prompt_tokens": rs[0]["prompt_tokens"],
                "new_tokens": median([r["new_tokens"] for r in rs]),
                "ttft_ms": 1000 * ttft,
                "recall_ms": 1000 * median([r["recall_s"] for r in rs]),
                "total_s": total,
                "decode_ms_per_token": 1000 * decode,
                "total_ms_per_token": 1000 * total / max(median([r["new_tokens"] for r in rs]), 1),
                "call_cpu_s": median([r["call_cpu_s"] for r in rs]),
                "runs": [
                    {k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items() if k != "answer"}
                    for r in rs
                ],
                "answer_sample": rs[-1]["answer"][:300],
            }
        )
    return rows


def hmt_vs_dense(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any] | None:
    if "hmt" not in runs or "dense-rag" not in runs:
        return None
    h, d = runs["hmt"], runs["dense-rag"]
    ratio = median([r["total_s"] for r in h]) / median([r["total_s"] for r in d])
    paired = median([a["total_s"] / b["total_s"] for a, b in zip(h, d, strict=True)])
    ttft = median([r["ttft_s"] for r in h]) / median([r["ttft_s"] for r in d])
    return {
        "hmt_over_dense_rag_total": ratio,
        "hmt_over_dense_rag_total_paired_median": paired,
        "hmt_over_dense_rag_ttft": ttft,
        "target": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
    }


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = apply_threads(args.threads)
    info = machine_info(device=args.device, dtype=args.dtype, threads=threads)
    checkpoint = None if args.checkpoint.lower() == "none" else args.checkpoint
    load_start = time.perf_counter()
    engine = Engine(
        EngineConfig(
            backbone=args.backbone,
            checkpoint=checkpoint,
            dtype=args.dtype,
            device=args.device,
            full_context_tokens=args.full_context_tokens,
            max_new_tokens=args.new_tokens,
            reader=None if str(args.reader).lower() == "none" else args.reader,
        )
    )
    load_s = time.perf_counter() - load_start
    doc, doc_source, kind = load_document(args, engine.tokenizer)
    question = args.question or QUESTIONS[kind]
    print(
        f"[{NAME}] model {args.backbone} ({engine.checkpoint_id}, {args.dtype}) loaded in {load_s:.1f} s; "
        f"document: {doc_source}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="hmtqa-latency-") as tmp:
        store = engine.open_store(Path(tmp) / "store")
        try:
            _, ingest = engine.ingest(store, doc)
            print(
                f"[{NAME}] ingested {ingest['tokens']} tokens ({ingest['segments']} segments) in "
                f"{ingest['total_s']:.1f} s ({ingest['tokens_per_s']:.0f} tokens/s)",
                flush=True,
            )
            runs = measure(engine, store, doc.doc_id, question, args)
        finally:
            store.close()
    rows = summarise(runs)
    ratio = hmt_vs_dense(runs)
    print_table(
        rows,
        [
            ("mode", "mode", "s"),
            ("reader", "reader", "s"),
            ("prompt_tokens", "prompt tok", "d"),
            ("new_tokens", "new tok", ".0f"),
            ("ttft_ms", "TTFT ms", ".0f"),
            ("total_s", "total s", ".2f"),
            ("decode_ms_per_token", "decode ms/tok", ".1f"),
            ("total_ms_per_token", "total ms/tok", ".1f"),
        ],
        title=f"Answer latency after ingesting {ingest['tokens']} tokens: {args.new_tokens}-token answers, "
        f"median of {args.repeats} (threads={threads}, {args.device}, {args.dtype}, "
        f"'none' window {args.full_context_tokens})",
    )
    if ratio is not None:
        verdict = "meets" if ratio["meets_target"] else "MISSES"
        print(
            f"\nhmt total / dense-rag total = {ratio['hmt_over_dense_rag_total']:.3f} "
            f"(paired median {ratio['hmt_over_dense_rag_total_paired_median']:.3f}; TTFT ratio "
            f"{ratio['hmt_over_dense_rag_ttft']:.3f}) -> {verdict} the target <= {TARGET_RATIO}"
        )
    read = [r for r in rows if r["reader"] != "-"]
    reader_budget = None
    if read:
        worst = max(r["total_s"] for r in read)
        reader_budget = {"worst_total_s": worst, "budget_s": READER_BUDGET_S, "meets": worst <= READER_BUDGET_S}
        print(
            f"reader answers: slowest mode {worst:.2f} s -> "
            f"{'meets' if reader_budget['meets'] else 'MISSES'} the budget <= {READER_BUDGET_S:.0f} s "
            f"(threads={threads}; the budget is for 2 cores)"
        )
    payload = {
        "benchmark": NAME,
        "machine": finish_machine_info(info),
        "settings": {
            "backbone": args.backbone,
            "reader": engine.reader.name if engine.reader is not None else None,
            "checkpoint": engine.checkpoint_id,
            "dtype": args.dtype,
            "full_context_tokens": args.full_context_tokens,
            "segment_length": engine.model.config.segment_length,
            "document": doc_source,
            "document_tokens": ingest["tokens"],
            "question": question,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "warmup_per_mode": 1,
            "quick": args.quick,
            "model_load_s": load_s,
            "method": "Engine.ask timings (first_token_s, total_s) with the EOS logit masked to -inf on "
            "engine.model and engine.plain (min_new_tokens), so every mode generates exactly new_tokens; "
            "rounds round-robin over modes, order alternating; medians reported. decode ms/token = "
            "(total - TTFT) / (new_tokens - 1).",
        },
        "ingest": ingest,
        "results": rows,
        "ratio": ratio,
        "reader_budget": reader_budget,
    }
    write_results(NAME, payload, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
