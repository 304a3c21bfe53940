"""`hmtqa train` and `hmtqa eval` end to end on the tiny model and a small synthetic data folder."""

import json
import random

import pytest

from hmtqa.main import main
from qa_pipeline.train_data import PUBMEDQA, PUBMEDQA_TRAIN


@pytest.fixture
def data_dir(tmp_path):
    rng = random.Random(0)
    words = "cell dose trial patient risk outcome protein gene therapy cohort blood sample".split()

    def text(n):
        return "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(n))

    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw/wiki.test.raw").write_text(text(400))
    (tmp_path / "pg19").mkdir()
    (tmp_path / "pg19/pg1342_pride_and_prejudice.txt").write_text(text(400))
    (tmp_path / "pubmedqa").mkdir()
    data = {
        str(1000 + i): {
            "QUESTION": f"Does {rng.choice(words)} change {rng.choice(words)}?",
            "CONTEXTS": [text(2), text(2)],
            "LABELS": ["BACKGROUND", "RESULTS"],
            "final_decision": rng.choice(["yes", "no", "maybe"]),
            "LONG_ANSWER": text(1),
        }
        for i in range(PUBMEDQA_TRAIN + 5)
    }
    (tmp_path / PUBMEDQA).write_text(json.dumps(data))
    return tmp_path


def test_train_then_eval_on_tiny_model(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main([
        "train", "--backbone", "tiny-random", "--data-dir", str(data_dir), "--out", str(out),
        "--segment-length", "64", "--sensory-length", "8", "--stage1-steps", "2", "--stage2-steps", "2",
        "--fuse", "2", "--max-lm-samples", "4", "--max-qa-samples", "4", "--qa-repeats", "2", "--no-bf16",
        "--device", "cpu", "--max-minutes", "30", "--json",
    ])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["stage1"]["step"] == 2 and result["stage2"]["step"] == 2
    assert not result["stage2"]["stopped_early"]
    assert result["stage2_samples"]["qa"] == 8  # 4 questions, each fused twice with other distractors
    assert (out / "final" / "hmt.safetensors").is_file() and (out / "final" / "adapter").is_dir()
    assert (out / "stage1" / "config.json").is_file()
    logs = (out / "stage2-run" / "log.jsonl").read_text().splitlines()
    assert len(logs) == 2 and "recall_loss" in json.loads(logs[-1])

    rc = main([
        "eval", "ppl", "--backbone", "tiny-random", "--checkpoint", str(out / "final"), "--data-dir", str(data_dir),
        "--contexts", "128,256", "--modes", "none,window,rmt,hmt,full", "--dtype", "float32", "--json",
    ])
    assert rc == 0
    table = json.loads(capsys.readouterr().out)["ppl"]
    assert set(table) == {"none", "window", "rmt", "hmt", "full"}
    assert all(v is not None and v > 1 for row in table.values() for v in row.values())


def test_qa_repeats_draw_other_distractors(data_dir):
    from qa_pipeline.train_data import pubmedqa_split

    first, _ = pubmedqa_split(data_dir, num_docs=3, seed=0)
    again, _ = pubmedqa_split(data_dir, num_docs=3, seed=100_000)
    assert [r.question for r in first] == [r.question for r in again]
    assert sum(a.load_document() != b.load_document() for a, b in zip(first, again, strict=True)) > len(first) // 2


def test_qa_samples_mark_the_question_for_the_recall_query(data_dir):
    from hmt import load_backbone
    from qa_pipeline.train_data import pubmedqa_split, qa_samples

    _, tokenizer = load_backbone("tiny-random")
    rows, _ = pubmedqa_split(data_dir, num_docs=2)
    sample = qa_samples(rows[:1], tokenizer, segment_length=64)[0]
    q = sample["query_length"]
    assert 0 < q < len(sample["input_ids"])
    assert set(sample["labels"][:q]) == {-100} and sample["labels"][q] != -100


def test_train_without_data_is_a_clear_error(tmp_path, capsys):
    rc = main(["train", "--backbone", "tiny-random", "--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "r")])
    assert rc == 2
    assert "data folder" in capsys.readouterr().err


def test_train_recall_passage_head_keeps_the_base_whole(tmp_path, capsys):
    """`hmtqa train-recall --head passages` (features already cached): the checkpoint gains a passage
    head trained on passage features; the segment recall, T, M_init and the base's other files stay."""
    import torch

    from hmt import HMTConfig, HMTModel, load_backbone
    from qa_pipeline.recall_data import RecallDoc, extract_features
    from qa_pipeline.recall_recipe import passage_model

    backbone, tok = load_backbone("tiny-random", dtype="float32")
    base = HMTModel(backbone, HMTConfig(segment_length=32, sensory_length=4))
    base.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "decision_heads.json").write_text("{}")  # a file the base brings along
    rng = random.Random(0)
    words = "cell dose trial patient risk outcome protein gene therapy cohort blood sample".split()
    docs = []
    for d in range(6):
        text = " ".join(" ".join(rng.choice(words) for _ in range(10)) + "." for _ in range(20))
        starts = [i for i, c in enumerate(text) if c == "."][::4]
        docs.append(RecallDoc(f"d{d}", text, group=f"g{d}", queries=[
            (text[max(0, s - 40) : s], [(max(0, s - 40), s)], "question") for s in starts
        ]))
    out = tmp_path / "run"
    extract_features(passage_model(base).eval(), tok, docs, passage_length=16).save(out / "features")
    rc = main([
        "train-recall", "--head", "passages", "--base", str(tmp_path / "base"), "--backbone", "tiny-random",
        "--out", str(out), "--passage-tokens", "16", "--steps", "30", "--val-share", "0.34", "--dtype", "float32",
        "--json",
    ])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["features_reused"] and summary["val_queries"] > 0
    assert summary["recipe"]["dtype"] == "float32" and summary["feature_dtype"] == "float32"
    assert set(summary["val_before"]) == {"hit@1", "hit@5", "mrr", "n"}
    final = out / "final"
    assert (final / "passage_training.json").is_file() and (final / "decision_heads.json").read_text() == "{}"
    trained = HMTModel.from_pretrained(final, backbone=load_backbone("tiny-random", dtype="float32")[0])
    assert trained.config.passage_recall and trained.passage_head is trained.passage_recall
    for name, value in base.hmt_state_dict().items():
        assert torch.equal(trained.hmt_state_dict()[name], value), name  # the segment side is the base's
    assert not torch.equal(trained.passage_recall.w_q.weight, trained.recall.w_q.weight)


def test_train_recall_token_head_reads_fits_and_keeps_the_base(tmp_path, capsys, monkeypatch):
    """`hmtqa train-recall --head tokens`: token features are read (then reused), the head is fitted,
    and the checkpoint is the base plus a late-interaction head; the base's other files come along."""
    import torch

    from hmt import HMTConfig, HMTModel, load_backbone
    from qa_pipeline import recall_recipe
    from qa_pipeline.recall_data import RecallDoc
    from qa_pipeline.token_recall_data import TokenFeatures

    backbone, _ = load_backbone("tiny-random", dtype="float32")
    base = HMTModel(backbone, HMTConfig(segment_length=32, sensory_length=4))
    base.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "decision_heads.json").write_text("{}")
    rng = random.Random(0)
    words = "cell dose trial patient risk outcome protein gene therapy cohort blood sample".split()
    docs = []
    for d in range(6):
        text = " ".join(" ".join(rng.choice(words) for _ in range(10)) + "." for _ in range(12))
        starts = [i for i, c in enumerate(text) if c == "."][::3]
        docs.append(RecallDoc(f"covidqa-d{d}", text, group=f"g{d}", queries=[
            (text[max(0, s - 40) : s], [(max(0, s - 40), s)], "question") for s in starts
        ]))
    monkeypatch.setattr(recall_recipe, "_training_docs", lambda recipe: docs)
    out = tmp_path / "run"
    args = ["train-recall", "--head", "tokens", "--base", str(tmp_path / "base"), "--backbone", "tiny-random",
            "--out", str(out), "--passage-tokens", "16", "--token-dim", "8", "--steps", "20", "--batch-size", "8",
            "--val-share", "0.34", "--dtype", "float32", "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert not summary["features_reused"] and summary["documents"] == 6 and summary["val_queries"] > 0
    assert set(summary["val_after"]) == {"hit@1", "hit@5", "mrr", "n"} and summary["feature_dtype"] == "float32"
    features = TokenFeatures.load(out / "token_features")
    assert features.width == 16 and features.doc_offsets[-1] == features.doc_ids.shape[0] == features.doc_states.shape[0]
    final = out / "final"
    assert (final / "token_recall_training.json").is_file() and (final / "decision_heads.json").read_text() == "{}"
    trained = HMTModel.from_pretrained(final, backbone=load_backbone("tiny-random", dtype="float32")[0])
    assert trained.config.token_recall_dim == 8
    assert trained.token_recall.w_weight.weight.abs().sum() > 0  # the question-token weights were fitted
    again = recall_recipe.token_model(trained, 8)  # a base with a token head: the next fit starts afresh
    assert not again.token_recall.w_weight.weight.any() and not again.token_recall.w_h.weight.any()
    for name, value in base.hmt_state_dict().items():
        assert torch.equal(trained.hmt_state_dict()[name], value), name
    assert main(args) == 0  # again: the cached token features are reused
    assert json.loads(capsys.readouterr().out)["features_reused"]
    assert main([*args[:-1], "--passage-tokens", "8", "--json"]) == 2  # cached for another width
    assert "passages of 16 tokens" in capsys.readouterr().err


def test_train_recall_refuses_unknown_sources(tmp_path, capsys):
    assert main(["train-recall", "--sources", "covidqa,wikipedia", "--out", str(tmp_path / "r")]) == 2
    assert "unknown" in capsys.readouterr().err


def test_train_decision_summary_names_the_mode_and_a_threshold_it_dropped():
    """A confidence that does not tell own from other article gets no threshold: the summary says
    "none (never abstain)", not "threshold 0.000", and names the mode whose answers it was fitted on."""
    from hmtqa.main import _open_summary

    report = {
        "threshold": 0.0, "useful": False, "candidate_threshold": 0.31, "max_abstain": 0.05,
        "positives_abstained": 0.0, "negatives_abstained": 0.0, "negatives_below_candidate": 0.07,
        "auroc": 0.54, "n_positive": 150, "mode": "hmt", "half": "evaluation", "mean_token_f1": 0.24,
    }
    line = _open_summary(report)
    assert "open answers in mode hmt, confidence: threshold none (never abstain) (150 questions" in line
    assert "0.000" not in line and "AUROC, own vs other article: 0.54" in line
    kept = _open_summary({**report, "threshold": 0.339, "useful": True, "positives_abstained": 0.05})
    assert "confidence: threshold 0.339 (" in kept and "5% of them turned away" in kept
