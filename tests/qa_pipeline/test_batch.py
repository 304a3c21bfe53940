"""Batch QA: JSONL rows -> results JSONL (resumable) + per-mode metrics; CLI, errors, torchrun (tiny-random)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from hmtqa.main import main
from qa_pipeline.batch import run_batch, shard_rows
from qa_pipeline.engine import Engine, EngineConfig
from qa_pipeline.qa_data import QARow, read_rows
from qa_pipeline.store import MemoryStore

REPO = Path(__file__).resolve().parents[2]
MODEL = ["--backbone", "tiny-random", "--checkpoint", "none", "--max-new-tokens", "3"]
OPTIONS = ["yes", "no", "maybe"]
MODES = ("hmt", "dense-rag")


def make_text(topic: str, n: int) -> str:
    return " ".join(f"In trial {i}, {topic} changed the outcome by {i % 9} points (p = 0.0{i % 7})." for i in range(n))


def write_data(folder: Path, *, malformed: bool = False) -> Path:
    """Five rows over three documents (inline with doc_id, inline without, document_path)."""
    aspirin, statin = make_text("aspirin", 70), make_text("a statin", 30)
    (folder / "docs").mkdir(exist_ok=True)
    (folder / "docs" / "vitd.txt").write_text(make_text("vitamin D", 40), encoding="utf-8")
    rows = [
        {"row_id": "a1", "question": "Did aspirin help?", "document": aspirin, "doc_id": "aspirin",
         "options": OPTIONS, "answer": "yes", "evidence": [[0, 80]]},
        {"row_id": "v1", "question": "Did vitamin D help?", "document_path": "docs/vitd.txt",
         "options": OPTIONS, "answer": "no", "evidence": [[100, 160]]},
        {"row_id": "a2", "question": "What changed the outcome?", "document": aspirin, "doc_id": "aspirin",
         "answer": "aspirin", "evidence": [[2000, 2100]]},
        {"row_id": "s1", "question": "Did statins help?", "document": statin, "options": OPTIONS, "answer": "maybe"},
        {"row_id": "v2", "question": "Which vitamin?", "document_path": "docs/vitd.txt", "answer": "vitamin D"},
    ]
    lines = [json.dumps(r) for r in rows]
    if malformed:
        lines.insert(2, '{"row_id": "broken", "question": ')  # line 3: invalid JSON
        lines.append(json.dumps({"row_id": "noq", "document": "x"}))  # line 7: no question
    path = folder / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def keys(path: Path) -> Counter:
    return Counter((r["row_id"], r["mode"]) for r in map(json.loads, path.read_text().splitlines()))


def test_batch_cli_answers_every_row_in_every_mode_and_resumes(tmp_path, capsys, monkeypatch):
    data = write_data(tmp_path)
    out = tmp_path / "results.jsonl"
    argv = ["batch", str(data), "--out", str(out), "--modes", ",".join(MODES), *MODEL]
    assert main(argv) == 0
    text, err = capsys.readouterr()
    header, *lines = text.splitlines()
    assert header.split()[:4] == ["mode", "n", "accuracy", "macro_f1"] and "hit@1" in header
    assert [line.split()[0] for line in lines] == list(MODES)
    assert "malformed" not in text and "malformed" not in err

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert keys(out) == Counter({(r, m): 1 for r in ("a1", "v1", "a2", "s1", "v2") for m in MODES})
    rows_json = {r["row_id"]: r for r in map(json.loads, data.read_text().splitlines())}
    with MemoryStore.open(tmp_path / "results-store", create=False) as st:
        seg_spans = {d: [(s.char_start, s.char_end) for s in st.segments(d)] for d in {r["doc_id"] for r in records}}
    for rec in records:
        assert "error" not in rec and rec["doc_id"] and rec["latency_s"] >= 0
        if rec["options"]:
            assert rec["prediction"] in OPTIONS and set(rec["option_scores"]) == set(OPTIONS)
        assert rec["evidence_ranked"] and all(s < e for s, e in rec["evidence_ranked"])
        # How many of them the prompt held as text: none in hmt, the document window in none.
        assert rec["prompt_passages"] == {"hmt": 0, "hmt+retrieval": 3, "dense-rag": 4, "none": 1}[rec["mode"]]
        # ...and the pieces of text they made, in document order: each of those items lies in a
        # piece, and each piece begins where one of them begins and ends where one ends.
        pieces, used = rec["prompt_spans"], rec["evidence_ranked"][: rec["prompt_passages"]]
        assert len(pieces) <= len(used) and pieces == sorted(pieces)
        assert all(any(a <= s and e <= b for a, b in pieces) for s, e in used)
        assert all(a in {s for s, _ in used} and b in {e for _, e in used} for a, b in pieces)
        assert (rec["sentence"] is None) == bool(rec["options"])
        assert rec["quoted"] is not bool(rec["options"])  # open answers quote the document by default
        assert rec["best_guess"] is None  # nothing turned away
        assert 0 <= rec["confidence"] <= 1 and rec["abstained"] is False  # no checkpoint: no threshold
        # The supporting sentence lies inside one of the answer's evidence passages.
        s0, e0 = rec["support"]
        assert s0 < e0 and any(s <= s0 and e0 <= e for s, e in rec["evidence_ranked"][:3])
        # Evidence at one granularity, the HMT segments, in every mode: the segments the mode's own
        # ranked spans fall in, first-ranked first, and the segments the gold span overlaps.
        ranked, n_seg = rec["segments_ranked"], rec["n_segments"]
        assert ranked and len(set(ranked)) == len(ranked) and all(0 <= i < n_seg for i in ranked)
        if rec["mode"] == "hmt":
            assert sorted(ranked) == list(range(n_seg))  # the whole recall
        first_start, first_end = rec["evidence_ranked"][0]
        assert ranked[0] == next(i for i, (a, b) in enumerate(seg_spans[rec["doc_id"]]) if a <= first_start < b)
        gold = rows_json[rec["row_id"]].get("evidence") or []
        assert rec["gold_segments"] == [
            i for i, (a, b) in enumerate(seg_spans[rec["doc_id"]]) if any(max(a, s) < min(b, e) for s, e in gold)
        ]
    assert sum("ingest" in r for r in records) == 3  # three documents, each read once
    assert (tmp_path / "results-store").is_dir()

    # Rerun: nothing left to do, so nothing is answered; the model loads only for its stamp.
    size = out.stat().st_size
    real_engine = Engine.ask

    def no_answers(*args, **kwargs):
        raise AssertionError("a finished batch must not answer again")

    monkeypatch.setattr(Engine, "ask", no_answers)
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert out.stat().st_size == size
    assert result["errors"] == [] and result["rows"] == 5 and list(result["metrics"]) == list(MODES)
    for m in result["metrics"].values():
        assert {"accuracy", "macro_f1", "hit@1", "hit@5", "exact_match", "n_errors"} <= set(m)
        assert m["n"] == 5 and m["n_closed"] == 3 and m["n_open"] == 2 and m["n_evidence"] == 3
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["macro_f1"] <= 1 and m["hit@1"] in (0, 1 / 3, 2 / 3, 1)
        assert m["n_errors"] == 0

    # A record left in a part file by an interrupted torchrun run counts as done and is merged.
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:-1]) + "\n")
    (tmp_path / "results.jsonl.rank1").write_text(lines[-1] + "\n")
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["hmt"]["n"] == 5
    assert not (tmp_path / "results.jsonl.rank1").exists() and sum(keys(out).values()) == 10

    # Summing up the finished file under other answering settings would report another model's
    # metrics as this one's: refused, and the file is left as it was.
    assert main([*argv, "--max-new-tokens", "5"]) == 2
    err = capsys.readouterr().err
    assert "its metrics would not be this model's" in err and str(out) in err
    assert Engine.ask is no_answers and out.stat().st_size == size and sum(keys(out).values()) == 10

    monkeypatch.setattr(Engine, "ask", real_engine)  # a new mode is answered
    # A new mode on the same output: only the new (row, mode) pairs are answered.
    assert main([*argv[:-len(MODEL)], "--modes", "hmt,none", *MODEL, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["metrics"]) == ["hmt", "none"]  # this run's modes only
    assert sum(keys(out).values()) == 15 and set(keys(out).values()) == {1}
    stamps = {json.loads(line).get("answered_by") for line in out.read_text().splitlines()}
    assert len(stamps) == 1 and None not in stamps  # one model and settings answered them all

    # Other answering settings (as a new threshold or checkpoint would) must not add their answers
    # beside these: the metrics would mix two models. The file is left as it was.
    size = out.stat().st_size
    other = [*argv[:-len(MODEL)], "--modes", "hmt+retrieval", *MODEL[:-1], "4"]
    assert main(other) == 2
    err = capsys.readouterr().err
    assert "another model or other answering settings" in err and str(out) in err
    assert out.stat().st_size == size


def test_malformed_lines_are_reported_and_the_rest_is_answered(tmp_path, capsys):
    data = write_data(tmp_path, malformed=True)
    out = tmp_path / "results.jsonl"
    assert main(["batch", str(data), "--out", str(out), "--modes", "hmt", "--json", *MODEL]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert len(result["errors"]) == 2
    assert "line 3: invalid JSON" in result["errors"][0] and "line 7: question" in result["errors"][1]
    assert "line 3" in captured.err and "line 7" in captured.err
    assert result["rows"] == 5 and result["metrics"]["hmt"]["n"] == 5
    assert sorted(r for r, _ in keys(out)) == ["a1", "a2", "s1", "v1", "v2"]

    assert main(["batch", str(data), "--out", str(out), "--modes", "hmt", *MODEL]) == 0
    text = capsys.readouterr().out
    assert "2 malformed line(s) skipped" in text and "rows.jsonl: line 3" in text


def test_batch_input_errors_exit_2(tmp_path, capsys):
    out = str(tmp_path / "r.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n", encoding="utf-8")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"row_id": "x", "question": "caf\xe9?", "document": "d"}\n')
    cases = [
        ([str(tmp_path / "missing.jsonl")], "batch data not found"),
        ([str(bad)], "no valid rows"),
        ([str(latin)], "not UTF-8"),
        ([str(write_data(tmp_path)), "--modes", "hmt,rag"], "unknown mode"),
    ]
    for argv, message in cases:
        assert main(["batch", *argv, "--out", out, *MODEL]) == 2, argv
        err = capsys.readouterr().err
        assert "hmtqa batch: error: " in err and message in err and "Traceback" not in err, err
    assert not Path(out).exists()


def test_run_batch_records_bad_rows_and_repairs_a_torn_file(tmp_path):
    engine = Engine(EngineConfig(backbone="tiny-random", checkpoint=None, max_new_tokens=2))
    store = engine.open_store(tmp_path / "store")
    rows = read_rows(write_data(tmp_path))[:2] + [
        QARow("gone", "Why?", document_path=str(tmp_path / "gone.txt"), options=OPTIONS, answer="no"),
        QARow("empty", "Why?", document="   ", options=OPTIONS, answer="no"),
        QARow("clash", "Why?", document="Another text entirely.", doc_id="aspirin", options=OPTIONS, answer="no"),
    ]
    out = tmp_path / "r.jsonl"
    metrics = run_batch(engine, rows, out, store, modes=("hmt",))
    records = {r["row_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {"a1", "v1", "gone", "empty", "clash"}
    assert "FileNotFoundError" in records["gone"]["error"] and records["gone"]["prediction"] is None
    assert "empty" in records["empty"]["error"]
    assert "different document under id 'aspirin'" in records["clash"]["error"]
    assert metrics["hmt"]["n"] == 5 and metrics["hmt"]["n_errors"] == 3
    assert metrics["hmt"]["accuracy"] <= 2 / 5

    # A run killed mid-write leaves a torn line; the next run drops it and redoes that row only.
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    run_batch(engine, rows, out, store, modes=("hmt",))
    assert keys(out) == Counter({(r.row_id, "hmt"): 1 for r in rows})

    # Part files left by an interrupted torchrun run are merged, not answered again.
    extra = QARow("p1", "Did aspirin help?", document=rows[0].document, doc_id="aspirin", options=OPTIONS, answer="yes")
    part = tmp_path / "r.jsonl.rank1"
    part.write_text(json.dumps({"row_id": "p1", "mode": "hmt", "prediction": "yes", "answer": "yes",
                                "options": OPTIONS, "rank": 1}) + "\n" + '{"row_id": "p', encoding="utf-8")
    metrics = run_batch(engine, [*rows, extra], out, store, modes=("hmt",))
    assert not part.exists() and keys(out)[("p1", "hmt")] == 1 and metrics["hmt"]["n"] == 6
    assert json.loads(out.read_text().splitlines()[-1])["rank"] == 1


def test_shard_rows_keeps_documents_together():
    rows = [QARow(f"r{i}", "q?", document=f"doc {i % 3}") for i in range(10)]
    rows += [QARow("p1", "q?", document_path="a.txt"), QARow("p2", "q?", document_path="a.txt")]
    shards = [shard_rows(rows, r, 2) for r in range(2)]
    ids = [[r.row_id for r in s] for s in shards]
    assert sorted(ids[0] + ids[1]) == sorted(r.row_id for r in rows) and not set(ids[0]) & set(ids[1])
    for shard, other in ((shards[0], shards[1]), (shards[1], shards[0])):
        assert shard and {r.document for r in shard}.isdisjoint({r.document for r in other})
    assert shard_rows(rows, 0, 1) == rows


def test_batch_under_torchrun_two_ranks(tmp_path):
    """Two processes share one store; each answers its own documents; rank 0 merges one output."""
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.is_file():
        pytest.skip("torchrun not installed")
    data = write_data(tmp_path)
    out = tmp_path / "results.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "hmtqa", "batch", str(data),
         "--out", str(out), "--modes", ",".join(MODES), "--json", *MODEL],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # rank 0 alone prints
    assert list(result["metrics"]) == list(MODES) and all(m["n"] == 5 for m in result["metrics"].values())
    assert keys(out) == Counter({(r, m): 1 for r in ("a1", "v1", "a2", "s1", "v2") for m in MODES})
    assert not list(tmp_path.glob("results.jsonl.rank*"))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by_rank = {rank: {r["row_id"] for r in records if r["rank"] == rank} for rank in (0, 1)}
    assert by_rank[0] and by_rank[1] and not by_rank[0] & by_rank[1]
    assert {"a1", "a2"} <= by_rank[0] or {"a1", "a2"} <= by_rank[1]  # one document, one rank
    assert all("error" not in r for r in records)
    ingested = Counter(r["doc_id"] for r in records if "ingest" in r)
    assert len(ingested) == 3 and set(ingested.values()) == {1}  # each document read once, in one store


def test_a_rows_own_fields_reach_its_results(tmp_path):
    """A user's ids travel with the row; they never replace a result field."""
    row = QARow.from_json({"row_id": "p1", "question": "Did aspirin help?", "document": make_text("aspirin", 20),
                           "doc_id": 123, "options": OPTIONS, "pmid": 123, "cohort": "B", "prediction": "mine"})
    engine = Engine(EngineConfig(backbone="tiny-random", checkpoint=None, max_new_tokens=2))
    out = tmp_path / "r.jsonl"
    run_batch(engine, [row], out, engine.open_store(tmp_path / "s"), modes=("hmt",))
    [record] = map(json.loads, out.read_text().splitlines())
    assert record["pmid"] == 123 and record["cohort"] == "B" and record["doc_id"] == "123"
    assert record["prediction"] in OPTIONS  # the result, not the row's own "prediction" field
