"""Embedding x GRU input projection fused into one table: exact outputs, honest sizes, detection."""
import pytest
import torch
from torch import nn

import workbench as wb
from conftest import state_bytes
from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.layers.fusion import fuse_embedding_rnn, fused_table, fusion_sizes
from workbench.layers.recurrent import LowRankRNN
from workbench.measure import count_flops, count_params
from workbench.registry import get_recipe
from workbench.zoo.text import TextGRU, synthetic_corpus, vocabulary


def small_text_model(cls=nn.GRU):
    torch.manual_seed(0)
    model = TextGRU(30, embed_dim=6, hidden=8)
    if cls is nn.LSTM:
        model.rnn = nn.LSTM(6, 8, batch_first=True)
    return model.eval()


def test_fused_table_is_the_exact_product():
    emb, w, b = torch.randn(30, 6), torch.randn(24, 6), torch.randn(24)
    tokens = torch.randint(30, (5, 7))
    expected = nn.functional.linear(nn.functional.embedding(tokens, emb), w, b)
    assert torch.allclose(nn.functional.embedding(tokens, fused_table(emb, w, b)), expected, atol=1e-5)


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM])
@pytest.mark.parametrize("rank_hh", [None, 8, 3])
def test_fused_model_equals_the_original(cls, rank_hh):
    model = small_text_model(cls)
    before = state_bytes(model)
    plan = wb.Plan({}, (wb.LayerPlan("fuse_embedding", {"embedding": "embed", "rnn": "rnn", "rank_hh": rank_hh}),))
    fused = wb.apply(model, plan)
    assert isinstance(fused.rnn, LowRankRNN) and fused.rnn.fused_input
    tokens = torch.randint(30, (4, 9))
    if rank_hh in (None, 8):  # dense or full rank: exact
        assert torch.allclose(fused(tokens), model(tokens), atol=1e-5)
    else:  # same as the unfused model with the same low-rank hidden matrix
        unfused = wb.apply(model, wb.Plan({"rnn": wb.LayerPlan("svd_rnn", {"rank_ih": None, "rank_hh": 3})}))
        assert torch.allclose(fused(tokens), unfused(tokens), atol=1e-5)
    assert state_bytes(model) == before


def test_sizes_are_reported_honestly():
    model = small_text_model()
    sizes = fusion_sizes(model.embed, model.rnn)
    assert (sizes.before, sizes.after) == (30 * 6 + 24 * 6 + 24, 30 * 24)
    assert sizes.grows  # vocab * 3H = 720 > 30*6 + 24*6 + 24 = 348
    fused = wb.apply(model, get_recipe("fuse_embedding")(model, example=torch.zeros(1, 5, dtype=torch.long)))
    assert count_params(fused) - count_params(model) == sizes.after - sizes.before
    x = torch.zeros(1, 5, dtype=torch.long)
    assert count_flops(model, x) - count_flops(fused, x) == 5 * sizes.flops_saved_per_token
    tiny_vocab = fusion_sizes(nn.Embedding(4, 64), nn.GRU(64, 8))
    assert not tiny_vocab.grows and tiny_vocab.after == 4 * 24


def test_detection_and_refusals():
    model = small_text_model()
    example = torch.zeros(1, 5, dtype=torch.long)
    plan = get_recipe("fuse_embedding")(model, example=example)
    assert [dict(s.params) for s in plan.steps] == [{"embedding": "embed", "rnn": "rnn"}]

    class Scaled(nn.Module):  # the RNN reads 2 * embedding: not a plain lookup, so no fusion
        def __init__(self):
            super().__init__()
            self.embed, self.rnn = nn.Embedding(10, 4), nn.GRU(4, 4)

        def forward(self, x):
            return self.rnn(2 * self.embed(x))[0]

    with pytest.raises(UnsupportedLayerError, match="nothing to fuse"):
        get_recipe("fuse_embedding")(Scaled(), example=example)
    with pytest.raises(UnsupportedLayerError, match="max_norm"):
        fuse_embedding_rnn(nn.Embedding(10, 4, max_norm=1.0), nn.GRU(4, 4))
    with pytest.raises(WorkbenchError, match="embedding width 5 differs from the RNN input size 4"):
        fuse_embedding_rnn(nn.Embedding(10, 5), nn.GRU(4, 4))
    with pytest.raises(UnsupportedLayerError, match="bidirectional=True"):
        fuse_embedding_rnn(nn.Embedding(10, 4), nn.GRU(4, 4, bidirectional=True))


def test_synthetic_corpus_is_deterministic_and_in_vocabulary():
    a, la, _ = synthetic_corpus(50)
    b, lb, _ = synthetic_corpus(50)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert int(a.max()) < len(vocabulary()) and a.shape == (50, 12)
    assert not torch.equal(a, synthetic_corpus(50, seed=1)[0])
