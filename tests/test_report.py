"""The headless report on digits-mlp (reduced study): a self-contained page, parseable results,
honest measures, exported models that reload; bad output folders refused before any work."""
import json
import os
import re

import pytest
import torch

from workbench.export.measures import batch_of, compare, disk_bytes, latency_profile, peak_memory_bytes
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.export import load_compressed
from workbench.report import StudyConfig, write_report


@pytest.fixture(scope="module")
def report(tmp_path_factory, mlp_task):
    out = tmp_path_factory.mktemp("report")
    written = write_report(mlp_task, out, 0.3, StudyConfig.fast(progress=False))
    return out, written


@pytest.mark.slow  # shares one reduced study (~20 s of CPU)
def test_index_is_self_contained(report):
    out, _ = report
    page = (out / "index.html").read_text()
    for attr, value in re.findall(r'\b(src|href)\s*=\s*["\']?([^"\'\s>]*)', page, flags=re.I):
        assert value.startswith("data:"), f"{attr}={value[:40]!r} is not embedded"
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page
    assert len(re.findall(r'src="data:image/png;base64,', page)) >= 4  # spectra, sensitivity, pareto, measures
    assert "Theoretical FLOP ratio" in page and "measured speed-up" in page
    assert "&quot;layers&quot;" in page  # the chosen plan is printed (escaped JSON)


@pytest.mark.slow  # shares one reduced study (~20 s of CPU)
def test_results_json_holds_the_measures(report, mlp_task):
    out, _ = report
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "digits-mlp" and results["skipped"] == []
    original, chosen = results["measures"]["original"], results["measures"]["chosen"]
    assert original["params"] == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    assert chosen["params"] <= 0.3 * original["params"] + 1
    assert original["flops"] == 2 * (64 * 256 + 256 * 256 + 256 * 10)
    for m in (original, chosen):
        assert set(m["disk"]) >= {"pt", "safetensors", "onnx"} and all(m["disk"][f] > 0 for f in ("pt", "safetensors", "onnx"))
        assert m["latency"]["batch1_ms"] > 0 and m["latency"]["large_ms"] > 0 and m["latency"]["threads"] == 1
        assert m["peak_memory_bytes"]["large"] is None or m["peak_memory_bytes"]["large"] >= 0
    ratios = results["measures"]["compare"]
    assert ratios["flop_ratio"] == pytest.approx(original["flops"] / chosen["flops"])
    assert ratios["speedup_large"] == pytest.approx(original["latency"]["large_ms"] / chosen["latency"]["large_ms"])
    assert chosen["disk"]["safetensors"] < original["disk"]["safetensors"] / 2
    assert results["plan"]["layers"], "the chosen plan compresses something"


@pytest.mark.slow  # shares one reduced study (~20 s of CPU)
def test_exported_models_reload_and_match(report, mlp_task):
    out, written = report
    loaded = load_compressed(out / "models" / "compressed.safetensors")
    x = mlp_task.eval_inputs[:64]
    with torch.no_grad():
        assert torch.equal(loaded.model(x), written["study"].model(x))
    from workbench.export.onnx_format import onnx_max_error
    assert onnx_max_error(out / "models" / "compressed.onnx", written["study"].model, x) < 1e-4
    assert (out / "models" / "original.onnx").stat().st_size > (out / "models" / "compressed.onnx").stat().st_size
    leftovers = [p.name for p in out.rglob("*.tmp")]
    assert leftovers == []


def test_unwritable_output_folder_fails_before_any_work(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")

    def must_not_load(name):
        raise AssertionError("the model was loaded before the output folder was checked")

    from workbench.cli import build_parser
    build_parser()  # import every subcommand first: none may bind the stand-in `load` for later tests
    monkeypatch.setattr("workbench.zoo.load", must_not_load)
    assert main(["report", "digits-mlp", "--out", str(blocker / "sub")]) == 2
    assert "cannot create output folder" in capsys.readouterr().err
    if os.geteuid() == 0:
        assert main(["report", "digits-mlp", "--out", "/proc/workbench-report"]) == 2
        assert "error:" in capsys.readouterr().err


def test_bad_budget_is_refused(mlp_task, tmp_path):
    with pytest.raises(WorkbenchError, match=r"budget=1.5 must be a fraction in \(0, 1\]"):
        write_report(mlp_task, tmp_path, 1.5, StudyConfig.fast(progress=False, onnx=False))


def test_latency_and_memory_measures_are_real(mlp_task):
    model = mlp_task.model
    profile = latency_profile(model, mlp_task.eval_inputs, large_batch=512, n_threads=1, repeats=3)
    assert profile["threads"] == 1 and torch.get_num_threads() >= 1
    assert profile["large_ms"] > profile["batch1_ms"] > 0
    big = torch.nn.Sequential(torch.nn.Linear(64, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 10))
    peak = peak_memory_bytes(big, batch_of(mlp_task.eval_inputs, 512))
    if peak is not None:  # Linux: the (512, 4096) float activations are 8 MiB and must show
        assert peak >= 512 * 4096 * 4 * 0.9
    assert batch_of(mlp_task.eval_inputs[:3], 7).shape == (7, 64)


def test_disk_bytes_track_real_files(mlp_task):
    sizes = disk_bytes(mlp_task.model, mlp_task.example_input, ("pt", "safetensors"))
    payload = sum(p.numel() * 4 for p in mlp_task.model.parameters())
    assert payload < sizes["safetensors"] < payload + 4096
    assert payload < sizes["pt"] < payload + 8192
    with pytest.raises(WorkbenchError, match="formats"):
        disk_bytes(mlp_task.model, mlp_task.example_input, ("zip",))


def test_compare_states_flop_ratio_beside_speedup():
    before = {"flops": 100, "params": 10, "metric": 0.9, "disk": {"pt": 400},
              "latency": {"batch1_ms": 2.0, "large_ms": 8.0}}
    after = {"flops": 25, "params": 5, "metric": 0.8, "disk": {"pt": 100},
             "latency": {"batch1_ms": 2.0, "large_ms": 4.0}}
    result = compare(before, after)
    assert result["flop_ratio"] == 4 and result["speedup_batch1"] == 1 and result["speedup_large"] == 2
    assert result["size_ratio_pt"] == 4 and result["metric_change"] == pytest.approx(-0.1)


def test_compare_gives_no_flop_ratio_when_flops_are_not_counted():
    before = {"flops": 100, "params": 10, "metric": 0.9, "disk": {}, "latency": {"batch1_ms": 1.0, "large_ms": 1.0}}
    after = {**before, "flops": 0}
    assert compare(before, after)["flop_ratio"] is None
