"""Block-wise reconstruction: held-out error falls, compression and masks survive, nothing mutates."""
import copy

import pytest
import torch

import workbench as wb
from conftest import random_bert_task, state_bytes
from workbench.errors import WorkbenchError
from workbench.layers.lowrank import LowRankLinear
from workbench.measure import count_params
from workbench.recovery.blockwise import reconstruct_blocks
from workbench.registry import get_recipe


def _output_error(model, task) -> float:
    """Relative error of ``model``'s outputs to the original's on the TEST inputs (never trained on)."""
    with torch.no_grad():
        ref = task.model(task.eval_inputs)
        return float((model(task.eval_inputs) - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def low_rank_mlp(mlp_task):
    return wb.apply(mlp_task.model, get_recipe("svd")(mlp_task.model, ratio=0.5))


def test_tuned_factors_match_the_original_better_on_held_out_data_and_stay_factorized(mlp_task, low_rank_mlp):
    original_before, compressed_before = state_bytes(mlp_task.model), state_bytes(low_rank_mlp)
    result = reconstruct_blocks(low_rank_mlp, mlp_task.model, mlp_task.train_inputs, lr=1e-3, progress=False)
    assert state_bytes(mlp_task.model) == original_before and state_bytes(low_rank_mlp) == compressed_before
    assert _output_error(result.model, mlp_task) < 0.9 * _output_error(low_rank_mlp, mlp_task)
    for name, module in low_rank_mlp.named_modules():
        if isinstance(module, LowRankLinear):
            tuned = result.model.get_submodule(name)
            assert isinstance(tuned, LowRankLinear) and tuned.rank == module.rank
    assert count_params(result.model) == count_params(low_rank_mlp)
    tuned_stages = [s for s in result.stages if s["parameters"]]
    assert tuned_stages and all(s["best_loss"] <= s["start_loss"] for s in tuned_stages)
    assert any(s["best_epoch"] > 0 for s in tuned_stages)


def test_same_seed_gives_the_same_weights(mlp_task, low_rank_mlp):
    x = mlp_task.train_inputs[:300]
    a = reconstruct_blocks(low_rank_mlp, mlp_task.model, x, epochs=2, progress=False).model
    b = reconstruct_blocks(low_rank_mlp, mlp_task.model, x, epochs=2, progress=False).model
    assert state_bytes(a) == state_bytes(b)


def test_an_uncompressed_model_has_nothing_to_tune_and_comes_back_identical(mlp_task):
    copy_of_original = copy.deepcopy(mlp_task.model)
    result = reconstruct_blocks(copy_of_original, mlp_task.model, mlp_task.train_inputs[:200], progress=False)
    assert all(s["parameters"] == 0 for s in result.stages)
    assert state_bytes(result.model) == state_bytes(mlp_task.model)


def test_pruned_weights_stay_exactly_zero_and_sparse_stored(mlp_task):
    from workbench.layers.sparse import SparseLinear
    pruned = wb.apply(mlp_task.model, get_recipe("prune")(mlp_task.model, ratio=0.1))
    result = reconstruct_blocks(pruned, mlp_task.model, mlp_task.train_inputs, epochs=3, progress=False)
    for name, module in pruned.named_modules():
        if isinstance(module, SparseLinear):
            tuned = result.model.get_submodule(name)
            assert isinstance(tuned, SparseLinear) and torch.equal(tuned.mask(), module.mask())
    assert count_params(result.model) == count_params(pruned)
    assert _output_error(result.model, mlp_task) < _output_error(pruned, mlp_task)


def test_tuned_model_saves_and_loads_back_bit_identically(tmp_path, mlp_task, low_rank_mlp):
    from workbench.export import load_compressed, save_compressed
    plan = get_recipe("svd")(mlp_task.model, ratio=0.5)
    tuned = reconstruct_blocks(low_rank_mlp, mlp_task.model, mlp_task.train_inputs[:300], epochs=1,
                               progress=False).model
    loaded = load_compressed(save_compressed(tmp_path / "tuned.safetensors", tuned, plan, "digits-mlp"))
    assert state_bytes(loaded.model) == state_bytes(tuned)


@pytest.mark.parametrize("options,message", [
    ({"epochs": 0}, "epochs=0"), ({"lr": -1.0}, "lr=-1.0"), ({"batch_size": 0}, "batch_size=0"),
    ({"holdout": 1.0}, "holdout=1.0"), ({"train": "norms"}, "train='norms'"),
])
def test_bad_options_are_refused_with_the_allowed_values(mlp_task, low_rank_mlp, options, message):
    with pytest.raises(WorkbenchError, match=message):
        reconstruct_blocks(low_rank_mlp, mlp_task.model, mlp_task.train_inputs[:50], progress=False, **options)


def test_too_few_calibration_inputs_are_refused(mlp_task, low_rank_mlp):
    with pytest.raises(WorkbenchError, match="at least 4 calibration inputs"):
        reconstruct_blocks(low_rank_mlp, mlp_task.model, mlp_task.train_inputs[:3], progress=False)


def test_minilm_blocks_are_tuned_in_order_and_embeddings_get_closer():
    from workbench.zoo import minilm
    task = wb.load("minilm")
    plan = get_recipe("svd")(task.model, ratio=0.5)
    compressed = wb.apply(task.model, plan)
    result = reconstruct_blocks(compressed, task.model, task.train_inputs[:96], epochs=1, progress=False)
    assert [s["stage"] for s in result.stages] == ["bert.embeddings"] + [f"bert.encoder.layer.{i}" for i in range(6)]
    assert result.stages[0]["parameters"] == 0 and all(s["parameters"] > 0 for s in result.stages[1:])
    assert all(s["best_loss"] < s["start_loss"] for s in result.stages[1:])
    before = minilm.mean_cosine(task.outputs(compressed), task.eval_targets)
    assert minilm.mean_cosine(task.outputs(result.model), task.eval_targets) > before + 0.02


def test_cli_blockwise_reports_each_stage_and_the_saved_model_loads_back(capsys, tmp_path, mlp_task):
    import json

    from workbench.cli import main
    from workbench.export import load_compressed
    out = tmp_path / "tuned.safetensors"
    assert main(["compress", "digits-mlp", "--method", "svd", "--ratio", "0.5", "--blockwise", "2",
                 "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [s["stage"] for s in result["blockwise"]] == ["fc1+act1", "fc2+act2", "fc3"]
    assert all(s["best_loss"] <= s["start_loss"] for s in result["blockwise"])
    model, _, _ = load_compressed(out)
    assert isinstance(model.fc1, LowRankLinear)
    assert mlp_task.evaluate(model) == pytest.approx(result["after"]["metric"])
    assert main(["compress", "digits-mlp", "--method", "svd", "--ratio", "0.5", "--blockwise", "0"]) != 0
    assert "--blockwise 0" in capsys.readouterr().err


def test_quantized_layers_tune_their_codes_on_fixed_ptq_steps_and_stay_packed(mlp_task):
    from workbench.layers.quantized import QuantLinear
    quantized = wb.apply(mlp_task.model, get_recipe("qat")(mlp_task.model, bits=3))
    result = reconstruct_blocks(quantized, mlp_task.model, mlp_task.train_inputs, epochs=3, lr=1e-3, progress=False)
    changed = 0
    for name in ("fc1", "fc2", "fc3"):
        before, tuned = quantized.get_submodule(name), result.model.get_submodule(name)
        assert isinstance(tuned, QuantLinear) and tuned.bits == 3
        assert torch.equal(tuned.scale, before.scale)            # steps fixed, as in plain STE tuning
        changed += int(not torch.equal(tuned.codes(), before.codes()))
    assert changed > 0 and count_params(result.model) == count_params(quantized)
    assert all(p.requires_grad for p in result.model.parameters())


def test_a_user_transformer_is_tuned_block_by_block_and_its_output_error_falls():
    """A BERT built from a config declares no stages; its blocks are found automatically and each
    is tuned towards the original's hidden state, the pooler after them towards its output."""
    task, calibration = random_bert_task(layers=3)
    compressed = wb.apply(task.model, get_recipe("svd")(task.model, ratio=0.2))
    original_before, compressed_before = state_bytes(task.model), state_bytes(compressed)
    result = reconstruct_blocks(compressed, task.model, calibration, epochs=3, lr=1e-3, progress=False)
    assert state_bytes(task.model) == original_before and state_bytes(compressed) == compressed_before
    assert [s["stage"] for s in result.stages] == (["before encoder.layer"] + [f"encoder.layer.{i}" for i in range(3)]
                                                   + ["after encoder.layer"])
    # embeddings are not compressed; every block and the pooler (low-rank) are tuned
    assert result.stages[0]["parameters"] == 0 and all(s["parameters"] > 0 for s in result.stages[1:])
    assert all(s["best_loss"] <= s["start_loss"] for s in result.stages[1:])
    assert all(s["best_epoch"] > 0 for s in result.stages[1:4])
    for name, module in compressed.named_modules():
        if isinstance(module, LowRankLinear):
            assert result.model.get_submodule(name).rank == module.rank
    assert count_params(result.model) == count_params(compressed)

    def error(m):  # relative error of the judged output on the evaluation ids (never tuned on)
        reference = task.outputs(task.model)
        return float((task.outputs(m) - reference).norm() / reference.norm())

    assert error(result.model) < 0.9 * error(compressed)
