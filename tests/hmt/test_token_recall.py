"""The late-interaction passage head (``TokenRecall``): its score against a by-hand MaxSim, its start
at the embeddings' cosine, its training on a toy task, and its place in HMTModel (keys at ingestion,
save and load)."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from hmt import HMTConfig, HMTModel
from hmt.token_recall import TokenRecall
from hmt.token_recall_head import TokenDoc, TokenQuery, fit_token_recall, passage_grid, token_rank_metrics
from tests.tiny import VOCAB, WIDTH, tiny_backbone


def _perturbed(dim: int = 8, seed: int = 0) -> TokenRecall:
    torch.manual_seed(seed)
    head = TokenRecall(WIDTH, dim)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return head


@torch.no_grad()
def test_score_is_the_weighted_maxsim_of_unit_keys():
    head = _perturbed()
    q_emb, q_hid = torch.randn(3, WIDTH), torch.randn(3, WIDTH)
    k_emb, k_hid = torch.randn(2, 4, WIDTH), torch.randn(2, 4, WIDTH)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    queries, weights = head.queries(q_emb, q_hid)
    keys = head.keys(k_emb, k_hid)
    got = head.scores(queries, weights, keys, mask).detach()
    # By hand, in float64: each question token's best cosine among the passage's real tokens.
    wq = (q_emb @ head.w_e.weight.T + head.w_e.bias + q_hid @ head.w_h.weight.T).double()
    wk = (k_emb @ head.w_e.weight.T + head.w_e.bias + k_hid @ head.w_h.weight.T).double()
    w = torch.softmax((q_hid @ head.w_weight.weight.T + head.w_weight.bias).double()[:, 0], 0)
    for p in range(2):
        real = wk[p][mask[p]]
        cos = F.normalize(wq, dim=-1) @ F.normalize(real, dim=-1).T
        expect = head.log_scale.double().exp() * (w * cos.max(dim=1).values).sum()
        assert float(got[p]) == pytest.approx(float(expect), rel=1e-5)
    assert float(weights.sum()) == pytest.approx(1.0)


@torch.no_grad()
def test_padding_and_empty_passages():
    head = _perturbed()
    queries, weights = head.queries(torch.randn(4, WIDTH), torch.randn(4, WIDTH), mask=torch.tensor([1, 1, 0, 0]))
    assert weights[2:].tolist() == [0.0, 0.0] and float(weights.sum()) == pytest.approx(1.0)
    keys = head.keys(torch.randn(3, 2, WIDTH), torch.randn(3, 2, WIDTH))
    scores = head.scores(queries, weights, keys, torch.tensor([[True, True], [False, False], [True, False]]))
    assert torch.isfinite(scores[[0, 2]]).all() and scores[1] == float("-inf")  # an empty passage never wins


@torch.no_grad()
def test_start_is_the_cosine_of_centred_embeddings():
    """Untrained (after ``init_from_embeddings`` with dim = d), a token's key is its centred input
    embedding, normalised: the same word matches itself with cosine 1, whatever its context."""
    emb = torch.randn(VOCAB, WIDTH)
    head = TokenRecall(WIDTH, WIDTH)
    head.init_from_embeddings(emb)
    ids = torch.tensor([3, 7, 3])
    keys = head.keys(emb[ids], torch.randn(3, WIDTH))  # the state term starts at zero
    centred = F.normalize(emb[ids] - emb.mean(0), dim=-1)
    assert_close(keys @ keys.T, centred @ centred.T, atol=1e-5, rtol=1e-5)
    assert float(keys[0] @ keys[2]) == pytest.approx(1.0, abs=1e-5)


def test_passage_grid_tiles_tokens_in_order():
    values = torch.arange(10, dtype=torch.float32)[:, None]
    grid, mask = passage_grid(values, 4)
    assert grid.shape == (3, 4, 1) and mask.sum(1).tolist() == [4, 4, 2]
    assert grid[1, :, 0].tolist() == [4, 5, 6, 7] and grid[2, :2, 0].tolist() == [8, 9]


def test_training_learns_which_passage_a_question_asks_about():
    """Toy task the untrained head cannot do: a question's tokens are not in its passage; only its
    states say which passage (they are a fixed map of the passage's states)."""
    torch.manual_seed(0)
    emb = torch.randn(VOCAB, WIDTH)
    mix = torch.randn(WIDTH, WIDTH) / WIDTH**0.5
    docs, queries = [], []
    for d in range(6):
        hidden = torch.randn(32, WIDTH)
        docs.append(TokenDoc(torch.randint(0, VOCAB, (32,)), hidden))
        for p in range(4):
            state = hidden[p * 8 : p * 8 + 8].mean(0) @ mix
            queries.append(TokenQuery(d, torch.randint(0, VOCAB, (3,)), state.expand(3, WIDTH).clone(), [p]))
    head = TokenRecall(WIDTH, 16)
    before = token_rank_metrics(head, emb, docs, queries, width=8)
    log = fit_token_recall(head, emb, docs, queries, width=8, steps=150, batch_size=12, lr=1e-2, log_every=50)
    after = token_rank_metrics(head, emb, docs, queries, width=8)
    assert log[-1]["loss"] < log[0]["loss"]
    assert after["hit@1"] > before["hit@1"] + 0.3 and after["n"] == 24
    assert all(not p.requires_grad for p in head.parameters())


def _model(dim: int = 8) -> HMTModel:
    cfg = HMTConfig(segment_length=16, sensory_length=4, num_cached=8, token_recall_dim=dim)
    model = HMTModel(tiny_backbone(), cfg).eval()
    with torch.no_grad():
        for p in model.token_recall.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def test_ingestion_records_carry_each_tokens_key():
    model = _model()
    ids = torch.randint(0, VOCAB, (1, 40))  # 2 full segments and a short one
    with torch.no_grad():
        records, _ = model.read_segments(ids, model.init_memory(1), passage_length=8)
        without, _ = model.read_segments(ids, model.init_memory(1))
    assert [r.token_keys.shape for r in records] == [(1, 16, 8), (1, 16, 8), (1, 8, 8)]
    for r in records:
        seg = ids[:, r.token_start : r.token_end]
        expect = model.token_recall.keys(model._embed(seg), r.token_states)
        assert_close(r.token_keys, expect)
        assert_close(r.token_keys.norm(dim=-1), torch.ones(r.token_keys.shape[:2]))
    assert all(r.token_keys is None and r.token_states is None for r in without)  # only with passages


def test_question_token_states_are_the_summary_pass():
    """``query_token_states`` are the states whose mean ``summarize`` returns (recall "content")."""
    model = _model()
    ids = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        states = model.query_token_states(ids)
        assert_close(states.mean(dim=1), model.summarize(ids)[:, 0], atol=1e-5, rtol=1e-5)
    assert states.shape == (1, 5, WIDTH)


def test_token_head_saves_and_loads(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = HMTModel.from_pretrained(tmp_path / "ckpt", backbone=tiny_backbone())
    assert loaded.config.token_recall_dim == 8
    for name, value in model.token_recall.parameter_dict().items():
        assert torch.equal(loaded.hmt_state_dict()[name], value), name
    # A checkpoint written before the head existed loads without one.
    plain = HMTModel(tiny_backbone(), HMTConfig(segment_length=16, sensory_length=4))
    plain.save_pretrained(tmp_path / "old")
    assert HMTModel.from_pretrained(tmp_path / "old", backbone=tiny_backbone()).token_recall is None
    with pytest.raises(ValueError, match="token_recall_dim"):
        HMTConfig(token_recall_dim=-1)


def test_fitting_without_questions_is_refused():
    with pytest.raises(ValueError, match="no questions"):
        fit_token_recall(TokenRecall(WIDTH, 4), torch.randn(VOCAB, WIDTH), [], [], width=8)


def test_fitting_only_some_parts_leaves_the_others():
    torch.manual_seed(0)
    emb = torch.randn(VOCAB, WIDTH)
    docs = [TokenDoc(torch.randint(0, VOCAB, (24,)), torch.randn(24, WIDTH)) for _ in range(2)]
    queries = [TokenQuery(d, torch.randint(0, VOCAB, (3,)), torch.randn(3, WIDTH), [p]) for d in range(2) for p in range(3)]
    head = TokenRecall(WIDTH, 8)
    head.init_from_embeddings(emb)
    before = {k: v.detach().clone() for k, v in head.state_dict().items()}
    fit_token_recall(head, emb, docs, queries, width=8, steps=5, lr=1e-1, trainable=("w_weight", "log_scale"))
    after = head.state_dict()
    for name in before:
        moved = not torch.equal(before[name], after[name])
        assert moved == name.startswith(("w_weight", "log_scale")), name
    with pytest.raises(ValueError, match="no part"):
        fit_token_recall(head, emb, docs, queries, width=8, steps=1, trainable=("w_q",))
