"""Properties of the HMT wrapper on tiny random backbones (CPU, no downloads)."""

import math

import pytest
import torch
from torch.testing import assert_close

from hmt import HMTConfig, HMTModel
from tests.tiny import VOCAB, WIDTH, tiny_backbone

L, K = 16, 4


def make(mode="hmt", family="llama", **kw):
    cfg = HMTConfig(segment_length=L, sensory_length=K, num_cached=8, mode=mode, **kw)
    return HMTModel(tiny_backbone(family), cfg).eval()


def ids(batch=1, length=5 * L, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_mode_none_single_segment_equals_backbone(family):
    model = make("none", family)
    x = ids(2, L)
    with torch.no_grad():
        ours = model(x).logits
        plain = model.backbone(input_ids=x).logits
    assert_close(ours, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("mode", ["hmt", "rmt", "window", "none"])
def test_causality_across_segments(family, mode):
    model = make(mode, family)
    x = ids(1, 4 * L)
    y = x.clone()
    y[:, 2 * L :] = (y[:, 2 * L :] + 7) % VOCAB  # change segments 2 and 3
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    assert_close(a[:, : 2 * L], b[:, : 2 * L])
    assert not torch.allclose(a[:, 2 * L :], b[:, 2 * L :])


@pytest.mark.parametrize("mode,carries", [("hmt", True), ("rmt", True), ("window", False), ("none", False)])
def test_memory_carries_information_past_sensory_window(mode, carries):
    model = make(mode)
    x = ids(1, 6 * L)
    y = x.clone()
    y[:, :L] = (y[:, :L] + 3) % VOCAB  # only segment 0 differs; segment 5 is far past k tokens
    with torch.no_grad():
        a, b = model(x).logits[:, 5 * L :], model(y).logits[:, 5 * L :]
    assert (not torch.allclose(a, b, atol=1e-6)) == carries


def _recall_by_hand(recall, summary, sources, memories, valid):
    """One sequence's recall written out from the recall's parameters: float64, a loop over the
    memories, softmax as exp / sum. Returns (P, weights) as float64."""
    wq, wk = recall.w_q.weight.detach().double(), recall.w_k.weight.detach().double()
    content = recall.kind == "content"

    def project(w, b, x):
        y = torch.stack([sum(w[r, c] * x[c] for c in range(x.shape[0])) for r in range(w.shape[0])])
        if content:
            y = y + b.detach().double()
            y = y / math.sqrt(sum(float(v) ** 2 for v in y))
        return y

    scale = math.exp(recall.log_scale.item()) if content else 1 / math.sqrt(wq.shape[0])
    q = project(wq, recall.w_q.bias, summary.double())
    scores = [
        scale * float(sum(q[h] * k[h] for h in range(q.shape[0])))
        for k in (project(wk, recall.w_k.bias, c.double()) for c in sources)
    ]
    top = max(s for s, ok in zip(scores, valid.tolist(), strict=True) if ok)
    exp = [math.exp(s - top) if ok else 0.0 for s, ok in zip(scores, valid.tolist(), strict=True)]
    weights = torch.tensor([e / sum(exp) for e in exp], dtype=torch.float64)
    return sum(w * m.double() for w, m in zip(weights, memories, strict=True)), weights


@pytest.mark.parametrize("kind", ["paper", "content"])
def test_recall_reads_out_the_hand_computed_softmax_of_its_keys(kind):
    """P and the weights against a computation from W_q, W_k (biases, scale) written out by hand; an
    invalid memory gets weight 0, and a row with nothing valid gets zero weights and has_memory False."""
    from hmt.memory import MemoryRecall

    recall = MemoryRecall(WIDTH, 16, kind)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # away from the start (identity, zero bias) so every parameter counts
        for lin in (recall.w_q, recall.w_k):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / 4)
            if kind == "content":
                lin.bias.copy_(torch.randn(16, generator=g))
        if kind == "content":
            recall.log_scale.fill_(1.7)
    summary = torch.randn(2, WIDTH, generator=g)
    sources = torch.randn(2, 5, WIDTH, generator=g)  # what keys are made from: M (paper) or contents
    memories = torch.randn(2, 5, WIDTH, generator=g)
    valid = torch.tensor([[True, True, False, True, True], [False] * 5])
    with torch.no_grad():
        recalled, weights, has = recall(summary, recall.keys(sources), memories, valid)
    p0, w0 = _recall_by_hand(recall, summary[0], sources[0], memories[0], valid[0])
    assert weights[0, 2] == 0 and w0.max() < 0.99  # no one-hot weights: the check sees the mixing
    assert_close(weights[0].double(), w0, rtol=1e-5, atol=1e-6)
    assert_close(recalled[0].double(), p0, rtol=1e-5, atol=1e-5)
    assert has.tolist() == [True, False]
    assert torch.equal(weights[1], torch.zeros(5))


def test_recall_with_empty_cache_uses_initial_memory():
    model = make("hmt")
    state = model.init_memory(2)
    token, weights = model._memory_token(torch.randn(2, WIDTH), state)
    assert_close(token, model.memory_init.expand(2, -1))
    assert weights.shape == (2, 0)


def test_last_segment_loss_reaches_every_hmt_parameter():
    model = make("hmt").train()
    x = ids(1, 4 * L)
    labels = torch.full_like(x, -100)
    labels[:, 3 * L :] = x[:, 3 * L :]
    out = model(x, labels=labels, return_logits=False)
    out.loss.backward()
    for name, p in [
        ("T", model.summary_prompt),
        ("M_init", model.memory_init),
        ("W_q", model.recall.w_q.weight),
        ("W_k", model.recall.w_k.weight),
    ]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_truncated_bptt_stops_gradient():
    full = make("rmt")
    truncated = make("rmt", bptt_depth=1)
    truncated.load_state_dict(full.state_dict())
    x = ids(1, 3 * L)
    labels = torch.full_like(x, -100)
    labels[:, 2 * L :] = x[:, 2 * L :]
    for m in (full, truncated):
        m(x, labels=labels, return_logits=False).loss.backward()
    # M_init enters only segment 0; with depth 1 the last segment's loss cannot reach it.
    assert full.memory_init.grad.abs().sum() > 0
    assert truncated.memory_init.grad is None or truncated.memory_init.grad.abs().sum() == 0


@pytest.mark.parametrize("recall", ["paper", "content"])
def test_truncated_bptt_keeps_w_k_learning_from_memories_older_than_the_cut(recall):
    """The cut stops gradients into old memories, not into W_k, which made their keys."""
    model = make("hmt", bptt_depth=1, recall=recall).train()
    x = ids(1, 3 * L)
    labels = torch.full_like(x, -100)
    labels[:, 2 * L :] = x[:, 2 * L :]  # only the last segment is scored: its recall reads memories 0 and 1
    model(x, labels=labels, return_logits=False).loss.backward()
    assert model.recall.w_k.weight.grad is not None and model.recall.w_k.weight.grad.abs().sum() > 0
    assert model.memory_init.grad is None or model.memory_init.grad.abs().sum() == 0  # still cut


@pytest.mark.parametrize("recall", ["paper", "content"])
def test_new_parameter_count(recall):
    for recall_dim in (None, 32):
        model = HMTModel(
            tiny_backbone(),
            HMTConfig(segment_length=L, sensory_length=K, recall_dim=recall_dim, recall=recall),
        )
        d, d_h = WIDTH, recall_dim or WIDTH
        new = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.backbone.parameters())
        # The paper's 2d + 2 d d_h; recall "content" adds the biases of W_q and W_k and the scale.
        assert new == 2 * d + 2 * d * d_h + (2 * d_h + 1 if recall == "content" else 0)
        assert sum(p.numel() for p in model.hmt_parameters()) == new


@pytest.mark.parametrize("recall", ["content", "paper"])
def test_summaries_of_a_padded_batch_equal_direct_backbone_calls(recall):
    """S_n of every segment of a right-padded batch, read in chunks of 3 rows, against the bare
    backbone on [T, E(x_n[:j]), T] built from the embedding table: the mean of the states over
    x_n[:j] (recall "content") or the state at the trailing T ("paper"). The short row's last
    segment has 2 real tokens (< j)."""
    model = make("hmt", summary_batch_size=3, recall=recall)
    j = model.config.summary_length
    lengths = [5 * L + 5, 3 * L + 2]
    x = ids(2, lengths[0])
    mask = torch.zeros_like(x)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    table = model.backbone.get_input_embeddings().weight
    t = model.summary_prompt
    with torch.no_grad():
        batched = model.summarize(x, mask)
        for b, n in enumerate(lengths):
            for seg in range(math.ceil(n / L)):
                tokens = x[b, seg * L : min(n, seg * L + j)]
                embeds = torch.cat([t, table[tokens], t])[None]
                states = model.backbone.model(inputs_embeds=embeds).last_hidden_state[0]
                direct = states[1:-1].mean(0) if recall == "content" else states[-1]
                assert_close(batched[b, seg], direct, rtol=1e-4, atol=1e-5)


def test_labels_and_loss_match_manual_cross_entropy():
    model = make("hmt")
    x = ids(2, 3 * L + 3)
    with torch.no_grad():
        out = model(x, labels=x)
    expect = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    assert_close(out.loss, expect, rtol=1e-5, atol=1e-5)
    assert out.num_label_tokens == 2 * (x.shape[1] - 1)


def test_answer_only_loss_counts_only_labelled_tokens():
    model = make("hmt")
    x = ids(1, 3 * L)
    labels = torch.full_like(x, -100)
    labels[:, -5:] = x[:, -5:]
    out = model(x, labels=labels)
    assert out.num_label_tokens == 5
    expect = torch.nn.functional.cross_entropy(out.logits[0, -6:-1], x[0, -5:])
    assert_close(out.loss, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["hmt", "rmt", "window", "none"])
def test_batch_with_right_padding_equals_single(mode):
    model = make(mode)
    long, short = ids(1, 4 * L, seed=2), ids(1, 2 * L + 5, seed=3)
    batch = torch.zeros(2, 4 * L, dtype=torch.long)
    mask = torch.zeros(2, 4 * L, dtype=torch.long)
    batch[0], mask[0] = long[0], 1
    batch[1, : short.shape[1]], mask[1, : short.shape[1]] = short[0], 1
    labels = batch.masked_fill(mask == 0, -100)
    with torch.no_grad():
        both = model(batch, attention_mask=mask, labels=labels)
        one = model(short)
        alone = model(long)
    assert_close(both.logits[1, : short.shape[1]], one.logits[0], rtol=1e-4, atol=1e-4)
    assert_close(both.logits[0], alone.logits[0], rtol=1e-4, atol=1e-4)
    assert torch.isfinite(both.loss)


def test_streaming_equals_one_shot():
    model = make("hmt")
    x = ids(1, 7 * L)
    with torch.no_grad():
        full = model(x, return_records=True)
        state = model.init_memory(1)
        streamed = []
        for start, end in [(0, 2 * L), (2 * L, 5 * L), (5 * L, 6 * L)]:
            records, state = model.read_segments(x[:, start:end], state)
            streamed += records
        last = model(x[:, 6 * L :], memory_state=state)
    assert [r.index for r in streamed] == list(range(6))
    assert [(r.token_start, r.token_end) for r in streamed] == [(i * L, (i + 1) * L) for i in range(6)]
    for a, b in zip(full.records[:6], streamed, strict=True):
        assert_close(a.memory, b.memory, rtol=1e-5, atol=1e-5)
        assert_close(a.recall_weights, b.recall_weights, rtol=1e-5, atol=1e-5)
    assert_close(last.logits, full.logits[:, 6 * L :], rtol=1e-5, atol=1e-5)
    assert_close(last.memory_state.memories, full.memory_state.memories, rtol=1e-5, atol=1e-5)


def test_passage_contents_pool_the_segment_in_runs():
    """Passages are runs of ``passage_length`` tokens: a run as long as the segment is its content, and
    the token-weighted mean of a segment's passages is its content; padding counts for nothing."""
    model = make("hmt")
    x = torch.zeros(2, 3 * L, dtype=torch.long)
    mask = torch.zeros_like(x)
    x[0], mask[0] = ids(1, 3 * L, seed=4)[0], 1
    x[1, : 2 * L + 3], mask[1, : 2 * L + 3] = ids(1, 2 * L + 3, seed=5)[0], 1
    with torch.no_grad():
        whole = model(x, attention_mask=mask, return_records=True, passage_length=L).records
        runs = model(x, attention_mask=mask, return_records=True, passage_length=6).records
        plain = model(x, attention_mask=mask, return_records=True).records
    assert all(r.passage_contents is None for r in plain)
    for w, r in zip(whole, runs, strict=True):
        assert w.passage_contents.shape == (2, 1, WIDTH) and r.passage_contents.shape == (2, 3, WIDTH)
        assert_close(w.passage_contents[:, 0], w.content, rtol=1e-5, atol=1e-5)
        assert r.passage_tokens[0].tolist() == [6, 6, 4]
        counts = r.passage_tokens.float()[..., None]
        pooled = (r.passage_contents * counts).sum(dim=1) / counts.sum(dim=1).clamp_min(1)
        assert_close(pooled[0], r.content[0], rtol=1e-5, atol=1e-5)
    # The padded row: its last segment has 3 real tokens, all in the first passage.
    assert runs[2].passage_tokens[1].tolist() == [3, 0, 0]
    assert_close(runs[2].passage_contents[1, 0], runs[2].content[1], rtol=1e-5, atol=1e-5)
    assert not runs[2].passage_contents[1, 1:].any()


def test_cache_is_fifo_and_bounded():
    model = make("hmt")  # num_cached = 8
    with torch.no_grad():
        out = model(ids(1, 12 * L), return_logits=False)
    state = out.memory_state
    assert state.num_cached == 8
    assert state.segment_ids.tolist() == [list(range(4, 12))]
    assert state.segments_seen == 12 and state.tokens_seen == 12 * L


def test_forward_does_not_mutate_callers_state():
    model = make("window")
    with torch.no_grad():
        _, state = model.read_segments(ids(1, 2 * L))
        before = state.sensory_ids.clone()
        model(ids(1, L, seed=9), memory_state=state)
    assert torch.equal(state.sensory_ids, before)


@pytest.mark.parametrize("mode", ["hmt", "rmt", "window", "none"])
def test_generate_past_one_segment(mode):
    model = make(mode)
    x = ids(1, 3 * L + 5)
    with torch.no_grad():
        last_logits = model(x).logits[:, -1]
        new = model.generate(x, max_new_tokens=3 * L + 2)
    assert new.shape == (1, 3 * L + 2)
    assert new[0, 0] == last_logits.argmax(-1)[0]


@pytest.mark.parametrize("mode", ["hmt", "rmt", "window", "none"])
def test_no_logit_depends_on_a_later_token_of_its_segment(mode):
    """Every position p of segments 1 and 2: changing token p leaves all logits before p unchanged
    and changes the logits at p (the prediction made after reading token p)."""
    model = make(mode)
    if mode == "hmt":
        # The recall query S_n is read from x_n[:j] before the segment (eq. 1), so a token p < j moves
        # P_n and with it the logits before p. A zero W_q makes recall uniform whatever the query;
        # everything else (P in front and at the end, the sensory tokens) is still checked.
        with torch.no_grad():
            model.recall.w_q.weight.zero_()
            model.recall.w_q.bias.zero_()
    x = ids(1, 3 * L)
    with torch.no_grad():
        base = model(x).logits
        for p in range(L, 3 * L):
            y = x.clone()
            y[0, p] = (y[0, p] + 1) % VOCAB
            changed = model(y).logits
            assert_close(changed[:, :p], base[:, :p], rtol=1e-5, atol=1e-5, msg=f"position {p}")
            assert not torch.allclose(changed[:, p], base[:, p], atol=1e-4), p


def test_generated_tokens_have_their_teacher_forced_log_probabilities():
    """Every token of a greedy generation that closes two segments: its log-probability (and its
    being the argmax) as forward computes it over the prompt and the tokens generated so far.

    Forward is given the recall queries generation uses: for the segment the prompt opens, its
    tail alone (summary_mask hides the generated tokens); for a segment opened by generation, the
    last j tokens of the segment it closed (query_ids).
    """
    model = make("hmt")
    j = model.config.summary_length
    x = ids(1, 2 * L + 3)
    logprobs: list[torch.Tensor] = []
    with torch.no_grad():
        new = torch.stack(list(model.iter_generate(x, 2 * L, token_logprobs=logprobs)), dim=1)
        full = torch.cat([x, new], dim=1)  # segments 2 and 3 are closed by generation; 4 is open
        seen = torch.ones_like(full[:, : 3 * L])
        seen[:, x.shape[1] :] = 0
        out = model(full[:, : 3 * L], summary_mask=seen)
        logits, state = [out.logits], out.memory_state
        for start in (3 * L, 4 * L):
            out = model(full[:, start : start + L], memory_state=state, query_ids=full[:, start - j : start])
            logits.append(out.logits)
            state = out.memory_state
        forced = torch.cat(logits, dim=1)[0].log_softmax(-1)
    assert new.shape == (1, 2 * L)
    for i, token in enumerate(new[0].tolist()):
        row = forced[x.shape[1] - 1 + i]
        assert_close(logprobs[i][0], row[token], rtol=1e-4, atol=1e-4, msg=f"token {i}")
        assert row[token] >= row.max() - 1e-4, i


def test_generate_stops_at_eos():
    model = make("hmt")
    x = ids(1, L + 2)
    with torch.no_grad():
        first = model.generate(x, max_new_tokens=1)[0, 0].item()
        out = model.generate(x, max_new_tokens=20, eos_token_id=first)
    assert out.shape[1] == 1


def test_score_options_matches_forward_loglik():
    model = make("window")  # no recall: the continuation's segment is scored exactly as forward does
    x = ids(1, L + 3)
    opts = [torch.tensor([5, 6]), torch.tensor([7])]
    with torch.no_grad():
        total, count = model.score_options(x, opts)
        for i, o in enumerate(opts):
            seq = torch.cat([x, o[None]], dim=1)
            logits = model(seq).logits.log_softmax(-1)
            expect = sum(logits[0, x.shape[1] - 1 + t, o[t]] for t in range(len(o)))
            assert_close(total[i], expect, rtol=1e-4, atol=1e-4)
    assert count.tolist() == [2, 1]


@pytest.mark.parametrize(
    "field,value",
    [
        ("segment_length", 1),
        ("sensory_length", -1),
        ("sensory_length", 999),
        ("summary_fraction", 0.0),
        ("num_cached", 0),
        ("recall_dim", 0),
        ("mode", "lstm"),
        ("bptt_depth", 0),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    kwargs = {"segment_length": 16, "sensory_length": 4, field: value}
    with pytest.raises(ValueError, match=field):
        HMTConfig(**kwargs)


def test_recall_of_bf16_memories_is_summed_in_float32():
    """P = sum_i w_i M_i is formed in float32 and cast back (bf16 products leak kernel caches on CPU):
    each component is the exact sum rounded once to bf16, within half a bf16 step of it."""
    from hmt.memory import MemoryRecall

    recall = MemoryRecall(WIDTH, WIDTH)
    g = torch.Generator().manual_seed(5)
    query = torch.randn(2, WIDTH, generator=g)
    keys = torch.randn(2, 7, WIDTH, generator=g) / 4
    memories = torch.randn(2, 7, WIDTH, generator=g).bfloat16()
    valid = torch.ones(2, 7, dtype=torch.bool)
    recalled, weights, _ = recall.attend(query, keys, memories, valid)
    assert recalled.dtype == torch.bfloat16 and weights.dtype == torch.float32
    for b in range(2):
        exact = sum(float(weights[b, i]) * memories[b, i].double() for i in range(7))
        half_step = 2.0 ** (torch.floor(torch.log2(exact.abs())) - 8)  # bf16 keeps 8 significant bits
        assert ((recalled[b].double() - exact).abs() <= half_step * 1.001).all()


def _repeats(tokens, n):
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) - len(set(grams))


def test_no_repeat_ngram_rule_stops_generation_loops():
    model = make("hmt")
    prompt = ids(2, L + 3)
    looping = model.generate(prompt, max_new_tokens=3 * L).tolist()
    assert any(_repeats(row, 3) for row in looping)  # greedy decoding of a random model loops
    for row in model.generate(prompt, max_new_tokens=3 * L, no_repeat_ngram_size=3).tolist():
        assert _repeats(row, 3) == 0


def test_multi_token_options_with_memory_equal_their_token_by_token_chain():
    """Options share the prompt's KV cache; each option's score must equal the sum of single-token
    scores of its tokens, each appended to the prompt (another code path: one pass, no cache)."""
    model = make("hmt")
    doc, prompt, query = ids(1, 3 * L), ids(1, 9), ids(1, 5)
    state = model.init_memory(1)
    with torch.no_grad():
        _, state = model.read_segments(doc, state)
        opts = [torch.tensor([5, 6, 7]), torch.tensor([8]), torch.tensor([9, 10])]
        kw = {"query_ids": query, "whole_prompt": True}
        total, count = model.score_options(prompt, opts, state, **kw)
        for i, o in enumerate(opts):
            chain = sum(
                model.score_options(torch.cat([prompt, o[None, :t]], dim=1), [o[t : t + 1]], state, **kw)[0][
                    0
                ]
                for t in range(len(o))
            )
            assert_close(total[i], chain, rtol=1e-4, atol=1e-4)
    assert count.tolist() == [3, 1, 2]


def test_generation_reports_the_log_probability_of_each_chosen_token():
    model = make("hmt")
    doc, prompt = ids(1, 2 * L), ids(1, 7, seed=3)
    with torch.no_grad():
        _, state = model.read_segments(doc, model.init_memory(1))
        logprobs: list[torch.Tensor] = []
        tokens = [
            int(t[0])
            for t in model.iter_generate(
                prompt, max_new_tokens=4, memory_state=state, token_logprobs=logprobs
            )
        ]
        total, _ = model.score_options(prompt, [torch.tensor(tokens)], state)
    assert len(logprobs) == 4
    assert_close(torch.cat(logprobs).sum(), total[0], rtol=1e-4, atol=1e-4)
