"""An open answer's text: where generation stops, and the short answer inside the sentence."""

from __future__ import annotations

import pytest

from qa_pipeline.answer_text import answer_phrase, quoted_answer, short_answer


def test_short_answer_is_the_first_sentence_of_the_first_paragraph():
    """What a small model writes after a blank line ("Question: ...") is a made-up passage."""
    assert short_answer("  In December 2019.\n\nBackground: the virus") == "In December 2019."
    assert short_answer("It was found in Wuhan. Later it spread to Europe.") == "It was found in Wuhan."
    assert short_answer("One line\nand the next") == "One line\nand the next"
    # Not sentence ends: a list's "1.", a number, a first sentence under three words.
    assert short_answer("The doses were:\n1. Five mg. Then more.") == "The doses were:\n1. Five mg."
    assert short_answer("Dose 5. Then 10 mg was given. Later less.") == "Dose 5. Then 10 mg was given."
    assert short_answer("Yes. The trial showed it. And more.") == "Yes. The trial showed it."


@pytest.mark.parametrize(
    "question, sentence, phrase",
    [
        # The question restated first, then the answer (the form a small chat model answers in).
        (
            "What is the doubling time of the COVID-19 pandemic?",
            "The doubling time of COVID-19 pandemic is approximately 6 days.",
            "approximately 6 days",
        ),
        (
            "What was the most common virus detected in community members?",
            "The most common virus detected in community members was coronavirus OC43.",
            "coronavirus OC43",
        ),
        ("What is hepcidin?", "Hepcidin is a low molecular weight peptide hormone.", "low molecular weight peptide hormone"),
        # A word of the question in another form ("stimulated" for "stimulates") still restates it.
        ("What stimulates the release of hepcidin?", "The release of hepcidin is stimulated by iron.", "iron"),
        # One word said differently inside the restatement.
        (
            "What are the clinically-available methods to detect viral antigens?",
            "The current clinical-available methods to detect viral antigens are ELISA and IFA.",
            "ELISA and IFA",
        ),
        # The other order: the answer, a linking verb, the question.
        (
            "What is the leading cause of death among children?",
            "Pneumonia is the leading cause of death among children.",
            "Pneumonia",
        ),
        # An abbreviation keeps its full stop.
        ("Who described the method?", "It was described by Smith et al.", "Smith et al."),
        # Nothing restated: the sentence whole, without its full stop.
        ("Where was SARS-CoV-2 first identified?", "Wuhan, China.", "Wuhan, China"),
        ("Is the drug safe?", "No.", "No"),
        # Nothing but the restatement: kept whole rather than emptied.
        ("What is the acronym SARS-CoV-2?", "SARS-CoV-2.", "SARS-CoV-2"),
        ("", "An answer.", "An answer"),
    ],
)
def test_answer_phrase_drops_the_restated_question(question, sentence, phrase):
    assert answer_phrase(sentence, question) == phrase


def test_quoted_answer_reads_a_sentence_of_the_document_on_one_line():
    """A document's sentence as the short answer: its layout's line breaks go, a word split by a
    hyphen at a line's end is whole again, and the restated question is dropped as from any answer."""
    sentence = "The mortality rate was dispro-\nportionately high in persons\n65 years of age."
    assert quoted_answer(sentence, "What was the mortality rate?") == "disproportionately high in persons 65 years of age"
    assert quoted_answer("COVID-\n19 spread.", "What spread?") == "COVID- 19 spread"  # not a split word
