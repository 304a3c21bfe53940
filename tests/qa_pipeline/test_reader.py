"""A reader writes open answers from the passages the memory recalled; recall, evidence, closed answers
and the store stay the memory model's."""

from __future__ import annotations

import pytest
import torch

from hmt.backbone import tiny_random_backbone
from qa_pipeline.answer_text import short_answer
from qa_pipeline.documents import load_text
from qa_pipeline.engine import DEFAULT_READER, Engine, EngineConfig, reader_name
from qa_pipeline.prompts import question_text
from qa_pipeline.reader import READER_INSTRUCTION
from tests.qa_pipeline.test_engine import make_text
from tests.tiny import tolerance

QUESTION = "Which drug was used?"
SETTINGS = dict(backbone="tiny-random", checkpoint=None, block_segments=4, max_new_tokens=12, no_repeat_ngram=0)


@pytest.fixture(scope="module")
def reader_dir(tmp_path_factory):
    """Another tiny random chat model (its own weights, SmolLM2's tokenizer and chat template), as a folder."""
    model, tokenizer = tiny_random_backbone(seed=1)
    path = tmp_path_factory.mktemp("reader")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def engines(reader_dir):
    return Engine(EngineConfig(**SETTINGS, reader=None)), Engine(EngineConfig(**SETTINGS, reader=reader_dir))


@pytest.fixture(scope="module")
def store(engines, tmp_path_factory):
    plain, _ = engines
    store = plain.open_store(tmp_path_factory.mktemp("store"))
    plain.ingest(store, load_text(make_text(), doc_id="trial", title="A trial"))
    return store


def test_which_reader_a_config_selects():
    assert reader_name(EngineConfig()) == DEFAULT_READER  # the default memory model reads with it
    assert reader_name(EngineConfig(backbone="tiny-random")) is None  # other backbones: no default reader
    assert reader_name(EngineConfig(reader="none")) is None
    assert reader_name(EngineConfig(reader="smollm2-135m-instruct")) is None  # the memory model itself
    assert reader_name(EngineConfig(backbone="tiny-random", reader="some/folder")) == "some/folder"


def _reference(reader, question: str, context: str) -> tuple[str, list[int]]:
    """Greedy decoding of the reader over the chat template's own prompt, without our stopping rule:
    the short answer and the generated ids."""
    tok = reader.tokenizer
    text = tok.apply_chat_template(
        [{"role": "user", "content": question_text(question, None, context, READER_INSTRUCTION)}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = reader.prompt_ids(question, context)
    assert tok.decode(ids[0]) == text  # our prompt is the chat template's, token for token in text
    with torch.no_grad():
        out = reader.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=SETTINGS["max_new_tokens"], do_sample=False
        )
    new = out[0, ids.shape[1] :].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    return short_answer(tok.decode(new, skip_special_tokens=True)), new


@pytest.mark.parametrize("mode", ["hmt+retrieval", "dense-rag", "none"])
def test_the_reader_answers_from_the_memory_models_passages(engines, store, mode):
    plain, read = engines
    mine = plain.ask(store, "trial", QUESTION, mode=mode, record=False)
    ans = read.ask(store, "trial", QUESTION, mode=mode, record=False)  # the same store: no re-ingestion
    assert ans.reader == read.reader.name and mine.reader is None
    # What was recalled and shown as evidence is the memory model's, untouched by the reader.
    assert ans.recall == mine.recall and ans.evidence == mine.evidence
    assert ans.prompt_passages == mine.prompt_passages and ans.recall_score == mine.recall_score
    text = store.get_text("trial")
    if mode == "none":
        context = text[: ans.evidence[0].char_end]
    else:
        context = Engine._context(text, ans.evidence[: ans.prompt_passages])
    assert ans.sentence == _reference(read.reader, QUESTION, context)[0]


def test_reader_answers_are_quoted_like_the_memory_models(engines, store, monkeypatch):
    """A reader's answer is quoted from the supporting sentence chosen by what it wrote; with
    quote_answers off it is its own short phrase, with the same sentence and support."""
    from qa_pipeline.answer_text import answer_phrase, quoted_answer

    _, read = engines
    quoted = read.ask(store, "trial", QUESTION, mode="dense-rag", record=False)
    assert quoted.reader and quoted.quoted and quoted.answer == quoted_answer(quoted.support.text, QUESTION)
    monkeypatch.setattr(read.config, "quote_answers", False)
    own = read.ask(store, "trial", QUESTION, mode="dense-rag", record=False)
    assert not own.quoted and own.answer == answer_phrase(own.sentence, QUESTION)
    assert (quoted.sentence, quoted.support) == (own.sentence, own.support)


def test_closed_questions_and_mode_hmt_stay_the_memory_models(engines, store):
    plain, read = engines
    options = ["yes", "no", "maybe"]
    for mode in ("hmt", "hmt+retrieval"):
        mine = plain.ask(store, "trial", "Did it work?", mode=mode, options=options, record=False)
        ans = read.ask(store, "trial", "Did it work?", mode=mode, options=options, record=False)
        assert ans.reader is None and ans.option_scores == mine.option_scores
    mine = plain.ask(store, "trial", QUESTION, mode="hmt", record=False)
    ans = read.ask(store, "trial", QUESTION, mode="hmt", record=False)
    assert ans.reader is None and ans.sentence == mine.sentence  # memory tokens: only HMT reads them


def test_the_reader_answer_likelihood_is_its_own(engines, store):
    """The answer's mean token log-likelihood is the reader's, from a forward pass over its tokens."""
    _, read = engines
    ans = read.ask(store, "trial", QUESTION, mode="dense-rag", record=False)
    context = Engine._context(store.get_text("trial"), ans.evidence[: ans.prompt_passages])
    _, new = _reference(read.reader, QUESTION, context)
    # The random reader writes no sentence end and no end token (blank lines): every token is answer.
    assert len(new) == SETTINGS["max_new_tokens"] and not ans.sentence.strip(" .")
    ids = read.reader.prompt_ids(QUESTION, context)
    with torch.no_grad():
        logits = read.reader.model(torch.cat([ids, torch.tensor([new])], dim=1)).logits
    logp = logits[0, ids.shape[1] - 1 : -1].float().log_softmax(-1)
    expect = float(logp.gather(1, torch.tensor(new)[:, None]).mean())
    assert ans.answer_logprob == pytest.approx(expect, **tolerance(read.reader.model.dtype, rel=1e-4, abs=1e-5))


def test_reader_answers_keep_the_recall_threshold_not_the_confidence_one(engines, store, monkeypatch):
    """The confidence threshold was fitted on the memory model's own answers; the recall score is the
    memory's, whoever writes the answer."""
    plain, read = engines
    for engine in (plain, read):
        monkeypatch.setattr(engine.decision_heads, "open_threshold", 0.999)
    mine = plain.ask(store, "trial", QUESTION, mode="hmt+retrieval", record=False)
    ans = read.ask(store, "trial", QUESTION, mode="hmt+retrieval", record=False)
    assert mine.abstained and "confidence" in mine.abstain_reason
    assert not ans.abstained
    for engine in (plain, read):
        monkeypatch.setattr(engine.decision_heads, "open_recall_threshold", ans.recall_score + 1.0)
    ans = read.ask(store, "trial", QUESTION, mode="hmt+retrieval", record=False)
    assert ans.abstained and "recall score" in ans.abstain_reason


def test_the_reader_loads_on_first_use_and_a_missing_one_is_a_clear_error(engines, store):
    """Ingestion never loads the reader; the first open answer does, and a bad one says what it is."""
    plain, _ = engines
    engine = Engine(EngineConfig(**SETTINGS, reader="/nonexistent/reader-folder"))
    assert engine._reader is None
    engine.ask(store, "trial", "Did it work?", options=["yes", "no"], record=False)  # closed: no reader
    with pytest.raises(FileNotFoundError, match="Could not load backbone '/nonexistent/reader-folder'"):
        engine.ask(store, "trial", QUESTION, mode="dense-rag", record=False)
