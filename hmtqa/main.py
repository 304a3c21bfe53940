"""``hmtqa``: the parser, :func:`main` and what every subcommand shares (CLIError, emit, dataclass flags).

Each subcommand has --help; most have --json. The training commands live here; the others register
themselves from :mod:`hmtqa.qa`, :mod:`hmtqa.evaluate` and :mod:`hmtqa.serve`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import typing
from collections.abc import Callable

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

logger = logging.getLogger("hmtqa")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --flag per dataclass field, typed from its annotation, defaulting to the field default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            parser.add_argument(
                flag,
                type=base if base in (int, float, str) else str,
                default=default,
                help=f"default: {default}" + (" (optional)" if optional else ""),
            )


def dataclass_from_args(cls: type, ns: argparse.Namespace):
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


def emit(data: dict | list, as_json: bool, text: Callable[[], str]) -> None:
    """Print JSON for machines or text for people."""
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        sys.stdout.write(text() + "\n")


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


def cmd_train(ns: argparse.Namespace) -> int:
    from qa_pipeline.recipe import Recipe, run

    try:
        recipe = dataclass_from_args(Recipe, ns)
        result = run(recipe, progress=not ns.json)
    except (FileNotFoundError, ValueError) as err:  # missing data or model, bad settings
        raise CLIError(str(err)) from err
    emit(
        result,
        ns.json,
        lambda: (
            f"trained in {result['wall_s'] / 60:.1f} min; final stage-2 loss {result['stage2'].get('loss', float('nan')):.3f}; "
            f"checkpoint: {recipe.out}/final"
        ),
    )
    return 0


def cmd_train_recall(ns: argparse.Namespace) -> int:
    from qa_pipeline.recall_recipe import RecallRecipe, run

    try:
        recipe = dataclass_from_args(RecallRecipe, ns)
        result = run(recipe, progress=not ns.json)
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from err
    emit(
        {k: v for k, v in result.items() if k != "log"},
        ns.json,
        lambda: (
            f"features {'reused' if result['features_reused'] else 'read'} "
            f"({(result['extract_s'] or 0) / 60:.1f} min when read); head fitted in {result['fit_s'] / 60:.1f} min "
            f"on {result['fit_queries']} queries; "
            + (
                f"held-out queries hit@1 {result['val_before']['hit@1']:.3f} -> {result['val_after']['hit@1']:.3f}; "
                if result["val_before"]
                else "no held-out queries (--val-share 0); "
            )
            + f"checkpoint: {recipe.out}/final"
        ),
    )
    return 0


def cmd_train_decision(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm.auto import tqdm

    from qa_pipeline import decision_recipe
    from qa_pipeline.engine import DEFAULT_CHECKPOINT
    from qa_pipeline.train_data import data_dir

    from .qa import _engine

    if str(ns.checkpoint).lower() == "none":
        raise CLIError(
            "train-decision writes into a checkpoint folder: give --checkpoint PATH (or 'default')"
        )
    checkpoint = DEFAULT_CHECKPOINT if ns.checkpoint == "default" else Path(ns.checkpoint)
    try:
        root = data_dir(ns.data_dir)
        # The heads and thresholds are fitted on the memory model's own answering pass and answers
        # (a reader's answers keep only the recall-score threshold): no reader here.
        engine = _engine(argparse.Namespace(**{**vars(ns), "reader": "none"}))
        work = Path(ns.work)
        store = engine.open_store(work / "store")
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from err
    bars: dict[str, tqdm] = {}

    def progress(name: str, done: int, total: int) -> None:
        bar = bars.get(name) or bars.setdefault(
            name, tqdm(total=total, desc=name, unit="q", file=sys.stderr, disable=ns.json)
        )
        bar.update(done - bar.n)

    try:
        report = decision_recipe.run(
            engine,
            root,
            checkpoint,
            work,
            store,
            progress=progress,
            negatives=ns.negatives,
            open_questions=ns.open_questions,
            open_mode=ns.open_mode,
            open_half=ns.open_half,
            closed=ns.closed,
            open_max_abstain=ns.open_max_abstain,
        )
    finally:
        for bar in bars.values():
            bar.close()
        store.close()
    emit(
        report,
        ns.json,
        lambda: (
            "\n".join(
                f"{name}: {r['n_questions']} questions, classes {r['classes']}, chosen: {r['chosen']}, "
                f"abstain threshold: {r.get('threshold', {}).get('useful') and 'fitted' or 'none (never abstain)'}\n"
                + "\n".join(
                    f"  {c['variant']:<16} cv accuracy {c['accuracy']:.3f}  macro-F1 {c['macro_f1']:.3f}  "
                    f"predicted {c['predicted']}"
                    for c in r["cv"]
                )
                for name, r in report.items()
                if "cv" in r
            )
            + (_open_summary(report["open"]) if "open" in report else "")
            + (
                _open_summary(
                    report["open_recall"],
                    f"recall score ({report['open_recall'].get('recall_signal', 'passage')} head)",
                    report["open"],
                )
                if "n_positive" in report.get("open_recall", {})
                else ""
            )
            + f"\nheads saved in {checkpoint}"
        ),
    )
    return 0


def _open_summary(r: dict, signal: str = "confidence", reference: dict | None = None) -> str:
    """One "not in the document" threshold's lines of `train-decision`'s summary (``reference``: the
    confidence's report, which holds the questions and their token F1)."""
    ref = reference or r
    t = r["threshold"]
    mode = f" in mode {ref['mode']}" if "mode" in ref else ""
    line = (
        f"\nopen answers{mode}, {signal}: threshold "
        f"{'none (never abstain)' if t is None or not r.get('useful', True) else f'{t:.3f}'} "
        f"({r['n_positive']} questions of the {ref.get('half', 'training')}-half COVID-QA articles, "
        f"{r['positives_abstained']:.0%} of them turned away; {r['negatives_abstained']:.0%} of those asked "
        "of another article)"
    )
    if r.get("auroc") is not None:
        line += (
            f"\n  {signal} AUROC, own vs other article: {r['auroc']:.2f}; the {r['max_abstain']:.0%} threshold "
            f"{r['candidate_threshold']:.3f} would catch {r['negatives_below_candidate']:.1%} of the others"
        )
    cross = r.get("cross_fitted")
    if cross:
        line += (
            f"\n  cross-fitted over {cross['folds']} folds of articles: {cross['positives_abstained']:.0%} "
            f"turned away, {cross['negatives_abstained']:.0%} of the negatives; token F1 "
            f"{cross['mean_token_f1']:.3f} (no threshold {ref['mean_token_f1']:.3f})"
        )
    return line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hmtqa", description="Question answering over long biomedical documents with HMT memory."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    from qa_pipeline.recipe import Recipe

    p = sub.add_parser("train", help="stage 1 + stage 2 HMT training (torchrun for many processes)")
    add_dataclass_args(p, Recipe)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_train)

    from qa_pipeline.recall_recipe import RecallRecipe

    p = sub.add_parser(
        "train-recall", help="give a checkpoint recall 'content' and train its recall head on cached features"
    )
    add_dataclass_args(p, RecallRecipe)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_train_recall)

    p = sub.add_parser(
        "train-decision",
        help="fit a checkpoint's decision heads for closed questions (PubMedQA yes/no/maybe, Evidence "
        "Inference) on cached answering-pass features of training questions",
    )
    from qa_pipeline.decision_recipe import FEATURE_MODES, OPEN_HALVES, OPEN_MAX_ABSTAIN

    from .qa import _engine_args

    _engine_args(p)
    p.add_argument(
        "--data-dir", default=None, help="shared data folder (default: $HMTQA_DATA_DIR or ../shared/data)"
    )
    p.add_argument("--work", default="runs/decision", help="feature cache and scratch store (resumable)")
    p.add_argument(
        "--negatives",
        type=int,
        default=100,
        help="training questions per set also asked of another document (closed thresholds)",
    )
    p.add_argument(
        "--open-questions",
        type=int,
        default=30,
        help="COVID-QA questions for the open-answer threshold (0: keep the checkpoint's)",
    )
    p.add_argument(
        "--open-mode",
        choices=FEATURE_MODES,
        default="hmt+retrieval",
        help="answering mode of those questions: the confidence threshold is that mode's own (other "
        "modes keep theirs; a mode with none uses the checkpoint's shared one)",
    )
    p.add_argument(
        "--open-half",
        choices=OPEN_HALVES,
        default="training",
        help="COVID-QA articles those questions come from: 'evaluation', the half recall was never trained "
        "on, gives a threshold for new documents (recall is surer of itself on its training articles); "
        "its report adds a cross-fitted estimate",
    )
    p.add_argument(
        "--open-max-abstain",
        type=float,
        default=OPEN_MAX_ABSTAIN,
        help="share of answerable open questions each open threshold may turn away "
        f"(default {OPEN_MAX_ABSTAIN})",
    )
    p.add_argument(
        "--closed",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fit the closed-question heads (--no-closed: keep the checkpoint's, fit the open threshold only)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_train_decision)

    from . import evaluate, qa, serve  # each module registers its own subcommands

    for module in (qa, evaluate, serve):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if ns.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return ns.func(ns)
    except CLIError as err:
        sys.stderr.write(f"hmtqa {ns.command}: error: {err}\n")
        return 2
