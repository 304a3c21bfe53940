"""``hmtqa eval ppl | qa | recall``: the numbers in the model card, from held-out data only."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .main import CLIError, emit


def _load(ns: argparse.Namespace):
    from hmt import HMTConfig, HMTModel, load_backbone, resolve_dtype

    # Load in float32, fold adapters in, then cast: exactly how the QA engine loads, so the numbers match.
    backbone, tokenizer = load_backbone(ns.backbone, dtype="float32", device=ns.device)
    if ns.checkpoint and ns.checkpoint.lower() != "none":
        from qa_pipeline.engine import DEFAULT_CHECKPOINT

        path = DEFAULT_CHECKPOINT if ns.checkpoint == "default" else Path(ns.checkpoint)
        model = HMTModel.from_pretrained(path, backbone=backbone)
    else:
        model = HMTModel(backbone, HMTConfig(segment_length=ns.segment_length, sensory_length=32))
    return model.to(dtype=resolve_dtype(ns.dtype, ns.device)).eval(), tokenizer


def cmd_ppl(ns: argparse.Namespace) -> int:
    from qa_pipeline.evaluate import format_ppl, ppl_by_context
    from qa_pipeline.train_data import data_dir, text_splits

    try:
        root = data_dir(ns.data_dir)
        model, tokenizer = _load(ns)
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from err
    contexts = tuple(int(x) for x in ns.contexts.split(","))
    modes = tuple(m.strip() for m in ns.modes.split(","))
    texts = [s.heldout for s in text_splits(root) if not ns.texts or s.name in ns.texts.split(",")]
    token_ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    progress = None if ns.json else (lambda msg: sys.stderr.write(msg + "\n"))
    result = ppl_by_context(
        model, token_ids, contexts=contexts, modes=modes, max_windows=ns.max_windows, progress=progress
    )
    result.update(
        {"checkpoint": ns.checkpoint, "backbone": ns.backbone, "dtype": ns.dtype, "texts": ns.texts or "all"}
    )
    if ns.out:
        Path(ns.out).write_text(json.dumps(result, indent=2))
    emit(result, ns.json, lambda: format_ppl(result))
    return 0


def cmd_qa(ns: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from qa_pipeline.engine import ANSWER_MODES
    from qa_pipeline.qa_eval import SETS, format_markdown, load_eval_set, run_qa_eval, training_prior
    from qa_pipeline.train_data import data_dir

    from .qa import _engine, _store_errors

    sets = [s.strip() for s in ns.sets.split(",") if s.strip()]
    modes = tuple(m.strip() for m in ns.modes.split(",") if m.strip())
    bad = [s for s in sets if s not in SETS] + [m for m in modes if m not in ANSWER_MODES]
    if bad or not sets or not modes:
        raise CLIError(
            f"unknown set(s) or mode(s) {bad or [ns.sets, ns.modes]}; sets: {', '.join(SETS)}; "
            f"modes: {', '.join(ANSWER_MODES)}"
        )
    if ns.bootstrap < 0:
        raise CLIError("--bootstrap must be >= 0")
    out = Path(ns.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; eval qa now writes a folder (<out>/<set>.jsonl, summary.md)")
    bars: dict[str, tqdm] = {}

    def progress(name: str, done: int, total: int) -> None:
        bar = bars.get(name)
        if bar is None:
            bar = bars[name] = tqdm(total=total, desc=name, unit="answer", file=sys.stderr)
        bar.update(done - bar.n)

    readers = [r.strip() for r in (ns.readers or ns.reader or "default").split(",") if r.strip()]
    results: dict[str, dict] = {}
    try:
        root = data_dir(ns.data_dir)
        rows = {s: load_eval_set(s, root, limit=ns.limit, fuse=ns.fuse, seed=ns.seed) for s in sets}
        priors = {s: training_prior(s, root) for s in sets}
        for reader in readers:
            # Several readers answer side by side, each in its own folder; the memory (one store) is shared.
            where = out if len(readers) == 1 else out / f"reader-{reader.replace('/', '_')}"
            each = argparse.Namespace(**{**vars(ns), "reader": reader})
            try:
                results[reader] = run_qa_eval(
                    rows,
                    where,
                    modes,
                    engine_factory=lambda each=each: _engine(each),
                    store_dir=ns.store or out / "store",
                    resamples=ns.bootstrap,
                    progress=None if ns.json else progress,
                    priors=priors,
                    meta={
                        "fuse": ns.fuse,
                        "seed": ns.seed,
                        "limit": ns.limit,
                        "checkpoint": ns.checkpoint,
                        "backbone": ns.backbone,
                        "reader": reader,
                        "dtype": ns.dtype,
                        "out": str(where),
                    },
                )
            finally:
                for bar in bars.values():
                    bar.close()
                bars.clear()
    except (*_store_errors(), ValueError) as err:
        raise CLIError(str(err)) from err
    if len(readers) == 1:
        emit(results[readers[0]], ns.json, lambda: format_markdown(results[readers[0]]))
    else:
        emit(
            {"readers": results},
            ns.json,
            lambda: "\n\n".join(f"### reader: {r}\n\n{format_markdown(res)}" for r, res in results.items()),
        )
    return 0


def cmd_recall(ns: argparse.Namespace) -> int:
    import tempfile

    from tqdm.auto import tqdm

    from qa_pipeline.dense import DenseModelNotFoundError
    from qa_pipeline.recall_eval import METHODS, SETS, format_recall, run_recall_eval
    from qa_pipeline.train_data import data_dir

    from .qa import _engine, _store_errors

    sets = [s.strip() for s in ns.sets.split(",") if s.strip()]
    methods = [m.strip() for m in ns.methods.split(",") if m.strip()]
    bad = [s for s in sets if s not in SETS] + [m for m in methods if m not in METHODS]
    if bad or not sets:
        raise CLIError(
            f"unknown set(s) or method(s) {bad or [ns.sets]}; sets: {', '.join(SETS)}; methods: {', '.join(METHODS)}"
        )
    for flag, value in (("--limit-docs", ns.limit_docs), ("--limit-questions", ns.limit_questions)):
        if value is not None and value < 1:
            raise CLIError(f"{flag} must be >= 1")
    tmp = None
    try:
        root = data_dir(ns.data_dir)
        engine = _engine(ns, answers=False)
        if ns.store:
            store_dir = ns.store
        else:
            tmp = tempfile.TemporaryDirectory(prefix="hmtqa-recall-")
            store_dir = tmp.name
        store = engine.open_store(store_dir)
        bars: dict[str, tqdm] = {}

        def progress(name: str, done: int, total: int) -> None:
            if ns.json:
                return
            bar = bars.get(name)
            if bar is None:
                bar = bars[name] = tqdm(total=total, desc=name, unit="q", file=sys.stderr)
            bar.update(done - bar.n)

        try:
            result = run_recall_eval(
                engine,
                root,
                store,
                sets=sets,
                limit_docs=ns.limit_docs,
                limit_questions=ns.limit_questions,
                methods=methods,
                details=ns.details,
                progress=progress,
            )
        finally:
            for bar in bars.values():
                bar.close()
            store.close()
    except (*_store_errors(), DenseModelNotFoundError) as err:
        raise CLIError(str(err)) from err
    finally:
        if tmp is not None:
            tmp.cleanup()
    result.update(
        {"checkpoint": ns.checkpoint, "backbone": ns.backbone, "dtype": ns.dtype, "store": ns.store}
    )
    if ns.out:
        Path(ns.out).write_text(json.dumps(result, indent=2, default=str))
    emit(result, ns.json, lambda: format_recall(result))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from qa_pipeline.engine import ANSWER_MODES
    from qa_pipeline.qa_eval import SETS as QA_SETS

    from .qa import _engine_args

    p = sub.add_parser(
        "eval", help="evaluate on held-out data: perplexity by context, QA answers, segment recall"
    )
    evsub = p.add_subparsers(dest="what", required=True)

    q = evsub.add_parser("ppl", help="perplexity of the segment after X tokens, per mode (held-out text)")
    q.add_argument("--data-dir", help="shared data folder (default: $HMTQA_DATA_DIR or ../shared/data)")
    q.add_argument("--backbone", default="smollm2-135m-instruct")
    q.add_argument("--checkpoint", default="default", help="HMT checkpoint folder, 'default' or 'none'")
    q.add_argument("--segment-length", type=int, default=256, help="only without a checkpoint")
    q.add_argument("--dtype", default="auto", help="auto (bfloat16 where computed natively, else float32), bfloat16 or float32")
    q.add_argument("--device", default=None)
    q.add_argument("--contexts", default="2048,4096,8192,16384,32768")
    q.add_argument("--modes", default="none,window,rmt,hmt,full")
    q.add_argument("--texts", help="comma-separated subset of wikitext-2,pg19")
    q.add_argument("--max-windows", type=int, help="windows per text (default: all that fit)")
    q.add_argument("--out", help="write the JSON result here too")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_ppl)

    q = evsub.add_parser(
        "qa",
        help="answers on PubMedQA, COVID-QA and Evidence Inference dev rows, every mode, with 95%% CIs",
        description="Answer the held-out rows of each set in each mode (hmtqa batch, resumable) and "
        "report per set and mode: accuracy and macro-F1 (closed sets) or token F1 and exact match "
        "(COVID-QA), each with a 95% percentile bootstrap interval over rows, errors and abstentions "
        "(counted as wrong), how often each option was predicted (closed) or the share of answers "
        "repeating an 8-token phrase (open), and the majority-class and uniform-chance lines; closed "
        "sets also at the class balance of their training questions (rows reweighted by gold label). "
        "pubmedqa: fused PubMedQA questions 401-500; covid-qa and evidence-inference: eval half of "
        "the articles (stable hash of the article id). Writes OUT/<set>.jsonl, OUT/summary.json and "
        "OUT/summary.md.",
    )
    q.add_argument("--data-dir", help="shared data folder (default: $HMTQA_DATA_DIR or ../shared/data)")
    q.add_argument("--sets", default=",".join(QA_SETS), help="comma-separated, from " + ", ".join(QA_SETS))
    q.add_argument("--fuse", type=int, default=8, help="abstracts per fused PubMedQA document")
    q.add_argument(
        "--limit",
        type=int,
        default=100,
        help="max rows per set (0: all); COVID-QA questions are dealt round-robin over articles",
    )
    q.add_argument("--seed", type=int, default=0, help="seed of the PubMedQA distractors")
    q.add_argument(
        "--modes", default=",".join(ANSWER_MODES), help=f"comma-separated, from {', '.join(ANSWER_MODES)}"
    )
    q.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (0: none; seed 0)"
    )
    q.add_argument("--out", required=True, help="output folder: one resumable JSONL per set and the summary")
    q.add_argument("--store", help="memory store folder (default: OUT/store)")
    q.add_argument(
        "--readers",
        help="comma-separated readers answered side by side over one store, each in OUT/reader-NAME "
        "(e.g. none,default: the memory model and the default reader); default: --reader alone",
    )
    q.add_argument("--json", action="store_true", help="print the whole result as JSON")
    _engine_args(q)
    q.set_defaults(func=cmd_qa)

    q = evsub.add_parser(
        "recall",
        help="memory recall vs dense and BM25 on HMT segments: hit@1, hit@5, MRR, with chance",
        description="Rank each document's HMT segments for each question by the model's recall, by "
        "MiniLM cosine and by BM25; a segment is gold when it overlaps gold evidence. COVID-QA and "
        "Evidence Inference: eval half of the articles only (stable hash of the article id). Recall is the "
        "memory model's alone: no reader (--reader) changes it, and none is loaded.",
    )
    q.add_argument("--data-dir", help="shared data folder (default: $HMTQA_DATA_DIR or ../shared/data)")
    q.add_argument(
        "--sets",
        default="pubmedqa-8,pubmedqa-32,covidqa,evidence-inference",
        help="comma-separated data sets",
    )
    q.add_argument("--methods", default="hmt,dense,bm25", help="comma-separated, from hmt, dense, bm25")
    q.add_argument("--limit-docs", type=int, default=40, help="max documents per set (file order)")
    q.add_argument(
        "--limit-questions",
        type=int,
        default=100,
        help="max questions per set, dealt round-robin over those documents",
    )
    q.add_argument("--store", help="memory store folder to reuse/fill (default: a temporary one)")
    q.add_argument("--details", action="store_true", help="per-question rankings in the JSON ('questions')")
    q.add_argument("--out", help="write the JSON result here too")
    q.add_argument("--json", action="store_true")
    _engine_args(q)
    q.set_defaults(func=cmd_recall)
