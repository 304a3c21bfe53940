"""Recall "content" (the default) and "paper": checked against direct backbone calls, and trained on a toy task."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from hmt import HMTConfig, HMTModel
from hmt.recall_head import RecallExamples, fit_recall_head, rank_metrics
from tests.tiny import VOCAB, WIDTH, tiny_backbone

L, K = 16, 4


def make(recall="content", **kw):
    cfg = HMTConfig(segment_length=L, sensory_length=K, num_cached=8, recall=recall, **kw)
    model = HMTModel(tiny_backbone(), cfg).eval()
    if recall == "content":
        with torch.no_grad():  # away from the identity start, so the checks see W and b at work
            for lin in (model.recall.w_q, model.recall.w_k):
                lin.weight.add_(0.1 * torch.randn_like(lin.weight))
                lin.bias.normal_()
            model.recall.log_scale.fill_(1.3)
    return model


def hidden(model, embeds):
    """Last-layer states of the plain backbone (no HMT code) for a row of embeddings."""
    return model.backbone.model(inputs_embeds=embeds).last_hidden_state


def test_content_recall_matches_independent_formula():
    model = make()
    contents, memories, summary = torch.randn(1, 5, WIDTH), torch.randn(1, 5, WIDTH), torch.randn(1, WIDTH)
    keys = model.recall.keys(contents[0])[None]
    _, weights, _ = model.recall(summary, keys, memories, torch.ones(1, 5, dtype=torch.bool))
    wq, bq = model.recall.w_q.weight, model.recall.w_q.bias
    wk, bk = model.recall.w_k.weight, model.recall.w_k.bias
    q = summary @ wq.T + bq
    k = contents[0] @ wk.T + bk
    cos = (q @ k.T) / (q.norm() * k.norm(dim=-1))
    assert_close(weights, torch.softmax(cos * math.exp(1.3), dim=-1))


@pytest.mark.parametrize("recall", ["content", "paper"])
def test_keys_and_summaries_equal_direct_backbone_passes(recall):
    """Segments 0 and 1 rebuilt by hand: [P, sensory, x, P] and [T, x[:j], T] on the bare backbone."""
    model = make(recall)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, VOCAB, (1, 2 * L), generator=g)
    with torch.no_grad():
        records = model(x, return_records=True).records
        emb = model.backbone.get_input_embeddings()
        j = model.config.summary_length
        m0 = model.memory_init[None]
        h0 = hidden(model, torch.cat([m0, emb(x[:, :L]), m0], dim=1))
        # One memory in the cache: recall's softmax is 1 on it whatever the query, so P_1 = M_0.
        p1 = h0[:, -1:]
        h1 = hidden(model, torch.cat([p1, emb(x[:, L - K : L]), emb(x[:, L:]), p1], dim=1))
        t = model.summary_prompt[None]
        s1 = hidden(model, torch.cat([t, emb(x[:, L : L + j]), t], dim=1))
    assert_close(records[0].memory, h0[:, -1], rtol=1e-4, atol=1e-4)
    assert_close(records[1].memory, h1[:, -1], rtol=1e-4, atol=1e-4)
    if recall == "content":
        content0, content1 = h0[:, 1:-1].mean(1), h1[:, 1 + K : -1].mean(1)
        summary1 = s1[:, 1:-1].mean(1)
        key = lambda c: F.normalize(c @ model.recall.w_k.weight.T + model.recall.w_k.bias, dim=-1)  # noqa: E731
        assert_close(records[0].recall_key, key(content0), rtol=1e-4, atol=1e-4)
        assert_close(records[1].recall_key, key(content1), rtol=1e-4, atol=1e-4)
    else:
        summary1 = s1[:, -1]
        assert_close(records[1].recall_key, h1[:, -1] @ model.recall.w_k.weight.T, rtol=1e-4, atol=1e-4)
    assert_close(records[1].summary, summary1, rtol=1e-4, atol=1e-4)


def test_query_ids_make_the_first_segments_query():
    """Training's question segment is recalled by the question alone, not by its prompt and answer."""
    model = make()
    g = torch.Generator().manual_seed(4)
    x, question = torch.randint(0, VOCAB, (1, L), generator=g), torch.randint(0, VOCAB, (1, 5), generator=g)
    with torch.no_grad():
        with_query = model(x, query_ids=question, return_records=True).records[0].summary
        t, emb = model.summary_prompt[None], model.backbone.get_input_embeddings()
        direct = hidden(model, torch.cat([t, emb(question), t], dim=1))[:, 1:-1].mean(1)
        own = model(x, return_records=True).records[0].summary
    assert_close(with_query, direct, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(own, direct, atol=1e-3)


def test_whole_prompt_is_one_answering_segment():
    """A prompt longer than L is read as one segment after [P, sensory], recalled by ``query_ids``."""
    model = make()
    g = torch.Generator().manual_seed(5)
    doc, prompt = torch.randint(0, VOCAB, (1, 3 * L), generator=g), torch.randint(0, VOCAB, (1, 2 * L + 3), generator=g)
    question, option = prompt[:, -4:], torch.tensor([7, 9])
    with torch.no_grad():
        state = model(doc, return_logits=False).memory_state
        lp, _ = model.score_options(prompt, [option], state, query_ids=question, whole_prompt=True)
        p, _, _ = model.recall(model.summarize(question)[:, 0], state.keys, state.memories, state.valid)
        emb = model.backbone.get_input_embeddings()
        embeds = torch.cat([p[:, None], emb(state.sensory_ids), emb(prompt), emb(option[None])], dim=1)
        logits = model.backbone(inputs_embeds=embeds).logits[0].log_softmax(-1)
        n = 1 + K + prompt.shape[1]
        expect = logits[n - 1, 7] + logits[n, 9]
    assert_close(lp[0], expect, rtol=1e-4, atol=1e-4)


def _toy_examples(model, n_docs, seed, segments=6, words=range(96, 112)):
    """Each segment carries one key word three times among filler; the question names the word."""
    g = torch.Generator().manual_seed(seed)
    queries, query_doc, positives, contents, segment_doc = [], [], [], [], []
    for d in range(n_docs):
        keys = torch.tensor(list(words))[torch.randperm(len(words), generator=g)[:segments]]
        x = torch.randint(0, 16, (segments, L), generator=g)
        for i, w in enumerate(keys):
            x[i, torch.randperm(L, generator=g)[:4]] = w
        with torch.no_grad():
            records = model(x.reshape(1, -1), return_logits=False, return_records=True).records
        base = len(contents)
        contents += [r.content[0] for r in records]
        segment_doc += [d] * segments
        q = torch.randint(0, 16, (segments, 6), generator=g)
        q[:, 2] = keys
        with torch.no_grad():
            queries.append(model.summarize(q)[:, 0])
        query_doc += [d] * segments
        positives += [[base + i] for i in range(segments)]
    return RecallExamples(
        torch.cat(queries), torch.tensor(query_doc), positives, torch.stack(contents), torch.tensor(segment_doc)
    )


def test_recall_head_learns_a_toy_task_from_scratch():
    model = HMTModel(tiny_backbone(), HMTConfig(segment_length=L, sensory_length=K, num_cached=8)).eval()
    train, test = _toy_examples(model, 200, seed=0), _toy_examples(model, 20, seed=1)
    before = rank_metrics(model.recall, test)
    fit_recall_head(model.recall, train, steps=400, batch_size=32, lr=1e-2)
    after = rank_metrics(model.recall, test)
    assert after["hit@1"] >= 0.95, (before, after)
    assert after["hit@1"] > before["hit@1"] + 0.2  # chance is 1/6: the identity start does not solve it


def test_generation_closes_segments_in_bfloat16():
    """Closing a generated segment keys it by its pooled content (summed in float32) in the model's dtype."""
    model = make().to(torch.bfloat16)
    prompt = torch.randint(0, VOCAB, (1, L + 3), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        new = model.generate(prompt, max_new_tokens=2 * L)  # closes at least one generated segment
    assert new.shape == (1, 2 * L)
