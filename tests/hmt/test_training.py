"""Training: a step lowers the loss, checkpoints resume, torchrun ranks stay in sync."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hmt import HMTConfig, HMTModel, training
from hmt.training import TrainConfig, batch_loss, batches, prepare_model, train
from tests.tiny import VOCAB, tiny_backbone

REPO = Path(__file__).resolve().parents[2]


def samples(n=6, length=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": ids, "labels": ids}
        for ids in torch.randint(0, VOCAB, (n, length), generator=g).tolist()
    ]


def model():
    return HMTModel(tiny_backbone(), HMTConfig(segment_length=16, sensory_length=4, num_cached=8))


def copy_samples(n=4, seed=0):
    """The answer sits in the first of two context segments and nowhere else: the samples differ in
    that segment only, and the question segment's window (the last k filler tokens) is the same."""
    g = torch.Generator().manual_seed(seed)
    answers = torch.randperm(VOCAB, generator=g)[:n].tolist()
    filler = torch.randint(0, VOCAB, (16,), generator=g).tolist()
    question = torch.randint(0, VOCAB, (8,), generator=g).tolist()
    return [
        {"context_ids": [a] * 16 + filler, "input_ids": question, "labels": [-100] + [a] * 7} for a in answers
    ]


@pytest.mark.parametrize("mode", ["hmt", "window"])
def test_memory_training_copies_an_answer_no_window_can_see(tmp_path, monkeypatch, mode):
    """Without memory the question segment looks the same in all 4 samples, so no model can beat
    ln 4 on them (the best constant guess: 1/4 on each answer). Training the HMT parameters with the
    transformer body frozen must take the loss clearly below that, and the same training with memory
    off (mode "window") must not.

    The output layer trains too: the random tiny backbone's logits stay within about +-1.7 (RMS-normed
    states times LM-head rows of norm <= 0.21), so with it frozen even a perfect memory could not
    bring a 128-way loss under about 1.8 > ln 4.
    """
    prepare = training.prepare_model

    def prepare_with(model, cfg):
        model = prepare(model, cfg)
        model.config = model.config.replace(mode=mode)
        for p in model.backbone.get_output_embeddings().parameters():
            p.requires_grad_(True)
        return model

    monkeypatch.setattr(training, "prepare_model", prepare_with)
    m = model()
    body = [p.detach().clone() for p in m.backbone.model.parameters()]
    cfg = TrainConfig(steps=60, lr=1e-2, batch_size=4, grad_accum=1, trainable="hmt", out_dir=str(tmp_path))
    summary = train(m, copy_samples(), cfg, progress=False)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [p["step"] for p in log] == list(range(1, 61)) and summary["step"] == 60
    assert {"loss", "lr", "tokens_per_s"} <= set(log[0])
    assert log[0]["loss"] > 4.5  # about ln 128: the answer is not known at the start
    assert all(torch.equal(a, b) for a, b in zip(body, m.backbone.model.parameters(), strict=True))
    if mode == "hmt":
        assert log[-1]["loss"] < 0.5 * math.log(4)
    else:
        assert log[-1]["loss"] > math.log(4) - 0.01


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
    train(
        m, samples(2), TrainConfig(steps=2, lr=1e-2, trainable="hmt", out_dir=str(tmp_path)), progress=False
    )
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


def test_recall_loss_is_the_cross_entropy_against_the_evidence(tmp_path):
    """A zero W_q makes recall uniform over each sample's valid memories: 1/3 over 3 segments for the
    first sample, 1/2 over the 2 real ones of the second (its third is padding). With evidence [1, 2]
    and [1] the logged loss is (ln 3 + ln 2) / 2."""
    m = model()
    with torch.no_grad():
        m.recall.w_q.weight.zero_()
        m.recall.w_q.bias.zero_()
    g = torch.Generator().manual_seed(1)
    question = torch.randint(0, VOCAB, (8,), generator=g).tolist()
    data = [
        {
            "context_ids": torch.randint(0, VOCAB, (n,), generator=g).tolist(),
            "input_ids": question,
            "labels": question,
            "evidence_segments": evidence,
        }
        for n, evidence in ((48, [1, 2]), (27, [1]))
    ]
    cfg = TrainConfig(steps=1, batch_size=2, recall_loss_weight=1.0, out_dir=str(tmp_path))
    train(m, data, cfg, progress=False)
    log = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert log["recall_loss"] == pytest.approx((math.log(3) + math.log(2)) / 2, abs=1e-5)
    assert "recall_hit" in log


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
    return {
        "context_ids": ctx,
        "input_ids": ids,
        "labels": labels,
        "query_length": prompt_len,
        "evidence_segments": evidence,
    }


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
    assert stats["lm_loss"] == pytest.approx(
        sum(a * n for a, n in zip(lm, counts, strict=True)) / sum(counts), rel=1e-4
    )
    assert stats["recall_loss"] == pytest.approx(sum(recall) / 3, rel=1e-4)
    assert stats["recall_hit"] == pytest.approx(sum(st["recall_hit"] for _, st in singles) / 3)


def test_batches_keep_kinds_apart():
    data = [
        {"input_ids": [1]},
        {"context_ids": [1], "input_ids": [1]},
        {"input_ids": [1]},
        {"context_ids": [2], "input_ids": [1]},
        {"input_ids": [3]},
    ]
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


@pytest.mark.skipif(
    shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="no torchrun"
)
def test_torchrun_two_ranks_disjoint_data_identical_parameters(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:  # a free port for the rendezvous (torchrun's port 0 hangs)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [
            torchrun,
            "--nproc_per_node=2",
            f"--master_port={port}",
            "--master_addr=127.0.0.1",
            str(REPO / "tests/hmt/ddp_worker.py"),
            str(tmp_path),
        ],
        env=env,
        cwd=REPO,
        timeout=240,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    assert ranks[0]["seen"] and ranks[1]["seen"]
    assert not set(ranks[0]["seen"]) & set(ranks[1]["seen"])
    assert ranks[0]["params"] == ranks[1]["params"]
