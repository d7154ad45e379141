"""Stages found automatically (`workbench.auto_stages`): models built from `transformers` configs
(random weights, nothing downloaded) and hand-written networks are cut at their list of blocks;
the staged run equals the forward; a change in the last block re-runs only that block and what
follows, with the metric of `wb.apply`; models whose blocks do not form a chain are cut in their
`torch.fx` graph instead (`workbench.graph_stages`), with the reason."""
import pytest
import torch
from torch import nn

import workbench as wb
from workbench.auto_stages import Carried, find_stages, tensor_leaves
from workbench.plan import LayerPlan, Plan

transformers = pytest.importorskip("transformers")


def bert():
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(
        num_hidden_layers=3, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=100))


def gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=4, n_embd=32, n_head=2, n_positions=64, vocab_size=100, bos_token_id=0, eos_token_id=0))


def llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
        vocab_size=100, max_position_embeddings=64))


class Block(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.mix = nn.Linear(channels, channels)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        y = self.mix(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return torch.relu(x + y)


class ResidualCNN(nn.Module):
    """A stem, a ModuleList of residual blocks, a pooled head: the blocks are a chain."""

    def __init__(self, channels=8, blocks=3, classes=5):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.ModuleList([Block(channels) for _ in range(blocks)])
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean((2, 3)))


class SequentialCNN(ResidualCNN):
    """The blocks in an nn.Sequential called as one module."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*self.blocks)

    def forward(self, x):
        return self.head(self.blocks(torch.relu(self.stem(x))).mean((2, 3)))


class TupleBlock(nn.Module):
    """Returns ``(hidden, gate)`` as older transformers blocks do; takes a keyword argument."""

    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, hidden, scale=None):
        gate = torch.sigmoid(scale)
        return hidden + gate * torch.tanh(self.fc(hidden)), gate


class TupleNet(nn.Module):
    def __init__(self, width=16, blocks=3):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(100, width)
        self.scale = nn.Linear(width, 1)
        self.layers = nn.ModuleList([TupleBlock(width) for _ in range(blocks)])
        self.out = nn.Linear(width, 7)

    def forward(self, ids):
        hidden = self.embed(ids)
        scale = self.scale(hidden.mean(1, keepdim=True))
        for layer in self.layers:
            hidden = layer(hidden, scale=scale)[0]
        return {"logits": self.out(hidden), "scale": scale}


class TwoStageCNN(nn.Module):
    """Two nn.Sequential lists of blocks one after another (a ResNet's layer1, layer2)."""

    def __init__(self, channels=8, classes=5):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.layer1 = nn.Sequential(Block(channels), Block(channels))
        self.layer2 = nn.Sequential(Block(channels), Block(channels), Block(channels))
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        return self.head(self.layer2(self.layer1(torch.relu(self.stem(x)))).mean((2, 3)))


class CalledTwice(ResidualCNN):
    def forward(self, x):
        x = torch.relu(self.stem(x))
        for block in self.blocks:
            x = block(block(x))
        return self.head(x.mean((2, 3)))


class DenseSkip(ResidualCNN):
    """Block 2 takes the sum of blocks 0 and 1's outputs: no single carried state."""

    def forward(self, x):
        x = torch.relu(self.stem(x))
        a = self.blocks[0](x)
        b = self.blocks[1](a)
        return self.head(self.blocks[2](a + b).mean((2, 3)))


def ids():
    return torch.randint(100, (12, 10), generator=torch.Generator().manual_seed(1))


def images():
    return torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(1))


CASES = {  # build, input, block list, a Linear-like layer of the last block
    "bert": (bert, ids, "encoder.layer", "encoder.layer.2.output.dense"),
    "gpt2": (gpt2, ids, "transformer.h", "transformer.h.3.mlp.c_fc"),
    "llama": (llama, ids, "model.layers", "model.layers.1.mlp.up_proj"),
    "cnn": (ResidualCNN, images, "blocks", "blocks.2.mix"),
    "sequential-cnn": (SequentialCNN, images, "blocks", "blocks.2.mix"),
    "tuple-blocks": (TupleNet, ids, "layers", "layers.2.fc"),
}


def run_stages(stages, model, x):
    for stage in stages:
        x = stage.run(model, x)
    return x


@pytest.mark.parametrize("case", CASES)
def test_stages_found_and_equal_to_the_forward(case):
    build, data, blocks, _ = CASES[case]
    model, x = build().eval(), data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stages, why = find_stages(model, x[:1])
    count = len(model.get_submodule(blocks))
    assert [s.label for s in stages] == [f"before {blocks}", *(f"{blocks}.{i}" for i in range(count)), f"after {blocks}"]
    assert why.startswith(f"{count + 2} stages: before {blocks} + {count} blocks of {blocks} + after {blocks}")
    with torch.no_grad():
        state = stages[0].run(model, x)
        assert isinstance(state, Carried) and state.inputs is x
        want, got = tensor_leaves(model(x)), tensor_leaves(run_stages(stages[1:], model, state))
    assert len(want) == len(got) > 0
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(want, got))
    # the model is left as it was: weights, no hooks, no stubs
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks and "forward" not in module.__dict__


@pytest.mark.parametrize("case", CASES)
def test_a_change_in_the_last_block_reruns_only_it_and_what_follows(case):
    build, data, blocks, layer = CASES[case]
    model, x = build(), data()
    task = wb.load(model, eval_data=x)
    engine = wb.Engine(task, preview=False)
    count = len(model.get_submodule(blocks))
    assert engine.report()["stages_found"].startswith(f"{count + 2} stages")
    assert engine.stage_of(layer) == count                  # stage 0 is what runs before the blocks
    width = min(task.model.get_submodule(layer).weight.shape)
    plan = Plan({layer: LayerPlan("svd", {"rank": max(1, width // 4)})})
    skipped = engine.stats["stages_skipped"]
    result = engine.evaluate(plan)
    assert result["from_stage"] == count and result["stages_run"] == 2
    assert engine.stats["stages_skipped"] - skipped == count
    expected = task.evaluate(wb.apply(task.model, plan))
    assert result["metric"] == pytest.approx(expected, rel=1e-5)
    assert result["metric"] != pytest.approx(engine.base["metric"], rel=1e-7)   # the change is seen
    assert engine.evaluate(Plan({}))["metric"] == engine.base["metric"]        # and undone


def test_lists_of_blocks_one_after_another_are_one_chain():
    model, x = TwoStageCNN().eval(), images()
    stages, why = find_stages(model, x[:1])
    assert [s.label for s in stages] == ["before layer1", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer2.2",
                                         "after layer2"]
    assert why.startswith("7 stages: before layer1 + 5 blocks of layer1, layer2 + after layer2")
    with torch.no_grad():
        assert torch.allclose(run_stages(stages, model, x), model(x), rtol=1e-5, atol=1e-6)
    engine = wb.Engine(wb.load(model, eval_data=x), preview=False)
    plan = Plan({"layer1.1.mix": LayerPlan("svd", {"rank": 2})})
    result = engine.evaluate(plan)
    assert result["from_stage"] == 2 and result["metric"] == pytest.approx(engine.task.evaluate(wb.apply(model, plan)), rel=1e-5)


def test_layers_before_and_after_the_blocks_belong_to_their_stages():
    model = llama().eval()
    stages, _ = find_stages(model, ids()[:1])
    assert stages[0].owns("model.embed_tokens") and not stages[0].owns("lm_head")
    assert stages[-1].owns("lm_head") and stages[-1].owns("model.norm") and not stages[-1].owns("model.layers.1.mlp.up_proj")
    tied, _ = find_stages(gpt2().eval(), ids()[:1])          # GPT-2's head shares the token embedding
    assert tied[0].owns("transformer.wte") and not tied[-1].owns("lm_head")


@pytest.mark.parametrize("cls, reason, stages, owner", [
    (CalledTwice, r"block blocks\.0 is called 2 times in one forward pass", 8, None),  # blocks.0 runs in 2 stages
    (DenseSkip, r"block blocks\.2 does not take the output of block blocks\.1", 5, 3),
])
def test_blocks_that_are_no_chain_fall_back_to_the_graph_cut(cls, reason, stages, owner):
    model = cls().eval()
    found, why = find_stages(model, images()[:1])
    assert len(found) == stages and why.startswith(f"{stages} stages: segments of the torch.fx graph")
    assert __import__("re").search("blocks: " + reason, why)       # the block list's reason is kept
    assert [i for i, s in enumerate(found) if s.owns("blocks.2.mix")] == ([] if owner is None else [owner])
    task = wb.load(model, eval_data=images())
    engine = wb.Engine(task, preview=False)
    assert engine.report()["stages_found"] == why
    plan = Plan({"blocks.2.mix": LayerPlan("svd", {"rank": 2})})
    result = engine.evaluate(plan)
    assert result["from_stage"] == (owner or 0)
    assert result["metric"] == pytest.approx(task.evaluate(wb.apply(model, plan)), rel=1e-6)


def test_no_block_list_or_no_example_is_one_stage_with_the_reason():
    flat = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    declared, why = find_stages(flat, torch.randn(2, 4))
    assert [s.name for s in declared] == ["0", "2"] and why.startswith("2 stages declared by the model")

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.a(x))

    class Branching(Plain):
        def forward(self, x):
            return self.b(self.a(x) if x.sum() > 0 else x)

    assert find_stages(Branching(), torch.randn(2, 4)).why == (
        "1 stage: no nn.ModuleList / nn.Sequential of two or more same-type blocks found; torch.fx: "
        "cannot trace the forward (TraceError: symbolically traced variables cannot be used as inputs to control flow)")
    assert find_stages(Plain(), torch.randn(2, 4)).why.startswith("2 stages: segments of the torch.fx graph")
    assert find_stages(ResidualCNN()).why == "1 stage: no example input to check cut points on"


def test_compared_tensors_are_the_hidden_state_between_stages_and_the_output_leaves_at_the_end():
    from workbench.auto_stages import compared_tensors, per_sample
    model, x = bert().eval(), ids()
    stages, _ = find_stages(model, x[:1])
    with torch.no_grad():
        state = stages[0].run(model, x)
        after_block = stages[1].run(model, state)
        output = run_stages(stages[2:], model, after_block)
    hidden = after_block.hidden[0] if isinstance(after_block.hidden, tuple) else after_block.hidden
    assert [t is hidden for t in compared_tensors(after_block)] == [True]   # not the ids, not the mask
    assert compared_tensors(Carried(x, (hidden, torch.ones(3)), (), {})) == [hidden]
    rows = per_sample(output)
    assert rows.shape == (12, 10 * 32 + 32)  # last_hidden_state (12, 10, 32) and pooler_output (12, 32)
    assert torch.equal(rows, torch.cat([output.last_hidden_state.flatten(1), output.pooler_output], dim=1))
    plain = torch.randn(4, 3, 2)
    assert torch.equal(per_sample(plain), plain.flatten(1))
    assert torch.equal(per_sample((torch.tensor(0.5), plain, torch.arange(4))), plain.flatten(1))
    with pytest.raises(wb.errors.WorkbenchError, match="no floating-point tensor"):
        per_sample(torch.arange(4))
