"""`compress --method prune|quant|int8`: the svd JSON plus notes; saved models load back."""
import json

import pytest

from workbench.cli import main
from workbench.export import load_compressed


def run_json(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("argv, max_bytes", [
    (["--method", "prune", "--ratio", "0.5", "--structured"], 0.4),
    (["--method", "quant", "--bits", "4", "--scheme", "kmeans"], 0.2),
    (["--method", "int8"], 0.3),
])
def test_compress_json_and_saved_model_loads_back(capsys, tmp_path, mlp_task, argv, max_bytes):
    out = tmp_path / "small.safetensors"
    result = run_json(capsys, "compress", "digits-mlp", *argv, "--out", str(out), "--json")
    before, after = result["before"], result["after"]
    assert after["bytes"] <= max_bytes * before["bytes"]
    assert {row["name"] for row in result["layers"]} == {"fc1", "fc2", "fc3"}
    assert result["notes"]
    model, plan, _ = load_compressed(out)
    assert json.loads(plan.to_json()) == result["plan"]
    assert mlp_task.evaluate(model) == pytest.approx(after["metric"])


def test_unstructured_prune_reports_sparse_latency(capsys, tmp_path, mlp_task):
    out = tmp_path / "sparse.safetensors"
    result = run_json(capsys, "compress", "digits-mlp", "--method", "prune", "--ratio", "0.2",
                      "--out", str(out), "--json")
    assert result["after"]["bytes"] <= 0.3 * result["before"]["bytes"]
    assert mlp_task.evaluate(load_compressed(out)[0]) == pytest.approx(result["after"]["metric"])
    rows = result["sparse_latency"]
    assert [r["name"] for r in rows] == ["fc1", "fc2", "fc3"]
    assert all(r["sparse_ms"] > 0 and r["dense_ms"] > 0 and r["sparsity"] == pytest.approx(0.8, abs=0.01) for r in rows)


def test_quant_error_figures_match_a_direct_computation(capsys, mlp_task):
    """``layer_errors``: weight MSE against the dequantized codes, and the output error of each
    layer on its own calibration inputs, recomputed here from the saved model."""
    from workbench.hooks import collect_layer_inputs
    from workbench.registry import get_recipe
    import workbench as wb

    result = run_json(capsys, "compress", "digits-mlp", "--method", "quant", "--bits", "3", "--json")
    model = wb.apply(mlp_task.model, get_recipe("quant")(mlp_task.model, bits=3))
    inputs = collect_layer_inputs(mlp_task.model, ["fc1", "fc2", "fc3"], mlp_task.calibration_inputs())
    rows = {row["name"]: row for row in result["layer_errors"]}
    assert set(rows) == {"fc1", "fc2", "fc3"}
    for name, row in rows.items():
        w, w_q = mlp_task.model.get_submodule(name).weight.detach(), model.get_submodule(name).dequantized_weight()
        assert row["bits"] == 3 and row["weight_mse"] == pytest.approx(float(((w - w_q) ** 2).mean()), rel=1e-5)
        x, bias = inputs[name], mlp_task.model.get_submodule(name).bias.detach()
        y = x @ w.T + bias
        expected = float((x @ (w_q - w).T).norm() / y.norm())
        assert 0 < row["output_rel_error"] == pytest.approx(expected, rel=1e-3)


def test_int8_reports_its_measured_latency(capsys):
    result = run_json(capsys, "compress", "digits-mlp", "--method", "int8", "--json")
    timing = result["latency_batch"]
    assert timing["batch"] == 256 and timing["fp32_ms"] > 0 and timing["int8_ms"] > 0
    assert timing["speedup"] == pytest.approx(timing["fp32_ms"] / timing["int8_ms"], rel=0.01)
    assert any("int8" in note for note in result["notes"])


@pytest.mark.parametrize("argv, message", [
    (["--method", "quant", "--bits", "9"], "bits=9 is outside 1..8"),
    (["--method", "prune", "--ratio", "1.5"], "ratio=1.5 must be in (0, 1]"),
    (["--method", "prune", "--ratio", "0.5", "--layers", "act1"], "'act1' of type ReLU"),
])
def test_bad_input_exits_2(capsys, argv, message):
    assert main(["compress", "digits-mlp", *argv]) == 2
    assert message in capsys.readouterr().err
