"""Attention-head and FFN-width pruning (``prune_heads``) on small random-weight BERT, GPT-2 and
Llama models built from configs (nothing downloaded). Oracles: a removed unit is a zeroed column
of its block's output projection; heads whose output projection is already zero are the ones
calibration ranks last, and removing them changes nothing; parameter counts follow the formula."""
import copy

import pytest
import torch

import workbench as wb
from workbench.errors import WorkbenchError
from workbench.methods import head_pruning
from workbench.methods.pruning import pruning_report
from workbench.registry import get_recipe

from conftest import state_bytes

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, FFN, LAYERS = 32, 4, 64, 2


def build(family: str, kv_heads: int = HEADS) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "bert":
        config = transformers.BertConfig(vocab_size=50, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                         intermediate_size=FFN, num_hidden_layers=LAYERS, max_position_embeddings=32)
        model = transformers.BertModel(config, add_pooling_layer=False)
    elif family == "gpt2":
        config = transformers.GPT2Config(vocab_size=50, n_embd=HIDDEN, n_head=HEADS, n_inner=FFN, n_layer=LAYERS,
                                         n_positions=32)
        model = transformers.GPT2Model(config)
    else:
        config = transformers.LlamaConfig(vocab_size=50, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                          num_key_value_heads=kv_heads, intermediate_size=FFN,
                                          num_hidden_layers=LAYERS, max_position_embeddings=32)
        model = transformers.LlamaModel(config)
    return model.double().eval()


IDS = torch.randint(0, 50, (6, 10), generator=torch.Generator().manual_seed(1))
MODELS = [("bert", HEADS), ("gpt2", HEADS), ("llama", HEADS), ("llama", 2)]


class Calibration:
    """A stand-in task: the recipe reads only its calibration inputs (token ids)."""

    def calibration_inputs(self, n):
        return IDS[:n]


def out(model, ids=IDS):
    with torch.no_grad():
        return model(ids).last_hidden_state


def zero_units(model, heads: dict, ffn: dict):
    """A copy whose removed units are cut off: their columns of the output projections zeroed.
    ``heads`` / ``ffn``: ``{block name: unit indices}`` (query heads / FFN units)."""
    masked = copy.deepcopy(model)
    blocks = {b.name: b for b in head_pruning.find_blocks(masked)}
    with torch.no_grad():
        for name, units in heads.items():
            b = blocks[name]
            cols = [h * b.head_dim + i for h in units for i in range(b.head_dim)]
            head_pruning.matrix(masked.get_submodule(b.out))[:, cols] = 0
        for name, units in ffn.items():
            head_pruning.matrix(masked.get_submodule(blocks[name].ffn_out))[:, list(units)] = 0
    return masked


def linear_params(model):
    return sum(head_pruning.linear_params(model, b) for b in head_pruning.find_blocks(model))


@pytest.mark.parametrize("family,kv", MODELS)
def test_pruned_model_computes_the_model_with_those_units_cut_off(family, kv):
    model = build(family, kv)
    before, config = state_bytes(model), model.config.to_dict()
    plan = get_recipe("prune")(model, task=Calibration(), ratio=0.5, structured=True)
    step = plan.steps[0]
    assert step.method == "prune_heads" and step["importance"] == "output"
    pruned = wb.apply(model, plan)
    heads = dict(zip(step["blocks"], step["heads_removed"]))
    ffn = dict(zip(step["blocks"], step["ffn_removed"]))
    assert all(len(h) == HEADS // 2 for h in heads.values())
    torch.testing.assert_close(out(pruned), out(zero_units(model, heads, ffn)), rtol=0, atol=1e-10)
    # really smaller: q/k/v/o and FFN shapes, head counts, config's per-block values
    blocks = head_pruning.find_blocks(pruned)
    assert [b.heads for b in blocks] == [HEADS // 2] * LAYERS
    assert pruned.config.layer_heads == [HEADS // 2] * LAYERS
    assert pruned.config.layer_intermediate_sizes == [b.width for b in blocks]
    assert linear_params(pruned) == pytest.approx(0.5 * linear_params(model), abs=LAYERS * (2 * HIDDEN + 1))
    if kv < HEADS:  # GQA: whole k/v groups go, with their query heads
        assert [pruned.get_submodule(b.qkv[1]).out_features for b in blocks] == [HIDDEN // HEADS] * LAYERS
    # the user's model and config are untouched; the plan round-trips through JSON
    assert state_bytes(model) == before and model.config.to_dict() == config
    assert not hasattr(model.config, "layer_heads")
    assert wb.Plan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize("family,kv", MODELS)
def test_heads_with_a_zero_output_projection_are_the_ones_removed_and_nothing_changes(family, kv):
    model = build(family, kv)
    blocks = head_pruning.find_blocks(model)
    per = HEADS // kv
    dead_heads = {b.name: [h for u in (0, kv - 1) if kv > 1 or u == 0 for h in range(u * per, (u + 1) * per)][:HEADS // 2]
                  for b in blocks}
    keep_width = head_pruning.kept_units(model, blocks[0], 0.5)[1]
    dead_ffn = {b.name: list(range(1, 2 * (FFN - keep_width), 2))[:FFN - keep_width] for b in blocks}
    model = zero_units(model, dead_heads, dead_ffn)
    plan = get_recipe("prune")(model, task=Calibration(), ratio=0.5, structured=True)
    step = plan.steps[0]
    assert [list(h) for h in step["heads_removed"]] == [sorted(dead_heads[b.name]) for b in blocks]
    assert [list(f) for f in step["ffn_removed"]] == [dead_ffn[b.name] for b in blocks]
    torch.testing.assert_close(out(wb.apply(model, plan)), out(model), rtol=0, atol=1e-10)


@pytest.mark.parametrize("family,kv", MODELS)
def test_ratio_one_keeps_everything(family, kv):
    model = build(family, kv)
    pruned = wb.apply(model, get_recipe("prune")(model, ratio=1.0, structured=True))
    assert linear_params(pruned) == linear_params(model)
    torch.testing.assert_close(out(pruned), out(model), rtol=0, atol=0)


def test_param_counts_follow_the_formula():
    model = build("bert")
    plan = get_recipe("prune")(model, ratio=0.5, structured=True)
    step = plan.steps[0]
    assert step["importance"] == "weights"  # no task: ranked by weight norms
    d = HIDDEN // HEADS
    heads, width = HEADS // 2, FFN - len(step["ffn_removed"][0])
    per_block = heads * (4 * HIDDEN * d + 3 * d) + HIDDEN + width * (2 * HIDDEN + 1) + HIDDEN
    pruned = wb.apply(model, plan)
    assert linear_params(pruned) == LAYERS * per_block
    total = HEADS * (4 * HIDDEN * d + 3 * d) + FFN * (2 * HIDDEN + 1) + 2 * HIDDEN
    assert abs(per_block - 0.5 * total) <= (2 * HIDDEN + 1) / 2  # within half an FFN unit
    report = pruning_report(model, pruned, None, plan)
    assert [(r["heads_before"], r["heads_after"], r["ffn_before"], r["ffn_after"]) for r in report["blocks"]] == \
        [(HEADS, heads, FFN, width)] * LAYERS
    assert report["linear_params_kept"] == pytest.approx(0.5, abs=0.01)


def test_round_to_and_min_heads():
    model = build("bert")
    step = get_recipe("prune")(model, ratio=0.5, structured=True, round_to=8).steps[0]
    assert (FFN - len(step["ffn_removed"][0])) % 8 == 0
    with pytest.raises(WorkbenchError, match="keeps 0 of the 4 attention units"):
        get_recipe("prune")(model, ratio=0.1, structured=True)
    step = get_recipe("prune")(model, ratio=0.3, structured=True, min_heads=2).steps[0]
    assert [len(h) for h in step["heads_removed"]] == [2] * LAYERS


@pytest.mark.parametrize("bad,match", [(0, "ratio=0 must be in"), (1.5, "ratio=1.5 must be in"),
                                       (0.02, "keeps 0 of the 4 attention units")])
def test_bad_ratios_are_refused(bad, match):
    model = build("gpt2")
    with pytest.raises(WorkbenchError, match=match):
        get_recipe("prune")(model, ratio=bad, structured=True)
    with pytest.raises(WorkbenchError, match="leaves no FFN hidden unit"):
        get_recipe("prune")(model, ratio=0.05, structured=True, min_heads=1)
    with pytest.raises(WorkbenchError, match="'taylor' is for channel groups"):
        get_recipe("prune")(model, ratio=0.5, structured=True, importance="taylor")


def test_a_bad_block_is_refused_before_any_edit():
    model = build("llama", 2)
    step = get_recipe("prune")(model, ratio=0.5, structured=True).steps[0]
    params = dict(step.params)
    params["heads_removed"] = (step["heads_removed"][0], (0, 1, 2, 3))  # every head of the second block
    work = copy.deepcopy(model)
    before = state_bytes(work)
    with pytest.raises(WorkbenchError, match="removing all 4 would leave nothing"):
        head_pruning.build_heads(work, params, None)
    assert state_bytes(work) == before  # the first block was not rebuilt either
    params["heads_removed"] = ((0,), (0, 1))  # half of a k/v group
    with pytest.raises(WorkbenchError, match="must be whole groups of 2"):
        head_pruning.build_heads(work, params, None)
    assert state_bytes(work) == before


@pytest.mark.parametrize("global_ranking,ratio", [(False, 0.5), (True, 0.4)], ids=["per-block", "global"])
def test_save_and_load_rebuild_the_same_model(tmp_path, global_ranking, ratio):
    """Per-block and globally allocated (`head_allocation`) pruning both rebuild bit-identically."""
    from workbench.export import load_compressed, save_compressed

    model = build("gpt2").float()
    plan = get_recipe("prune")(model, task=Calibration(), ratio=ratio, structured=True, global_ranking=global_ranking)
    pruned = wb.apply(model, plan)
    path = save_compressed(tmp_path / "gpt2.safetensors", pruned, plan, "tiny-gpt2", original=model,
                           example_input=IDS[:1])
    loaded = load_compressed(path, original=model)
    assert loaded.plan == plan
    torch.testing.assert_close(out(loaded.model), out(pruned), rtol=0, atol=0)


def test_blockwise_reconstruction_runs_on_the_rebuilt_model():
    from workbench.recovery.blockwise import reconstruct_blocks

    model = build("bert").float()
    pruned = wb.apply(model, get_recipe("prune")(model, task=Calibration(), ratio=0.5, structured=True))
    ids = torch.randint(0, 50, (24, 10), generator=torch.Generator().manual_seed(2))
    result = reconstruct_blocks(pruned, model, ids, epochs=3, lr=3e-3, batch_size=8, progress=False)
    tuned = [s for s in result.stages if "best_loss" in s]
    assert len(tuned) >= LAYERS and all(s["best_loss"] <= s["start_loss"] for s in tuned)
    assert any(s["best_loss"] < s["start_loss"] for s in tuned)
    assert head_pruning.find_blocks(result.model)[0].heads == HEADS // 2


def test_the_command_line_prunes_a_llama_folder_and_reconstructs(tmp_path, capsys):
    import json

    from test_hf_folders import TEXTS, tiny_tokenizer, vocab_size
    from workbench.cli import main

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=2,
        intermediate_size=FFN, max_position_embeddings=64, vocab_size=vocab_size(), bos_token_id=2, eos_token_id=3,
        pad_token_id=0))
    model.eval().save_pretrained(tmp_path / "llama", safe_serialization=True)
    tiny_tokenizer().save_pretrained(tmp_path / "llama")
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS * 2) + "\n")
    code = main(["compress", str(tmp_path / "llama"), "--texts", str(tmp_path / "texts.txt"), "--method", "prune",
                 "--structured", "--ratio", "0.5", "--blockwise", "1", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["after"]["params"] < out["before"]["params"]
    assert [(b["heads_before"], b["heads_after"]) for b in out["blocks"]] == [(HEADS, HEADS // 2)] * LAYERS
    assert all(b["ffn_after"] < b["ffn_before"] for b in out["blocks"])
    assert out["linear_params_kept"] == pytest.approx(0.5, abs=0.02) and out["blockwise"]
    assert main(["compress", str(tmp_path / "llama"), "--texts", str(tmp_path / "texts.txt"), "--method", "prune",
                 "--structured", "--ratio", "0.1", "--json"]) == 2
    assert "keeps 0 of the 2 attention units" in capsys.readouterr().err
