"""``hmtqa ingest | ask | docs`` in-process (hmtqa.main.main) and across processes (tiny-random)."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from hmtqa.main import main

REPO = Path(__file__).resolve().parents[2]
MODEL = ["--backbone", "tiny-random", "--checkpoint", "none", "--max-new-tokens", "4"]
OPTIONS = ["yes", "no", "maybe"]


def make_text(n: int = 120) -> str:
    drugs = ["aspirin", "metformin", "statin", "warfarin"]
    return " ".join(
        f"Patient group {i} took {drugs[i % 4]} and the outcome improved by {i % 9} points (p = 0.0{i % 7})."
        for i in range(n)
    )


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def listed(capsys, store: Path) -> list[tuple[str, int, int]]:
    rc, out, _ = run(capsys, "docs", "list", "--store", str(store), "--json")
    assert rc == 0
    return [(d["doc_id"], d["n_tokens"], d["n_segments"]) for d in json.loads(out)]


@pytest.fixture
def store(tmp_path, capsys) -> Path:
    """A store holding one ingested document, ``trial``."""
    doc = tmp_path / "trial.txt"
    doc.write_text(make_text(), encoding="utf-8")
    rc, out, err = run(capsys, "ingest", str(doc), "--store", str(tmp_path / "store"), "--json", *MODEL)
    assert rc == 0, err
    [result] = json.loads(out)
    assert result["doc_id"] == "trial" and result["segments"] >= 3
    return tmp_path / "store"


def test_ingest_ask_docs(store, capsys, tmp_path):
    [(doc_id, n_tokens, n_segments)] = listed(capsys, store)
    assert doc_id == "trial" and n_segments == -(-n_tokens // 256)
    rc, out, _ = run(capsys, "docs", "list", "--store", str(store))
    assert rc == 0 and out.startswith(f"trial\t{n_tokens} tokens\t{n_segments} segments")

    rc, out, err = run(capsys, "ask", "Did metformin help?", "--store", str(store), "--doc", "trial",
                       "--options", "yes, no,maybe", "--json", *MODEL)
    assert rc == 0, err
    ans = json.loads(out)
    assert ans["answer"] in OPTIONS and set(ans["option_scores"]) == set(OPTIONS)
    assert len(ans["recall"]) == n_segments and "query" not in ans
    assert ans["evidence"] and all(0 <= e["char_start"] < e["char_end"] for e in ans["evidence"])
    assert 0.0 <= ans["confidence"] <= 1.0 and ans["abstained"] is False
    support = ans["support"]
    assert make_text()[support["char_start"] : support["char_end"]] == support["text"]
    where = ["--store", str(store), "--doc", "trial"]
    rc, out, err = run(capsys, "ask", "Did metformin help?", *where, "--options", "yes, no,maybe", *MODEL)
    assert rc == 0, err
    assert f"Confidence: {ans['confidence']:.2f}\n" in out
    span = f"chars {support['char_start']}-{support['char_end']}"
    assert f'Supporting sentence ({span}): "{support["text"]}"' in out
    rc, out, err = run(capsys, "ask", "Did metformin help?", "--store", str(store), "--doc", "trial",
                       "--options", "yes, no,maybe", "--calibrate-options", "--json", *MODEL)
    assert rc == 0, err
    calibrated = json.loads(out)["option_scores"]
    assert calibrated != ans["option_scores"] and set(calibrated) == set(OPTIONS)

    for mode in ("hmt", "hmt+retrieval", "dense-rag", "none"):
        rc, out, err = run(capsys, "ask", "Which drug?", "--store", str(store), "--doc", "trial", "--mode", mode, *MODEL)
        assert rc == 0, err
        assert out.startswith(f"Answer ({mode}") and "Evidence:" in out and "Time: recall" in out

    more = tmp_path / "more.md"
    more.write_text("# Notes\n\nA short note about statins.\n", encoding="utf-8")
    rc, out, err = run(capsys, "ingest", str(more), "--store", str(store), *MODEL)
    assert rc == 0 and out.startswith("ingested more: ")
    assert [d[0] for d in listed(capsys, store)] == ["trial", "more"]
    rc, out, _ = run(capsys, "docs", "delete", "more", "--store", str(store))
    assert rc == 0 and [d[0] for d in listed(capsys, store)] == ["trial"]


def test_ask_text_says_when_the_model_abstains(store, capsys, monkeypatch):
    """Below the checkpoint's threshold the answer says so; the text shows the confidence and best guess."""
    import dataclasses

    from qa_pipeline.engine import NOT_IN_DOCUMENT, Engine

    real_ask = Engine.ask

    def abstaining(self, *args, **kwargs):
        ans = real_ask(self, *args, **kwargs)
        return dataclasses.replace(
            ans, answer=NOT_IN_DOCUMENT, confidence=0.123, abstained=True, abstain_reason="confidence 0.12 is below 0.40"
        )

    monkeypatch.setattr(Engine, "ask", abstaining)
    where = ["--store", str(store), "--doc", "trial"]
    rc, out, err = run(capsys, "ask", "Did metformin help?", *where, "--options", "yes, no,maybe", *MODEL)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == f"Answer (hmt+retrieval): {NOT_IN_DOCUMENT}"  # the default mode
    low = "Confidence: 0.12 (the document does not seem to say: confidence 0.12 is below 0.40; best guess: "
    assert lines[1].startswith(low) and lines[1].endswith(")") and lines[1][len(low) : -1] in OPTIONS


def test_ask_text_shows_the_sentence_a_short_answer_came_from(store, capsys, monkeypatch):
    import dataclasses

    from qa_pipeline.engine import Engine

    real_ask = Engine.ask

    def phrased(self, *args, **kwargs):
        ans = real_ask(self, *args, **kwargs)
        return dataclasses.replace(ans, answer="metformin", sentence="The drug  given was\nmetformin.", **setting)

    monkeypatch.setattr(Engine, "ask", phrased)
    setting = {}
    for quoted, source in ((False, ""), (True, ", quoted from the document")):
        setting["quoted"] = quoted
        rc, out, err = run(capsys, "ask", "Which drug was given?", "--store", str(store), "--doc", "trial", *MODEL)
        assert rc == 0, err
        assert out.splitlines()[:2] == [
            f"Answer (hmt+retrieval{source}): metformin",
            'The model wrote: "The drug given was metformin."',
        ]
    # An open question's evidence in hmt+retrieval: the passages the recall head ranked, each named.
    evidence = out.split("Evidence:\n", 1)[1].splitlines()
    assert evidence[0].startswith("  [seg ") and " passage] chars " in evidence[0]


def test_ask_text_shows_an_abstained_open_answers_best_guess(store, capsys, monkeypatch):
    import dataclasses

    from qa_pipeline.engine import NOT_IN_DOCUMENT, Engine
    from qa_pipeline.support import Support

    real_ask = Engine.ask

    def abstained(self, *args, **kwargs):
        ans = real_ask(self, *args, **kwargs)
        return dataclasses.replace(
            ans,
            answer=NOT_IN_DOCUMENT,
            abstained=True,
            confidence=0.3,
            sentence="The drug given was\nmetformin.",
            abstain_reason="recall score 0.8 is below 10.3: no passage matches the question well",
            support=Support("Metformin was\ngiven.", 40, 61, 0),
            **setting,
        )

    monkeypatch.setattr(Engine, "ask", abstained)
    # The best guess is the model's own words, or (quoted) the supporting sentence's.
    setting = {}
    for quoted, guess in ((False, "metformin"), (True, "Metformin")):
        setting["quoted"] = quoted
        rc, out, err = run(capsys, "ask", "Which drug was given?", "--store", str(store), "--doc", "trial", *MODEL)
        assert rc == 0, err
        assert out.splitlines()[:3] == [
            f"Answer (hmt+retrieval): {NOT_IN_DOCUMENT}",
            "Confidence: 0.30 (the document does not seem to say: recall score 0.8 is below 10.3: no passage matches "
            f"the question well; best guess: {guess})",
            # The sentence backs the guess, not the answer given, and is called so.
            'Sentence behind the best guess (chars 40-61): "Metformin was given."',
        ]
        assert "Supporting sentence" not in out


def _blank_pdf(path: Path) -> None:
    from pypdf import PdfWriter

    writer = PdfWriter()
    writer.add_blank_page(width=200, height=200)
    with path.open("wb") as fh:
        writer.write(fh)


BAD_FILES = {
    "empty.txt": (lambda p: p.write_bytes(b""), "empty"),
    "binary.txt": (lambda p: p.write_bytes(bytes(range(256)) * 4), "binary"),
    "scan.pdf": (_blank_pdf, "no text layer"),
    "latin1.txt": (lambda p: p.write_bytes(b"caf\xe9 au lait, r\xe9sum\xe9"), "invalid UTF-8"),
    "spaces.md": (lambda p: p.write_text(" \n\t\n", encoding="utf-8"), "only whitespace"),
    "missing.txt": (lambda p: None, "no such file"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_are_refused_and_nothing_is_written(store, capsys, tmp_path, name):
    make, message = BAD_FILES[name]
    bad = tmp_path / name
    make(bad)
    good = tmp_path / "good.txt"
    good.write_text("A good document about aspirin.", encoding="utf-8")
    before = listed(capsys, store)
    rc, out, err = run(capsys, "ingest", str(good), str(bad), "--store", str(store), *MODEL)
    assert rc == 2 and out == ""
    assert err.startswith("hmtqa ingest: error: ") and message in err and name in err
    assert "Traceback" not in err
    assert listed(capsys, store) == before  # the good file in the same call was not ingested either


def test_existing_id_needs_replace(store, capsys, tmp_path):
    before = listed(capsys, store)
    doc = tmp_path / "other" / "trial.txt"
    doc.parent.mkdir()
    doc.write_text("A replacement text about warfarin.", encoding="utf-8")
    rc, _, err = run(capsys, "ingest", str(doc), "--store", str(store), *MODEL)
    assert rc == 2 and "'trial' already in the store" in err and "--replace" in err
    assert listed(capsys, store) == before
    rc, _, err = run(capsys, "ingest", str(doc), "--store", str(store), "--replace", *MODEL)
    assert rc == 0, err
    [(doc_id, n_tokens, n_segments)] = listed(capsys, store)
    assert (doc_id, n_segments) == ("trial", 1) and n_tokens < before[0][1]


def test_two_files_with_one_id_are_refused(tmp_path, capsys):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "paper.txt").write_text(f"Paper {sub} about statins.", encoding="utf-8")
    rc, _, err = run(capsys, "ingest", str(tmp_path / "a" / "paper.txt"), str(tmp_path / "b" / "paper.txt"),
                     "--store", str(tmp_path / "s"), *MODEL)
    assert rc == 2 and "both give document id 'paper'" in err
    assert not (tmp_path / "s").exists() or listed(capsys, tmp_path / "s") == []


def test_bad_questions_and_ids(store, capsys):
    before = listed(capsys, store)
    cases = [
        (["ask", "Why?", "--doc", "nope"], "unknown document id 'nope'; known: trial"),
        (["ask", "", "--doc", "trial"], "the question is empty"),
        (["ask", "   ", "--doc", "trial"], "the question is empty"),
        (["ask", "why " * 300, "--doc", "trial"], "limit is one segment (256 tokens)"),
        (["ask", "why " * 300, "--doc", "trial", "--mode", "dense-rag"], "limit is one segment"),
        (["ask", "Why?", "--doc", "trial", "--dtype", "float8"], "unknown dtype 'float8'"),
    ]
    for argv, message in cases:
        rc, out, err = run(capsys, *argv, "--store", str(store), *MODEL)
        assert rc == 2 and out == "", argv
        assert err.startswith("hmtqa ask: error: ") and message in err, (argv, err)
    rc, _, err = run(capsys, "docs", "delete", "trial", "nope", "--store", str(store))
    assert rc == 2 and "unknown document id 'nope'" in err
    assert listed(capsys, store) == before  # 'trial' was not deleted either


def test_ask_without_a_store_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "typo-store"
    rc, _, err = run(capsys, "ask", "Why?", "--store", str(missing), "--doc", "trial", *MODEL)
    assert rc == 2 and "no memory store at" in err
    assert not missing.exists()
    rc, _, err = run(capsys, "docs", "list", "--store", str(missing))
    assert rc == 2 and not missing.exists()


def test_store_made_by_another_model_is_refused(store, capsys, tmp_path):
    """--dtype and --checkpoint change the model fingerprint; the store refuses the other model."""
    from hmt import HMTConfig, HMTModel, load_backbone

    before = listed(capsys, store)
    # The store was made in the dtype "auto" picked here; the other one is another model.
    import torch

    from hmt import resolve_dtype

    other = "bfloat16" if resolve_dtype("auto") == torch.float32 else "float32"
    rc, _, err = run(capsys, "ask", "Why?", "--store", str(store), "--doc", "trial", *MODEL, "--dtype", other)
    assert rc == 2 and "different model" in err and "dtype" in err
    made_in = "float32" if other == "bfloat16" else "bfloat16"
    assert f"(open it with --dtype {made_in})" in err  # the store's own dtype, one flag away

    backbone, _ = load_backbone("tiny-random")
    ckpt = tmp_path / "ckpt"
    HMTModel(backbone, HMTConfig(segment_length=256, sensory_length=32, backbone="tiny-random")).save_pretrained(ckpt)
    model = ["--backbone", "tiny-random", "--checkpoint", str(ckpt)]
    rc, _, err = run(capsys, "ask", "Why?", "--store", str(store), "--doc", "trial", *model)
    assert rc == 2 and "different model" in err and "hmt_checkpoint" in err
    doc = tmp_path / "new.txt"
    doc.write_text("Another paper about aspirin and stroke.", encoding="utf-8")
    rc, _, err = run(capsys, "ingest", str(doc), "--store", str(store), *model)
    assert rc == 2 and "different model" in err
    assert listed(capsys, store) == before

    # The checkpoint's own store works, and the untrained model is refused there.
    rc, _, err = run(capsys, "ingest", str(doc), "--store", str(tmp_path / "ck-store"), *model)
    assert rc == 0, err
    rc, out, err = run(capsys, "ask", "Why?", "--store", str(tmp_path / "ck-store"), "--doc", "new", "--json", *model)
    assert rc == 0 and json.loads(out)["doc_id"] == "new"
    rc, _, err = run(capsys, "ask", "Why?", "--store", str(tmp_path / "ck-store"), "--doc", "new", *MODEL)
    assert rc == 2 and "untrained-seed0" in err

    rc, _, err = run(capsys, "ask", "Why?", "--store", str(store), "--doc", "trial",
                     "--backbone", "tiny-random", "--checkpoint", str(tmp_path / "no-such-ckpt"))
    assert rc == 2 and "not an HMT checkpoint" in err


def test_ingest_then_ask_from_another_process(tmp_path):
    """Two real processes: the store written by `hmtqa ingest` is read by a second `hmtqa ask`."""
    doc = tmp_path / "paper.txt"
    doc.write_text(make_text(80), encoding="utf-8")
    store = tmp_path / "store"
    exe = Path(sys.executable).parent / "hmtqa"
    first = [str(exe)] if exe.is_file() else [sys.executable, "-m", "hmtqa"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    ingest = subprocess.run(
        [*first, "ingest", str(doc), "--store", str(store), "--json", *MODEL],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )
    assert ingest.returncode == 0, ingest.stderr
    [info] = json.loads(ingest.stdout)
    ask = subprocess.run(
        [sys.executable, "-m", "hmtqa", "ask", "Did aspirin help?", "--store", str(store),
         "--doc", info["doc_id"], "--options", "yes,no,maybe", "--mode", "hmt", "--json", *MODEL],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )
    assert ask.returncode == 0, ask.stderr
    ans = json.loads(ask.stdout)
    assert ans["answer"] in OPTIONS and len(ans["recall"]) == info["segments"]


def test_python_m_cli_reports_errors_without_traceback(tmp_path, monkeypatch, capsys):
    """`python -m hmtqa`, in-process: the package's __main__ runs hmtqa.main.main."""
    monkeypatch.setattr(sys, "argv", ["hmtqa", "docs", "list", "--store", str(tmp_path / "missing")])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("hmtqa", run_name="__main__")
    assert exit_.value.code == 2 and "no memory store at" in capsys.readouterr().err


def test_ask_with_a_reader_names_it_and_a_bad_one_fails_before_any_work(store, capsys, tmp_path):
    """--reader: the answer says who wrote it (text and JSON); a reader that cannot load is a clear error."""
    from hmt.backbone import tiny_random_backbone

    model, tokenizer = tiny_random_backbone(seed=1)
    folder = tmp_path / "reader"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    rc, out, err = run(capsys, "ask", "Why?", "--store", str(store), "--doc", "trial", "--mode", "dense-rag",
                       "--json", *MODEL, "--reader", str(folder))
    assert rc == 0, err
    assert json.loads(out)["reader"] == str(folder)
    rc, out, err = run(capsys, "ask", "Why?", "--store", str(store), "--doc", "trial", "--mode", "dense-rag",
                       *MODEL, "--reader", str(folder))
    assert rc == 0 and f"reader: {folder}" in out.splitlines()[0]
    rc, out, err = run(capsys, "ask", "Why?", "--store", str(store), "--doc", "trial", *MODEL,
                       "--reader", str(tmp_path / "missing"))
    assert rc == 2 and "cannot load the model" in err and "missing" in err
