"""The command line: JSON shapes, saved models that load back, bad input exits 2 with a message."""
import json
import subprocess
import sys

import pytest
import torch

from workbench.cli import main
from workbench.export import load_compressed


def run_json(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


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
