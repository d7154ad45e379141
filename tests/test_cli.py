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
])
def test_bad_input_exits_2_with_a_clear_message(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert __import__("re").search(message, err), err
    assert "Traceback" not in err


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "workbench", "compress", "digits-mlp", "--method", "svd",
                           "--rank", "fc1=999"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "rank=999 is above" in done.stderr and "Traceback" not in done.stderr
