"""What an answer rests on: the supporting sentence of its evidence, and an open answer's confidence."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .metrics import normalize_answer

if TYPE_CHECKING:
    from .engine import Evidence

# Sentence ends: . ! ? followed by space and an upper-case letter, digit or bracket, or a line break.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])|\n+")
# Words that say nothing about which sentence supports an answer.
_STOPWORDS = frozenset(
    "a an the of in on at to for and or is are was were be been by with as from that this these those it its "
    "what which who whom whose when where why how do does did not no yes maybe than then there their they "
    "has have had can could may might will would should into about between after before during".split()
)


@dataclass
class Support:
    """One sentence of the evidence passages: the one sharing most words with the answer."""

    text: str
    char_start: int
    char_end: int
    segment: int  # the evidence item it comes from (segment, chunk, or -1)


def _words(text: str) -> set[str]:
    return {w for w in normalize_answer(text).split() if w not in _STOPWORDS}


def sentences(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Character spans of the sentences of ``text[start:end]`` (stripped, non-empty)."""
    spans, pos = [], start
    for match in [*_SENTENCE_END.finditer(text, start, end), None]:
        stop = match.start() if match else end
        piece = text[pos:stop]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            spans.append((pos + lead, pos + len(piece.rstrip())))
        pos = match.end() if match else end
    return spans


def supporting_sentence(
    text: str, evidence: list[Evidence], answer: str, question: str, top: int = 3
) -> Support | None:
    """The sentence of the top ``top`` evidence passages that shares most words with the answer
    (ties, and closed answers such as "yes", go to the sentence closest to the question); a sentence
    of fewer than four words (a heading) only when the passages have nothing longer.

    A lexical pointer into the passages the answer was made from, not a second retriever: it never
    looks outside the evidence the mode used.
    """
    answer_words, question_words = _words(answer), _words(question)
    best, best_key = None, None
    for rank, ev in enumerate(evidence[:top]):
        if ev.char_end <= ev.char_start:
            continue
        for s, e in sentences(text, ev.char_start, ev.char_end):
            words = _words(text[s:e])
            if not words:
                continue
            # A heading ("Subjects", "Methods") is no support: sentences of 4+ words come first.
            # Earlier (higher-ranked) passages win ties.
            key = (len(text[s:e].split()) >= 4, len(words & answer_words), len(words & question_words), -rank)
            if best_key is None or key > best_key:
                best, best_key = Support(text[s:e], s, e, ev.segment), key
    return best


def open_confidence(answer_logprob: float | None, recall: list[tuple[int, float]]) -> float | None:
    """An open answer's confidence in [0, 1]: the geometric mean of the answer's per-token
    probability (exp of its mean log-likelihood) and, in the HMT modes, the recall's top weight
    (how concentrated recall is on one segment). None when there is no answer."""
    if answer_logprob is None:
        return None
    token_p = math.exp(min(0.0, answer_logprob))
    if not recall:
        return token_p
    return math.sqrt(token_p * max(w for _, w in recall))
