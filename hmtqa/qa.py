"""``hmtqa ingest | ask | batch | docs``: the document QA commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qa_pipeline.engine import ANSWER_MODES, DEFAULT_MODE, EngineConfig

from .main import CLIError, emit


def _engine_args(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("model")
    defaults = EngineConfig()
    group.add_argument("--backbone", default=defaults.backbone, help="embedded name, hub id or folder")
    group.add_argument(
        "--checkpoint", default=defaults.checkpoint,
        help="HMT checkpoint folder; 'default' = the committed one; 'none' = untrained memory",
    )
    group.add_argument("--dtype", default=defaults.dtype, help="auto (default: bfloat16 where the CPU or GPU computes it natively, else float32), bfloat16 or float32")
    group.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    group.add_argument("--full-context-tokens", type=int, default=defaults.full_context_tokens,
                       help="window of mode 'none'")
    group.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    group.add_argument("--passage-tokens", type=int, default=defaults.passage_tokens,
                       help="open questions in hmt+retrieval: the prompt holds the recalled passages of this "
                       "many tokens (set when a document is ingested; 0: whole segments)")
    group.add_argument("--no-repeat-ngram", type=int, default=defaults.no_repeat_ngram,
                       help="open answers never repeat a run of this many tokens (0: off)")
    group.add_argument(
        "--calibrate-options", action=argparse.BooleanOptionalAction, default=defaults.calibrate_options,
        help="closed questions: rank options by score with the document minus score without it",
    )
    group.add_argument(
        "--quote-answers", action=argparse.BooleanOptionalAction, default=defaults.quote_answers,
        help="open questions: the short answer is quoted from the supporting sentence of the document "
        "(--no-quote-answers: the model's own words)",
    )
    group.add_argument(
        "--reader", default=defaults.reader,
        help="open questions in modes hmt+retrieval, dense-rag and none: this chat model writes the answer "
        "from the passages the memory recalled: an embedded name (qwen2.5-coder-0.5b-instruct), hub id or "
        "folder; 'default': qwen2.5-coder-0.5b-instruct with the default backbone; 'none': the memory "
        "model answers. Recall, evidence and closed answers stay the memory model's",
    )
    group.add_argument(
        "--decision-heads", action=argparse.BooleanOptionalAction, default=defaults.decision_heads,
        help="closed questions in modes hmt/hmt+retrieval: decide with the checkpoint's decision head "
        "(--no-decision-heads: plain likelihood) and say 'not in the document' below its threshold",
    )


def _engine(ns: argparse.Namespace, *, answers: bool = True):
    """The engine the flags select; ``answers``: also load its reader now, so a bad --reader fails
    before any work (ingestion never needs it)."""
    from qa_pipeline.engine import Engine

    checkpoint = None if str(ns.checkpoint).lower() == "none" else ns.checkpoint
    try:
        engine = Engine(
            EngineConfig(
                backbone=ns.backbone, checkpoint=checkpoint, dtype=ns.dtype, device=ns.device,
                full_context_tokens=ns.full_context_tokens, max_new_tokens=ns.max_new_tokens,
                calibrate_options=ns.calibrate_options, no_repeat_ngram=ns.no_repeat_ngram,
                decision_heads=ns.decision_heads, passage_tokens=ns.passage_tokens,
                quote_answers=ns.quote_answers, reader=ns.reader,
            )
        )
        if answers:
            _ = engine.reader
        return engine
    except (ValueError, OSError, RuntimeError) as err:  # bad --dtype/--device, checkpoint of another width
        raise CLIError(f"cannot load the model: {err}") from err


def _existing_store(path: str):
    """Open an existing store read-only (no model needed), so that a wrong --store or --doc fails fast."""
    from qa_pipeline.store import MemoryStore

    return MemoryStore.open(path, create=False)


def _store_errors():
    from qa_pipeline.documents import DocumentError
    from qa_pipeline.engine import QAError
    from qa_pipeline.qa_data import QADataError
    from qa_pipeline.store import StoreError

    return (DocumentError, QAError, QADataError, StoreError, FileNotFoundError)


def cmd_ingest(ns: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from qa_pipeline.documents import load_documents

    try:
        docs, origin = [], {}
        for path in ns.files:  # all files checked before any write
            for d in load_documents(path):
                if d.doc_id in origin:
                    raise CLIError(
                        f"{path} and {origin[d.doc_id]} both give document id {d.doc_id!r}; "
                        "rename one of the files (ids come from file names)"
                    )
                origin[d.doc_id] = path
                docs.append(d)
        engine = _engine(ns, answers=False)
        store = engine.open_store(ns.store)
        taken = [d.doc_id for d in docs if d.doc_id in store]
        if taken and not ns.replace:
            raise CLIError(
                f"document(s) {', '.join(map(repr, taken))} already in the store {ns.store}; "
                "pass --replace to overwrite them (nothing was ingested)"
            )
        results = []
        for doc in docs:
            with tqdm(total=1, desc=doc.doc_id, unit="seg", disable=ns.json, file=sys.stderr) as bar:

                def progress(done: int, total: int, tps: float, bar=bar) -> None:
                    bar.total = total
                    bar.n = done
                    bar.set_postfix(tok_s=f"{tps:.0f}")
                    bar.refresh()

                info, timing = engine.ingest(store, doc, replace=ns.replace, progress=progress)
            results.append({"doc_id": info.doc_id, "title": info.title, "tokens": info.n_tokens,
                            "segments": info.n_segments, **{k: round(v, 3) for k, v in timing.items()}})
    except _store_errors() as err:
        raise CLIError(str(err)) from err
    emit(results, ns.json, lambda: "\n".join(
        f"ingested {r['doc_id']}: {r['tokens']} tokens, {r['segments']} segments, "
        f"{r['tokens_per_s']:.0f} tokens/s" for r in results))
    return 0


def cmd_ask(ns: argparse.Namespace) -> int:
    options = [o.strip() for o in ns.options.split(",") if o.strip()] if ns.options else None
    if not ns.question.strip():
        raise CLIError("the question is empty")
    try:
        with _existing_store(ns.store) as peek:  # before the model loads: a wrong --store/--doc fails fast
            peek.get_document(ns.doc)
        engine = _engine(ns)
        store = engine.open_store(ns.store, create=False)
        stream = None
        if not ns.json and not options and sys.stdout.isatty():
            def stream(text: str) -> None:
                sys.stdout.write("\r" + text)
                sys.stdout.flush()
        ans = engine.ask(store, ns.doc, ns.question, mode=ns.mode, options=options, on_token=stream)
    except _store_errors() as err:
        raise CLIError(str(err)) from err
    if stream is not None:
        sys.stdout.write("\n")

    def text() -> str:
        source = ", quoted from the document" if ans.quoted and not ans.abstained else ""
        reader = f", reader: {ans.reader}" if ans.reader else ""
        lines = [f"Answer ({ans.mode}{reader}{source}): {ans.answer}"]
        if ans.fuller_sentence:
            lines.append(f'The model wrote: "{" ".join(ans.fuller_sentence.split())}"')
        if ans.confidence is not None:
            line = f"Confidence: {ans.confidence:.2f}"
            if ans.abstained:
                line += f" (the document does not seem to say: {ans.abstain_reason or 'low confidence'}"
                if ans.best_guess:
                    line += f"; best guess: {' '.join(ans.best_guess.split())}"
                line += ")"
            lines.append(line)
        if ans.option_scores:
            lines.append("Option scores (log-probabilities): " + ", ".join(f"{o}={s:.2f}" for o, s in ans.option_scores.items()))
        if ans.support is not None:
            sentence = " ".join(ans.support.text.split())
            span = f"chars {ans.support.char_start}-{ans.support.char_end}"
            # An abstained answer's sentence backs only the best guess, not the answer given.
            label = "Sentence behind the best guess" if ans.abstained else "Supporting sentence"
            lines.append(f'{label} ({span}): "{sentence}"')
        lines.append("Evidence:")
        for e in ans.evidence:
            snippet = " ".join(e.snippet.split())[:160]
            where = f"seg {e.segment} passage" if e.passage else f"seg {e.segment}"
            lines.append(f"  [{where}] chars {e.char_start}-{e.char_end} weight {e.weight:.3f}: {snippet}")
        t = ans.timings
        lines.append(f"Time: recall {t['recall_s']:.2f}s, first token {t['first_token_s']:.2f}s, total {t['total_s']:.2f}s")
        return "\n".join(lines)

    emit(ans.to_json(), ns.json, text)
    return 0


def _load_rows(spec: str, ns: argparse.Namespace, errors: list[str]) -> list:
    """Rows of one data spec; malformed JSONL lines are reported in ``errors`` and skipped."""
    from qa_pipeline.datasets import _PREFIXES, _detect_kind, load_batch_data
    from qa_pipeline.qa_data import read_rows

    head, sep, rest = spec.partition(":")
    prefixed = bool(sep) and head.strip().lower() in _PREFIXES
    path = Path(rest if prefixed else spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"batch data not found: {path}")
    kind = _PREFIXES[head.strip().lower()] if prefixed else _detect_kind(path)
    if kind != "jsonl":
        return load_batch_data(spec, limit=ns.limit, fuse=ns.fuse, seed=ns.seed)

    def on_error(line: int, message: str) -> None:
        text = message if message.startswith(f"line {line}") else f"line {line}: {message}"
        errors.append(f"{path}: {text}")

    rows = read_rows(path, on_error=on_error)
    return rows if ns.limit is None else rows[: ns.limit]


def cmd_batch(ns: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from hmt.training import close_distributed, init_distributed
    from qa_pipeline.batch import batch_metrics, check_stamps, merge_parts, pending, run_batch

    modes = tuple(m.strip() for m in ns.modes.split(",") if m.strip())
    bad = [m for m in modes if m not in ANSWER_MODES]
    if bad or not modes:
        raise CLIError(f"unknown mode(s) {bad or [ns.modes]}; choose from {', '.join(ANSWER_MODES)}")
    errors: list[str] = []  # malformed input lines, reported with file and line number
    try:
        rank, world = init_distributed()
        rows = []
        for spec in ns.data:
            rows += _load_rows(spec, ns, errors)
        if rank == 0:
            for message in errors:
                sys.stderr.write(f"hmtqa batch: skipped malformed row: {message}\n")
        if not rows:
            raise CLIError(
                f"no valid rows in {', '.join(ns.data)}" + (f" ({len(errors)} malformed line(s))" if errors else "")
            )
        if world == 1 and not pending(rows, ns.out, modes):  # all answered already
            # The model loads only for its stamp: another model's answers are not summed up as its own.
            check_stamps(ns.out, _engine(ns).answer_stamp)
            merge_parts(Path(ns.out))
            metrics = batch_metrics(ns.out, rows, modes)
        else:
            engine = _engine(ns)
            store_dir = ns.store or str(Path(ns.out).with_suffix("")) + "-store"
            store = _open_shared_store(engine, store_dir, rank, world)
            quiet = ns.json or rank != 0
            with tqdm(total=len(rows) * len(modes), desc="batch", unit="answer", disable=quiet, file=sys.stderr) as bar:
                def progress(done: int, total: int) -> None:
                    bar.total = total
                    bar.n = done
                    bar.refresh()

                metrics = run_batch(engine, rows, ns.out, store, modes=modes, progress=progress)
    except UnicodeDecodeError as err:
        raise CLIError(f"batch data is not UTF-8 text: {err}") from err
    except _store_errors() as err:
        raise CLIError(str(err)) from err
    close_distributed()
    if rank != 0:
        return 0  # rank 0 reports for all ranks

    def text() -> str:
        lines = [format_metrics(metrics)]
        n_err = sum(m.get("n_errors", 0) for m in metrics.values())
        if n_err:
            lines.append(f"{n_err} answer(s) failed (recorded with an 'error' field in {ns.out})")
        if errors:
            lines.append(f"{len(errors)} malformed line(s) skipped:")
            lines += [f"  {e}" for e in errors]
        return "\n".join(lines)

    emit({"metrics": metrics, "errors": errors, "rows": len(rows), "out": ns.out}, ns.json, text)
    return 0


def _open_shared_store(engine, store_dir: str, rank: int, world: int):
    """Open the batch store; under torchrun rank 0 creates it first, so the ranks never race to make it."""
    if world == 1:
        return engine.open_store(store_dir)
    import torch.distributed as dist

    store = engine.open_store(store_dir) if rank == 0 else None
    dist.barrier()
    return store if store is not None else engine.open_store(store_dir)


def format_metrics(metrics: dict) -> str:
    """A side-by-side table of the per-mode metrics."""
    cols = ["n", "accuracy", "macro_f1", "exact_match", "token_f1", "hit@1", "hit@5", "chance_hit@5", "latency_p50_s"]
    lines = ["mode            " + "".join(f"{c:>14}" for c in cols)]
    for mode, m in metrics.items():
        cells = []
        for c in cols:
            v = m.get(c)
            cells.append(f"{'-':>14}" if v is None else f"{v:>14.3f}" if isinstance(v, float) else f"{v:>14}")
        lines.append(f"{mode:<16}" + "".join(cells))
    return "\n".join(lines)


def cmd_docs(ns: argparse.Namespace) -> int:
    from qa_pipeline.store import MemoryStore, StoreError

    try:
        store = MemoryStore.open(ns.store, create=False)
        if ns.action == "delete":
            if not ns.ids:
                raise CLIError("docs delete needs one or more document ids")
            for doc_id in ns.ids:  # all checked before any is deleted
                store.get_document(doc_id)
            for doc_id in ns.ids:
                store.delete_document(doc_id)
            emit({"deleted": ns.ids}, ns.json, lambda: f"deleted {', '.join(ns.ids)}")
            return 0
        docs = store.list_documents()
    except StoreError as err:
        raise CLIError(str(err)) from err
    emit([d.__dict__ for d in docs], ns.json, lambda: "\n".join(
        f"{d.doc_id}\t{d.n_tokens} tokens\t{d.n_segments} segments\t{d.title[:60]}" for d in docs) or "(no documents)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="read documents through HMT into a memory store")
    p.add_argument("files", nargs="+", help=".txt .md .pdf .nxml/.xml (PMC JATS) .json (PubMedQA) .jsonl")
    p.add_argument("--store", required=True, help="memory store folder (created if missing)")
    p.add_argument("--replace", action="store_true", help="replace documents with the same id")
    p.add_argument("--json", action="store_true")
    _engine_args(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("ask", help="answer a question about an ingested document, with evidence")
    p.add_argument("question")
    p.add_argument("--store", required=True)
    p.add_argument("--doc", required=True, help="document id (see `hmtqa docs list`)")
    p.add_argument("--mode", default=DEFAULT_MODE, choices=ANSWER_MODES)
    p.add_argument("--options", help="comma-separated options of a closed question, e.g. yes,no,maybe")
    p.add_argument("--json", action="store_true")
    _engine_args(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("batch", help="answer many questions; JSONL out; metrics at the end")
    p.add_argument("data", nargs="+", help="rows.jsonl, pubmedqa:PATH, covidqa:PATH, evidence-inference:DIR")
    p.add_argument("--out", required=True, help="results JSONL (appended; finished rows are skipped)")
    p.add_argument("--store", help="memory store folder (default: OUT without suffix + '-store')")
    p.add_argument("--modes", default=DEFAULT_MODE, help=f"comma-separated, from {', '.join(ANSWER_MODES)}")
    p.add_argument("--limit", type=int, help="rows per data set")
    p.add_argument("--fuse", type=int, default=8, help="abstracts per fused PubMedQA document")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    _engine_args(p)
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("docs", help="list or delete documents in a store")
    p.add_argument("action", choices=["list", "delete"])
    p.add_argument("ids", nargs="*")
    p.add_argument("--store", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_docs)

