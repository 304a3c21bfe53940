"""Pure functions that turn pipeline results into what the UI components display.

No Gradio here, so they are tested directly.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from qa_pipeline.engine import Answer, Evidence
from qa_pipeline.metrics import exact_match, normalize_label
from qa_pipeline.store import SegmentInfo
from qa_pipeline.support import Support

FULL_TEXT_CHARS = 20_000  # longer documents are shown as the evidence with some context around it
CONTEXT_CHARS = 400
# Rank 1 darkest: the eye finds the strongest evidence first.
EVIDENCE_COLORS = ["#f76707", "#ffa94d", "#ffd8a8", "#ffe8cc", "#fff4e6"]
WINDOW_COLOR = "#a5d8ff"
SUPPORT_LABEL = "supporting sentence"
# An abstained answer's sentence backs only the guess the model did not give as its answer.
GUESS_SUPPORT_LABEL = "sentence behind the best guess"
SUPPORT_COLOR = "#69db7c"  # green: stands out inside the orange evidence

Highlight = list[tuple[str, str | None]]

_MD_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")  # every ASCII punctuation character


def md_text(text: object) -> str:
    """Text from a document or a user (a title, a snippet, a question), made inert for a Markdown component.

    On one line, with every ASCII punctuation character backslash-escaped (CommonMark allows that for
    all of them and shows the character itself): an image ``![x](http://...)`` a title carries is not
    loaded for every user who opens the document, nor a link, an HTML tag or emphasis made. Document
    ids (letters, digits, ``._-``) go in code spans instead.
    """
    return _MD_PUNCTUATION.sub(r"\\\1", " ".join(str(text).split()))


def evidence_label(rank: int, ev: Evidence, mode: str) -> str:
    """What a highlighted span says about itself: rank, where it is, and its weight."""
    if ev.segment < 0:
        return f"read by the model (first {ev.char_end:,} characters)"
    if mode == "dense-rag":
        return f"#{rank} chunk {ev.segment} · similarity {ev.weight:.2f}"
    if ev.passage:
        return f"#{rank} passage of segment {ev.segment} · recall weight {ev.weight:.2f}"
    return f"#{rank} segment {ev.segment} · recall weight {ev.weight:.2f}"


def evidence_highlights(
    text: str,
    evidence: Sequence[Evidence],
    mode: str,
    support: Support | None = None,
    support_label: str = SUPPORT_LABEL,
) -> tuple[Highlight, dict[str, str]]:
    """Document text split into (piece, label) pairs with the evidence labelled, plus a colour map.

    Overlapping evidence (dense-rag chunks overlap) is shown once, under its best rank. The
    supporting sentence, if given, gets its own label and colour and is cut out of the evidence
    span around it (which then shows on both sides of it). Long documents are cut to the evidence
    and some context, with the gaps marked.
    """
    spans: list[tuple[int, int, str]] = []
    colors: dict[str, str] = {}
    if support is not None:
        start, end = max(0, support.char_start), min(len(text), support.char_end)
        if end > start:
            spans.append((start, end, support_label))
            colors[support_label] = SUPPORT_COLOR
    for rank, ev in enumerate(evidence, start=1):
        start, end = max(0, ev.char_start), min(len(text), ev.char_end)
        if end <= start:
            continue
        label = evidence_label(rank, ev, mode)
        colors[label] = WINDOW_COLOR if ev.segment < 0 else EVIDENCE_COLORS[min(rank, len(EVIDENCE_COLORS)) - 1]
        # Cut away what the sentence and better-ranked spans already cover, keeping the uncovered pieces.
        pieces = [(start, end)]
        for s, e, _ in spans:
            pieces = [p for a, b in pieces for p in ((a, min(b, s)), (max(a, e), b)) if p[1] > p[0]]
        spans.extend((a, b, label) for a, b in pieces)
    spans.sort()
    return _with_gaps(text, spans), colors


def _with_gaps(text: str, spans: list[tuple[int, int, str]]) -> Highlight:
    """Interleave labelled spans with the unlabelled text between them, eliding long stretches."""
    long_doc = len(text) > FULL_TEXT_CHARS
    out: Highlight = []
    pos = 0

    def plain(a: int, b: int, first: bool, last: bool) -> None:
        if b <= a:
            return
        piece = text[a:b]
        if long_doc and len(piece) > 2 * CONTEXT_CHARS + 200:
            head = "" if first else piece[:CONTEXT_CHARS]
            tail = "" if last else piece[-CONTEXT_CHARS:]
            skipped = len(piece) - len(head) - len(tail)
            out.append((f"{head}\n[… {skipped:,} characters not shown …]\n{tail}", None))
        else:
            out.append((piece, None))

    for i, (s, e, label) in enumerate(spans):
        plain(pos, s, first=i == 0, last=False)
        out.append((text[s:e], label))
        pos = e
    if not spans and long_doc:
        out.append((text[:FULL_TEXT_CHARS], None))
        out.append((f"\n[… {len(text) - FULL_TEXT_CHARS:,} more characters …]", None))
    else:
        plain(pos, len(text), first=not spans, last=True)
    return out


def document_preview(text: str) -> Highlight:
    """The document with nothing highlighted (before a question is asked)."""
    return _with_gaps(text, [])


def confidence_markdown(answer: Answer) -> str | None:
    """How sure the model is; when it abstained, that the document does not seem to say (and, for
    a closed question, the option it would have chosen). None when there is no confidence."""
    if answer.confidence is None:
        return None
    if not answer.abstained:
        return f"**confidence:** {answer.confidence:.2f}"
    line = f"**the document does not seem to say** ({answer.abstain_reason or f'low confidence {answer.confidence:.2f}'})"
    if answer.best_guess:
        line += f" · the model's best guess: “{md_text(snippet(answer.best_guess, 80))}”"
    return line


def support_label(answer: Answer) -> str:
    """What the answer's support sentence is called: the answer's support, or, when the model
    abstained, only the best guess's (the answer given is that the document does not seem to say)."""
    return GUESS_SUPPORT_LABEL if answer.abstained else SUPPORT_LABEL


def support_markdown(answer: Answer) -> str | None:
    """The evidence sentence the answer rests on, quoted on one line; None when there is none."""
    if answer.support is None or not answer.support.text.strip():
        return None
    sentence = md_text(snippet(answer.support.text, 300))
    source = " (the short answer is quoted from it)" if answer.quoted and not answer.abstained else ""
    return f"**{support_label(answer)}{source}:** “{sentence}” (green in the text below)"


def sentence_markdown(answer: Answer) -> str | None:
    """The sentence the model wrote, when the short answer is only part of it."""
    sentence = answer.fuller_sentence
    return None if sentence is None else f"**the model wrote:** “{md_text(snippet(sentence, 300))}”"


def answer_markdown(answer: Answer) -> str:
    """Confidence, the model's sentence, the supporting sentence, mode, timings and (closed
    questions) the option scores."""
    t = answer.timings
    parts = (confidence_markdown(answer), sentence_markdown(answer), support_markdown(answer))
    lines = [line for line in parts if line]
    lines.append(
        f"**mode** `{answer.mode}`" + (f" · **reader** `{answer.reader}`" if answer.reader else "")
        + f" · recall {t.get('recall_s', 0):.2f} s · first token "
        f"{t.get('first_token_s', 0):.2f} s · total {t.get('total_s', 0):.2f} s"
    )
    if answer.option_scores:
        scores = sorted(answer.option_scores.items(), key=lambda kv: -kv[1])
        lines.append(
            "**option scores** (log-probabilities; the decision head's where the checkpoint has one) "
            + " · ".join(f"{md_text(o)}: {s:.2f}" for o, s in scores)
        )
    if not answer.evidence:
        lines.append("_No evidence returned for this mode._")
    else:
        items = [
            f"{rank}. {evidence_label(rank, ev, answer.mode).removeprefix(f'#{rank} ')}: “{md_text(snippet(ev.snippet, 110))}”"
            for rank, ev in enumerate(answer.evidence[:3], start=1)
        ]
        lines.append("**top evidence** (highlighted in the text below)\n\n" + "\n".join(items))
    return "\n\n".join(lines)


SEGMENT_HEADERS = ["segment", "tokens", "characters", "snippet"]
# Gradio 6 sizes table columns to their content unless told: a long snippet would push the table
# wider than the page instead of wrapping.
SEGMENT_WIDTHS = ["8%", "12%", "12%", "68%"]


def segment_rows(text: str, segments: Sequence[SegmentInfo], snippet_chars: int = 120) -> list[list]:
    """One row per segment: index, token span, character span, the start of its text."""
    return [
        [
            s.idx,
            f"{s.token_start}–{s.token_end}",
            f"{s.char_start}–{s.char_end}",
            snippet(text[s.char_start : s.char_end], snippet_chars),
        ]
        for s in segments
    ]


def snippet(text: str, limit: int) -> str:
    """The start of ``text`` on one line, cut at a word boundary with an ellipsis."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    return flat[:limit].rsplit(" ", 1)[0] + " …"


METRIC_COLUMNS = ["n", "accuracy", "macro_f1", "exact_match", "token_f1", "hit@1", "hit@5", "chance_hit@5", "latency_p50_s"]
METRIC_HEADERS = ["mode", *METRIC_COLUMNS]


def metric_rows(metrics: dict[str, dict]) -> list[list]:
    """One row per answer mode; metrics without data show as a dash."""
    rows = []
    for mode, m in metrics.items():
        row: list = [mode]
        for c in METRIC_COLUMNS:
            v = m.get(c)
            row.append("–" if v is None else round(v, 3) if isinstance(v, float) else v)
        rows.append(row)
    return rows


RESULT_HEADERS = [
    "row",
    "mode",
    "document",
    "question",
    "gold",
    "prediction",
    "correct",
    "confidence",
    "latency s",
    "error",
]
RESULT_WIDTHS = ["6%", "7%", "11%", "22%", "11%", "14%", "7%", "9%", "8%", "5%"]


def _correct(record: dict) -> str:
    """✓ / ✗ for a scored row (closed: same label; open: SQuAD exact match); blank without gold."""
    gold, pred = record.get("answer"), record.get("prediction")
    if not gold:
        return ""
    if record.get("options"):
        ok = normalize_label(pred) == normalize_label(gold)
    else:
        ok = exact_match(pred, gold) == 1.0
    return "✓" if ok else "✗"


def _confidence(record: dict) -> str:
    """The answer's confidence, with "(abstained)" when it fell below the threshold; blank without one."""
    confidence = record.get("confidence")
    if confidence is None:
        return ""
    return f"{confidence:.2f}" + (" (abstained)" if record.get("abstained") else "")


def result_rows(records: Sequence[dict]) -> list[list]:
    """The batch results, one row per (question, mode)."""
    return [
        [
            r.get("row_id", ""),
            r.get("mode", ""),
            r.get("doc_id", ""),
            r.get("question", ""),
            r.get("answer") or "",
            r.get("prediction") or "",
            _correct(r),
            _confidence(r),
            round(float(r.get("latency_s") or 0.0), 3),
            r.get("error", ""),
        ]
        for r in records
    ]
