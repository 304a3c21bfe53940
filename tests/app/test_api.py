"""The web app through its HTTP API (gradio_client), with the tiny-random engine."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from .conftest import TEST_UPLOAD_MB, note, start_server, stop_server

# Starlette's deprecation inside Gradio's own error path (422 responses); nothing we can change.
pytestmark = pytest.mark.filterwarnings("ignore:'HTTP_422_UNPROCESSABLE_ENTITY' is deprecated")


def client(server) -> Client:
    return Client(server.url, verbose=False)


def ingest_text(c: Client, text: str) -> str:
    status, doc_id, info = c.predict(files=[], text=text, save_to_shared=False, api_name="/ingest")
    assert doc_id and info[0]["doc_id"] == doc_id, status
    return doc_id


def test_ingest_and_ask(server):
    c = client(server)
    doc_id = ingest_text(c, note("warfarin"))
    answer, record = c.predict(doc_id=doc_id, question="What was the INR?", mode="hmt", options="", api_name="/ask")
    assert isinstance(answer, str)
    assert record["doc_id"] == doc_id and record["mode"] == "hmt" and record["answer"] == answer
    assert record["evidence"], "an hmt answer carries evidence segments"
    ev = record["evidence"][0]
    assert {"segment", "char_start", "char_end", "weight", "snippet"} <= set(ev)
    weights = [w for _, w in record["recall"]]
    assert abs(sum(weights) - 1.0) < 1e-3  # recall weights are a softmax over the document's memories
    assert {"recall_s", "first_token_s", "total_s"} <= set(record["timings"])
    # How sure the model is, whether it abstained, and the evidence sentence the answer rests on.
    assert record["abstained"] is False  # no checkpoint, no threshold
    assert record["confidence"] is None or 0.0 <= record["confidence"] <= 1.0
    support = record["support"]
    if support is not None:  # a sentence of the evidence passages, by character offsets
        assert {"text", "char_start", "char_end", "segment"} <= set(support)
        start, end = support["char_start"], support["char_end"]
        assert any(e["char_start"] <= start < end <= e["char_end"] for e in record["evidence"])


def test_ingest_file_and_closed_question(server, tmp_path):
    path = tmp_path / "heparin-note.txt"
    path.write_text(note("heparin"), encoding="utf-8")
    c = client(server)
    status, doc_id, info = c.predict(files=[handle_file(str(path))], text="", save_to_shared=False, api_name="/ingest")
    assert doc_id == "heparin-note" and "ingested" in status
    assert info[0]["segments"] >= 2 and info[0]["tokens_per_s"] > 0
    answer, record = c.predict(
        doc_id=doc_id, question="Was the dose kept?", mode="hmt+retrieval", options="yes, no, maybe", api_name="/ask"
    )
    assert answer in ("yes", "no", "maybe")
    assert set(record["option_scores"]) == {"yes", "no", "maybe"}
    assert answer == max(record["option_scores"], key=record["option_scores"].get)
    assert 0.0 <= record["confidence"] <= 1.0 and record["abstained"] is False
    support = record["support"]
    assert support["text"] and note("heparin")[support["char_start"] : support["char_end"]] == support["text"]


def test_modes_none_and_search(server):
    c = client(server)
    doc_id = ingest_text(c, note("digoxin"))
    _, record = c.predict(doc_id=doc_id, question="Which drug?", mode="none", options="", api_name="/ask")
    assert record["mode"] == "none" and record["recall"] == []
    hits = c.predict(doc_id=doc_id, text="bleeding risk", k=2, api_name="/search")
    assert [row[0] for row in hits["data"]] == [1, 2]
    scores = [row[2] for row in hits["data"]]
    assert scores == sorted(scores, reverse=True)


def test_sessions_are_isolated(server):
    """Two clients (two sessions) each see only their own upload, also while working concurrently."""
    a, b = client(server), client(server)
    texts = {"a": note("amiodarone"), "b": note("bisoprolol")}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        ids = dict(zip("ab", pool.map(ingest_text, [a, b], [texts["a"], texts["b"]]), strict=True))
    seen_a = {d["doc_id"] for d in a.predict(api_name="/documents")}
    seen_b = {d["doc_id"] for d in b.predict(api_name="/documents")}
    assert ids["a"] in seen_a and ids["b"] not in seen_a
    assert ids["b"] in seen_b and ids["a"] not in seen_b
    with pytest.raises(AppError, match="Unknown document"):
        b.predict(doc_id=ids["a"], question="Which drug?", mode="hmt", options="", api_name="/ask")


def test_save_to_shared_makes_a_document_visible_to_others(server):
    a, b = client(server), client(server)
    doc_id = ingest_text(a, note("apixaban"))
    status = a.predict(doc_id=doc_id, api_name="/save_to_shared")
    assert "shared store" in status
    entries = {d["doc_id"]: d["where"] for d in b.predict(api_name="/documents")}
    assert entries.get(doc_id) == "shared"
    _, record = b.predict(doc_id=doc_id, question="Which drug?", mode="hmt", options="", api_name="/ask")
    assert record["doc_id"] == doc_id


def test_eight_concurrent_asks(server):
    """Load: 8 clients ask at once; the queue (concurrency 2) serves them all, each its own answer."""
    c = client(server)
    doc_id = ingest_text(c, note("metformin"))
    expected = c.predict(doc_id=doc_id, question="Question 0?", mode="hmt", options="", api_name="/ask")[1]

    def ask(i: int) -> dict:
        own = client(server)  # one session per simulated user
        own_doc = ingest_text(own, note("metformin"))  # same text -> same id, in the user's own store
        return own.predict(doc_id=own_doc, question=f"Question {i % 2}?", mode="hmt", options="", api_name="/ask")[1]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        records = list(pool.map(ask, range(8)))
    assert len(records) == 8
    for i, rec in enumerate(records):
        assert rec["question"] == f"Question {i % 2}?" and rec["doc_id"] == doc_id
        if i % 2 == 0:  # same question, same memories: the same deterministic answer and recall
            assert rec["answer"] == expected["answer"]
            assert [s for s, _ in rec["recall"]] == [s for s, _ in expected["recall"]]
            assert [w for _, w in rec["recall"]] == pytest.approx([w for _, w in expected["recall"]], abs=1e-4)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"", "empty"),
        ("image.txt", bytes(range(256)) * 8, "binary"),
        ("huge.txt", b"a" * int(TEST_UPLOAD_MB * 1024 * 1024 + 1024), "(limit|size|large)"),
        ("data.bin", b"hello", "unsupported file type|Invalid file type"),
    ],
)
def test_bad_uploads_are_refused_and_the_app_keeps_serving(server, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    c = client(server)
    with pytest.raises(Exception, match=f"(?i){message}"):  # AppError, or the upload refused by Gradio
        c.predict(files=[handle_file(str(path))], text="", save_to_shared=False, api_name="/ingest")
    assert ingest_text(c, note("after a bad upload"))  # still serving


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"doc_id": "no-such-doc", "question": "Why?"}, "Unknown document 'no-such-doc'"),
        ({"doc_id": "", "question": "Why?"}, "Pick a document"),
        ({"question": "   "}, "Type a question"),
        ({"question": "Why?", "options": "only-one"}, "at least two"),
        ({"question": "Why? " * 300}, "limit is one segment"),
    ],
)
def test_bad_questions_get_a_clear_error(server, kwargs, message):
    c = client(server)
    doc_id = ingest_text(c, note("insulin"))
    args = {"doc_id": doc_id, "mode": "hmt", "options": ""} | kwargs
    with pytest.raises(AppError, match=message):
        c.predict(**args, api_name="/ask")


def test_pasted_text_over_the_limit(server):
    c = client(server)
    with pytest.raises(AppError, match="over the"):
        c.predict(files=[], text="x" * int(TEST_UPLOAD_MB * 1024 * 1024 + 10), save_to_shared=False, api_name="/ingest")
    with pytest.raises(AppError, match="Nothing to ingest"):
        c.predict(files=[], text="   ", save_to_shared=False, api_name="/ingest")


def test_batch_sample_and_upload(server, tmp_path):
    c = client(server)
    status, metrics, results, out = c.predict(questions_file=None, use_sample=True, modes=["hmt", "none"], api_name="/batch")
    assert "12 answers" in status
    assert [row[0] for row in metrics["data"]] == ["hmt", "none"]
    assert len(results["data"]) == 12
    records = [json.loads(line) for line in Path(out).read_text(encoding="utf-8").splitlines()]
    assert {r["row_id"] for r in records} == {"cap-1", "cap-2", "trial-1", "trial-2", "hf-1", "hf-2"}

    csv_path = tmp_path / "rows.csv"
    csv_path.write_text(
        'document,question,options,answer\n"' + note("enoxaparin") + '",Was the dose kept?,yes|no,yes\n', encoding="utf-8"
    )
    status, metrics, results, _ = c.predict(
        questions_file=handle_file(str(csv_path)), use_sample=False, modes=["hmt"], api_name="/batch"
    )
    assert "1 answers" in status and metrics["data"][0][1] == 1

    bad = tmp_path / "rows.jsonl"
    bad.write_text(json.dumps({"question": "q?", "document_path": "/etc/passwd"}) + "\n", encoding="utf-8")
    with pytest.raises(AppError, match="document_path"):
        c.predict(questions_file=handle_file(str(bad)), use_sample=False, modes=["hmt"], api_name="/batch")


def test_page_is_served_while_the_model_loads(tmp_path, tiny_engine, gate):
    """The engine loads in the background: the page answers at once and requests wait for the model."""

    def slow_factory():
        gate.wait(30)
        return tiny_engine

    srv = start_server(tmp_path, slow_factory)
    try:
        page = httpx.get(srv.url, timeout=10)
        assert page.status_code == 200
        assert srv.qa.service.loader.status() == "loading"
        assert "model loading" in srv.qa.model_status()
        c = client(srv)
        done: dict = {}
        worker = threading.Thread(target=lambda: done.setdefault("id", ingest_text(c, note("loading"))))
        worker.start()
        time.sleep(0.5)
        assert "id" not in done  # waiting for the model, not failing
        gate.set()
        worker.join(30)
        assert done.get("id")
        assert "ready" in srv.qa.model_status()
    finally:
        stop_server(srv)
