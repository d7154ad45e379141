"""Global allocation of head / FFN pruning (``global_ranking``): the units of all blocks ranked on
one list. Oracles: with equal costs the kept units are the globally top-scored ones; the kept Linear
parameters are ``ratio`` of all blocks' to within one FFN unit; dead units (zero output projection)
go first and removing them changes nothing; a pruned model computes the model with its removed
units zeroed; floors hold whatever the scores."""
import json

import pytest
import torch

import workbench as wb
from workbench.errors import WorkbenchError
from workbench.methods import head_pruning
from workbench.methods.head_allocation import allocate
from workbench.registry import get_recipe

from test_head_pruning import FFN, HEADS, HIDDEN, LAYERS, MODELS, Calibration, build, linear_params, out, zero_units

transformers = pytest.importorskip("transformers")


def ffn_cost(model):
    return head_pruning.unit_costs(model, head_pruning.find_blocks(model)[0])[1]


@pytest.mark.parametrize("scale", ["raw", "block"])
def test_equal_costs_keep_the_globally_best_units(scale):
    gen = torch.Generator().manual_seed(3)
    heads = [torch.rand(4, generator=gen) for _ in range(3)]
    ffn = [torch.rand(10, generator=gen) for _ in range(3)]
    kept = allocate(heads, ffn, [(1, 1)] * 3, budget=20, head_floors=[1] * 3, ffn_floors=[1] * 3, scale=scale)
    assert sum(h + f for h, f in kept) == 20
    # oracle: the floors (each block's best head and FFN unit), then the best remaining scores overall
    norms = [float(h.sum() + f.sum()) if scale == "block" else 1.0 for h, f in zip(heads, ffn)]
    rest = sorted([(float(s) / n, b, k) for b, (h, f, n) in enumerate(zip(heads, ffn, norms))
                   for k, scores in enumerate((h, f)) for s in scores.sort(descending=True).values[1:]], reverse=True)
    expected = [[1, 1] for _ in range(3)]
    for _, b, k in rest[:20 - 6]:
        expected[b][k] += 1
    assert [list(k) for k in kept] == expected


def test_chunks_of_round_to_and_the_budget_bound():
    heads, ffn = [torch.ones(2), torch.ones(2)], [torch.arange(16.0), torch.arange(16.0) + 100]
    kept = allocate(heads, ffn, [(5, 1), (5, 1)], budget=30, head_floors=[1, 1], ffn_floors=[1, 1], round_to=4)
    assert all(f % 4 == 0 for _, f in kept)
    used = sum(h * 5 + f for h, f in kept)
    assert 30 - 4 < used <= 30  # within one chunk of FFN units
    assert kept[1][1] > kept[0][1]  # the second block's FFN units score higher
    with pytest.raises(WorkbenchError, match="scale='depth' is not one of block, raw"):
        allocate(heads, ffn, [(5, 1), (5, 1)], 30, [1, 1], [1, 1], scale="depth")


@pytest.mark.parametrize("family,kv", MODELS)
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_all_blocks_keep_ratio_together_and_the_zeroing_oracle_holds(family, kv, ratio):
    model = build(family, kv)
    plan = get_recipe("prune")(model, task=Calibration(), ratio=ratio, structured=True, global_ranking=True)
    step = plan.steps[0]
    assert step["global_ranking"] is True and step["max_ratio"] == 0.9
    pruned = wb.apply(model, plan)
    kept, budget = linear_params(pruned), ratio * linear_params(model)
    assert budget - ffn_cost(model) < kept <= budget
    heads = dict(zip(step["blocks"], step["heads_removed"]))
    ffn = dict(zip(step["blocks"], step["ffn_removed"]))
    torch.testing.assert_close(out(pruned), out(zero_units(model, heads, ffn)), rtol=0, atol=1e-10)
    blocks = head_pruning.find_blocks(pruned)
    assert pruned.config.layer_heads == [b.heads for b in blocks]
    assert pruned.config.layer_intermediate_sizes == [b.width for b in blocks]
    assert wb.Plan.from_json(plan.to_json()) == plan


def test_a_block_of_dead_units_is_cut_first_and_nothing_changes():
    model = build("bert")
    blocks = head_pruning.find_blocks(model)
    dead = blocks[1].name  # the second block: 3 of its 4 heads and 48 of its 64 FFN units do nothing
    model = zero_units(model, {dead: [0, 2, 3]}, {dead: list(range(16, 64))})
    head, ffn = head_pruning.unit_costs(model, blocks[1])[:2]
    total = linear_params(model)
    ratio = (total - 3 * head - 48 * ffn + 0.5) / total  # exactly the dead units' parameters go
    plan = get_recipe("prune")(model, task=Calibration(), ratio=ratio, structured=True, global_ranking=True)
    step = plan.steps[0]
    removed = dict(zip(step["blocks"], zip(step["heads_removed"], step["ffn_removed"])))
    assert set(removed[dead][0]) == {0, 2, 3} and set(removed[dead][1]) >= set(range(16, 64))
    assert removed[blocks[0].name] == ((), ())  # the budget is spent on the dead units
    torch.testing.assert_close(out(wb.apply(model, plan)), out(model), rtol=0, atol=1e-10)


def test_floors_hold_whatever_the_scores():
    model = build("bert")
    first = head_pruning.find_blocks(model)[0].name  # every unit of the first block dead
    model = zero_units(model, {first: range(HEADS)}, {first: range(FFN)})
    for ratio, min_heads, max_ratio in ((0.3, 0, 0.9), (0.45, 2, 0.7)):
        plan = get_recipe("prune")(model, task=Calibration(), ratio=ratio, structured=True, global_ranking=True,
                                   min_heads=min_heads, max_ratio=max_ratio)
        blocks = head_pruning.find_blocks(wb.apply(model, plan))
        assert blocks[0].heads == max(min_heads, 1)
        assert blocks[0].width == {0.9: 7, 0.7: 20}[max_ratio]  # ceil((1 - max_ratio) * width)
        assert all(b.heads >= max(min_heads, 1) and b.width >= (1 - max_ratio) * FFN for b in blocks)


def test_bad_settings_are_refused():
    model = build("gpt2")
    with pytest.raises(WorkbenchError, match=r"max_ratio=1.5 must be in \(0, 1\)"):
        get_recipe("prune")(model, ratio=0.5, structured=True, global_ranking=True, max_ratio=1.5)
    with pytest.raises(WorkbenchError, match="per-block floors .* more than the"):
        get_recipe("prune")(model, ratio=0.2, structured=True, global_ranking=True, min_heads=4)
    with pytest.raises(WorkbenchError, match="ratio=0 must be in"):
        get_recipe("prune")(model, ratio=0, structured=True, global_ranking=True)


def test_the_default_is_unchanged_per_block():
    model = build("llama", 2)
    step = get_recipe("prune")(model, task=Calibration(), ratio=0.5, structured=True).steps[0]
    assert "global_ranking" not in step.params and "max_ratio" not in step.params
    blocks = head_pruning.find_blocks(model)
    sizes = [head_pruning.kept_units(model, b, 0.5) for b in blocks]
    assert [(b.groups - len(h) // (HEADS // b.groups), b.width - len(f)) for b, h, f in
            zip(blocks, step["heads_removed"], step["ffn_removed"])] == sizes


def test_the_command_line_takes_global_ranking(tmp_path, capsys):
    from test_hf_folders import TEXTS, tiny_tokenizer, vocab_size
    from workbench.cli import main

    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=vocab_size(), hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=FFN,
        num_hidden_layers=LAYERS, max_position_embeddings=64))
    model.eval().save_pretrained(tmp_path / "bert", safe_serialization=True)
    tiny_tokenizer().save_pretrained(tmp_path / "bert")
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS * 2) + "\n")
    args = ["compress", str(tmp_path / "bert"), "--texts", str(tmp_path / "texts.txt"), "--method", "prune",
            "--structured", "--ratio", "0.5", "--global-ranking", "--max-ratio", "0.8", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["linear_params_kept"] <= 0.5
    assert main(args[:-3] + ["--min-heads", "4", "--ratio", "0.3", "--json"]) == 2
    assert "per-block floors" in capsys.readouterr().err
