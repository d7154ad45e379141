"""Least-squares refit of pruned blocks' output projections (workbench/recovery/refit.py) on small
random-weight BERT and GPT-2 models built from configs. Oracles: with nothing removed and no ridge
the refit gives back the original weights (the least-squares optimum is exact); after head / FFN
pruning it lowers the error to the original's output; neither model is modified."""
import pytest
import torch

import workbench as wb
from workbench.errors import WorkbenchError
from workbench.methods.head_pruning import find_blocks, matrix
from workbench.recovery import refit_projections
from workbench.registry import get_recipe

from conftest import state_bytes

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 50, (24, 16), generator=torch.Generator().manual_seed(1))  # 384 tokens > 65 features


def build(family):
    torch.manual_seed(0)
    if family == "bert":
        config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                         num_hidden_layers=2, max_position_embeddings=32)
        return transformers.BertModel(config, add_pooling_layer=False).double().eval()
    config = transformers.GPT2Config(vocab_size=50, n_embd=32, n_head=4, n_inner=64, n_layer=2, n_positions=32)
    return transformers.GPT2Model(config).double().eval()


class Calibration:
    def calibration_inputs(self, n):
        return IDS[:n]


def out(model):
    with torch.no_grad():
        return model(IDS).last_hidden_state


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_nothing_removed_gives_back_the_original_weights(family):
    model = build(family)
    refit = refit_projections(model, model, IDS, ridge=0.0)
    for b in find_blocks(model):
        for name in (b.out, b.ffn_out):
            torch.testing.assert_close(matrix(refit.get_submodule(name)), matrix(model.get_submodule(name)),
                                       rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(refit.get_submodule(name).bias, model.get_submodule(name).bias,
                                       rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_refit_lowers_the_error_of_the_pruned_model_and_mutates_nothing(family):
    model = build(family)
    pruned = wb.apply(model, get_recipe("prune")(model, task=Calibration(), ratio=0.5, structured=True))
    snapshots = state_bytes(model), state_bytes(pruned)
    refit = refit_projections(pruned, model, IDS)
    reference = out(model)
    before = (out(pruned) - reference).pow(2).mean()
    after = (out(refit) - reference).pow(2).mean()
    assert after < 0.2 * before
    assert [(b.heads, b.width) for b in find_blocks(refit)] == [(b.heads, b.width) for b in find_blocks(pruned)]
    assert (state_bytes(model), state_bytes(pruned)) == snapshots


def test_bad_settings_are_refused():
    model = build("bert")
    with pytest.raises(WorkbenchError, match="ridge=-1 must be a number >= 0"):
        refit_projections(model, model, IDS, ridge=-1)
    with pytest.raises(WorkbenchError, match="blocks"):
        refit_projections(torch.nn.Sequential(torch.nn.Linear(4, 4)), model, IDS)
