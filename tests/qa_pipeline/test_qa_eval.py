"""``hmtqa eval qa``: statistics on hand-made records, and the command end to end on the tiny model."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest

from hmtqa.main import main
from qa_pipeline.engine import ANSWER_MODES
from qa_pipeline.metrics import macro_f1, token_f1
from qa_pipeline.qa_data import QARow
from qa_pipeline.qa_eval import (
    NOT_IN_DOCUMENT,
    _encode,
    bootstrap_ci,
    chance_line,
    evaluate_set,
    expected_chance_macro_f1,
    format_markdown,
    load_eval_set,
    macro_f1_matrix,
    majority_line,
    prior_weights,
    repeats_ngram,
    training_prior,
)
from qa_pipeline.train_data import PUBMEDQA, PUBMEDQA_TRAIN

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
OPTIONS = ["yes", "no", "maybe"]
MODEL = ["--backbone", "tiny-random", "--checkpoint", "none", "--max-new-tokens", "4", "--dtype", "float32"]


# --------------------------------------------------------------------------------------------------
# Pure statistics
# --------------------------------------------------------------------------------------------------


def test_repeats_ngram():
    eight = "one two three four five six seven eight"
    assert not repeats_ngram(eight)
    assert repeats_ngram(f"{eight} and {eight}")
    assert repeats_ngram("a " * 9)  # overlapping runs count
    assert not repeats_ngram("a " * 8)
    assert not repeats_ngram(None) and not repeats_ngram("")
    assert repeats_ngram("x y x y", n=2) and not repeats_ngram("x y z w", n=2)


def test_bootstrap_ci_contains_the_mean_narrows_with_n_and_is_seeded():
    rng = np.random.default_rng(1)
    small = rng.integers(0, 2, 30).astype(float)
    large = rng.integers(0, 2, 600).astype(float)
    lo, hi = bootstrap_ci(small, resamples=1000, seed=0)
    assert lo <= small.mean() <= hi and lo < hi
    lo2, hi2 = bootstrap_ci(large, resamples=1000, seed=0)
    assert lo2 <= large.mean() <= hi2
    assert hi2 - lo2 < (hi - lo) / 2  # ~ 1 / sqrt(n): 20x the rows, ~4.5x narrower
    assert bootstrap_ci(small, resamples=1000, seed=0) == (lo, hi)
    assert bootstrap_ci(small, resamples=1000, seed=1) != (lo, hi)
    assert bootstrap_ci([0.5] * 10) == (0.5, 0.5)
    assert bootstrap_ci([]) is None and bootstrap_ci([1.0], resamples=0) is None


def test_macro_f1_matrix_matches_metrics_macro_f1():
    rng = random.Random(0)
    labels = ["yes", "no", "maybe"]
    for _ in range(200):
        n = rng.randint(1, 12)
        golds = [rng.choice(labels[: rng.randint(1, 3)]) for _ in range(n)]
        preds = [rng.choice([*labels, NOT_IN_DOCUMENT, None, "Yes."]) for _ in range(n)]
        p, g, k = _encode(preds, golds, labels)
        assert macro_f1_matrix(p, g, k)[0] == pytest.approx(macro_f1(preds, golds, labels=labels))


def test_macro_f1_bootstrap_recomputes_macro_f1_per_resample():
    golds = ["yes", "no", "maybe", "no", "yes", "no"] * 5
    preds = ["yes", "no", "no", "no", "maybe", "yes"] * 5
    p, g, k = _encode(preds, golds, OPTIONS)
    idx = np.random.default_rng(0).integers(0, len(golds), size=(50, len(golds)))
    by_matrix = macro_f1_matrix(p[idx], g[idx], k)
    by_metrics = [macro_f1([preds[i] for i in row], [golds[i] for i in row], labels=OPTIONS) for row in idx]
    assert by_matrix == pytest.approx(by_metrics)


def test_majority_line_exact():
    golds = ["no", "no", "yes", "maybe", "no"]
    line = majority_line(golds, OPTIONS)
    # F1(no) = 2*3 / (2*3 + 2 + 0) = 0.75; yes and maybe are gold but never predicted: F1 0.
    assert line == {"label": "no", "accuracy": 0.6, "macro_f1": pytest.approx(0.25)}
    assert majority_line(["no", "yes"], OPTIONS)["label"] == "yes"  # a tie goes to the earlier option
    assert majority_line([], OPTIONS)["accuracy"] is None


def _brute_force_chance(golds, options):
    scores = [
        macro_f1(list(preds), golds, labels=options)
        for preds in itertools.product(options, repeat=len(golds))
    ]
    return sum(scores) / len(scores)


def test_chance_line_exact_equals_enumeration():
    golds = ["yes", "yes", "no", "maybe"]
    line = chance_line(golds, [OPTIONS] * len(golds))
    assert line["accuracy"] == pytest.approx(1 / 3)
    assert line["macro_f1_method"] == "exact"
    assert line["macro_f1"] == pytest.approx(_brute_force_chance(golds, OPTIONS), abs=1e-12)
    # Two labels, one row each: preds (a,a) 1/3, (a,b) 1, (b,a) 0, (b,b) 1/3 -> mean 5/12.
    assert expected_chance_macro_f1([1, 1]) == pytest.approx(5 / 12)
    with pytest.raises(ValueError):
        expected_chance_macro_f1([2, 0])


def test_chance_line_simulates_when_a_label_is_never_gold():
    golds = ["yes", "yes", "no", "no", "yes"]  # no gold "maybe": the number of labels in the mean varies
    line = chance_line(golds, [OPTIONS] * len(golds), draws=20_000, seed=0)
    assert line["macro_f1_method"].startswith("simulation (20000 draws, seed 0")
    assert line["macro_f1"] == pytest.approx(_brute_force_chance(golds, OPTIONS), abs=0.01)
    assert chance_line(golds, [OPTIONS] * len(golds), draws=20_000, seed=0) == line


def _closed_rows(golds):
    return [
        QARow(
            row_id=f"r{i}",
            question="q?",
            document=f"doc {i % 2}",
            doc_id=f"d{i % 2}",
            options=OPTIONS,
            answer=g,
        )
        for i, g in enumerate(golds)
    ]


def test_evaluate_closed_set_counts_errors_abstentions_and_missing_records_as_wrong():
    golds = ["yes", "no", "no", "maybe", "yes", "no"]
    rows = _closed_rows(golds)
    recs = {
        ("r0", "hmt"): {"prediction": "Yes."},
        ("r1", "hmt"): {"prediction": "no", "confidence": 0.9, "support": []},
        ("r2", "hmt"): {"prediction": "no", "abstained": True},  # counts as "not in the document"
        ("r3", "hmt"): {"prediction": None, "error": "OSError: gone"},
        ("r4", "hmt"): {"prediction": "no", "abstained": False},
        # r5: no record at all
    }
    for i, g in enumerate(golds):
        recs[(f"r{i}", "none")] = {"prediction": g}
    res = evaluate_set(rows, recs, ["hmt", "none"], resamples=200, seed=0)
    assert res["kind"] == "closed" and res["n"] == 6 and res["n_documents"] == 2
    hmt = res["modes"]["hmt"]
    assert hmt["n_errors"] == 2 and hmt["n_abstained"] == 1 and hmt["abstention_rate"] == pytest.approx(1 / 6)
    assert hmt["metrics"]["accuracy"]["value"] == pytest.approx(2 / 6)
    preds = ["yes", "no", NOT_IN_DOCUMENT, None, "no", None]
    assert hmt["metrics"]["macro_f1"]["value"] == pytest.approx(macro_f1(preds, golds, labels=OPTIONS))
    lo, hi = hmt["metrics"]["accuracy"]["ci"]
    assert lo <= 2 / 6 <= hi
    assert hmt["predicted"] == {
        "yes": 1,
        "no": 2,
        "maybe": 0,
        "(not in document)": 1,
        "(error)": 2,
        "(other)": 0,
    }
    perfect = res["modes"]["none"]["metrics"]
    assert perfect["accuracy"] == {"value": 1.0, "ci": [1.0, 1.0]} and perfect["macro_f1"]["value"] == 1.0
    assert res["majority"]["label"] == "no" and res["majority"]["accuracy"] == 0.5
    assert res["chance"]["accuracy"] == pytest.approx(1 / 3) and res["chance"]["macro_f1_method"] == "exact"
    assert res["gold_counts"] == {"yes": 2, "no": 3, "maybe": 1}


def test_prior_weights_give_the_rows_another_class_balance():
    golds = ["yes", "no", "maybe", "yes"]
    w = prior_weights(golds, {"yes": 0.25, "no": 0.5, "maybe": 0.25})
    assert w.tolist() == [0.5, 2.0, 1.0, 0.5]  # each label's weight sums to its share of the 4 rows
    assert prior_weights(golds, {"yes": 0.5, "no": 0.5}).tolist() == [1.0, 2.0, 0.0, 1.0]
    assert prior_weights(["yes", "no"], {"yes": 0.5, "no": 0.3, "maybe": 0.2}) is None  # no "maybe" row
    assert prior_weights([], {"yes": 1.0}) is None


def test_accuracy_at_the_training_balance_equals_the_rows_repeated_to_that_balance():
    # Weights 0.5 / 2 / 1 for yes / no / maybe are the rows repeated 1 / 4 / 2 times (halved).
    golds = ["yes", "no", "maybe", "yes"]
    preds = ["yes", "no", "yes", "no"]
    recs = {(f"r{i}", "hmt"): {"prediction": p} for i, p in enumerate(preds)}
    prior = {"source": "test", "n": 8, "shares": {"yes": 0.25, "no": 0.5, "maybe": 0.25}}
    res = evaluate_set(_closed_rows(golds), recs, ["hmt"], resamples=200, prior=prior)
    repeated = [(g, p) for g, p, k in zip(golds, preds, [1, 4, 2, 1], strict=True) for _ in range(k)]
    g_rep, p_rep = zip(*repeated, strict=True)
    at = res["modes"]["hmt"]["at_prior"]
    assert at["accuracy"]["value"] == pytest.approx(sum(a == b for a, b in repeated) / len(repeated))  # 5 / 8
    assert at["macro_f1"]["value"] == pytest.approx(macro_f1(list(p_rep), list(g_rep), labels=OPTIONS))
    lo, hi = at["accuracy"]["ci"]
    assert lo <= 5 / 8 <= hi
    # The dev rows' own figures are unchanged, and the majority at that balance is "no", right half the time.
    assert res["modes"]["hmt"]["metrics"]["accuracy"]["value"] == pytest.approx(2 / 4)
    assert res["prior"]["applied"] and res["prior"]["majority"]["label"] == "no"
    assert res["prior"]["majority"]["accuracy"] == pytest.approx(0.5)
    assert res["prior"]["majority"]["macro_f1"] == pytest.approx(macro_f1(["no"] * 8, list(g_rep), labels=OPTIONS))
    table = format_markdown({"sets": {"pubmedqa": res}, "bootstrap": res["bootstrap"]})
    assert "At the class balance of the training questions" in table
    assert "| pubmedqa | `hmt` | 0.625 [" in table and "test (n = 8): yes 25%, no 50%, maybe 25% |" in table
    # A balance the rows cannot stand for (no row of one label) is reported as not applied.
    res = evaluate_set(_closed_rows(["yes", "no"]), {}, ["hmt"], resamples=10, prior=prior)
    assert res["prior"]["applied"] is False and "at_prior" not in res["modes"]["hmt"]
    assert res["prior"]["missing"] == ["maybe"]
    table = format_markdown({"sets": {"pubmedqa": res}, "bootstrap": {}})
    assert "At the class balance" not in table
    assert "Not at the class balance of the training questions: pubmedqa (no row answered maybe)." in table


def test_evaluate_open_set():
    rows = [
        QARow(
            row_id="a",
            question="q",
            document="t",
            doc_id="d1",
            answer="the red fox",
            metadata={"answers": ["the red fox", "a fox"]},
        ),
        QARow(row_id="b", question="q", document="t", doc_id="d1", answer="blue sky"),
        QARow(row_id="c", question="q", document="t", doc_id="d2", answer="document"),
        QARow(row_id="d", question="q", document="t", doc_id="d2", answer="green"),
    ]
    loop = "one two three four five six seven eight " * 2
    recs = {
        ("a", "hmt"): {"prediction": "fox"},  # best of the gold answers: F1("fox", "a fox") = 1
        ("b", "hmt"): {"prediction": "blue sky"},
        ("c", "hmt"): {"prediction": "the document", "abstained": True},  # F1 0 even though it overlaps
        # Repetition is counted in the sentence the model wrote, not only in its short answer.
        ("d", "hmt"): {"prediction": "seven eight", "sentence": loop},
    }
    res = evaluate_set(rows, recs, ["hmt"], resamples=100)
    assert (
        res["kind"] == "open"
        and res["majority"] is None
        and res["chance"] is None
        and res["n_documents"] == 2
    )
    m = res["modes"]["hmt"]
    assert m["metrics"]["token_f1"]["value"] == pytest.approx(0.5)
    assert m["metrics"]["exact_match"]["value"] == pytest.approx(0.5)  # "fox" = "a fox" without articles
    assert m["n_abstained"] == 1 and m["n_errors"] == 0
    assert m["n_answered"] == 3 and m["n_repeats_8gram"] == 1 and m["repeats_8gram"] == pytest.approx(1 / 3)
    table = format_markdown({"sets": {"covid-qa": res}, "bootstrap": res["bootstrap"]})
    assert "| covid-qa | `hmt` | 4 (2) | – | – | 0.500 [" in table and "n/a" in table
    assert "8-gram repeats 33%" in table


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path):
    rng = random.Random(0)
    words = "cell dose trial patient risk outcome protein gene therapy cohort blood sample".split()

    def text(n):
        return " ".join(rng.choice(words) for _ in range(n))

    (tmp_path / "pubmedqa").mkdir()
    data = {
        str(1000 + i): {
            "QUESTION": f"Does {rng.choice(words)} change {rng.choice(words)}?",
            "CONTEXTS": [text(20), text(20)],
            "final_decision": ["yes", "no", "no"][i % 3],
            "LONG_ANSWER": text(10),
        }
        for i in range(PUBMEDQA_TRAIN + 4)
    }
    (tmp_path / PUBMEDQA).write_text(json.dumps(data))
    return tmp_path


def test_eval_qa_end_to_end_on_tiny_model(data_dir, tmp_path, capsys):
    out = tmp_path / "qa"
    argv = [
        "eval",
        "qa",
        "--data-dir",
        str(data_dir),
        "--sets",
        "pubmedqa",
        "--fuse",
        "2",
        "--limit",
        "3",
        "--bootstrap",
        "200",
        "--out",
        str(out),
        *MODEL,
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    for mode in ANSWER_MODES:
        assert f"| pubmedqa | `{mode}` | 3 (3) | " in table
    assert "accuracy [95% CI]" in table and "macro-F1 [95% CI]" in table
    assert "| pubmedqa | majority (no) | 3 (3) | 0.667 | 0.400 |" in table  # golds: no, no, yes
    assert (
        "| pubmedqa | chance (uniform) | 3 (3) | 0.333 |" in table and "simulation" in table
    )  # no gold maybe
    main_table, _, at_prior = table.partition("At the class balance of the training questions")
    lines = [line for line in main_table.splitlines() if "`" in line]
    assert len(lines) == len(ANSWER_MODES) and all(" [" in line for line in lines)
    # The fixture's training questions (those before the held-out ones) give the second table.
    assert sum("`" in line for line in at_prior.splitlines()) == len(ANSWER_MODES)
    assert "PubMedQA questions 1-" in at_prior
    assert (out / "pubmedqa.jsonl").is_file() and (out / "store").is_dir()
    assert (out / "summary.md").read_text().startswith("| set | mode |")
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["sets"]["pubmedqa"]["modes"]) == list(ANSWER_MODES)

    # Every answer is there: the rerun only re-evaluates.
    n_lines = len((out / "pubmedqa.jsonl").read_text().splitlines())
    assert main([*argv, "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert len((out / "pubmedqa.jsonl").read_text().splitlines()) == n_lines == 3 * len(ANSWER_MODES)
    assert again["sets"] == summary["sets"]
    # Another model (here: other answering settings) must not sum up these answers as its own.
    summary_md = (out / "summary.md").read_text()
    assert main([*argv, "--max-new-tokens", "5"]) == 2
    err = capsys.readouterr().err
    assert "its metrics would not be this model's" in err and "Traceback" not in err
    assert len((out / "pubmedqa.jsonl").read_text().splitlines()) == n_lines
    assert (out / "summary.md").read_text() == summary_md
    hmt = again["sets"]["pubmedqa"]["modes"]["hmt"]
    assert sum(hmt["predicted"].values()) == 3 and hmt["n_errors"] == 0
    assert set(hmt["metrics"]) == {"accuracy", "macro_f1"} and len(hmt["metrics"]["accuracy"]["ci"]) == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sets", "pubmedqa,squad"], "unknown set"),
        (["--modes", "hmt,oracle"], "unknown set(s) or mode(s) ['oracle']"),
        (["--sets", "covid-qa"], "COVID-QA data not found"),
        (["--sets", "evidence-inference"], "Evidence Inference data not found"),
    ],
)
def test_eval_qa_errors(data_dir, tmp_path, capsys, extra, message):
    rc = main(["eval", "qa", "--data-dir", str(data_dir), "--out", str(tmp_path / "o"), *extra, *MODEL])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_eval_qa_refuses_a_file_as_out(data_dir, tmp_path, capsys):
    (tmp_path / "r.jsonl").write_text("")
    rc = main(["eval", "qa", "--data-dir", str(data_dir), "--out", str(tmp_path / "r.jsonl"), *MODEL])
    assert rc == 2 and "is a file" in capsys.readouterr().err


@pytest.mark.skipif(not (SHARED / "covid-qa").is_dir(), reason="needs the shared data folder")
def test_dev_sets_on_the_shared_data():
    pubmed = load_eval_set("pubmedqa", SHARED, limit=100)
    assert len(pubmed) == 100 and {r.answer for r in pubmed} == set(OPTIONS)
    covid = load_eval_set("covid-qa", SHARED, limit=None)
    assert len(covid) == 309 and len({r.doc_id for r in covid}) == 23
    spread = load_eval_set("covid-qa", SHARED, limit=30)
    assert len(spread) == 30 and len({r.doc_id for r in spread}) == 23
    ei = load_eval_set("evidence-inference", SHARED, limit=100)
    assert len(ei) == 76 and all(len(r.options) == 3 for r in ei)
    # The training questions' balance, never the dev rows': PubMedQA 1-400 are 233 yes, 124 no, 43 maybe.
    assert training_prior("pubmedqa", SHARED)["shares"] == {"yes": 233 / 400, "no": 124 / 400, "maybe": 43 / 400}
    assert training_prior("evidence-inference", SHARED)["n"] == 56
    assert training_prior("covid-qa", SHARED) is None


def test_support_in_gold_evidence_counts_rows_whose_sentence_overlaps_it():
    from qa_pipeline.qa_eval import evaluate_set

    rows = [
        QARow(
            row_id=f"r{i}", question="q?", document="x" * 100, doc_id="d", answer="a b", evidence=[(10, 20)]
        )
        for i in range(4)
    ]
    supports = [[12, 18], [0, 9], [19, 40], None]
    records = {
        (f"r{i}", "hmt"): {"row_id": f"r{i}", "mode": "hmt", "prediction": "a b", "support": s}
        for i, s in enumerate(supports)
    }
    m = evaluate_set(rows, records, ["hmt"], resamples=0)["modes"]["hmt"]
    assert m["n_support"] == 3 and m["support_in_evidence"] == pytest.approx(2 / 3)


def test_gold_in_prompt_counts_rows_whose_answer_span_is_inside_the_prompts_passages():
    rows = [
        QARow(row_id=r, question="q", document="t", doc_id="d", answer="x", evidence=[(100, 110)])
        for r in ("a", "b", "c", "d", "f")
    ] + [QARow(row_id="e", question="q", document="t", doc_id="d", answer="x")]  # no gold span: not counted
    ranked = [[0, 50], [90, 120]]  # the gold span lies inside the second passage only
    recs = {
        ("a", "dense-rag"): {"prediction": "x", "evidence_ranked": ranked, "prompt_passages": 2},
        ("b", "dense-rag"): {"prediction": "x", "evidence_ranked": ranked, "prompt_passages": 1},
        ("c", "dense-rag"): {"prediction": "x", "evidence_ranked": [[95, 105]], "prompt_passages": 1},  # overlaps only
        ("e", "dense-rag"): {"prediction": "x", "evidence_ranked": ranked, "prompt_passages": 2},
        # Two passages that touch are one piece of the prompt's text: the span across them is inside...
        ("d", "dense-rag"): {"prediction": "x", "evidence_ranked": [[105, 130], [90, 105]], "prompt_passages": 2},
        # ...but not when the second one was ranked below the prompt's passages.
        ("f", "dense-rag"): {"prediction": "x", "evidence_ranked": [[105, 130], [90, 105]], "prompt_passages": 1},
        ("a", "hmt"): {"prediction": "x", "evidence_ranked": ranked, "prompt_passages": 0},  # no text in the prompt
    }
    res = evaluate_set(rows, recs, ["dense-rag", "hmt"], resamples=10)
    assert res["modes"]["dense-rag"]["gold_in_prompt"] == pytest.approx(2 / 5)
    assert res["modes"]["hmt"]["gold_in_prompt"] is None
    table = format_markdown({"sets": {"covid-qa": res}, "bootstrap": res["bootstrap"]})
    assert "gold answer in the prompt's text 40%" in table
    # Records of this version say which spans the prompt held: chunks that touch but stayed apart
    # there (separated by "...") do not hold a span across their border.
    recs[("d", "dense-rag")]["prompt_spans"] = [[90, 105], [105, 130]]
    recs[("a", "dense-rag")]["prompt_spans"] = [[0, 50], [90, 120]]
    res = evaluate_set(rows, recs, ["dense-rag", "hmt"], resamples=10)
    assert res["modes"]["dense-rag"]["gold_in_prompt"] == pytest.approx(1 / 5)


def test_open_answers_without_the_threshold_and_paired_against_dense_rag():
    rows = [
        QARow(row_id="a", question="Where were the sharks studied?", document="t", doc_id="d", answer="Pescador Island"),
        QARow(row_id="b", question="Which dose?", document="t", doc_id="d", answer="10 mg"),
    ]
    recs = {
        # Turned away, but the sentence the model wrote held the answer: its best guess scores.
        ("a", "hmt+retrieval"): {
            "prediction": "The document does not seem to say.",
            "abstained": True,
            "sentence": "The sharks were studied at Pescador Island.",
        },
        ("b", "hmt+retrieval"): {"prediction": "10 mg"},
        # A record that kept its best guess (quoted from the document) is scored by it, not by its sentence.
        ("a", "hmt"): {
            "prediction": "The document does not seem to say.",
            "abstained": True,
            "sentence": "The sharks were studied at Pescador Island.",
            "quoted": True,
            "best_guess": "in the Gulf",
        },
        ("b", "hmt"): {"prediction": "10 mg"},
        ("a", "dense-rag"): {"prediction": "the Gulf of Mexico"},
        ("b", "dense-rag"): {"prediction": "10 mg daily"},
    }
    res = evaluate_set(rows, recs, ["hmt+retrieval", "dense-rag"], resamples=50)
    hmt, dense = res["modes"]["hmt+retrieval"], res["modes"]["dense-rag"]
    assert hmt["metrics"]["token_f1"]["value"] == pytest.approx(0.5)  # the abstention counts as wrong
    assert hmt["metrics"]["token_f1_no_threshold"]["value"] == pytest.approx(1.0)
    assert "token_f1_no_threshold" not in dense["metrics"]  # nothing turned away
    with_guess = evaluate_set(rows, recs, ["hmt", "dense-rag"], resamples=10)["modes"]["hmt"]
    assert with_guess["metrics"]["token_f1_no_threshold"]["value"] == pytest.approx(0.5)  # "in the Gulf": 0
    # Row by row: (1 - 0) and (1 - 0.8), against the baseline itself nothing.
    assert hmt["vs_dense_rag"]["value"] == pytest.approx(0.6)
    lo, hi = hmt["vs_dense_rag"]["ci"]
    assert 0.2 - 1e-9 <= lo <= hi <= 1.0 + 1e-9  # resamples of the two differences
    assert "vs_dense_rag" not in dense
    table = format_markdown({"sets": {"covid-qa": res}, "bootstrap": res["bootstrap"]})
    assert "token F1 without the threshold 1.000" in table and "paired vs dense-rag (no threshold) 0.600" in table
    # Without dense-rag among the modes there is nothing to pair with.
    assert "vs_dense_rag" not in evaluate_set(rows, recs, ["hmt+retrieval"], resamples=0)["modes"]["hmt+retrieval"]


def test_quoted_answers_are_also_scored_by_the_models_own_words():
    """A quoted answer set also reports the token F1 of what the model wrote (its short answer): what
    --no-quote-answers gives; abstentions stay wrong; unquoted sets report nothing extra."""
    rows = [
        QARow(row_id="a", question="Which dose was used?", document="t", doc_id="d", answer="10 mg"),
        QARow(row_id="b", question="Where?", document="t", doc_id="d", answer="Pescador Island"),
        QARow(row_id="c", question="When?", document="t", doc_id="d", answer="in 2012"),
    ]
    recs = {
        ("a", "dense-rag"): {"prediction": "patients received 10 mg of the drug daily", "quoted": True,
                             "sentence": "10 mg"},
        ("b", "dense-rag"): {"prediction": "Pescador Island", "quoted": True, "sentence": "the Gulf of Mexico"},
        ("c", "dense-rag"): {"prediction": "The document does not seem to say.", "abstained": True,
                             "quoted": True, "sentence": "in 2012"},
    }
    m = evaluate_set(rows, recs, ["dense-rag"], resamples=20)["modes"]["dense-rag"]
    quoted_f1 = (token_f1("patients received 10 mg of the drug daily", "10 mg") + 1.0 + 0.0) / 3
    assert m["metrics"]["token_f1"]["value"] == pytest.approx(quoted_f1)
    assert m["metrics"]["token_f1_own_words"]["value"] == pytest.approx((1.0 + 0.0 + 0.0) / 3)
    for rec in recs.values():
        rec["quoted"] = False
    assert "token_f1_own_words" not in evaluate_set(rows, recs, ["dense-rag"], resamples=20)["modes"]["dense-rag"]["metrics"]
