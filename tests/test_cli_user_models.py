"""The command line on the user's own model: ``MODEL --constructor MODULE:FN --data FILE``.

A tiny network module is written into a temporary folder put on ``sys.path``; its state_dict, a
TorchScript copy and a ``--data`` dict are saved beside it. Bad input exits 2 with one line.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import workbench as wb
from workbench.cli import main
from workbench.errors import WorkbenchError

MODULE = "cli_user_net"  # a name no other test imports
SOURCE = textwrap.dedent("""
    from torch import nn

    def build():
        return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def other():
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))

    def broken():
        raise ValueError("no weights today")

    class Doubled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            return self.fc(x) * 2
""")


def strict_loads(text: str):
    """``json.loads`` that refuses NaN, Infinity and -Infinity."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant} in the output")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``{name: path}``: the module, its state_dict (.pt and .safetensors), TorchScript, data files."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("user_model")
    (folder / f"{MODULE}.py").write_text(SOURCE)
    sys.path.insert(0, str(folder))
    try:
        module = __import__(MODULE)
        torch.manual_seed(0)
        model = module.build()
        paths = {"folder": folder, "pt": folder / "net.pt", "safetensors": folder / "net.safetensors",
                 "script": folder / "net_script.pt", "doubled": folder / "doubled_script.pt",
                 "data": folder / "data.pt"}
        torch.save(model.state_dict(), paths["pt"])
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(paths["safetensors"]))
        torch.jit.save(torch.jit.script(model), str(paths["script"]))
        torch.jit.save(torch.jit.script(module.Doubled()), str(paths["doubled"]))
        torch.save({"inputs": torch.randn(48, 16), "train_inputs": torch.randn(96, 16)}, paths["data"])
        yield paths
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(MODULE, None)


def run_json(capsys, *argv):
    assert main([str(a) for a in argv]) == 0
    return strict_loads(capsys.readouterr().out)


def own(files, kind="pt"):
    return [files[kind], "--constructor", f"{MODULE}:build", "--data", files["data"]]


def refused(capsys, *argv) -> str:
    """The one stderr line of a command that must exit with status 2."""
    assert main([str(a) for a in argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert captured.out == ""
    return lines[0]


@pytest.mark.parametrize("kind", ["pt", "safetensors"])
def test_compress_state_dict_file_halves_params_and_saves(capsys, files, kind, tmp_path):
    out = tmp_path / "small.safetensors"
    result = run_json(capsys, "compress", *own(files, kind), "--method", "svd", "--ratio", "0.5",
                      "--out", out, "--json")
    before, after = result["before"], result["after"]
    assert before["params"] == 16 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10
    assert 0.4 <= after["params"] / before["params"] <= 0.55
    assert after["bytes"] < before["bytes"] and after["flops"] < before["flops"]
    assert before["metric"] == pytest.approx(1.0)  # output fidelity of the original to itself
    assert 0 < after["metric"] < 1
    assert set(result["plan"]["layers"]) == {"0", "2", "4"}
    build, other = sys.modules[MODULE].build, sys.modules[MODULE].other
    loaded = wb.load_compressed(out, original=build())
    assert loaded.plan.to_dict() == result["plan"]
    # The CLI has no command that loads a compressed file: the refusal is the library's.
    with pytest.raises(WorkbenchError, match="different model"):
        wb.load_compressed(out, original=other())


def test_compress_torchscript_file(capsys, files):
    result = run_json(capsys, "compress", files["script"], "--data", files["data"], "--method", "svd",
                      "--ratio", "0.5", "--json")
    assert result["model"] == str(files["script"])
    assert 0.4 <= result["after"]["params"] / result["before"]["params"] <= 0.55
    assert {row["name"] for row in result["layers"]} == {"0", "2", "4"}
    assert result["left_dense"] == []


def test_spectra_of_own_model(capsys, files):
    layers = run_json(capsys, "spectra", *own(files), "--json")["layers"]
    assert [layer["name"] for layer in layers] == ["0", "2", "4"]
    state = torch.load(files["pt"], weights_only=True)
    expected = torch.linalg.svdvals(state["2.weight"].double())
    assert layers[1]["shape"] == [64, 64]
    assert layers[1]["singular_values"] == pytest.approx(expected.tolist(), rel=1e-5)


def test_sensitivity_and_allocate_on_own_model(capsys, files):
    result = run_json(capsys, "sensitivity", *own(files), "--grid", "0.25", "0.75", "--json")
    assert result["layers"] == ["0", "2", "4"] and result["grid"] == [0.25, 0.75]
    for row in result["metric"]:
        assert all(0 < value <= 1 for value in row)
        assert row[0] <= row[1] + 1e-6  # keeping more of a layer loses no fidelity here
    allocated = run_json(capsys, "allocate", *own(files), "--budget", "0.5", "--allocator", "uniform", "--json")
    assert allocated["used"] <= allocated["limit"] < allocated["total"]


def test_pareto_on_own_model(capsys, files, tmp_path):
    result = run_json(capsys, "pareto", *own(files), "--out", tmp_path, "--methods", "svd",
                      "--no-combinations", "--no-allocations", "--no-recovery", "--json")
    assert any(p["method"] == "original" for p in result["points"])
    assert any(p["params"] < result["points"][0]["params"] for p in result["points"])
    strict_loads((tmp_path / "pareto.json").read_text())


def test_subprocess_json_is_strict_and_constructor_found_on_pythonpath(files):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(files["folder"]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "workbench", "compress", *map(str, own(files)), "--method", "svd",
                           "--ratio", "0.5", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = strict_loads(proc.stdout)
    assert result["after"]["params"] < result["before"]["params"]


def test_a_pickle_that_would_run_code_is_refused_unexecuted(capsys, files, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pt"
    torch.save({"inputs": Payload()}, evil)
    line = refused(capsys, "compress", files["pt"], "--constructor", f"{MODULE}:build", "--data", evil,
                   "--method", "svd", "--ratio", "0.5", "--json")
    assert "would run code" in line and "inputs, targets, train_inputs, train_targets" in line
    assert "\x1b" not in line
    assert not marker.exists()


def data_file(tmp_path, name, value):
    path = tmp_path / name
    torch.save(value, path)
    return path


@pytest.mark.parametrize("case, expected", [
    ("missing model", "no such file"),
    ("folder", "must be a model file"),
    ("missing constructor", "--constructor MODULE:FN"),
    ("unimportable module", "cannot be imported (ModuleNotFoundError"),
    ("absent function", "cannot be imported (AttributeError"),
    ("constructor without colon", "must look like MODULE:FUNCTION"),
    ("constructor raises", "failed when called with no arguments (ValueError: no weights today)"),
    ("wrong constructor", "do not fit Sequential"),
    ("no data", "give --data FILE"),
    ("missing data file", "no such file"),
    ("unknown data key", "unknown key(s) 'labels'"),
    ("not a dict", "holds a list"),
    ("not a tensor", "'inputs' (list) not a tensor"),
    ("no inputs", "has no 'inputs'"),
    ("train targets alone", "'train_targets' without 'train_inputs'"),
    ("shape does not fit", "--data inputs of shape (4, 7)"),
    ("train shape does not fit", "--data train_inputs of shape (4, 3)"),
    ("torchscript shape does not fit", "--data inputs of shape (4, 7) do not fit"),
    ("torchscript custom forward", "layer '(model)' (Doubled) cannot be rebuilt"),
    ("embedded model with data", "--data is for your own model files"),
])
def test_bad_input_exits_2_with_one_line(capsys, files, tmp_path, case, expected):
    good = files["data"]
    model, constructor, data = files["pt"], f"{MODULE}:build", good
    if case == "missing model":
        model = tmp_path / "nope.pt"
    elif case == "folder":
        model = tmp_path
    elif case == "missing constructor":
        constructor = None
    elif case == "unimportable module":
        constructor = "no_such_module_xyz:build"
    elif case == "absent function":
        constructor = f"{MODULE}:absent"
    elif case == "constructor without colon":
        constructor = MODULE
    elif case == "constructor raises":
        constructor = f"{MODULE}:broken"
    elif case == "wrong constructor":
        constructor = f"{MODULE}:other"
    elif case == "no data":
        data = None
    elif case == "missing data file":
        data = tmp_path / "absent.pt"
    elif case == "unknown data key":
        data = data_file(tmp_path, "d.pt", {"inputs": torch.randn(4, 16), "labels": torch.zeros(4)})
    elif case == "not a dict":
        data = data_file(tmp_path, "d.pt", [torch.randn(4, 16)])
    elif case == "not a tensor":
        data = data_file(tmp_path, "d.pt", {"inputs": [1.0, 2.0]})
    elif case == "no inputs":
        data = data_file(tmp_path, "d.pt", {"targets": torch.zeros(4)})
    elif case == "train targets alone":
        data = data_file(tmp_path, "d.pt", {"inputs": torch.randn(4, 16), "train_targets": torch.zeros(4)})
    elif case == "shape does not fit":
        data = data_file(tmp_path, "d.pt", {"inputs": torch.randn(4, 7)})
    elif case == "train shape does not fit":
        data = data_file(tmp_path, "d.pt", {"inputs": torch.randn(4, 16), "train_inputs": torch.randn(4, 3)})
    elif case == "torchscript shape does not fit":
        model, constructor = files["script"], None
        data = data_file(tmp_path, "d.pt", {"inputs": torch.randn(4, 7)})
    elif case == "torchscript custom forward":
        model, constructor = files["doubled"], None
    elif case == "embedded model with data":
        model, constructor = "digits-mlp", None
    argv = ["compress", model, "--method", "svd", "--ratio", "0.5", "--json"]
    argv += ["--constructor", constructor] if constructor else []
    argv += ["--data", data] if data else []
    assert expected in refused(capsys, *argv)


@pytest.mark.parametrize("command", ["spectra", "sensitivity", "allocate", "pareto", "report"])
def test_every_model_command_takes_the_same_flags(capsys, files, tmp_path, command):
    """Each command refuses the same bad --data in the same words, before doing any work."""
    bad = data_file(tmp_path, "d.pt", {"inputs": torch.randn(4, 16), "extra": torch.zeros(1)})
    extra = {"allocate": ["--budget", "0.5"], "pareto": ["--out", tmp_path / "p"],
             "report": ["--out", tmp_path / "r"]}.get(command, [])
    line = refused(capsys, command, files["pt"], "--constructor", f"{MODULE}:build", "--data", bad, *extra)
    assert "unknown key(s) 'extra'" in line


def test_a_model_that_is_not_nn_module_is_refused(capsys, files, tmp_path):
    (files["folder"] / "cli_user_not_module.py").write_text("def build():\n    return 3\n")
    line = refused(capsys, "spectra", files["pt"], "--constructor", "cli_user_not_module:build", "--data", files["data"])
    assert "not an nn.Module" in line


def test_eager_rebuild_matches_the_script(files):
    from workbench.cli.model_source import eager_from_torchscript

    script = torch.jit.load(str(files["script"]))
    inputs = torch.randn(5, 16)
    model = eager_from_torchscript(script, inputs, "net_script.pt")
    assert isinstance(model, nn.Sequential) and not model.training
    with torch.no_grad():
        assert torch.equal(model(inputs), script(inputs))
