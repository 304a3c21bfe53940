"""Tests of batch-QA rows and the data-set adapters (synthetic fixtures; real data when present)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from qa_pipeline.datasets import (
    EVIDENCE_INFERENCE_OPTIONS,
    covid_qa,
    evidence_inference,
    load_batch_data,
    pubmedqa_fused,
)
from qa_pipeline.qa_data import (
    QADataError,
    QARow,
    read_rows,
    write_rows,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = Path(os.environ.get("HMTQA_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


# ------------------------------------------------------------------------------------------------
# QARow and JSONL
# ------------------------------------------------------------------------------------------------


def test_row_round_trip(tmp_path: Path) -> None:
    rows = [
        QARow("a", "Is it?", document="Yes it is.", options=["yes", "no"], answer="yes", evidence=[(0, 3)]),
        QARow("b", "What?", document_path="doc.txt", doc_id="d1", metadata={"k": [1, 2]}),
    ]
    path = tmp_path / "rows.jsonl"
    write_rows(rows, path)
    back = read_rows(path)
    assert back[0] == rows[0]
    # A relative document_path is resolved against the data file's folder.
    assert back[1].document_path == str(tmp_path.resolve() / "doc.txt")
    assert back[1].doc_id == "d1" and back[1].metadata == {"k": [1, 2]}
    assert QARow.from_json(rows[0].to_json()) == rows[0]
    assert "evidence" not in rows[1].to_json() and "answer" not in rows[1].to_json()


def test_load_document(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("file text", encoding="utf-8")
    assert QARow("x", "q?", document_path=str(tmp_path / "d.txt")).load_document() == "file text"
    assert QARow("x", "q?", document="inline").load_document() == "inline"
    with pytest.raises(QADataError):
        QARow("x", "q?").load_document()


@pytest.mark.parametrize(
    "obj, fragment",
    [
        ({"row_id": "r", "question": "", "document": "t"}, "question"),
        ({"row_id": "r", "question": 3, "document": "t"}, "question"),
        ({"row_id": "r", "question": "q?"}, "document"),
        ({"row_id": "r", "question": "q?", "document": "text", "evidence": [[3, 3]]}, "evidence"),
        ({"row_id": "r", "question": "q?", "document": "text", "evidence": [[-1, 2]]}, "evidence"),
        ({"row_id": "r", "question": "q?", "document": "text", "evidence": [[0, 1.5]]}, "evidence"),
        ({"row_id": "r", "question": "q?", "document": "text", "evidence": [[0, 1, 2]]}, "evidence"),
        ({"row_id": "r", "question": "q?", "document": "text", "evidence": [[0, 99]]}, "past the end"),
        ({"row_id": "r", "question": "q?", "document": "t", "options": ["yes"], "answer": "no"}, "options"),
        ({"row_id": "r", "question": "q?", "document": "t", "options": []}, "options"),
        ({"row_id": "r", "question": "q?", "document": "t", "doc_id": 1.5}, "doc_id"),
        (["not", "an", "object"], "object"),
    ],
)
def test_from_json_rejects(obj: object, fragment: str) -> None:
    with pytest.raises(QADataError, match=fragment) as info:
        QARow.from_json(obj, line=7)
    assert "line 7" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_fields_are_kept_and_a_numeric_doc_id_is_its_string(tmp_path: Path, caplog) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(
        "\n".join(
            json.dumps({"row_id": f"r{i}", "question": "q?", "document": "t", "doc_id": 31415926, "pmid": 27, "fused": True})
            for i in range(3)
        )
    )
    with caplog.at_level("WARNING"):
        rows = read_rows(path)
    assert [r.doc_id for r in rows] == ["31415926"] * 3
    assert rows[0].extra == {"pmid": 27, "fused": True}
    assert QARow.from_json(rows[0].to_json()) == rows[0]  # the fields survive a round trip
    warnings = [r for r in caplog.records if "not part of the row format" in r.getMessage()]
    assert len(warnings) == 1 and "fused" in warnings[0].getMessage()  # once per file, naming the fields


def test_from_json_defaults() -> None:
    row = QARow.from_json({"question": "q?", "document": "t"}, line=4)
    assert row.row_id == "line-4"
    assert QARow.from_json({"id": 12, "question": "q?", "document_path": "p"}).row_id == "12"
    # Closed-answer check is case-insensitive.
    assert QARow.from_json(
        {"id": "a", "question": "q?", "document": "t", "options": ["Yes", "No"], "answer": "yes"}
    )
    with pytest.raises(QADataError, match="row_id"):
        QARow.from_json({"question": "q?", "document": "t"})


def test_read_rows_errors(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    lines = [
        json.dumps({"row_id": "a", "question": "q1?", "document": "doc"}),
        "{not json",
        "",
        json.dumps({"row_id": "b", "question": "", "document": "doc"}),
        json.dumps({"row_id": "a", "question": "dup?", "document": "doc"}),
        json.dumps({"row_id": "c", "question": "q3?", "document": "doc", "evidence": [[0, 2]]}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    errors: list[tuple[int, str]] = []
    rows = read_rows(path, on_error=lambda n, msg: errors.append((n, msg)))
    assert [r.row_id for r in rows] == ["a", "c"]
    assert [n for n, _ in errors] == [2, 4, 5]
    assert "duplicate" in errors[2][1]
    with pytest.raises(QADataError, match="line 2"):
        read_rows(path)


# ------------------------------------------------------------------------------------------------
# Synthetic fixtures
# ------------------------------------------------------------------------------------------------


def _pubmedqa_file(tmp_path: Path, n: int = 6) -> Path:
    decisions = ["yes", "no", "maybe"]
    data = {
        str(1000 + i): {
            "QUESTION": f"Does drug {i} work?",
            "CONTEXTS": [f"Background of study {i}.", f"Results of study {i} were clear."],
            "LABELS": ["BACKGROUND", "RESULTS"],
            "MESHES": ["Humans"],
            "final_decision": decisions[i % 3],
            "LONG_ANSWER": f"Drug {i} conclusion.",
        }
        for i in range(n)
    }
    path = tmp_path / "ori_pqal.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_pubmedqa_fused(tmp_path: Path) -> None:
    path = _pubmedqa_file(tmp_path)
    rows = pubmedqa_fused(path, num_docs=4, seed=0)
    assert len(rows) == 6
    for i, row in enumerate(rows):
        pmid = str(1000 + i)
        abstract = f"Background of study {i}. Results of study {i} were clear."
        ((start, end),) = row.evidence
        assert row.document[start:end] == abstract
        assert row.options == ["yes", "no", "maybe"] and row.answer == ["yes", "no", "maybe"][i % 3]
        assert row.doc_id == f"pqa-{pmid}-m4"
        assert row.metadata["pmid"] == pmid and row.metadata["long_answer"] == f"Drug {i} conclusion."
        spans = row.metadata["abstract_spans"]
        assert len(spans) == 4 and len({p for p, _, _ in spans}) == 4
        assert spans[row.metadata["target_position"]] == [pmid, start, end]
        assert "\n\n".join(row.document[s:e] for _, s, e in spans) == row.document
        QARow.from_json(row.to_json())  # valid
    # Deterministic, independent of limit; another seed gives other documents.
    again = pubmedqa_fused(path, num_docs=4, seed=0, limit=3)
    assert [r.document for r in again] == [r.document for r in rows[:3]]
    other = pubmedqa_fused(path, num_docs=4, seed=5)
    assert [r.document for r in other] != [r.document for r in rows]
    assert other[0].doc_id == "pqa-1000-m4-s5"
    # num_docs larger than the file is capped.
    assert len(pubmedqa_fused(path, num_docs=50)[0].metadata["abstract_spans"]) == 6


def _covid_file(tmp_path: Path) -> Path:
    ctx1 = "Intro text. The incubation period is 5 days. Another fact: masks help. The incubation period is 5 days."
    ctx2 = "Second article about bats and coronaviruses."
    i = ctx1.index("5 days")
    data = {
        "data": [
            {
                "paragraphs": [
                    {
                        "document_id": 77,
                        "context": ctx1,
                        "qas": [
                            {
                                "id": 1,
                                "question": "Incubation?",
                                "answers": [{"text": "5 days", "answer_start": i}],
                            },
                            # offset off by 2 and a leading space in the answer text
                            {
                                "id": 2,
                                "question": "Masks?",
                                "answers": [{"text": " masks help", "answer_start": ctx1.index("masks") + 1}],
                            },
                            {"id": 3, "question": "Impossible?", "answers": [], "is_impossible": True},
                        ],
                    }
                ]
            },
            {
                "paragraphs": [
                    {
                        "context": ctx2,
                        "qas": [
                            {"id": 4, "question": "Bats?", "answers": [{"text": "bats", "answer_start": 24}]}
                        ],
                    }
                ]
            },
        ]
    }
    path = tmp_path / "covid.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_covid_qa(tmp_path: Path) -> None:
    rows = covid_qa(_covid_file(tmp_path))
    assert [r.row_id for r in rows] == ["covidqa-1", "covidqa-2", "covidqa-4"]
    assert rows[0].doc_id == rows[1].doc_id == "covidqa-77"
    assert rows[2].doc_id == "covidqa-2"
    for row in rows:
        ((s, e),) = row.evidence
        assert row.document[s:e] == row.answer
        assert row.options is None
    # The first of the two occurrences is the one nearest the given offset.
    assert rows[0].evidence[0][0] == rows[0].document.index("5 days")
    assert rows[1].answer == "masks help"
    assert rows[1].metadata["answers"] == ["masks help"]
    assert len(covid_qa(_covid_file(tmp_path), limit=2)) == 2


def _ei_dir(tmp_path: Path) -> Path:
    root = tmp_path / "ei"
    (root / "txt_files").mkdir(parents=True)
    text = "Methods. Pain fell more with drug A than placebo (p<0.01). Nausea did not differ (p=0.4)."
    (root / "txt_files" / "PMC111.txt").write_text(text, encoding="utf-8")
    with (root / "prompts_merged.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["PromptID", "PMCID", "Outcome", "Intervention", "Comparator"])
        w.writerow(["1", "111", "pain", "drug A", "placebo"])
        w.writerow(["2", "111", "nausea", "drug A", "placebo"])
        w.writerow(["3", "999", "x", "y", "z"])  # article missing
        w.writerow(["4", "111", "sleep", "drug A", "placebo"])  # no annotations
        w.writerow(["911", "111", "flagged", "drug A", "placebo"])  # flagged incorrect upstream
    pain = "Pain fell more with drug A than placebo (p<0.01)."
    nausea = "Nausea did not differ (p=0.4)."
    ps, ns = text.index(pain), text.index(nausea)
    header = ["UserID", "PromptID", "PMCID", "Valid Label", "Valid Reasoning", "Label", "Annotations",
              "Label Code", "In Abstract", "Evidence Start", "Evidence End"]  # fmt: skip
    with (root / "v2_annotations.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerow([0, 1, 111, True, True, "significantly decreased", pain, -1, "UNK", ps, ps + len(pain)])
        # wrong offsets, then a label the verifier rejected (no offsets)
        w.writerow([1, 1, 111, True, True, "significantly decrease", pain, -1, "UNK", ps + 3, ps + 9])
        w.writerow([2, 1, 111, False, True, "significantly increase", pain, 1, "UNK", -1, -1])
        w.writerow(
            [0, 2, 111, True, True, "no significant difference", nausea, 0, "UNK", ns, ns + len(nausea)]
        )
        w.writerow([3, 2, 111, True, False, "significantly increase", "not in text", 1, "UNK", 0, 5])
        w.writerow(
            [0, 911, 111, True, True, "no significant difference", nausea, 0, "UNK", ns, ns + len(nausea)]
        )
    return root


def test_evidence_inference(tmp_path: Path) -> None:
    root = _ei_dir(tmp_path)
    rows = evidence_inference(root)
    assert [r.row_id for r in rows] == ["ei-1", "ei-2"]
    text = (root / "txt_files" / "PMC111.txt").read_text(encoding="utf-8")
    pain, nausea = rows
    assert pain.question == "Compared with placebo, what was the effect of drug A on pain?"
    assert pain.options == EVIDENCE_INFERENCE_OPTIONS
    assert pain.answer == "significantly decreased"  # 2 accepted votes; the rejected one is ignored
    assert pain.doc_id == "PMC111" and Path(pain.document_path).name == "PMC111.txt"
    assert pain.document is None and pain.load_document() == text
    # Three annotations of the same sentence (one with wrong offsets, one with none) -> one span.
    assert [text[s:e] for s, e in pain.evidence] == ["Pain fell more with drug A than placebo (p<0.01)."]
    # Tie (1 vs 1): first label wins; the span of the rejected reasoning is not used.
    assert nausea.answer == "no significant difference"
    assert nausea.metadata["label_tie"] is True
    assert [text[s:e] for s, e in nausea.evidence] == ["Nausea did not differ (p=0.4)."]
    assert evidence_inference(root, limit=1)[0].row_id == "ei-1"


def test_load_batch_data_dispatch(tmp_path: Path) -> None:
    pqa = _pubmedqa_file(tmp_path)
    cov = _covid_file(tmp_path)
    ei = _ei_dir(tmp_path)
    jsonl = tmp_path / "rows.jsonl"
    write_rows([QARow("r1", "q?", document="d"), QARow("r2", "q2?", document="d")], jsonl)

    assert load_batch_data(str(pqa), fuse=3)[0].doc_id == "pqa-1000-m3"
    assert load_batch_data(f"pubmedqa:{pqa}", limit=2, fuse=3, seed=1)[1].doc_id == "pqa-1001-m3-s1"
    assert load_batch_data(str(cov))[0].row_id == "covidqa-1"
    assert load_batch_data(f"covidqa:{cov}")[0].row_id == "covidqa-1"
    assert load_batch_data(str(ei))[0].row_id == "ei-1"
    assert load_batch_data(f"evidence-inference:{ei}")[0].row_id == "ei-1"
    assert [r.row_id for r in load_batch_data(str(jsonl), limit=1)] == ["r1"]
    # JSONL under a .json name is still read as rows.
    other = tmp_path / "rows.json"
    other.write_text(jsonl.read_text(encoding="utf-8"), encoding="utf-8")
    assert len(load_batch_data(str(other))) == 2
    with pytest.raises(FileNotFoundError):
        load_batch_data(str(tmp_path / "missing.jsonl"))
    weird = tmp_path / "weird.json"
    weird.write_text(json.dumps({"foo": 1}), encoding="utf-8")
    with pytest.raises(QADataError):
        load_batch_data(str(weird))


# ------------------------------------------------------------------------------------------------
# Real data (skipped when the shared data folder is absent)
# ------------------------------------------------------------------------------------------------

needs_data = pytest.mark.skipif(
    not DATA_DIR.exists(), reason=f"no shared data at {DATA_DIR} (set HMTQA_DATA_DIR)"
)


def _check_real(rows: list[QARow]) -> None:
    assert len(rows) >= 20
    texts: dict[str, str] = {}
    for row in rows:
        QARow.from_json(row.to_json())
        text = texts.setdefault(row.doc_id or row.row_id, row.load_document())
        assert row.evidence
        for s, e in row.evidence:
            assert 0 <= s < e <= len(text)
        if row.options is not None:
            assert row.answer in row.options


@needs_data
@pytest.mark.parametrize(
    "spec",
    ["pubmedqa/pqal_trainval.json", "covid-qa/covidqa_dev.json", "evidence-inference"],
)
def test_real_adapters(spec: str) -> None:
    path = DATA_DIR / spec
    if not path.exists():
        pytest.skip(f"{path} missing")
    rows = load_batch_data(str(path), limit=60, fuse=4)
    _check_real(rows)
    if spec.startswith("covid"):
        assert all(r.document[s:e] == r.answer for r in rows for s, e in r.evidence)
