"""Recall training data: cloze queries from sentences, features read as ingestion and ``ask`` read them."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from qa_pipeline.engine import Engine, EngineConfig
from qa_pipeline.recall_data import (
    RecallDoc,
    RecallFeatures,
    add_cloze_queries,
    extract_features,
    sentence_spans,
)


def test_sentence_spans_are_whole_sentences_within_the_word_limits():
    text = "Short one. This sentence has exactly seven words in it. (Another) sentence follows here with more words!\n\nTitle\nNext"
    spans = sentence_spans(text, min_words=6, max_words=12)
    assert [text[s:e] for s, e in spans] == [
        "This sentence has exactly seven words in it.",
        "(Another) sentence follows here with more words!",
    ]


def test_cloze_queries_point_at_their_own_sentence():
    text = " ".join(f"Patients in group {i} received dose {i} of the study drug daily." for i in range(40))
    doc = RecallDoc("d", text, group="d")
    add_cloze_queries(doc, random.Random(0), per_1k_chars=5)
    assert len(doc.queries) == round(len(text) / 1000 * 5)
    for query, [(s, e)], kind in doc.queries:
        assert kind == "cloze" and text[s:e] == query


@pytest.fixture(scope="module")
def engine():
    return Engine(EngineConfig(backbone="tiny-random", checkpoint=None))


def test_features_are_what_ingestion_and_recall_read(engine, tmp_path):
    model, tok = engine.model, engine.tokenizer
    text_a = " ".join(f"Cohort {i} took aspirin and reported fewer headaches." for i in range(60))
    text_b = " ".join(f"Trial arm {i} measured insulin after meals." for i in range(30))
    needle = text_a.index("Cohort 41 took")
    docs = [
        RecallDoc("a", text_a, group="g", queries=[("Who took aspirin in cohort 41?", [(needle, needle + 20)], "question")]),
        RecallDoc("b", text_b, group="h", queries=[("insulin", [(0, len(text_b))], "question")]),
    ]
    feats = extract_features(model, tok, docs, block_segments=2)
    ids_a = torch.tensor([tok(text_a, add_special_tokens=False).input_ids])
    with torch.inference_mode():
        records = model(ids_a, return_logits=False, return_records=True).records
        query = model.summarize(torch.tensor([tok("Who took aspirin in cohort 41?", add_special_tokens=False).input_ids]))
    n_a = len(records)
    np.testing.assert_allclose(feats.contents[:n_a], np.stack([r.content[0].float().numpy() for r in records]), atol=1e-3)
    np.testing.assert_allclose(feats.queries[0], query[0, 0].float().numpy(), atol=2e-2)
    offsets = tok(text_a, add_special_tokens=False, return_offsets_mapping=True).offset_mapping
    L = model.config.segment_length
    expected = sorted({i // L for i, (s, e) in enumerate(offsets) if s < needle + 20 and e > needle})
    assert feats.positives[0] == expected
    assert feats.positives[1] == list(range(n_a, feats.contents.shape[0]))  # all of document b
    assert feats.segment_doc.tolist() == [0] * n_a + [1] * (feats.contents.shape[0] - n_a)
    feats.save(tmp_path)
    again = RecallFeatures.load(tmp_path)
    assert again.positives == feats.positives and np.array_equal(again.contents, feats.contents)
    examples = again.examples()
    assert len(examples) == 2 and examples.contents.shape == (feats.contents.shape[0], model.hidden_size)



def test_passage_features_are_what_ingestion_stores(engine, tmp_path):
    """With ``passage_length`` each segment's passages are kept as ingestion pools them, and a query's
    gold passages are the runs of that many tokens holding a gold token."""
    model, tok = engine.model, engine.tokenizer
    text = " ".join(f"Cohort {i} took aspirin and reported fewer headaches." for i in range(60))
    needle = text.index("Cohort 41 took")
    docs = [RecallDoc("a", text, group="g", queries=[("Who took aspirin?", [(needle, needle + 20)], "question")])]
    width = model.config.segment_length // 2
    feats = extract_features(model, tok, docs, block_segments=2, passage_length=width)
    ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
    with torch.inference_mode():
        records = model(ids, return_logits=False, return_records=True, passage_length=width).records
    pooled = np.concatenate(
        [r.passage_contents[0][r.passage_tokens[0] > 0].float().numpy() for r in records]
    )
    assert feats.passage_contents.shape[0] == -(-ids.shape[1] // width)  # the last one may be short
    np.testing.assert_allclose(feats.passage_contents, pooled, atol=1e-3)
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True).offset_mapping
    expected = sorted({i // width for i, (s, e) in enumerate(offsets) if s < needle + 20 and e > needle})
    assert feats.passage_positives == [expected]
    assert {p // 2 for p in expected} == set(feats.positives[0])  # two passages per segment
    feats.save(tmp_path)
    again = RecallFeatures.load(tmp_path)
    assert again.passage_positives == feats.passage_positives
    examples = again.examples(passages=True)
    assert examples.contents.shape == feats.passage_contents.shape and examples.positives == [expected]
    with pytest.raises(ValueError, match="does not divide"):
        extract_features(model, tok, docs, passage_length=width - 1)


def test_features_without_passages_refuse_passage_examples(engine):
    docs = [RecallDoc("b", "Trial arm 3 measured insulin after meals. " * 20, group="h",
                      queries=[("insulin", [(0, 40)], "question")])]
    feats = extract_features(engine.model, engine.tokenizer, docs)
    assert feats.passage_contents is None
    with pytest.raises(ValueError, match="without passages"):
        feats.examples(passages=True)
