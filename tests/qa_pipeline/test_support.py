"""The supporting sentence of an answer and an open answer's confidence."""

from __future__ import annotations

import math

import pytest

from qa_pipeline.engine import Evidence
from qa_pipeline.support import open_confidence, sentences, supporting_sentence

TEXT = (
    "Background. Thresher sharks hunt with their tails. "
    "The sharks were studied at Pescador Island, Philippines, in 2010. "
    "Tail slaps stunned sardines in 33 of 66 strikes.\n\n"
    "Methods. Divers filmed the sharks at dawn. Funding came from a foundation."
)


def ev(start: int, end: int, segment: int = 0) -> Evidence:
    return Evidence(segment, start, end, 0.5, TEXT[start:end])


def test_sentences_cover_the_span_without_spaces():
    spans = sentences(TEXT, 0, len(TEXT))
    texts = [TEXT[s:e] for s, e in spans]
    assert texts[1] == "Thresher sharks hunt with their tails."
    assert texts[2] == "The sharks were studied at Pescador Island, Philippines, in 2010."
    assert all(t == t.strip() and t for t in texts)
    cut = TEXT.index("Methods")
    assert sentences(TEXT, cut, len(TEXT))[0][0] == cut


def test_the_sentence_sharing_the_answer_words_is_chosen_with_its_offsets():
    split = TEXT.index("Methods")
    evidence = [ev(split, len(TEXT), 1), ev(0, split, 0)]
    s = supporting_sentence(TEXT, evidence, "At Pescador Island in the Philippines.", "Where were the sharks studied?")
    assert s.text == "The sharks were studied at Pescador Island, Philippines, in 2010."
    assert TEXT[s.char_start : s.char_end] == s.text and s.segment == 0


def test_a_closed_answer_falls_back_to_the_question_words():
    s = supporting_sentence(TEXT, [ev(0, len(TEXT))], "yes", "Did tail slaps stun sardines?")
    assert s.text.startswith("Tail slaps stunned sardines")


def test_no_sentence_outside_the_evidence():
    split = TEXT.index("Methods")
    s = supporting_sentence(TEXT, [ev(split, len(TEXT))], "Pescador Island", "Where were the sharks studied?")
    assert s.char_start >= split
    assert supporting_sentence(TEXT, [], "Pescador Island", "Where?") is None


def test_open_confidence_combines_likelihood_and_recall_concentration():
    assert open_confidence(None, []) is None
    assert open_confidence(math.log(0.5), []) == pytest.approx(0.5)
    focused = open_confidence(math.log(0.5), [(0, 0.9), (1, 0.1)])
    spread = open_confidence(math.log(0.5), [(0, 0.34), (1, 0.33), (2, 0.33)])
    assert focused == pytest.approx(math.sqrt(0.45)) and spread < focused
    assert open_confidence(math.log(0.9), [(0, 0.9)]) > open_confidence(math.log(0.2), [(0, 0.9)])


def test_a_heading_is_support_only_when_nothing_longer_is_there():
    # Seen in the CLI: "How many subjects were scanned?" got the heading "Subjects" as its support.
    text = "Subjects\nFrom 2011 to 2013, 14,758 subjects received brain MRI examinations here.\nMethods"
    s = supporting_sentence(text, [ev(0, len(text))], "The number of subjects is not given.", "How many subjects?")
    assert s.text.startswith("From 2011 to 2013")
    assert supporting_sentence("Subjects", [ev(0, 8)], "subjects", "How many subjects?").text == "Subjects"
