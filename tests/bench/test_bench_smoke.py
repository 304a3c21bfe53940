"""Smoke tests of the benchmark scripts on tiny inputs (the real runs are `python -m bench.<name>`)."""

import json

import pytest
import torch

from bench import common, faiss_scale, ingest_speed, memory_scale, run_all
from hmt import HMTConfig, HMTModel
from tests.tiny import VOCAB, tiny_backbone

L, K = 16, 4


def tiny_model():
    backbone = tiny_backbone("llama")
    return backbone, HMTModel(backbone, HMTConfig(segment_length=L, sensory_length=K, num_cached=8)).eval()


def ids(length):
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(0))


def test_paired_blocks_and_model_ratio():
    backbone, model = tiny_model()
    x = ids(6 * L)
    pairs = ingest_speed.paired_blocks(model, backbone, x, block_segments=2, repeats=2, device="cpu")
    assert len(pairs) == 6  # 3 blocks x 2 repeats
    assert all(p["hmt_wall"] > 0 and p["backbone_wall"] > 0 for p in pairs)
    macs = ingest_speed.mac_model(backbone, model.config, x.shape[1])
    assert 0 < macs["model_ratio"] < 2


def test_profile_accounts_for_the_time_and_unpatches():
    _, model = tiny_model()
    prof = ingest_speed.profile_hmt(model, ids(4 * L), block=2, device="cpu")
    shares = sum(prof[f"{k}_share"] for k in ("summary", "main", "recall", "step_other", "outside"))
    assert shares == pytest.approx(1.0, abs=1e-6)
    assert prof["summary_s"] > 0 and prof["main_s"] > 0
    # The wrappers live on the instance only and must be gone afterwards.
    for name in ("summarize", "_segment_step", "_run_backbone"):
        assert name not in vars(model)
    assert "forward" not in vars(model.recall)


def test_eager_summary_switch_is_reversible_and_exact():
    _, model = tiny_model()
    config = model._causal_lm().config
    before = config._attn_implementation
    x = ids(3 * L)
    with torch.inference_mode():
        plain = model.summarize(x)
        with ingest_speed.summary_attention(model, "eager"):
            eager = model.summarize(x)
    assert config._attn_implementation == before
    assert "_summary_pass" not in vars(model)
    torch.testing.assert_close(plain, eager, rtol=1e-4, atol=1e-4)


def test_interleaved_and_tables(tmp_path, capsys):
    times = common.interleaved({"a": lambda: None, "b": lambda: None}, repeats=3)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    common.print_table([{"x": 1.5, "y": None}], [("x", "X", ".2f"), ("y", "Y", "s")], title="t")
    assert "1.50" in capsys.readouterr().out
    path = common.write_results("demo", {"v": torch.tensor(2.0)}, tmp_path / "demo.json")
    assert json.loads(path.read_text()) == {"v": 2.0}


def test_token_source_falls_back_to_synthetic(tmp_path):
    class Tok:
        vocab_size = 1000

    x, source = common.text_token_ids(Tok(), 50, tmp_path / "missing")
    assert x.shape == (1, 50) and int(x.max()) < 1000
    assert "synthetic" in source


def test_machine_info_fields():
    info = common.machine_info(device="cpu", dtype="float32", threads=1)
    for key in ("cpu_model", "logical_cores", "torch_version", "torch_threads", "dtype", "date"):
        assert key in info


def test_faiss_scale_small(tmp_path):
    out = tmp_path / "faiss.json"
    argv = ["--sizes", "300", "2000", "--exact-limit", "1000", "--dim", "16", "--queries", "8"]
    assert faiss_scale.main([*argv, "--clusters", "20", "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["index"] for r in rows] == ["IndexFlatIP", "IndexHNSWFlat"]
    assert rows[0]["recall_at_k"] == pytest.approx(1.0)
    assert 0.0 <= rows[1]["recall_at_k"] <= 1.0


def test_memory_scale_token_blocks_and_summary():
    blocks = list(memory_scale.token_blocks(None, 100, 10, 4))
    assert [len(b) for b in blocks] == [4, 4, 2]
    cyclic = list(memory_scale.token_blocks(torch.arange(3).numpy(), 100, 7, 4))
    assert [b.tolist() for b in cyclic] == [[0, 1, 2, 0], [1, 2, 0]]
    rows = [
        {"mode": "hmt", "tokens": 4096, "ingest_peak_rss_mb": 100.0},
        {"mode": "hmt", "tokens": 1_048_576, "ingest_peak_rss_mb": 110.0},
        {"mode": "backbone", "tokens": 4096, "ingest_peak_rss_mb": 300.0},
    ]
    summary = memory_scale.summarise(rows)["hmt"]
    assert summary["growth"] == pytest.approx(1.1) and summary["meets_target"]
    assert summary["target_checked_at_1M"]
    assert rows[2]["vs_smallest_hmt"] == pytest.approx(3.0)


def test_run_all_lists_modules_that_exist():
    import importlib

    for name in run_all.BENCHMARKS:
        assert hasattr(importlib.import_module(f"bench.{name}"), "main")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_final_position_backbone_matches_full_pass(family):
    backbone = tiny_backbone(family)
    # Only the paper's recall reads one position per pass; recall "content" pools every position.
    model = HMTModel(backbone, HMTConfig(segment_length=L, sensory_length=K, num_cached=8, recall="paper")).eval()
    assert ingest_speed.final_position_backbone(HMTModel(backbone, HMTConfig(segment_length=L, sensory_length=K))) is None
    x = torch.randint(0, VOCAB, (2, 3 * L + 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(x)
    mask[1, 2 * L + 3 :] = 0  # right padding in one row
    trimmed = ingest_speed.final_position_backbone(model)
    assert trimmed is not None
    with torch.inference_mode():
        full = model(x, mask, return_logits=False, return_records=True).records
        with ingest_speed.patched_run_backbone(model, trimmed):
            fast = model(x, mask, return_logits=False, return_records=True).records
    assert "_run_backbone" not in vars(model)
    for a, b in zip(full, fast, strict=True):
        torch.testing.assert_close(a.summary, b.summary, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.memory, b.memory, rtol=1e-5, atol=1e-5)


def test_final_position_backbone_declines_other_families():
    model = HMTModel(tiny_backbone("gpt2"), HMTConfig(segment_length=L, sensory_length=K))
    assert ingest_speed.final_position_backbone(model) is None


def test_quick_results_never_overwrite_full_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    assert common.write_results("x", {"settings": {"quick": True}}).name == "x_quick.json"
    assert common.write_results("x", {"quick": True}).name == "x_quick.json"
    assert common.write_results("x", {"settings": {"quick": False}}).name == "x.json"
    assert common.write_results("x", {}, quick=True).name == "x_quick.json"
    assert common.write_results("x", {"quick": True}, tmp_path / "given.json").name == "given.json"


def test_not_in_document_cuts_the_answers_sentences_and_nothing_else():
    from bench.not_in_document import cut_answer

    text = "Intro here. The dose was 100 mg daily. Patients improved. Later, 100 mg daily was kept. End."
    start = text.index("The dose")
    cut = cut_answer(text, [(start + 4, start + 8)], "100 mg daily")
    # The sentence holding the evidence and the other one naming the answer are gone; the rest stays.
    assert cut == "Intro here. Patients improved. End."
    # An answer too short to search for ("UK") cuts only the evidence's sentence.
    assert cut_answer("In the UK. The UK trial. Done.", [(0, 5)], "UK").strip() == "The UK trial. Done."


def test_not_in_document_summary_separates_by_signal():
    from bench.not_in_document import summary_table

    def rows(scores, abstained):
        return [
            {"recall_score": s, "confidence": 0.5, "grounding": -s, "abstained": a, "token_f1": 0.0}
            for s, a in zip(scores, abstained, strict=True)
        ]

    asked = {
        "answerable": rows([20.0, 18.0, 16.0, 9.0], [False, False, False, True]),
        "other article": rows([5.0, 6.0, 7.0, 12.0], [True, True, True, False]),
    }
    answerable, other = summary_table(asked, threshold=10.0)
    assert answerable["abstained"] == 0.25 and answerable["below_recall_threshold"] == 0.25
    assert "auroc_recall_score" not in answerable
    assert other["abstained"] == 0.75 and other["median_recall_score"] == 6.5
    assert other["auroc_recall_score"] == pytest.approx(15 / 16)  # pairs where answerable scores higher
    assert other["auroc_confidence"] == 0.5 and other["auroc_grounding"] == pytest.approx(1 / 16)
    lo, hi = other["auroc_recall_score_ci"]
    assert 0 <= lo <= other["auroc_recall_score"] <= hi <= 1
