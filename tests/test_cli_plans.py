"""``compress --plan FILE``, the allocated + sequential + block-wise pipeline flags, and ``--lr``."""
import json

import pytest
import torch

import workbench as wb
from workbench.cli import main
from workbench.measure import count_params, measure
from workbench.plan import PLAN_FORMAT_VERSION
from workbench.recovery.blockwise import reconstruct_blocks
from workbench.select.aware_budget import allocated_plan


def run_json(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def refused(capsys, *argv) -> str:
    """The one stderr line of a refused command (exit status 2)."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


@pytest.fixture(scope="module")
def svd_half_plan(mlp_task):
    return wb.recipe("svd")(mlp_task.model, ratio=0.5)


def test_plan_file_round_trip_matches_apply_and_measure(capsys, tmp_path, mlp_task, svd_half_plan):
    path = tmp_path / "plan.json"
    path.write_text(svd_half_plan.to_json())
    result = run_json(capsys, "compress", "digits-mlp", "--plan", str(path), "--json")
    expected = measure(wb.apply(mlp_task.model, svd_half_plan), mlp_task)
    assert result["plan"] == svd_half_plan.to_dict() and result["method"] == "plan"
    assert result["after"]["bytes"] == expected["bytes"] and result["after"]["params"] == expected["params"]
    assert result["after"]["metric"] == pytest.approx(expected["metric"])
    assert result["after"]["params"] < result["before"]["params"] == count_params(mlp_task.model)


def test_allocate_style_wrapper_and_compress_json_are_plan_files(capsys, tmp_path, mlp_task, svd_half_plan):
    wrapped = tmp_path / "allocate.json"
    wrapped.write_text(json.dumps({"model": "digits-mlp", "layers": {"fc1": {"method": "dense"}},
                                   "plan": svd_half_plan.to_dict()}))
    result = run_json(capsys, "compress", "digits-mlp", "--plan", str(wrapped), "--json")
    assert result["plan"] == svd_half_plan.to_dict() and result["plan_made_for"] == "digits-mlp"
    # a compress --json output read back applies the same plan
    out = tmp_path / "compress.json"
    out.write_text(json.dumps(result))
    again = run_json(capsys, "compress", "digits-mlp", "--plan", str(out), "--json")
    assert again["after"]["bytes"] == result["after"]["bytes"]


def test_widget_configuration_is_a_plan_file(capsys, tmp_path, mlp_task, svd_half_plan):
    pytest.importorskip("ipywidgets")
    from workbench.widgets.persistence import save_configuration

    path = save_configuration(tmp_path / "config.json", svd_half_plan, mlp_task.model, "digits-mlp", {"layer": "fc2"})
    result = run_json(capsys, "compress", "digits-mlp", "--plan", str(path), "--json")
    assert result["plan"] == svd_half_plan.to_dict() and result["plan_made_for"] == "digits-mlp"


def test_plan_for_another_model_is_refused_naming_both_and_the_layer(capsys, tmp_path, cnn_task):
    path = tmp_path / "cnn.json"
    path.write_text(json.dumps({"model": "digits-cnn", "plan": wb.recipe("svd")(cnn_task.model, ratio=0.5).to_dict()}))
    out = tmp_path / "never.safetensors"
    err = refused(capsys, "compress", "digits-mlp", "--plan", str(path), "--out", str(out))
    assert "digits-cnn" in err and "digits-mlp" in err and "conv1" in err
    assert not out.exists()


def test_configuration_with_other_shapes_is_refused(capsys, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"kind": "workbench-configuration", "format_version": 1, "model": "x",
                                "layer_shapes": {"fc1": [8, 8]},
                                "plan": {"layers": {"fc1": {"method": "svd", "rank": 2}}}}))
    err = refused(capsys, "compress", "digits-mlp", "--plan", str(path))
    assert "'fc1'" in err and "[8, 8]" in err and "[256, 64]" in err


@pytest.mark.parametrize("text, message", [
    (json.dumps({"format_version": PLAN_FORMAT_VERSION + 1, "layers": {}}), "newer"),
    (json.dumps({"kind": "workbench-configuration", "format_version": 99, "plan": {}}), "newer"),
    ('{"layers": {"fc1": ', "not valid JSON"),
    ("[1, 2]", "not a plan object"),
    (json.dumps({"rank": 3}), "holds no plan"),
    (json.dumps({"layers": ["fc1"]}), "'layers' must map"),
    (json.dumps({"layers": {"fc1": {"rank": 3}}}), "needs a 'method'"),
])
def test_bad_plan_files_are_refused_in_one_line(capsys, tmp_path, text, message):
    path = tmp_path / "plan.json"
    path.write_text(text)
    assert message in refused(capsys, "compress", "digits-mlp", "--plan", str(path))


@pytest.mark.parametrize("extra, message", [
    (["--method", "svd"], "--method"),
    (["--ratio", "0.5"], "--ratio"),
    (["--allocate"], "--allocate"),
])
def test_plan_excludes_method_and_its_options(capsys, tmp_path, svd_half_plan, extra, message):
    path = tmp_path / "plan.json"
    path.write_text(svd_half_plan.to_json())
    err = refused(capsys, "compress", "digits-mlp", "--plan", str(path), *extra)
    assert "cannot be combined" in err and message in err


@pytest.mark.parametrize("argv, message", [
    ([], "give --method M"),
    (["--method", "prune", "--ratio", "0.5", "--allocate"], "does not apply to --method prune"),
    (["--method", "svd", "--energy", "0.9", "--allocate"], "--energy"),
    (["--method", "prune", "--ratio", "0.5", "--sequential"], "--sequential does not apply"),
    (["--method", "svd", "--ratio", "0.5", "--finetune", "1", "--lr", "0"], "--lr 0.0 must be a finite number > 0"),
    (["--method", "svd", "--ratio", "0.5", "--finetune", "1", "--lr", "nan"], "--lr nan"),
    (["--method", "svd", "--ratio", "0.5", "--lr", "1e-3"], "--finetune EPOCHS"),
])
def test_pipeline_and_lr_misuse_is_refused(capsys, argv, message):
    assert message in refused(capsys, "compress", "digits-mlp", *argv)


def test_allocate_sequential_blockwise_flags_match_the_python_pipeline(capsys, mlp_task):
    # benchmarks/aware_fidelity.py variant "alloc+seq+block", with 2 passes per block (fast)
    calibration = mlp_task.calibration_inputs()
    plan = allocated_plan(mlp_task.model, calibration, 0.3, sequential=True)
    model = wb.apply(mlp_task.model, plan, calibration_inputs=calibration)
    model = reconstruct_blocks(model, mlp_task.model, mlp_task.train_inputs, epochs=2, progress=False).model
    result = run_json(capsys, "compress", "digits-mlp", "--method", "svd", "--allocate", "--sequential",
                      "--ratio", "0.3", "--blockwise", "2", "--json")
    assert result["plan"] == plan.to_dict()
    assert {entry["sequential"] for entry in result["plan"]["layers"].values()} == {True}
    assert result["after"]["metric"] == pytest.approx(mlp_task.evaluate(model))
    assert result["after"]["params"] == count_params(model)


def test_lr_reaches_the_optimizer(capsys, tmp_path, mlp_task):
    flat = lambda model: torch.cat([p.detach().flatten() for p in model.parameters()])  # noqa: E731
    start = flat(wb.apply(mlp_task.model, wb.recipe("svd")(mlp_task.model, ratio=0.2)))
    moved = []
    for lr in ("1e-4", "5e-3"):
        out = tmp_path / f"ft{lr}.safetensors"
        result = run_json(capsys, "compress", "digits-mlp", "--method", "svd", "--ratio", "0.2", "--finetune", "1",
                          "--lr", lr, "--out", str(out), "--json")
        assert result["history"]["lr"] == float(lr) and result["history"]["best_epoch"] == 1
        moved.append((flat(wb.load_compressed(out)[0]) - start).abs().max().item())
    assert moved[1] > 10 * moved[0] > 0  # Adam moves a weight by at most about lr per step


def test_lr_reaches_blockwise_reconstruction(capsys, tmp_path, mlp_task):
    flat = lambda model: torch.cat([p.detach().flatten() for p in model.parameters()])  # noqa: E731
    model = wb.apply(mlp_task.model, wb.recipe("svd")(mlp_task.model, ratio=0.5))
    for lr, flags in ((3e-4, []), (3e-3, ["--lr", "3e-3"])):  # 3e-4: the default without --lr
        tuned = reconstruct_blocks(model, mlp_task.model, mlp_task.train_inputs, epochs=1, lr=lr, progress=False).model
        out = tmp_path / f"block{lr}.safetensors"
        run_json(capsys, "compress", "digits-mlp", "--method", "svd", "--ratio", "0.5", "--blockwise", "1", *flags,
                 "--out", str(out), "--json")
        torch.testing.assert_close(flat(wb.load_compressed(out)[0]), flat(tuned))


def test_learn_scales_reaches_blockwise_and_needs_it(capsys, tmp_path, mlp_task):
    plan = wb.recipe("gptq")(mlp_task.model, bits=3)
    model = wb.apply(mlp_task.model, plan, calibration_inputs=mlp_task.calibration_inputs())
    tuned = reconstruct_blocks(model, mlp_task.model, mlp_task.train_inputs, epochs=1, lr=1e-3, learn_scales=True,
                               progress=False).model
    out = tmp_path / "steps.safetensors"
    run_json(capsys, "compress", "digits-mlp", "--method", "gptq", "--bits", "3", "--blockwise", "1", "--lr", "1e-3",
             "--learn-scales", "--out", str(out), "--json")
    loaded = wb.load_compressed(out)[0]
    for name in ("fc1", "fc2", "fc3"):  # the learned steps were stored: they differ from GPTQ's
        torch.testing.assert_close(getattr(loaded, name).scale, getattr(tuned, name).scale)
    assert any(not torch.equal(getattr(loaded, n).scale, getattr(model, n).scale) for n in ("fc1", "fc2", "fc3"))
    assert "--learn-scales" in refused(capsys, "compress", "digits-mlp", "--method", "gptq", "--bits", "3",
                                       "--learn-scales")
