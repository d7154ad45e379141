"""Head and FFN-width knobs for the StructuredExplorer (workbench/widgets/structured_heads.py), headless,
on a tiny random-weight BERT built from a config (nothing downloaded). Oracle: moving a block's heads
slider to k keeps exactly its k best-ranked heads (the q/k/v rows and output-projection columns of
those heads, original weights), the model shown is the one `apply` builds from the explorer's plan,
the user's model is untouched."""
import pytest
import torch
import torch.nn.functional as F

import workbench as wb
from workbench.errors import WorkbenchError
from workbench.methods.head_pruning import find_blocks
from workbench.plan import Plan
from workbench.zoo.task import Task

from conftest import state_bytes

transformers = pytest.importorskip("transformers")
widgets_structured = pytest.importorskip("workbench.widgets.structured")
from workbench.widgets.structured_heads import HeadKnob, head_knobs  # noqa: E402

HIDDEN, HEADS, FFN, D = 32, 4, 64, 8
FAST = {"repeats": 1, "batches": (4,), "batch": 4}
BLOCK = "encoder.layer.1"


@pytest.fixture(scope="module")
def bert_task():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                     intermediate_size=FFN, num_hidden_layers=2, max_position_embeddings=32)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(0, 50, (8, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).last_hidden_state

    def cosine(outputs, targets):
        return float(F.cosine_similarity(outputs.flatten(1), targets.flatten(1), dim=-1).mean())

    return Task("tiny-bert", model, ids, reference, cosine, "mean cosine", output="last_hidden_state")


@pytest.fixture(scope="module")
def explorer(bert_task):
    knobs = head_knobs(bert_task.model, bert_task.calibration_inputs())
    return widgets_structured.StructuredExplorer(bert_task, knobs=knobs, synchronous=True, **FAST)


def test_one_heads_and_one_ffn_knob_per_block(explorer):
    assert [(k.name, k.channels, k.kind, k.method) for k in explorer.knobs] == [
        ("encoder.layer.0.heads", HEADS, "heads", "prune_heads"), ("encoder.layer.0.ffn", FFN, "ffn", "prune_heads"),
        ("encoder.layer.1.heads", HEADS, "heads", "prune_heads"), ("encoder.layer.1.ffn", FFN, "ffn", "prune_heads")]
    assert explorer.knobs[2].members == (f"{BLOCK}.attention.self.query", f"{BLOCK}.attention.self.key",
                                         f"{BLOCK}.attention.self.value", f"{BLOCK}.attention.output.dense")
    assert isinstance(explorer.knobs[0], HeadKnob) and explorer.knobs[0].group_size == 1
    assert explorer.plan == Plan({})


def test_a_heads_slider_removes_exactly_those_heads(explorer, bert_task):
    original = bert_task.model
    snapshot = state_bytes(original)
    state = explorer.set_kept(f"{BLOCK}.heads", 2)
    assert explorer.error.value == "" and state["kept"][f"{BLOCK}.heads"] == 2
    model = state["model"]
    knob = explorer._knobs[f"{BLOCK}.heads"]
    kept = sorted(knob.order[:2])
    rows = [h * D + i for h in kept for i in range(D)]
    attention = model.get_submodule(f"{BLOCK}.attention")
    source = original.get_submodule(f"{BLOCK}.attention")
    for part in ("query", "key", "value"):
        assert torch.equal(getattr(attention.self, part).weight, getattr(source.self, part).weight[rows])
        assert torch.equal(getattr(attention.self, part).bias, getattr(source.self, part).bias[rows])
    assert torch.equal(attention.output.dense.weight, source.output.dense.weight[:, rows])
    # only that block's heads changed: its FFN and the other block are whole
    assert [(b.heads, b.width) for b in find_blocks(model)] == [(HEADS, FFN), (2, FFN)]
    step = explorer.plan.steps[0]
    assert step["blocks"] == (BLOCK,) and step["heads_removed"] == (tuple(sorted(knob.order[2:])),)
    assert step["ffn_removed"] == ((),)
    # the model shown is what apply builds from the plan, and it runs; the user's model is untouched
    built = wb.apply(original, explorer.plan)
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), model.state_dict().values()))
    with torch.no_grad():
        assert model(bert_task.eval_inputs[:2]).last_hidden_state.shape == (2, 10, HIDDEN)
    assert state_bytes(original) == snapshot
    assert state["result"]["params"] == sum(p.numel() for p in model.parameters())
    explorer.set_kept(f"{BLOCK}.heads", HEADS)


def test_ffn_and_heads_of_one_block_make_one_entry_and_plans_round_trip(explorer):
    explorer.set_kept("encoder.layer.0.ffn", 16)
    state = explorer.set_kept("encoder.layer.0.heads", 3)
    assert [(b.heads, b.width) for b in find_blocks(state["model"])] == [(3, 16), (HEADS, FFN)]
    step = explorer.plan.steps[0]
    assert step["blocks"] == ("encoder.layer.0",) and len(step["ffn_removed"][0]) == FFN - 16
    assert explorer.settings_for(explorer.plan) == {"encoder.layer.0.heads": 3, "encoder.layer.0.ffn": 16,
                                                    f"{BLOCK}.heads": HEADS, f"{BLOCK}.ffn": FFN}
    with pytest.raises(WorkbenchError, match=r"kept=0 .* must be an integer in 1..4"):
        explorer.set_kept("encoder.layer.0.heads", 0)
    assert explorer.kept()["encoder.layer.0.heads"] == 3


def test_knobs_refuse_a_model_without_blocks():
    with pytest.raises(WorkbenchError, match="no BERT / GPT-2 / Llama block"):
        head_knobs(torch.nn.Sequential(torch.nn.Linear(4, 4)))
