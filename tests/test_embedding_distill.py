"""End-to-end embedding distillation (workbench/recovery/embedding_distill.py) on a tiny random-weight
BERT behind MiniLM's pooling (`MiniLMEncoder`: mean over real tokens, L2 normalised). Oracles: the
original as its own student starts at cosine 1 and is kept as it is (epoch 0); a head / FFN-pruned
student gets closer to the original on held-out rows and on unseen inputs; neither input model
changes; a fixed seed gives the same result."""
import pytest
import torch

import workbench as wb
from workbench.errors import WorkbenchError
from workbench.methods.head_pruning import find_blocks
from workbench.recovery.embedding_distill import cosine_loss, distill_embeddings
from workbench.registry import get_recipe
from workbench.zoo.minilm import MiniLMEncoder

from conftest import state_bytes

transformers = pytest.importorskip("transformers")


def inputs(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (n, 12), generator=g)
    lengths = torch.randint(4, 13, (n,), generator=g)
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    return torch.stack([ids * mask, mask], 1)


CALIBRATION, UNSEEN = inputs(80, 1), inputs(40, 2)


class Calibration:
    def calibration_inputs(self, n):
        return CALIBRATION[:n]


def build():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                     num_hidden_layers=2, max_position_embeddings=32,
                                     initializer_range=0.3)  # blocks that matter to the embedding
    return MiniLMEncoder(transformers.BertModel(config, add_pooling_layer=False)).eval()


def mean_cosine(model, original, x):
    with torch.no_grad():
        return float(1 - cosine_loss(model(x), original(x)))


def test_pruned_student_moves_towards_the_original_and_inputs_are_not_mutated():
    model = build()
    pruned = wb.apply(model, get_recipe("prune")(model, task=Calibration(), ratio=0.5, structured=True))
    snapshots = state_bytes(model), state_bytes(pruned)
    grads = [p.requires_grad for p in model.parameters()], [p.requires_grad for p in pruned.parameters()]
    result = distill_embeddings(pruned, model, CALIBRATION, epochs=6, lr=3e-3, batch_size=16, progress=False)
    assert result.start < 0.99
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.best_epoch > 0 and max(h["cosine"] for h in result.history) > result.start
    assert 1 - mean_cosine(result.model, model, UNSEEN) < 0.6 * (1 - mean_cosine(pruned, model, UNSEEN))
    assert [(b.heads, b.width) for b in find_blocks(result.model)] == [(b.heads, b.width) for b in find_blocks(pruned)]
    assert (state_bytes(model), state_bytes(pruned)) == snapshots
    assert ([p.requires_grad for p in model.parameters()], [p.requires_grad for p in pruned.parameters()]) == grads
    again = distill_embeddings(pruned, model, CALIBRATION, epochs=6, lr=3e-3, batch_size=16, progress=False)
    assert state_bytes(again.model) == state_bytes(result.model)


def test_the_original_as_student_is_kept_unchanged():
    model = build()
    result = distill_embeddings(model, model, CALIBRATION, epochs=1, lr=1e-3, progress=False)
    assert result.start == pytest.approx(1.0, abs=1e-6)
    assert result.best_epoch == 0
    assert state_bytes(result.model) == state_bytes(model)


def test_bad_settings_are_refused():
    model = build()
    with pytest.raises(WorkbenchError, match="holdout=1.5 must be a fraction"):
        distill_embeddings(model, model, CALIBRATION, holdout=1.5)
    with pytest.raises(WorkbenchError, match="epochs=0"):
        distill_embeddings(model, model, CALIBRATION, epochs=0)
    with pytest.raises(WorkbenchError, match="at least 4 calibration inputs, got 3"):
        distill_embeddings(model, model, CALIBRATION[:3])
    with pytest.raises(WorkbenchError, match="differ from the original's"):
        cosine_loss(torch.ones(2, 3), torch.ones(2, 4))
