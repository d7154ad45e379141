"""The command line: JSON shapes, saved models that load back, bad input exits 2 with a message."""
import json
import subprocess
import sys

import pytest
import torch

from workbench.cli import main
from workbench.cli.output import emit
from workbench.export import load_compressed

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def strict_loads(text: str):
    """``json.loads`` that refuses the non-standard constants NaN, Infinity and -Infinity."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant} in the output")
    return json.loads(text, parse_constant=refuse)


def run_json(capsys, *argv):
    assert main(list(argv)) == 0
    return strict_loads(capsys.readouterr().out)


def test_models_lists_the_embedded_models(capsys):
    names = {m["name"] for m in run_json(capsys, "models", "--json")["models"]}
    assert {"digits-mlp", "digits-cnn", "digits-gru"} <= names


def test_spectra_json(capsys, mlp_task):
    layers = run_json(capsys, "spectra", "digits-mlp", "--json")["layers"]
    assert [l["name"] for l in layers] == ["fc1", "fc2", "fc3"]
    assert layers[1]["shape"] == [256, 256] and len(layers[1]["singular_values"]) == 256
    expected = torch.linalg.svdvals(mlp_task.model.fc2.weight.detach().double())
    assert layers[1]["singular_values"][:5] == pytest.approx(expected[:5].tolist(), rel=1e-5)
    assert layers[1]["singular_values"] == sorted(layers[1]["singular_values"], reverse=True)


def test_compress_ratio_half_json_and_saved_model_loads_back(capsys, tmp_path, mlp_task):
    out = tmp_path / "small.safetensors"
    result = run_json(capsys, "compress", "digits-mlp", "--method", "svd", "--ratio", "0.5",
                      "--out", str(out), "--json")
    before, after = result["before"], result["after"]
    for key in ("metric", "params", "bytes", "flops"):
        assert key in before and key in after
    assert 0.45 <= after["params"] / before["params"] <= 0.55
    assert 0.45 <= after["bytes"] / before["bytes"] <= 0.55
    assert after["flops"] < before["flops"]
    assert {row["name"] for row in result["layers"]} == {"fc1", "fc2", "fc3"}
    model, plan, name = load_compressed(out)
    assert name == "digits-mlp" and plan.to_dict() == result["plan"]
    assert mlp_task.evaluate(model) == pytest.approx(after["metric"])


def test_compress_by_rank_and_energy(capsys):
    result = run_json(capsys, "compress", "digits-mlp", "--method", "svd", "--rank", "fc2=16", "--json")
    assert result["plan"]["layers"] == {"fc2": {"method": "svd", "rank": 16}}
    row = next(r for r in result["layers"] if r["name"] == "fc2")
    assert row["params_after"] == 16 * 512 + 256
    result = run_json(capsys, "compress", "digits-cnn", "--method", "svd", "--energy", "0.9", "--json")
    assert result["after"]["params"] < result["before"]["params"]


@pytest.mark.parametrize("argv, message", [
    (["compress", "digits-mlp", "--method", "svd", "--rank", "fc1=0"], "rank=0"),
    (["compress", "digits-mlp", "--method", "svd", "--rank", "fc1=65"], r"rank=65 is above min\(out, in\)=64"),
    (["compress", "digits-mlp", "--method", "svd", "--ratio", "1.2"], r"ratio=1.2 must be in \(0, 1\]"),
    (["compress", "digits-mlp", "--method", "svd", "--energy", "0"], r"energy=0.0 must be in \(0, 1\]"),
    (["compress", "digits-mlp", "--method", "svd", "--rank", "fc7=3"], "unknown layer 'fc7'"),
    (["compress", "digits-mlp", "--method", "svd", "--rank", "act1=3"], "act1"),
    (["compress", "nonexistent", "--method", "svd", "--ratio", "0.5"], "unknown model 'nonexistent'"),
    (["compress", "digits-mlp", "--method", "magic", "--ratio", "0.5"], "unknown method 'magic'"),
    # a flag the method would ignore is refused, naming what the method takes
    (["compress", "digits-mlp", "--method", "quant", "--bits", "4", "--ratio", "0.3"],
     r"--ratio does not apply to --method quant \(it takes: .*--bits"),
    (["compress", "digits-mlp", "--method", "int8", "--bits", "4"], "--bits does not apply to --method int8"),
    # ranks above a mode's size: Tucker's smaller channel mode, a GRU's largest matrix rank
    (["compress", "digits-cnn", "--method", "tucker", "--rank", "conv2=40"], r"rank=40 is above the smaller channel mode"),
    (["compress", "digits-cnn", "--method", "tucker", "--rank", "conv2=24x40"], "rank_in=40"),
    (["compress", "digits-gru", "--method", "svd", "--rank", "rnn=100"], r"rank=100 is above .*weight_hh \(64"),
    (["sensitivity", "digits-mlp", "--layers", "nope"], r"layers \['nope'\] are not compressible .* fc1, fc2, fc3"),
    (["report", "digits-mlp", "--budget", "0.0001", "--out", "{tmp}/report"], r"below the smallest model .* at least 0.02"),
    (["pareto", "digits-mlp", "--out", "{tmp}/file/sub"], "cannot create output folder"),
    (["pareto", "digits-mlp", "--out", "{tmp}/pareto", "--methods", "svd", "magic"], "unknown method 'magic'"),
    # a grid value the recipe refuses for every layer is an error, not a row of NaN
    (["sensitivity", "digits-mlp", "--method", "quant", "--grid", "0", "4"],
     r"--grid 0 is refused by --method quant: bits=0"),
    (["sensitivity", "digits-mlp", "--method", "quant", "--grid", "2.5"], r"bits=2.5 must be an integer"),
    (["sensitivity", "digits-cnn", "--method", "tucker", "--grid", "0.5", "--layers", "conv2", "fc1"],
     r"layer 'fc1' is refused by --method tucker: tucker needs nn.Conv2d"),
])
def test_bad_input_exits_2_with_a_clear_message(capsys, tmp_path, argv, message):
    (tmp_path / "file").write_text("not a folder")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().split("\n")[-1].split("\r")[-1]  # after any progress bar
    assert err.startswith("error: ")
    assert __import__("re").search(message, err), err
    assert "Traceback" not in err
    assert not list(tmp_path.rglob("*.html")) and not list(tmp_path.rglob("*.json"))  # nothing half-written


def test_recurrent_rank_that_would_not_save_weights_leaves_the_matrix_dense(capsys, gru_task):
    """One rank for both GRU matrices is capped per matrix, and a matrix whose factors would
    hold more weights than itself stays dense: the model never grows."""
    out = run_json(capsys, "compress", "digits-gru", "--method", "svd", "--rank", "rnn=20", "--json")
    settings = out["plan"]["layers"]["rnn"]
    assert settings["rank_ih"] is None and settings["rank_hh"] == 20  # ih: 8 inputs, rank 8 saves nothing
    assert out["after"]["params"] < out["before"]["params"]
    # per gate, 64 x 64 at rank 40 stores 5,120 weights instead of 4,096: both matrices stay dense
    out = run_json(capsys, "compress", "digits-gru", "--method", "svd", "--rank", "rnn=40", "--json")
    assert out["plan"]["layers"] == {} and out["after"]["params"] == out["before"]["params"]


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "workbench", "compress", "digits-mlp", "--method", "svd",
                           "--rank", "fc1=999"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "rank=999 is above" in done.stderr and "Traceback" not in done.stderr


def test_json_is_strict_non_finite_values_become_null_with_a_reason(capsys):
    emit({"metric": float("nan"), "metric_error": "the recipe refused", "latency_ms": float("inf"),
          "grid": [0.5, float("-inf")], "rows": [{"loss": float("nan")}], "n": 3}, as_json=True)
    data = strict_loads(capsys.readouterr().out)
    assert data["metric"] is None and data["metric_error"] == "the recipe refused"  # the producer's reason kept
    assert data["latency_ms"] is None and "not a finite number (inf)" in data["latency_ms_error"]
    assert data["grid"] == [0.5, None] and data["n"] == 3
    assert data["rows"] == [{"loss": None, "loss_error": data["rows"][0]["loss_error"]}]
    assert "nan" in data["rows"][0]["loss_error"]
    emit({"metric": float("nan")}, as_json=False)  # the indented default (no text) is strict too
    assert strict_loads(capsys.readouterr().out)["metric"] is None


def test_sensitivity_quant_grid_is_integer_bits(capsys, mlp_task):
    """``--grid 2 4 8`` reaches the quant recipe as bits=2, 4, 8 (not 2.0, which it refuses)."""
    data = run_json(capsys, "sensitivity", "digits-mlp", "--method", "quant", "--grid", "2", "4", "8", "--json")
    assert data["option"] == "bits" and data["grid"] == [2, 4, 8]
    assert all(type(g) is int for g in data["grid"])
    assert data["layers"] == ["fc1", "fc2", "fc3"] and "metric_errors" not in data
    for row, choices in zip(data["metric"], data["choices"]):
        assert all(isinstance(v, float) and 0 <= v <= 1 for v in row)
        assert [c["bits"] for c in choices] == [2, 4, 8]
        assert row[0] <= row[2]  # 2 bits never beat 8 bits here
    assert main(["sensitivity", "digits-mlp", "--method", "quant", "--grid", "2", "4", "8"]) == 0
    text = capsys.readouterr().out
    assert "nan" not in text.lower() and "bits:" in text


def test_sensitivity_layers_a_method_does_not_take_are_null_with_the_reason(capsys, cnn_task):
    """Tucker on the CNN: the convs are measured, the Linear layers are null beside the recipe's reason."""
    data = run_json(capsys, "sensitivity", "digits-cnn", "--method", "tucker", "--grid", "0.1", "0.5", "--json")
    assert data["layers"] == ["conv1", "conv2", "fc1", "fc2"]
    for name, row, reasons in zip(data["layers"], data["metric"], data["metric_errors"]):
        if name.startswith("conv"):
            assert all(isinstance(v, float) for v in row) and reasons == [None, None]
        else:
            assert row == [None, None]
            assert all(f"tucker needs nn.Conv2d, got Linear for layer {name!r}" in r for r in reasons)


def test_pareto_writes_strict_json_and_both_charts(capsys, tmp_path, mlp_task):
    out = tmp_path / "pareto"
    data = run_json(capsys, "pareto", "digits-mlp", "--out", str(out), "--methods", "svd", "quant",
                    "--no-combinations", "--no-allocations", "--no-recovery", "--max-bytes", "100000", "--json")
    labels = [p["label"] for p in data["points"]]
    assert labels[0] == "original"
    assert {p["method"] for p in data["points"]} == {"original", "svd", "quant"}  # only what was asked for
    assert data["files"] == [str(out / n) for n in ("pareto.json", "pareto_bytes.png", "pareto_latency.png")]
    assert strict_loads((out / "pareto.json").read_text()) == {k: v for k, v in data.items() if k != "files"}
    for name in ("pareto_bytes.png", "pareto_latency.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    on_front = [p for p in data["points"] if p["on_front_bytes"]]
    assert on_front and all(p["bytes"] > 0 for p in on_front)
    choice = data["advice"]["choice"]
    assert choice is not None and choice["bytes"] <= 100_000 and choice["label"] in labels


@pytest.mark.parametrize("command", ["compress", "spectra", "sensitivity", "allocate", "pareto", "report"])
def test_model_commands_take_own_model_flags(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--constructor MODULE:FN" in text and "--data FILE" in text


def test_embedded_model_refuses_own_model_flags(capsys):
    assert main(["spectra", "digits-mlp", "--constructor", "x:y", "--data", "d.pt"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --constructor and --data are for your own model files; the embedded model 'digits-mlp' "
        "brings its own architecture and data")
