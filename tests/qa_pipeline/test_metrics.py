"""Tests of the QA metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from qa_pipeline.metrics import (
    accuracy,
    exact_match,
    macro_f1,
    normalize_answer,
    rank_metrics,
    summarize,
    token_f1,
)


def test_accuracy() -> None:
    assert accuracy(["yes", "No", "maybe", "yes."], ["yes", "no", "no", "Yes"]) == 0.75
    assert math.isnan(accuracy([], []))
    with pytest.raises(ValueError):
        accuracy(["a"], [])


def test_macro_f1_hand_computed() -> None:
    golds = ["yes", "yes", "no", "no", "maybe"]
    preds = ["yes", "no", "no", "no", "yes"]
    # yes: tp1 fp1 fn1 -> 2/4 = 0.5; no: tp2 fp1 fn0 -> 4/5 = 0.8; maybe: tp0 fn1 -> 0
    assert macro_f1(preds, golds) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert macro_f1(preds, golds, labels=["yes", "no", "maybe"]) == pytest.approx(1.3 / 3)
    # A label in neither golds nor preds is left out of the mean.
    assert macro_f1(["a", "b"], ["a", "b"], labels=["a", "b", "c"]) == 1.0


def test_macro_f1_matches_sklearn() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    golds = ["yes", "no", "maybe", "yes", "no", "yes", "maybe", "no"]
    preds = ["yes", "yes", "maybe", "no", "no", "yes", "no", "no"]
    expected = sklearn_metrics.f1_score(golds, preds, average="macro")
    assert macro_f1(preds, golds) == pytest.approx(expected)


def test_squad_normalisation() -> None:
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("an apple a day") == "apple day"


def test_exact_match_and_token_f1() -> None:
    assert exact_match("The 5 days.", "5 days") == 1.0
    assert exact_match("5 days", ["six days", "five days"]) == 0.0
    assert exact_match("five days", ["six days", "five days"]) == 1.0
    assert exact_match(None, "x") == 0.0
    # pred tokens [incubation, is, 5, days], gold [5, days] -> P=2/4, R=1 -> F1=2/3
    assert token_f1("incubation is 5 days", "5 days") == pytest.approx(2 / 3)
    # max over golds: vs "about 5 days" P=2/4 R=2/3 -> 4/7
    assert token_f1("incubation is 5 days", ["nothing", "about 5 days"]) == pytest.approx(4 / 7)
    assert token_f1("a", "the") == 1.0  # both normalise to empty
    assert token_f1("x", []) == 0.0


def test_rank_metrics_hit_at_k() -> None:
    assert rank_metrics([3, 7, 1], [7])["hit@1"] == 0.0
    assert rank_metrics([3, 7, 1], [7], ks=(2,))["hit@2"] == 1.0
    assert rank_metrics([3, 7, 1], {9, 1})["hit@5"] == 1.0
    assert rank_metrics([], [7])["hit@5"] == 0.0
    assert rank_metrics([3, 7], [])["hit@5"] == 0.0


def test_summarize() -> None:
    opts = ["yes", "no", "maybe"]
    records = [
        # mode hmt: 3 closed, 1 open
        {"mode": "hmt", "prediction": "yes", "answer": "yes", "options": opts,
         "segments_ranked": [0, 1], "gold_segments": [1], "n_segments": 4, "latency_s": 1.0},
        {"mode": "hmt", "prediction": "no", "answer": "yes", "options": opts,
         "segments_ranked": [1], "gold_segments": [1], "n_segments": 4, "latency_s": 2.0},
        {"mode": "hmt", "prediction": "no", "answer": "no", "options": opts, "latency_s": 3.0},
        {"mode": "hmt", "prediction": "the 5 days", "answer": "5 days", "options": None,
         "segments_ranked": [], "gold_segments": [0, 2], "n_segments": 10, "latency_s": 4.0},
        # mode rag: one open with extra acceptable answers, one errored
        {"mode": "rag", "prediction": "five days", "answer": "5 days", "answers": ["five days"], "latency_s": 0.5,
         "segments_ranked": None, "gold_segments": [0], "n_segments": 3},  # no ranking (mode none): no hit@k
        {"mode": "rag", "prediction": None, "answer": "x y", "error": "boom"},
    ]  # fmt: skip
    out = summarize(records)
    assert list(out) == ["hmt", "rag"]
    hmt = out["hmt"]
    assert hmt["n"] == 4 and hmt["n_closed"] == 3 and hmt["n_open"] == 1
    assert hmt["accuracy"] == pytest.approx(2 / 3)
    # yes: tp1 fn1 -> 2/3; no: tp1 fp1 -> 2/3; maybe unused -> left out
    assert hmt["macro_f1"] == pytest.approx(2 / 3)
    assert hmt["exact_match"] == 1.0 and hmt["token_f1"] == 1.0
    assert hmt["n_evidence"] == 3
    assert hmt["hit@1"] == pytest.approx(1 / 3)  # only the second record hits at rank 1
    assert hmt["hit@5"] == pytest.approx(2 / 3)
    # chance: 1 gold of 4 -> 1/4 at rank 1 and 1 in the top 5 (twice); 2 gold of 10 -> 1/5 and 1 - C(8,5)/C(10,5)
    assert hmt["chance_hit@1"] == pytest.approx((1 / 4 + 1 / 4 + 1 / 5) / 3)
    assert hmt["chance_hit@5"] == pytest.approx((1 + 1 + (1 - 56 / 252)) / 3)
    assert hmt["latency_mean_s"] == 2.5 and hmt["latency_p50_s"] == 2.5
    assert hmt["latency_p95_s"] == pytest.approx(3.85)  # linear: 3 + 0.85 * (4 - 3)
    rag = out["rag"]
    assert rag["n"] == 2 and rag["n_closed"] == 0 and rag["accuracy"] is None and rag["macro_f1"] is None
    assert rag["exact_match"] == 0.5 and rag["token_f1"] == 0.5
    assert rag["n_evidence"] == 0 and rag["hit@1"] is None
    assert rag["n_latency"] == 1 and rag["latency_p95_s"] == 0.5
    assert summarize([{"prediction": "a"}])["default"]["n"] == 1
    assert summarize([]) == {}
