"""An open answer's text: the generated sentence it stops at, and the short answer inside it.

A small instruction model answers in a full sentence that first restates the question ("The doubling
time of the COVID-19 pandemic is approximately 6 days."). The answer a reader wants, and the one the
gold spans of extractive QA sets hold, is the new part ("approximately 6 days"). Both are kept: the
short answer is shown first, the sentence with it (``Answer.sentence``).
"""

from __future__ import annotations

import re

# A sentence ends at . ! ? followed by space and a capital, digit or bracket; the sentence must end
# in a word of two or more letters, so "1." of a list or "5." of a number does not end the answer.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")
_WORD_BEFORE_END = re.compile(r"[A-Za-z]{2}[)\]\"'\u201d\u2019]*[.!?]$")
_WORD = re.compile(r"\S+")
# Words a restatement may hold that the question need not: articles, prepositions, auxiliaries.
_FILLER = frozenset(
    "a an the of in on at to for by with from and or as than that which this these those it its their "
    "is are was were be been being has have had do does did can could may might will would should "
    "what who whom whose when where why how".split()
)
# The verbs that join a restated question to its answer in the other order ("Pneumonia is the
# leading cause of death in children.").
_LINKS = frozenset("is are was were remains remain".split())


def short_answer(text: str) -> str:
    """The generated text's first sentence of three or more words, within its first paragraph.

    Generation stops there: what a small model writes after a blank line ("Question: ...",
    "Background: ...") is a made-up passage, never the answer, and later sentences drift.
    """
    text = text.strip()
    blank = text.find("\n\n")
    text = text if blank < 0 else text[:blank].rstrip()
    for match in _SENTENCE_END.finditer(text):
        head = text[: match.start()].rstrip()
        if len(head.split()) >= 3 and _WORD_BEFORE_END.search(head):
            return head
    return text


def answer_phrase(sentence: str, question: str) -> str:
    """The part of an answer sentence that is not the question said again.

    "The most common virus detected in this sample was coronavirus OC43." asked as "What was the
    most common virus detected in this sample?" gives "coronavirus OC43"; "Pneumonia is the leading
    cause of death in children." asked as "What is the leading cause of death in children?" gives
    "Pneumonia". A sentence that does not restate the question (or is nothing but the restatement)
    is returned whole, without its final full stop.
    """
    sentence = sentence.strip()
    words = [(m.start(), _norm(m.group())) for m in _WORD.finditer(sentence)]
    asked = {w for w in map(_norm, question.split()) if w and w not in _FILLER}
    if not words or not asked:
        return _trim(sentence)
    start = _echo_end(words, asked)
    if start is not None:
        return _trim(sentence[words[start][0] :])
    end = _echo_start(words, asked)
    if end is not None:
        return _trim(sentence[: words[end][0]])
    return _trim(sentence)


def quoted_answer(sentence: str, question: str) -> str:
    """A short answer quoted from the document: ``answer_phrase`` of one of its sentences, on one line
    (a PDF's line breaks, even inside a hyphenated word, are the layout's, not the text's)."""
    text = re.sub(r"(?<=[a-z])-\n(?=[a-z])", "", sentence)
    return answer_phrase(" ".join(text.split()), question)


def _echo_end(words: list[tuple[int, str]], asked: set[str]) -> int | None:
    """Index of the first word after a leading restatement (at least one question word), or None."""
    i, matched, skipped = 0, 0, False
    while i < len(words):
        w = words[i][1]
        if _in(w, asked):
            matched += 1
        elif w not in _FILLER and w:
            # One word of the question said differently ("clinical-available" for "clinically-available").
            if skipped or i + 1 >= len(words) or not _in(words[i + 1][1], asked):
                break
            skipped = True
        i += 1
    return i if matched and i < len(words) else None


def _echo_start(words: list[tuple[int, str]], asked: set[str]) -> int | None:
    """Index of the linking verb before a trailing restatement ("X is <the question>"), or None."""
    for i, (_, w) in enumerate(words):
        if w in _LINKS and i > 0:
            head, tail = words[:i], [t for _, t in words[i + 1 :]]
            if any(_in(t, asked) for _, t in head):
                return None  # the head restates the question: handled by _echo_end
            content = [t for t in tail if t and t not in _FILLER]
            if content and sum(_in(t, asked) for t in content) >= 0.7 * len(content):
                return i
            return None
    return None


def _norm(word: str) -> str:
    return re.sub(r"[^\w\-]", "", word.lower())


def _in(word: str, asked: set[str]) -> bool:
    """``word`` is a question word, up to its ending ("stimulated" for "stimulates")."""
    if word in asked:
        return True
    return len(word) >= 5 and any(len(a) >= 5 and a[:5] == word[:5] for a in asked)


def _trim(text: str) -> str:
    text = text.strip().rstrip(",;:").strip()
    # A final full stop is the sentence's, not the answer's; "et al." or "U.S." keep theirs.
    if text.endswith(".") and not re.search(r"\b\w\.\w?\.$|\bal\.$", text):
        text = text[:-1].rstrip()
    return text
