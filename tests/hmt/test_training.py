"""Training: a step lowers the loss, checkpoints resume, torchrun ranks stay in sync."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hmt import HMTConfig, HMTModel
from hmt.training import TrainConfig, batch_loss, batches, prepare_model, train
from tests.tiny import VOCAB, tiny_backbone

REPO = Path(__file__).resolve().parents[2]


def samples(n=6, length=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, VOCAB, (n, length), generator=g).tolist()]


def model():
    return HMTModel(tiny_backbone(), HMTConfig(segment_length=16, sensory_length=4, num_cached=8))


def test_training_lowers_loss_on_repeated_data(tmp_path):
    m = model()
    data = samples(2)
    summary = train(m, data, TrainConfig(steps=30, lr=3e-3, trainable="all", out_dir=str(tmp_path)), progress=False)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(log) == 30 and {"loss", "lr", "tokens_per_s"} <= set(log[0])
    assert log[-1]["loss"] < log[0]["loss"] - 0.5
    assert summary["step"] == 30


def test_stage1_trains_no_recall_parameters(tmp_path):
    m = model()
    before = m.recall.w_q.weight.detach().clone()
    train(m, samples(2), TrainConfig(stage=1, steps=2, lr=1e-2, out_dir=str(tmp_path)), progress=False)
    assert torch.equal(m.recall.w_q.weight, before)
    assert m.config.use_recall is False


def test_hmt_only_training_leaves_backbone_frozen(tmp_path):
    m = model()
    before = [p.detach().clone() for p in m.backbone.parameters()]
    mi = m.memory_init.detach().clone()
    train(m, samples(2), TrainConfig(steps=2, lr=1e-2, trainable="hmt", out_dir=str(tmp_path)), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, m.backbone.parameters(), strict=True))
    assert not torch.equal(mi, m.memory_init)


def test_lora_wraps_backbone_and_trains_adapters_only(tmp_path):
    m = prepare_model(model(), TrainConfig(trainable="lora", out_dir=str(tmp_path)))
    trainable = [n for n, p in m.backbone.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_resume_continues_from_checkpoint(tmp_path):
    cfg = TrainConfig(steps=4, lr=1e-2, save_every=2, out_dir=str(tmp_path))
    first = model()
    train(first, samples(), cfg, progress=False)
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 4
    again = model()
    summary = train(again, samples(), TrainConfig(steps=6, lr=1e-2, out_dir=str(tmp_path)), progress=False)
    log = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5, 6] and summary["step"] == 6


def test_recall_loss_is_logged(tmp_path):
    m = model()
    g = torch.Generator().manual_seed(1)
    ctx = torch.randint(0, VOCAB, (64,), generator=g).tolist()
    sample = {"context_ids": ctx, "input_ids": ctx[:8], "labels": ctx[:8], "evidence_segments": [1]}
    train(m, [sample], TrainConfig(steps=1, recall_loss_weight=1.0, out_dir=str(tmp_path)), progress=False)
    log = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert log["recall_loss"] > 0 and "recall_hit" in log


def test_max_minutes_stops_early_and_saves(tmp_path):
    cfg = TrainConfig(steps=50, lr=1e-2, max_minutes=1e-6, out_dir=str(tmp_path))
    summary = train(model(), samples(), cfg, progress=False)
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert summary["stopped_early"] and state["step"] < 50


def test_answer_does_not_leak_into_the_recall_query():
    """With query_length, the question segment's recall is what it is at answer time (question only)."""
    m = model().eval()
    g = torch.Generator().manual_seed(2)
    ctx = torch.randint(0, VOCAB, (1, 48), generator=g)
    question = torch.randint(0, VOCAB, (1, 5), generator=g)
    answer = torch.randint(0, VOCAB, (1, 6), generator=g)
    with torch.no_grad():
        state = m(ctx, return_logits=False).memory_state
        _, at_answer_time, _ = m.query_recall(question, state)
        ids = torch.cat([question, answer], dim=1)
        mask = torch.ones_like(ids)
        mask[:, 5:] = 0
        masked = m(ids, memory_state=state, return_records=True, summary_mask=mask).records[0].recall_weights
        leaked = m(ids, memory_state=state, return_records=True).records[0].recall_weights
    torch.testing.assert_close(masked, at_answer_time)
    assert not torch.allclose(leaked, at_answer_time)


def qa_sample(g, context_len, prompt_len, answer_len, evidence):
    ctx = torch.randint(0, VOCAB, (context_len,), generator=g).tolist()
    ids = torch.randint(0, VOCAB, (prompt_len + answer_len,), generator=g).tolist()
    labels = [-100] * prompt_len + ids[prompt_len:]
    return {"context_ids": ctx, "input_ids": ids, "labels": labels, "query_length": prompt_len,
            "evidence_segments": evidence}


def test_batched_loss_equals_one_sample_at_a_time():
    """Right-padded batches (contexts of other lengths, padded whole segments) change nothing."""
    m = prepare_model(model(), TrainConfig(stage=2, out_dir="unused")).eval()
    g = torch.Generator().manual_seed(3)
    group = [qa_sample(g, 70, 5, 9, [1]), qa_sample(g, 23, 7, 20, [0]), qa_sample(g, 48, 4, 6, [2])]
    with torch.no_grad():
        loss, stats = batch_loss(m, group, recall_loss_weight=1.0)
        singles = [batch_loss(m, [s], recall_loss_weight=1.0) for s in group]
    counts = [sum(x != -100 for x in s["labels"][1:]) for s in group]
    lm = [st["lm_loss"] for _, st in singles]
    recall = [st["recall_loss"] for _, st in singles]
    assert stats["lm_loss"] == pytest.approx(sum(a * n for a, n in zip(lm, counts, strict=True)) / sum(counts), rel=1e-4)
    assert stats["recall_loss"] == pytest.approx(sum(recall) / 3, rel=1e-4)
    assert stats["recall_hit"] == pytest.approx(sum(st["recall_hit"] for _, st in singles) / 3)


def test_batches_keep_kinds_apart():
    data = [{"input_ids": [1]}, {"context_ids": [1], "input_ids": [1]}, {"input_ids": [1]}, {"context_ids": [2], "input_ids": [1]}, {"input_ids": [3]}]
    assert batches(data, [0, 1, 2, 3, 4], 2) == [[0, 2], [1, 3], [4]]
    assert batches(data, [4, 3, 2, 1, 0], 1) == [[4], [3], [2], [1], [0]]


def test_batched_training_runs(tmp_path):
    g = torch.Generator().manual_seed(4)
    data = [qa_sample(g, 40 + 9 * i, 5, 8, [1]) for i in range(4)] + samples(4)
    cfg = TrainConfig(steps=2, batch_size=3, recall_loss_weight=1.0, out_dir=str(tmp_path))
    summary = train(model(), data, cfg, progress=False)
    assert summary["step"] == 2 and summary["loss"] > 0


def test_bad_train_config_names_the_field():
    with pytest.raises(ValueError, match="trainable"):
        TrainConfig(trainable="some")
    with pytest.raises(ValueError, match="max_minutes"):
        TrainConfig(max_minutes=0)


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="no torchrun")
def test_torchrun_two_ranks_disjoint_data_identical_parameters(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:  # a free port for the rendezvous (torchrun's port 0 hangs)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [torchrun, "--nproc_per_node=2", f"--master_port={port}", "--master_addr=127.0.0.1", str(REPO / "tests/hmt/ddp_worker.py"), str(tmp_path)],
        env=env, cwd=REPO, timeout=240, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    assert ranks[0]["seen"] and ranks[1]["seen"]
    assert not set(ranks[0]["seen"]) & set(ranks[1]["seen"])
    assert ranks[0]["params"] == ranks[1]["params"]
