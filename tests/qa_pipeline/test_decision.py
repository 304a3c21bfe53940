"""Decision heads: fitted on features, saved with a checkpoint, used by ``ask`` for closed questions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qa_pipeline.decision import DecisionHeads, OptionHead, fit_option_head, head_probs
from qa_pipeline.decision_recipe import cross_validate
from qa_pipeline.metrics import macro_f1

OPTIONS = ["yes", "no", "maybe"]


def prior_dominated(n: int, seed: int, d: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels skewed 6:3:1; the likelihood always prefers "yes" by a wide margin (a small LM's prior)
    and carries no information; one direction of the hidden state carries the label, with noise."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, size=n, p=[0.6, 0.3, 0.1])
    logprobs = np.log(np.array([0.8, 0.15, 0.05]))[None].repeat(n, 0) + rng.normal(0, 0.1, (n, 3))
    hidden = rng.normal(0, 1, (n, d))
    hidden[:, :3] += 2.5 * np.eye(3)[labels]
    return logprobs, hidden, labels


def test_head_learns_the_decision_that_likelihood_misses():
    lp, hid, y = prior_dominated(400, seed=0)
    test_lp, test_hid, test_y = prior_dominated(400, seed=1)
    assert (test_lp.argmax(1) == 0).all()  # likelihood: one class
    head = fit_option_head(OPTIONS, lp, hid, y, l2=1.0)
    pred = head_probs(head, test_lp, test_hid).argmax(1)
    assert (pred == test_y).mean() > 0.85
    assert macro_f1(pred.tolist(), test_y.tolist(), labels=[0, 1, 2]) > 0.8
    assert set(pred.tolist()) == {0, 1, 2}  # class balance: the rare class is predicted too


def test_calibration_only_moves_the_prior_and_predicts_every_class():
    rng = np.random.default_rng(0)
    y = rng.choice(3, size=300)
    # Likelihood knows the label, but "yes" gets +3 nats for free: argmax says "yes" almost always.
    lp = (
        np.log(np.full((300, 3), 0.1))
        + 2.0 * np.eye(3)[y]
        + np.array([3.0, 0.0, 0.0])
        + rng.normal(0, 0.5, (300, 3))
    )
    assert (lp.argmax(1) == 0).mean() > 0.9
    head = fit_option_head(OPTIONS, lp, np.zeros((300, 4)), y, use_hidden=False)
    assert not head.weight.any()
    pred = head_probs(head, lp, np.zeros((300, 4))).argmax(1)
    assert (pred == y).mean() > 0.85
    # The free 3 nats of "yes" are taken back (in units of the fitted likelihood weight).
    assert (head.bias[1] - head.bias[0]) / head.lm_weight == pytest.approx(3.0, abs=0.75)


def test_cross_validation_prefers_the_head_when_the_state_carries_the_answer():
    lp, hid, y = prior_dominated(200, seed=2)
    cv = {r["variant"]: r for r in cross_validate(OPTIONS, lp, hid, y)}
    assert cv["likelihood"]["predicted"][1:] == [0, 0]
    assert (
        max(r["macro_f1"] for name, r in cv.items() if name.startswith("head"))
        > cv["likelihood"]["macro_f1"] + 0.4
    )


def test_heads_round_trip_and_match_options_in_any_order_and_case(tmp_path):
    d = 8
    head = OptionHead(
        options=["yes", "no", "maybe"],
        lm_weight=0.5,
        bias=np.array([0.0, 1.0, -1.0]),
        weight=np.arange(3 * d, dtype=float).reshape(3, d) / 10,
        center=np.ones(d),
        scale=np.full(d, 2.0),
        threshold=0.4,
        info={"n": 3},
    )
    DecisionHeads([head], open_threshold=0.2, open_recall_threshold=-3.5).save(tmp_path)
    older = DecisionHeads.load(tmp_path)
    DecisionHeads([head], open_threshold=0.2, open_recall_threshold=-3.5, open_recall_signal="tokens").save(tmp_path)
    loaded = DecisionHeads.load(tmp_path)
    assert loaded.open_threshold == pytest.approx(0.2)
    assert loaded.open_recall_threshold == pytest.approx(-3.5)  # a logit: below 0 is a real threshold
    # Which head's logit the threshold was fitted on is saved with it, and changes the answer stamp.
    assert (older.open_recall_signal, loaded.open_recall_signal) == ("passage", "tokens")
    assert older.digest() != loaded.digest()
    body = json.loads((tmp_path / "decision_heads.json").read_text())
    del body["open_recall_signal"]  # a checkpoint saved before there was a choice: the pooled head's
    (tmp_path / "decision_heads.json").write_text(json.dumps(body))
    assert DecisionHeads.load(tmp_path).open_recall_signal == "passage"
    with pytest.raises(ValueError, match="unknown recall signal"):
        DecisionHeads(open_recall_signal="bm25")
    lp, hid = np.array([-1.0, -2.0, -3.0]), np.linspace(-1, 1, d)
    probs, threshold = loaded.decide(["yes", "no", "maybe"], lp, hid)
    assert threshold == pytest.approx(0.4)
    # Same options, another order and case: the same probability for each option.
    perm = [2, 0, 1]
    probs2, _ = loaded.decide(["Maybe", "YES", " no"], lp[perm], hid)
    assert probs2 == pytest.approx(probs[perm], rel=1e-5)
    assert loaded.decide(["increased", "decreased"], lp[:2], hid) is None
    assert not DecisionHeads.load(tmp_path / "nothing")


def _checkpoint_with_head(tmp_path, bias, threshold=0.0):
    from hmt import HMTConfig, HMTModel, load_backbone

    backbone, _ = load_backbone("tiny-random")
    ckpt = tmp_path / "ckpt"
    model = HMTModel(backbone, HMTConfig(segment_length=64, sensory_length=8))
    model.save_pretrained(ckpt)
    d = 2 * model.hidden_size  # the decision state: [last token's state, mean over the prompt]
    head = OptionHead(
        options=["yes", "no", "maybe"],
        lm_weight=0.0,
        bias=np.asarray(bias, dtype=float),
        weight=np.zeros((3, d)),
        center=np.zeros(d),
        scale=np.ones(d),
        threshold=threshold,
    )
    DecisionHeads([head]).save(ckpt)
    return ckpt


def test_ask_decides_with_the_checkpoints_head_in_hmt_modes_only(tmp_path):
    from qa_pipeline.documents import load_text
    from qa_pipeline.engine import Engine, EngineConfig

    ckpt = _checkpoint_with_head(tmp_path, [0.0, 0.0, 8.0])
    engine = Engine(EngineConfig(backbone="tiny-random", checkpoint=str(ckpt), max_new_tokens=4))
    store = engine.open_store(tmp_path / "store")
    engine.ingest(store, load_text("Aspirin lowered the risk in the trial. " * 40, doc_id="d"))
    for mode in ("hmt", "hmt+retrieval"):
        ans = engine.ask(
            store, "d", "Did aspirin lower the risk?", mode=mode, options=["Yes", "no", "maybe"], record=False
        )
        assert ans.answer == "maybe" and ans.confidence > 0.99 and not ans.abstained
        assert sum(np.exp(list(ans.option_scores.values()))) == pytest.approx(1.0)
        assert ans.to_json()["confidence"] == ans.confidence and "decision_state" not in ans.to_json()
    # The plain backbone (dense-rag, none) keeps likelihood: the head was fitted on HMT's answering pass.
    ans = engine.ask(
        store, "d", "Did aspirin lower the risk?", mode="none", options=["yes", "no", "maybe"], record=False
    )
    lp = dict(zip(["yes", "no", "maybe"], ans.option_logprobs, strict=True))
    assert ans.option_scores == pytest.approx(lp) and ans.answer == max(lp, key=lp.get)


def test_below_the_threshold_the_answer_says_the_document_does_not_say(tmp_path):
    from qa_pipeline.documents import load_text
    from qa_pipeline.engine import NOT_IN_DOCUMENT, Engine, EngineConfig

    ckpt = _checkpoint_with_head(tmp_path, [0.0, 0.0, 0.0], threshold=0.5)  # a flat head: p = 1/3 < 0.5
    engine = Engine(EngineConfig(backbone="tiny-random", checkpoint=str(ckpt), max_new_tokens=4))
    store = engine.open_store(tmp_path / "store")
    engine.ingest(store, load_text("Aspirin lowered the risk in the trial. " * 40, doc_id="d"))
    ans = engine.ask(store, "d", "Did aspirin lower the risk?", options=["yes", "no", "maybe"], record=False)
    assert ans.abstained and ans.answer == NOT_IN_DOCUMENT
    assert ans.confidence == pytest.approx(1 / 3)
    assert set(ans.option_scores) == {"yes", "no", "maybe"}  # the model's scores stay visible


def test_threshold_turns_away_at_most_a_tenth_of_answerable_questions():
    from qa_pipeline.decision import fit_threshold

    rng = np.random.default_rng(0)
    pos, neg = rng.uniform(0.5, 1.0, 200), rng.uniform(0.3, 0.55, 200)
    correct = pos > 0.6  # low confidence, wrong answers
    t, info = fit_threshold(pos, correct, neg)
    assert 0.5 < t < 0.6 and info["positives_abstained"] <= 0.1
    assert info["negatives_abstained"] > 0.8
    assert info["accuracy_kept_positives"] > info["accuracy_all_positives"]
    # Confidence that does not tell the two apart catches no more negatives than positives.
    same = rng.uniform(0.3, 1.0, 400)
    _, info = fit_threshold(same[:200], np.ones(200, bool), same[200:])
    assert abs(info["negatives_abstained"] - info["positives_abstained"]) < 0.07


def test_folds_keep_a_questions_modes_together_and_negatives_give_a_threshold():
    from qa_pipeline.decision_recipe import _folds, fit_heads

    lp, hid, y = prior_dominated(120, seed=3)
    groups = np.concatenate([np.arange(60), np.arange(60)])
    for fold in _folds(groups, 5):
        assert set(groups[fold]).isdisjoint(set(np.setdiff1d(groups, groups[fold])))
    by_mode = {
        m: {"logprobs": lp[i::2], "hidden": hid[i::2], "labels": y[i::2]}
        for i, m in enumerate(("hmt", "hmt+retrieval"))
    }
    # Negatives: a state with no label direction, so the head is unsure of them.
    nlp, nhid, ny = prior_dominated(40, seed=4)
    nhid[:, :3] = 0.0
    negatives = {"pubmedqa": {"hmt": {"logprobs": nlp, "hidden": nhid, "labels": ny}}}
    heads, report = fit_heads({"pubmedqa": by_mode}, {"pubmedqa": OPTIONS}, negatives)
    r = report["pubmedqa"]
    assert r["n_questions"] == 60 and r["chosen"].startswith("head")
    head = heads.find(OPTIONS)[0]
    assert 0 < head.threshold < 1 and r["threshold"]["positives_abstained"] <= 0.1
    assert r["threshold"]["negatives_abstained"] > 0.3


def test_negative_rows_ask_each_question_of_another_document():
    from qa_pipeline.decision_recipe import negative_rows
    from qa_pipeline.qa_data import QARow

    rows = [
        QARow(
            row_id=f"q{i}",
            question=f"q{i}?",
            document=f"doc {i // 2}",
            doc_id=f"d{i // 2}",
            options=OPTIONS,
            answer="yes",
            evidence=[(0, 5)],
        )
        for i in range(6)
    ]
    neg = negative_rows(rows, limit=4)
    assert [r.row_id for r in neg] == ["q0-neg", "q1-neg", "q2-neg", "q3-neg"]
    assert [r.doc_id for r in neg] == ["d1", "d1", "d2", "d2"]
    assert all(
        n.document != r.document and n.question == r.question and not n.evidence
        for n, r in zip(neg, rows, strict=False)
    )


def test_open_answers_abstain_below_the_open_threshold_in_hmt_modes_only(tmp_path):
    from qa_pipeline.documents import load_text
    from qa_pipeline.engine import NOT_IN_DOCUMENT, Engine, EngineConfig

    ckpt = _checkpoint_with_head(tmp_path, [0.0, 0.0, 0.0])
    heads = DecisionHeads.load(ckpt)
    heads.open_threshold = 1.01  # above any confidence
    heads.save(ckpt)
    engine = Engine(EngineConfig(backbone="tiny-random", checkpoint=str(ckpt), max_new_tokens=4))
    store = engine.open_store(tmp_path / "store")
    engine.ingest(store, load_text("Aspirin lowered the risk in the trial. " * 40, doc_id="d"))
    ans = engine.ask(store, "d", "What did aspirin do?", mode="hmt", record=False)
    assert ans.abstained and ans.answer == NOT_IN_DOCUMENT and 0 < ans.confidence <= 1
    ans = engine.ask(store, "d", "What did aspirin do?", mode="dense-rag", record=False)
    assert not ans.abstained and ans.answer != NOT_IN_DOCUMENT
    # A mode with a threshold of its own (0: its answers never abstain by confidence) uses that one.
    engine.decision_heads.open_thresholds = {"hmt": 0.0}
    assert not engine.ask(store, "d", "What did aspirin do?", mode="hmt", record=False).abstained
    assert engine.ask(store, "d", "What did aspirin do?", mode="hmt+retrieval", record=False).abstained
    off = Engine(
        EngineConfig(backbone="tiny-random", checkpoint=str(ckpt), max_new_tokens=4, decision_heads=False)
    )
    assert (
        not off.decision_heads
        and not off.ask(store, "d", "What did aspirin do?", mode="hmt", record=False).abstained
    )


def test_open_answers_abstain_below_the_recall_score_threshold_in_hmt_modes_only(tmp_path):
    """Each open answer of the HMT modes carries the passage head's best logit for its question; below
    the checkpoint's recall threshold it says the document does not seem to say, whatever its
    confidence. The plain-backbone modes have no recall score and never abstain."""
    from qa_pipeline.documents import load_text
    from qa_pipeline.engine import NOT_IN_DOCUMENT, Engine, EngineConfig
    from qa_pipeline.support import open_confidence

    ckpt = _checkpoint_with_head(tmp_path, [0.0, 0.0, 0.0])
    engine = Engine(EngineConfig(backbone="tiny-random", checkpoint=str(ckpt), max_new_tokens=4))
    store = engine.open_store(tmp_path / "store")
    engine.ingest(store, load_text("Aspirin lowered the risk in the trial. " * 40, doc_id="d"))
    question = "What did aspirin do?"
    score = engine.recall_score(store, "d", question)
    for mode in ("hmt", "hmt+retrieval"):
        ans = engine.ask(store, "d", question, mode=mode, record=False)
        # The same score answering as without answering, in the record, and the same in both modes.
        assert ans.recall_score == pytest.approx(score) and ans.to_json()["recall_score"] == ans.recall_score
        assert not ans.abstained
        # The answer's likelihood is in the record too: the confidence is made from it and the recall.
        assert ans.answer_logprob is not None and ans.answer_logprob <= 0
        assert ans.confidence == pytest.approx(open_confidence(ans.answer_logprob, ans.recall))
        assert ans.to_json()["answer_logprob"] == ans.answer_logprob
    dense = engine.ask(store, "d", question, mode="dense-rag", record=False)
    assert dense.recall_score is None
    engine.decision_heads.open_recall_threshold = score + 1e-3
    for mode in ("hmt", "hmt+retrieval"):
        ans = engine.ask(store, "d", question, mode=mode, record=False)
        assert ans.abstained and ans.answer == NOT_IN_DOCUMENT
        assert ans.abstain_reason.startswith("recall score") and ans.to_json()["abstain_reason"] == ans.abstain_reason
    assert not engine.ask(store, "d", question, mode="dense-rag", record=False).abstained
    engine.decision_heads.open_recall_threshold = score - 1e-3
    assert not engine.ask(store, "d", question, mode="hmt", record=False).abstained
    # Closed questions keep their own thresholds: no recall score, never turned away by it.
    engine.decision_heads.open_recall_threshold = score + 10.0
    closed = engine.ask(store, "d", "Did it?", mode="hmt", options=["yes", "no", "maybe"], record=False)
    assert closed.recall_score is None and closed.answer_logprob is None and not closed.abstained


def test_the_reason_never_reads_a_number_below_itself():
    heads = DecisionHeads(open_threshold=0.33897, open_recall_threshold=14.9015)
    assert heads.open_abstains(0.12, None) == "confidence 0.12 is below 0.34"
    # Rounded to 2 decimals both would read 0.34 (and 0.339 at 3): as many as it takes.
    assert heads.open_abstains(0.33882, None) == "confidence 0.3388 is below 0.3390"
    assert heads.open_abstains(0.9, 14.88).startswith("recall score 14.88 is below 14.90: no passage")
    assert heads.open_abstains(0.9, 3.2).startswith("recall score 3.2 is below 14.9: ")
    assert heads.open_abstains(0.9, 15.0) is None


def test_each_mode_abstains_by_its_own_confidence_threshold(tmp_path):
    """A mode fitted on its own answers uses its threshold; the others, the shared one. Thresholds
    per mode are saved, change the answer stamp, and a checkpoint saved before them has none."""
    heads = DecisionHeads(open_threshold=0.34, open_thresholds={"hmt": 0.2})
    assert heads.open_abstains(0.25, None, "hmt") is None
    assert heads.open_abstains(0.15, None, "hmt") == "confidence 0.15 is below 0.20"
    assert heads.open_abstains(0.25, None, "hmt+retrieval") == "confidence 0.25 is below 0.34"
    assert heads.open_abstains(0.25, None) == "confidence 0.25 is below 0.34"
    assert DecisionHeads(open_thresholds={"hmt": 0.2}) and not DecisionHeads(open_thresholds={"hmt": 0.0})
    heads.save(tmp_path)
    loaded = DecisionHeads.load(tmp_path)
    assert loaded.open_thresholds == {"hmt": 0.2} and loaded.digest() == heads.digest()
    assert loaded.digest() != DecisionHeads(open_threshold=0.34).digest()
    body = json.loads((tmp_path / "decision_heads.json").read_text())
    del body["open_thresholds"]
    (tmp_path / "decision_heads.json").write_text(json.dumps(body))
    older = DecisionHeads.load(tmp_path)
    assert older.open_thresholds == {} and older.digest() == DecisionHeads(open_threshold=0.34).digest()


def test_a_score_threshold_that_does_not_separate_means_never_not_zero():
    """Recall scores are logits of any sign: a threshold that does not pay for itself is -inf (None
    in the report), since 0 would turn away every answer scored below 0."""
    from qa_pipeline.decision import fit_threshold

    rng = np.random.default_rng(2)
    same = rng.normal(-5.0, 1.0, 400)
    t, info = fit_threshold(same[:200], np.ones(200, bool), same[200:], never=-np.inf)
    assert t == -np.inf and info["threshold"] is None and not info["useful"]
    assert info["positives_abstained"] == 0.0
    t, info = fit_threshold(same[:200], np.ones(200, bool), same[200:] - 10.0, never=-np.inf)
    assert info["useful"] and t == info["threshold"] < -5.0 and info["negatives_abstained"] == 1.0


def test_a_threshold_that_does_not_separate_is_dropped():
    from qa_pipeline.decision import fit_threshold

    rng = np.random.default_rng(1)
    same = rng.uniform(0.3, 1.0, 400)
    t, info = fit_threshold(same[:200], np.ones(200, bool), same[200:])
    assert t == 0.0 and not info["useful"] and info["positives_abstained"] == 0.0
    assert 0 < info["candidate_threshold"] < 1


def test_open_threshold_alone_keeps_the_closed_heads(tmp_path, monkeypatch):
    """`train-decision --no-closed`: the checkpoint's closed heads and their report stay as they were;
    the open threshold is fitted from open answers given without any threshold."""

    from qa_pipeline import decision_recipe
    from qa_pipeline.engine import Engine, EngineConfig
    from qa_pipeline.qa_data import QARow

    ckpt = _checkpoint_with_head(tmp_path, [0.0, 0.0, 8.0], threshold=0.4)
    heads = DecisionHeads.load(ckpt)
    heads.open_threshold = 1.01  # an old threshold that would turn every answer away
    heads.save(ckpt)
    (ckpt / "decision_training.json").write_text(json.dumps({"pubmedqa": {"chosen": "head"}}))
    before = (ckpt / "decision_heads.safetensors").read_bytes()
    facts = [f"Cohort {i} took drug {chr(65 + i)} and slept {i} hours longer." for i in range(12)]
    rows = [
        QARow(f"q{i}", f"What did cohort {i} take?", document=" ".join(facts[i:] + facts[:i]) * 3,
              answer=f"drug {chr(65 + i)}", evidence=[(0, 30)])
        for i in range(12)
    ]
    monkeypatch.setattr(decision_recipe, "covid_open_rows", lambda root, limit, half: rows[:limit])
    engine = Engine(EngineConfig(backbone="tiny-random", checkpoint=str(ckpt), max_new_tokens=4))
    store = engine.open_store(tmp_path / "store")
    report = decision_recipe.run(
        engine, tmp_path, ckpt, tmp_path / "work", store, open_questions=12, closed=False, open_max_abstain=0.25
    )
    assert report["pubmedqa"] == {"chosen": "head"} and report["open"]["n_positive"] == 12
    assert report["dtype"] == str(engine.model.dtype).removeprefix("torch.") != "auto"  # as resolved here
    saved = DecisionHeads.load(ckpt)
    assert (ckpt / "decision_heads.safetensors").read_bytes() == before
    assert [h.threshold for h in saved.heads.values()] == [0.4]
    # The threshold is the answering mode's own; the shared one stays for modes without their own.
    assert saved.open_thresholds == {"hmt+retrieval": report["open"]["threshold"]}
    assert report["open"]["threshold"] < 1.01 == saved.open_threshold
    assert report["open"]["mode"] == "hmt+retrieval" and report["open_by_mode"] == {"hmt+retrieval": report["open"]}
    # The recall-score threshold is fitted from the same questions (recall only) and saved with it.
    recall = report["open_recall"]
    assert recall["n_positive"] == recall["n_negative"] == 12 and "cross_fitted" in recall
    assert saved.open_recall_threshold == (recall["threshold"] if recall["useful"] else None)
    # ... on the logit of the head that ranks passages (this model has no token head), and each
    # threshold turns away at most the share asked for.
    assert saved.open_recall_signal == recall["recall_signal"] == engine.recall_signal == "passage"
    assert report["open"]["max_abstain"] == recall["max_abstain"] == 0.25
    assert recall["positives_abstained"] <= 0.25 and report["open"]["positives_abstained"] <= 0.25
    assert json.loads((ckpt / "decision_training.json").read_text())["open"] == report["open"]
    # A second mode is fitted on its own answers; the first keeps its threshold and its report.
    first = report["open"]
    report = decision_recipe.run(
        engine, tmp_path, ckpt, tmp_path / "work", store, open_questions=12, open_mode="hmt", closed=False,
        open_max_abstain=0.25,
    )
    saved = DecisionHeads.load(ckpt)
    assert report["open"]["mode"] == "hmt" and report["open_by_mode"] == {"hmt+retrieval": first, "hmt": report["open"]}
    assert saved.open_thresholds == {"hmt+retrieval": first["threshold"], "hmt": report["open"]["threshold"]}
    assert len(list((tmp_path / "work" / "features").glob("open-hmt-*.npz"))) == 1  # its own answers
    with pytest.raises(ValueError, match="nothing to fit"):
        decision_recipe.run(engine, tmp_path, ckpt, tmp_path / "work", store, open_questions=0, closed=False)


def test_cross_fitted_threshold_judges_each_article_by_the_others():
    """Two articles whose answerable questions are unlike in confidence: fitted in-sample, the
    threshold turns away 10% of them; judged by the other article's threshold, one article keeps
    every answer and the other loses every one. The cross-fitted figure must show that."""
    from qa_pipeline.decision import fit_threshold
    from qa_pipeline.decision_recipe import cross_fitted_threshold

    pos = np.concatenate([np.linspace(0.6, 1.0, 50), np.linspace(0.2, 0.55, 50)])
    neg = np.zeros(100)  # every question asked of another article: confidence 0
    f1 = np.ones(100)
    groups = ["a"] * 50 + ["b"] * 50
    _, in_sample = fit_threshold(pos, f1 >= 0.3, neg)
    assert in_sample["positives_abstained"] == pytest.approx(0.1, abs=0.02)
    assert in_sample["auroc"] == 1.0  # every answerable question above every other-article one
    assert fit_threshold(np.array([0.2, 0.6]), np.ones(2, bool), np.array([0.4, 0.6]))[1]["auroc"] == 0.375
    cross = cross_fitted_threshold(pos, f1, neg, groups)
    assert cross["folds"] == 2 and len(cross["thresholds"]) == 2
    # Fold "a" is judged by b's threshold (about 0.24): all kept; fold "b" by a's (about 0.64): none kept.
    assert cross["positives_abstained"] == pytest.approx(0.5)
    assert cross["negatives_abstained"] == 1.0
    assert cross["mean_token_f1"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="negative"):
        cross_fitted_threshold(pos, f1, neg[:10], groups)


def test_open_rows_come_from_one_half_of_the_articles(tmp_path):
    """`--open-half`: the two halves split the COVID-QA articles between them, as recall's split does."""

    from qa_pipeline.decision_recipe import covid_open_rows
    from qa_pipeline.recall_eval import is_train_article

    data = {
        "data": [
            {
                "paragraphs": [
                    {
                        "document_id": k,
                        "context": f"Article {k} says the answer is value {k}.",
                        "qas": [
                            {"id": 10 * k + j, "question": f"Q{j} of {k}?",
                             "answers": [{"text": f"value {k}", "answer_start": 25 + len(str(k))}]}
                            for j in range(2)
                        ],
                    }
                ]
            }
            for k in range(12)
        ]
    }
    (tmp_path / "covid-qa").mkdir()
    (tmp_path / "covid-qa" / "covidqa_dev.json").write_text(json.dumps(data))
    train = covid_open_rows(tmp_path, 100, "training")
    evaluation = covid_open_rows(tmp_path, 100, "evaluation")
    assert len(train) + len(evaluation) == 24 and train and evaluation
    assert all(is_train_article(r.document_id()) for r in train)
    assert not any(is_train_article(r.document_id()) for r in evaluation)
    # Spread over articles: a limit takes each article's first question before any second one.
    assert len({r.document_id() for r in covid_open_rows(tmp_path, 3, "evaluation")}) == 3
    with pytest.raises(ValueError, match="unknown half"):
        covid_open_rows(tmp_path, 3, "test")


def test_the_answer_stamp_follows_heads_thresholds_and_settings(tmp_path):
    """Batch files are stamped with what the answers depend on: the same model and settings give the
    same stamp in another process; a new threshold, head or setting gives another."""
    from qa_pipeline.engine import Engine, EngineConfig

    ckpt = _checkpoint_with_head(tmp_path, [0.0, 0.0, 8.0])
    config = EngineConfig(backbone="tiny-random", checkpoint=str(ckpt))
    engine = Engine(config)
    stamp = engine.answer_stamp
    assert Engine(config).answer_stamp == stamp
    engine.decision_heads.open_threshold = 0.3
    assert engine.answer_stamp != stamp
    engine.decision_heads = DecisionHeads.load(ckpt)
    engine.decision_heads.open_recall_threshold = -2.0
    assert engine.answer_stamp != stamp
    engine.decision_heads = DecisionHeads.load(ckpt)
    assert engine.answer_stamp == stamp
    next(iter(engine.decision_heads.heads.values())).bias[2] = 7.0
    assert engine.answer_stamp != stamp
    assert Engine(EngineConfig(backbone="tiny-random", checkpoint=str(ckpt), max_new_tokens=9)).answer_stamp != stamp
    # The dtype counts as resolved: "auto" answers as the dtype it resolves to does, and stamps alike.
    resolved = str(engine.model.dtype).replace("torch.", "")
    assert config.dtype == "auto"
    assert Engine(EngineConfig(backbone="tiny-random", checkpoint=str(ckpt), dtype=resolved)).answer_stamp == stamp
    other = "float32" if resolved == "bfloat16" else "bfloat16"
    assert Engine(EngineConfig(backbone="tiny-random", checkpoint=str(ckpt), dtype=other)).answer_stamp != stamp
