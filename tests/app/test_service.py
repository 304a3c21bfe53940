"""The app's service layer and view helpers, without a server."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from app import plots, views
from app.batch_io import read_batch_upload, sample_rows
from app.errors import AppError
from app.query import query_vector, recall_weights
from app.service import PRIVATE, SHARED, QAService
from app.settings import AppSettings
from qa_pipeline.engine import NOT_IN_DOCUMENT, Answer, Evidence
from qa_pipeline.support import Support

from .conftest import note


@pytest.fixture
def service(tmp_path, tiny_engine):
    svc = QAService(
        AppSettings(
            store=str(tmp_path / "shared"),
            session_root=str(tmp_path / "sessions"),
            max_upload_mb=0.01,
            allow_shared_writes=True,
        ),
        lambda: tiny_engine,
    )
    yield svc
    svc.close()


def test_ingest_ask_and_memory_views(service):
    session = service.new_session()
    docs = service.load_uploads([], note("rivaroxaban"))
    seen = []
    [result] = service.ingest(session, docs, progress=lambda title, done, total, tps: seen.append((done, total)))
    assert result["status"] == "ingested" and seen[-1][0] == seen[-1][1] == result["segments"]
    again = service.ingest(session, docs)  # same text: nothing to redo
    assert again[0]["status"] == "already ingested"
    doc_id = result["doc_id"]
    assert [(e.doc_id, e.where) for e in service.documents(session)] == [(doc_id, PRIVATE)]

    answer = service.ask(session, doc_id, "What was the INR?", mode="hmt")
    assert session.last_answer is answer and answer.query is not None
    view = service.memory_view(session, doc_id)
    assert view.memory.shape[0] == view.recall_key.shape[0] == len(view.segments) == result["segments"]

    # The search box encodes text exactly as a question is encoded, so its query is the answer's.
    q = query_vector(service.engine(), "What was the INR?")
    np.testing.assert_allclose(q, np.asarray(answer.query), rtol=1e-5, atol=1e-5)
    weights = recall_weights(view.recall_key, q, service.engine().recall_scale)
    np.testing.assert_allclose(weights, [w for _, w in answer.recall], atol=2e-3)
    hits = service.search(session, doc_id, "What was the INR?", k=10)
    assert [h["segment"] for h in hits] == list(np.argsort(-weights, kind="stable"))


def test_sessions_do_not_see_each_other(service):
    a, b = service.new_session(), service.new_session()
    [ra] = service.ingest(a, service.load_uploads([], note("amiodarone")))
    assert [e.doc_id for e in service.documents(b)] == []
    with pytest.raises(AppError, match="Unknown document"):
        service.ask(b, ra["doc_id"], "Which drug?")
    service.save_to_shared(a, ra["doc_id"])
    assert [(e.doc_id, e.where) for e in service.documents(b)] == [(ra["doc_id"], SHARED)]
    assert service.ask(b, ra["doc_id"], "Which drug?").doc_id == ra["doc_id"]
    a.close()
    assert not a.folder.exists()


def test_upload_checks(service, tmp_path):
    cases = {
        "empty.txt": (b"", "empty"),
        "blob.txt": (bytes(range(256)) * 4, "binary"),
        "big.txt": (b"word " * 5000, "upload limit is 0.01 MB"),
        "notes.docx": (b"PK\x03\x04", "unsupported file type"),
        "paper.xml": (b"<html><body>hi</body></html>", "not a JATS article"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(AppError, match=message) as err:
            service.load_uploads([str(path)], None)
        assert str(tmp_path) not in str(err.value)  # messages name the user's file, not server paths
    with pytest.raises(AppError, match="Nothing to ingest"):
        service.load_uploads([], "  \n ")
    with pytest.raises(AppError, match="pasted text is over"):
        service.load_uploads([], "x" * 20_000)


def test_ask_stream_yields_partial_text_then_the_answer(service, monkeypatch):
    final = Answer("d", "q", "hmt", "abc", None, None, [], [], {"total_s": 0.0})

    def fake_ask(session, doc_id, question, *, mode, options, on_token):
        for text in ("a", "ab", "abc"):
            on_token(text)
        return final

    monkeypatch.setattr(service, "ask", fake_ask)
    updates = list(service.ask_stream(None, "d", "q"))
    assert updates[-1] == ("abc", final)
    assert all(answer is None for _, answer in updates[:-1])
    assert all("abc".startswith(text) for text, _ in updates)


def test_ask_stream_reports_errors(service, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(service, "ask", broken)
    with pytest.raises(AppError, match="RuntimeError: boom"):
        list(service.ask_stream(None, "d", "q"))


def test_options_parsing():
    assert QAService.parse_options("") is None
    assert QAService.parse_options(" yes, no ,maybe ") == ["yes", "no", "maybe"]
    with pytest.raises(AppError):
        QAService.parse_options("yes")


def test_evidence_highlights_cover_the_text_once():
    text = "".join(f"[segment {i} text]" for i in range(6))
    step = len(text) // 6
    evidence = [Evidence(3, 3 * step, 4 * step, 0.5, ""), Evidence(1, step, 2 * step, 0.3, ""), Evidence(2, step + 2, 3 * step, 0.1, "")]
    pieces, colors = views.evidence_highlights(text, evidence, "hmt")
    assert "".join(p for p, _ in pieces) == text
    labels = [label for _, label in pieces if label]
    assert labels[0].startswith("#2 segment 1") and "#1 segment 3 · recall weight 0.50" in labels
    assert set(labels) <= set(colors)  # the overlapping third span only adds what is not yet covered
    assert sum(len(p) for p, label in pieces if label and label.startswith("#3")) == step


def test_evidence_labels_say_which_unit_ranked_it():
    ev = Evidence(4, 0, 10, 0.25, "")
    assert views.evidence_label(1, ev, "hmt+retrieval") == "#1 segment 4 · recall weight 0.25"
    passage = Evidence(4, 0, 10, 0.25, "", passage=True)
    assert views.evidence_label(2, passage, "hmt+retrieval") == "#2 passage of segment 4 · recall weight 0.25"
    assert views.evidence_label(1, Evidence(7, 0, 10, 0.61, ""), "dense-rag") == "#1 chunk 7 · similarity 0.61"


def test_long_documents_are_cut_to_the_evidence():
    text = "x" * 100_000
    pieces, _ = views.evidence_highlights(text, [Evidence(0, 50_000, 51_000, 1.0, "")], "hmt")
    shown = "".join(p for p, _ in pieces)
    assert len(shown) < 5_000 and "characters not shown" in shown
    assert any(label for _, label in pieces)
    assert "more characters" in views.document_preview(text)[-1][0]


def test_batch_uploads(tmp_path):
    good = tmp_path / "q.csv"
    good.write_text('document,question,options,answer\n"Some text.",Is it?,yes|no,yes\n"Other text.",What?,,\n', encoding="utf-8")
    rows = read_batch_upload(good)
    assert [r.options for r in rows] == [["yes", "no"], None] and rows[0].answer == "yes"
    missing = tmp_path / "m.csv"
    missing.write_text("question\nIs it?\n", encoding="utf-8")
    with pytest.raises(AppError, match="missing CSV column"):
        read_batch_upload(missing)
    wrong = tmp_path / "w.jsonl"
    wrong.write_text('{"question": "q?", "document": "t", "options": ["a", "b"], "answer": "c"}\n', encoding="utf-8")
    with pytest.raises(AppError, match="line 1"):
        read_batch_upload(wrong)
    with pytest.raises(AppError, match="runs at most 1 "):
        read_batch_upload(good, max_rows=1)
    rows = sample_rows()
    assert len(rows) == 6 and all(r.document and r.evidence for r in rows)
    for r in rows:  # the gold evidence spans point at the right words
        assert all(0 <= s < e <= len(r.document) for s, e in r.evidence)


def test_plots_are_figures():
    rng = np.random.default_rng(0)
    recall = [(i, w) for i, w in enumerate(rng.dirichlet(np.ones(12)))]
    assert isinstance(plots.recall_weights_figure(12, recall, [3, 5]), Figure)
    assert isinstance(plots.recall_distance_figure(12, recall), Figure)
    fig = plots.memory_pca_figure(rng.normal(size=(12, 64)), rng.normal(size=(12, 64)), rng.normal(size=64))
    assert len(fig.axes) == 3  # two panels and the colour bar
    assert isinstance(plots.memory_pca_figure(rng.normal(size=(1, 8)), rng.normal(size=(1, 8))), Figure)


def test_results_outside_temp_are_copied_for_download(service, tmp_path, monkeypatch):
    inside = tmp_path / "r.jsonl"
    inside.write_text("{}\n", encoding="utf-8")
    assert service.downloadable(inside) == inside  # pytest's tmp_path is under the system temp folder
    monkeypatch.setattr("app.service._servable_roots", lambda: [tmp_path / "elsewhere"])
    copy = service.downloadable(inside)
    assert copy != inside and copy.read_text(encoding="utf-8") == "{}\n"


def test_expired_session_state_removes_the_private_store(service):
    from app.ui import _close_session

    session = service.new_session()
    service.ingest(session, service.load_uploads([], note("ticagrelor")))
    assert (session.folder / "store").is_dir()
    _close_session(session)  # what Gradio calls when the session's gr.State expires
    assert session.closed and not session.folder.exists()
    with pytest.raises(AppError, match="expired"):
        session.store(service.engine())


def test_pasted_text_title_skips_a_byte_order_mark(service):
    [doc] = service.load_uploads([], "\ufeff# Warfarin notes\nThe INR rose.")
    assert doc.title == "Warfarin notes" and not doc.text.startswith("\ufeff")


def _answer(**kw) -> Answer:
    fields = {
        "doc_id": "d",
        "question": "Did it help?",
        "mode": "hmt",
        "answer": "yes",
        "options": None,
        "option_scores": None,
        "evidence": [],
        "recall": [],
        "timings": {"total_s": 0.1},
    }
    return Answer(**(fields | kw))


def test_supporting_sentence_is_marked_inside_its_evidence():
    text = "Intro words here. The drug lowered the INR. It was kept. Later text follows on."
    ev_start, ev_end = text.index("The drug"), text.index("Later")
    start = text.index("It was")
    support = Support("It was kept.", start, start + len("It was kept."), 1)
    evidence = [Evidence(1, ev_start, ev_end, 0.8, ""), Evidence(0, 0, ev_start, 0.2, "")]
    pieces, colors = views.evidence_highlights(text, evidence, "hmt", support)
    assert "".join(p for p, _ in pieces) == text
    offsets, pos = [], 0
    for piece, label in pieces:
        offsets.append((pos, pos + len(piece), label))
        pos += len(piece)
    first = "#1 segment 1 · recall weight 0.80"
    assert [(s, e, label) for s, e, label in offsets if label and not label.startswith("#2")] == [
        (ev_start, start, first),  # the evidence either side of the sentence
        (start, support.char_end, views.SUPPORT_LABEL),
        (support.char_end, ev_end, first),
    ]
    assert colors[views.SUPPORT_LABEL] == views.SUPPORT_COLOR and views.SUPPORT_COLOR not in {
        c for label, c in colors.items() if label != views.SUPPORT_LABEL
    }
    # Without a supporting sentence nothing changes; a span outside the text is ignored.
    plain, plain_colors = views.evidence_highlights(text, evidence, "hmt")
    assert views.SUPPORT_LABEL not in plain_colors and all(label != views.SUPPORT_LABEL for _, label in plain)
    outside = Support("x", len(text) + 5, len(text) + 9, 1)
    assert views.evidence_highlights(text, evidence, "hmt", outside) == (plain, plain_colors)


def test_answer_markdown_shows_confidence_and_the_supporting_sentence():
    support = Support("The INR\nwas *2.4* on day 3.", 10, 37, 2)
    md = views.answer_markdown(_answer(confidence=0.734, support=support))
    # Document text is escaped: its Markdown (here *emphasis*) shows as the characters themselves.
    assert md.startswith(r"**confidence:** 0.73" "\n\n" r"**supporting sentence:** “The INR was \*2\.4\* on day 3\.”")
    assert "does not seem to say" not in md

    scores = {"yes": -0.9, "no": -0.5}
    abstained = _answer(answer=NOT_IN_DOCUMENT, option_scores=scores, confidence=0.21, abstained=True)
    md = views.answer_markdown(abstained)
    assert "**the document does not seem to say** (low confidence 0.21)" in md
    assert "best guess: “no”" in md and "supporting sentence" not in md
    # An open question that abstained shows the short answer of the sentence the model wrote.
    sentence = "The INR was 2.4 on day 3."
    open_abstained = _answer(
        question="What was the INR?", answer=NOT_IN_DOCUMENT, confidence=0.1, abstained=True, sentence=sentence
    )
    assert "best guess: “2\\.4 on day 3”" in views.answer_markdown(open_abstained)
    # Turned away by the recall score, not the confidence: the line says which.
    reason = "recall score 0.8 is below 10.3: no passage matches the question well"
    by_recall = _answer(answer=NOT_IN_DOCUMENT, confidence=0.4, abstained=True, abstain_reason=reason)
    assert f"**the document does not seem to say** ({reason})" in views.answer_markdown(by_recall)
    assert "best guess" not in views.answer_markdown(_answer(answer=NOT_IN_DOCUMENT, confidence=0.1, abstained=True))
    # An abstained answer's sentence backs only the best guess: named so above and in the text's highlight.
    guessed = _answer(answer=NOT_IN_DOCUMENT, confidence=0.1, abstained=True, sentence=sentence, support=support)
    md = views.answer_markdown(guessed)
    assert r"**sentence behind the best guess:** “The INR was \*2\.4\* on day 3\.”" in md
    assert "supporting sentence" not in md
    text = "x" * 10 + support.text + "y" * 20
    pieces, colors = views.evidence_highlights(text, [], "hmt", support, views.support_label(guessed))
    assert (support.text, views.GUESS_SUPPORT_LABEL) in pieces and views.SUPPORT_LABEL not in colors
    assert "confidence" not in views.answer_markdown(_answer())


def test_answer_markdown_shows_the_sentence_a_short_answer_came_from():
    sentence = "The INR on day 3 was *2.4*."
    md = views.answer_markdown(_answer(answer="2.4", sentence=sentence, confidence=0.5))
    assert md.startswith("**confidence:** 0.50\n\n" r"**the model wrote:** “The INR on day 3 was \*2\.4\*\.”")
    # Not when the answer is the whole sentence, nor when the answer abstained.
    assert "model wrote" not in views.answer_markdown(_answer(answer="It was 2.4", sentence="It was 2.4."))
    abstained = _answer(answer=NOT_IN_DOCUMENT, sentence=sentence, confidence=0.1, abstained=True)
    assert "model wrote" not in views.answer_markdown(abstained)


def test_batch_results_show_the_confidence():
    records = [
        {"row_id": "a", "prediction": "yes", "confidence": 0.8123, "abstained": False},
        {"row_id": "b", "prediction": NOT_IN_DOCUMENT, "confidence": 0.2, "abstained": True},
        {"row_id": "c", "error": "ValueError: bad"},
    ]
    column = views.RESULT_HEADERS.index("confidence")
    assert [row[column] for row in views.result_rows(records)] == ["0.81", "0.20 (abstained)", ""]
    assert all(len(row) == len(views.RESULT_HEADERS) for row in views.result_rows(records))


def test_show_answer_marks_the_supporting_sentence(service):
    from app.ui import QAApp

    qa = QAApp(service)
    session = service.new_session()
    [result] = service.ingest(session, service.load_uploads([], note("dabigatran")))
    answer = service.ask(session, result["doc_id"], "Was the dose kept?", options="yes, no")
    assert answer.confidence is not None and 0.0 <= answer.confidence <= 1.0
    assert answer.support is not None
    text = service.memory_view(session, answer.doc_id).text
    assert text[answer.support.char_start : answer.support.char_end] == answer.support.text
    highlighted, md, *_ = qa.show_answer(session)
    pieces = highlighted.value
    if isinstance(pieces[0], dict):  # Gradio keeps the value in its own format
        pieces = [(p["token"], p["class_or_confidence"]) for p in pieces]
    assert [p for p, label in pieces if label == views.SUPPORT_LABEL] == [answer.support.text]
    assert f"**confidence:** {answer.confidence:.2f}" in md or "does not seem to say" in md
    assert "**supporting sentence:**" in md


def test_the_first_line_names_the_reader_that_writes_open_answers(tmp_path):
    """The status line says which model writes open answers: the reader, when one is set."""
    from app.ui import build_app

    def never():  # the line is read before any model loads
        raise AssertionError("the status line must not load the model")

    base = dict(backbone="tiny-random", checkpoint=None, store="", session_root=str(tmp_path / "s"))
    with_reader = build_app(AppSettings(**base, reader="some/reader-folder"), never)
    without = build_app(AppSettings(**base, reader=None), never)
    default = build_app(AppSettings(**{**base, "backbone": "smollm2-135m-instruct"}), never)
    try:
        assert "reader `some/reader-folder`" in with_reader.model_status().splitlines()[0]
        assert "reader" not in without.model_status()
        assert "reader `qwen2.5-coder-0.5b-instruct`" in default.model_status()
    finally:
        for qa in (with_reader, without, default):
            qa.service.close()
