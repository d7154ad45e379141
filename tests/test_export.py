"""Save / load of compressed models: bit-identical round trips and clear errors on bad files."""
import json
from collections import OrderedDict
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import workbench as wb
from workbench.errors import WorkbenchError
from workbench.export import (EXPORT_FORMAT_VERSION, HEADER_KEY, load_compressed, plan_sidecar, read_header,
                             save_compressed)
from workbench.plan import LayerPlan, Plan
from workbench.registry import get_recipe, methods, recipes

#: Options tried, in order, to make a plan from each registered recipe on a small model.
RECIPE_OPTIONS = ({"ratio": 0.3}, {"bits": 8}, {"bits": 4}, {"ratio": 0.5, "structured": True},
                  {"ratio": 0.3, "bits": 4}, {})


def outputs(model, inputs):
    with torch.no_grad():
        return model(inputs)


def plan_from_recipe(name, task):
    for options in RECIPE_OPTIONS:
        try:
            plan = get_recipe(name)(task.model, task=task, **options)
        except (WorkbenchError, TypeError):
            continue
        if plan.layers or plan.steps:
            return plan
    return None


#: Recipes whose rebuild re-runs an iterative decomposition (CP-ALS, Tucker-HOOI) on the CNN: seconds.
SLOW_RECIPES = {"cp", "tucker"}


@pytest.mark.parametrize("recipe", [pytest.param(r, marks=pytest.mark.slow) if r in SLOW_RECIPES else r
                                    for r in recipes()])
def test_every_recipe_round_trips_bit_identically(recipe, request, tmp_path):
    """The common check: whatever a registered recipe builds saves and loads to the same bits.

    Each recipe runs on the first embedded model it compresses (MLP, then CNN, then GRU)."""
    for fixture in ("mlp_task", "cnn_task", "gru_task"):
        task = request.getfixturevalue(fixture)
        plan = plan_from_recipe(recipe, task)
        if plan is not None:
            break
    else:
        pytest.skip(f"recipe {recipe!r} made no plan for the digits models with {RECIPE_OPTIONS}")
    compressed = wb.apply(task.model, plan, calibration_inputs=task.calibration_inputs())
    path = save_compressed(tmp_path / "m.safetensors", compressed, plan, task.name)
    loaded, loaded_plan, name = load_compressed(path)
    assert name == task.name and loaded_plan == plan
    assert type(loaded) is type(compressed)
    x = task.eval_inputs[:64]
    assert torch.equal(outputs(loaded, x), outputs(compressed, x))
    assert [k for k in loaded.state_dict()] == [k for k in compressed.state_dict()]


def test_fine_tuned_weights_survive_not_the_rebuilt_ones(mlp_task, tmp_path):
    """Loading must give the saved weights, not those `apply` recomputes from the original."""
    plan = Plan({"fc2": LayerPlan("svd", {"rank": 8})})
    compressed = wb.apply(mlp_task.model, plan)
    with torch.no_grad():
        compressed.fc2.first.weight.add_(0.01)  # as if fine-tuned after compression
    loaded = wb.load_compressed(save_compressed(tmp_path / "m.safetensors", compressed, plan, "digits-mlp"))
    assert torch.equal(loaded.model.fc2.first.weight, compressed.fc2.first.weight)


def test_file_holds_only_the_factors(mlp_task, tmp_path):
    plan = Plan({"fc2": LayerPlan("svd", {"rank": 8})})
    compressed = wb.apply(mlp_task.model, plan)
    path = save_compressed(tmp_path / "m.safetensors", compressed, plan, "digits-mlp")
    dense = save_compressed(tmp_path / "d.safetensors", mlp_task.model, Plan(), "digits-mlp")
    saved_floats = (256 * 256) - 8 * (256 + 256)
    difference = os.path.getsize(dense) - os.path.getsize(path)
    assert saved_floats * 4 - 512 <= difference <= saved_floats * 4  # minus a longer JSON header


def test_header_records_plan_and_versions(mlp_task, tmp_path):
    plan = Plan({"fc1": LayerPlan("svd", {"rank": 4})})
    path = save_compressed(tmp_path / "m.safetensors", wb.apply(mlp_task.model, plan), plan, "digits-mlp")
    header = read_header(path)
    assert header["format_version"] == EXPORT_FORMAT_VERSION
    assert header["plan"]["layers"] == {"fc1": {"method": "svd", "rank": 4}}
    assert header["versions"]["torch"] == torch.__version__
    # beside it, the same plan and versions as readable JSON (loading never needs it)
    sidecar = json.loads(plan_sidecar(path).read_text())
    assert plan_sidecar(path).name == "m.plan.json"
    assert sidecar["plan"] == header["plan"] and sidecar["versions"] == header["versions"]


def test_user_model_needs_its_original_and_refuses_another(tmp_path):
    torch.manual_seed(1)
    mine = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    plan = Plan({"0": LayerPlan("svd", {"rank": 3})})
    compressed = wb.apply(mine, plan)
    path = save_compressed(tmp_path / "mine.safetensors", compressed, plan, "my-net", original=mine,
                           example_input=torch.randn(1, 20))
    with pytest.raises(WorkbenchError, match="original=model"):
        load_compressed(path)
    loaded = load_compressed(path, original=mine)
    x = torch.randn(7, 20)
    assert torch.equal(outputs(loaded.model, x), outputs(compressed, x))
    other = nn.Sequential(nn.Linear(20, 40), nn.ReLU(), nn.Linear(40, 5))
    with pytest.raises(WorkbenchError, match=r"layer '0' has weight shape \[30, 20\] there but \[40, 20\] here"):
        load_compressed(path, original=other)
    renamed = nn.Sequential(nn.Identity(), nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    with pytest.raises(WorkbenchError, match="different"):
        load_compressed(path, original=renamed)


def test_user_model_without_original_is_refused_at_save(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(WorkbenchError, match="original="):
        save_compressed(tmp_path / "x.safetensors", model, Plan(), "my-net")
    assert list(tmp_path.iterdir()) == []


def test_plan_from_a_different_model_is_refused(mlp_task, cnn_task, tmp_path):
    """A file whose plan names layers the embedded model lacks (here: conv1 on the MLP)."""
    plan = Plan({"conv1": LayerPlan("svd", {"rank": 4})})
    path = save_compressed(tmp_path / "cnn.safetensors", wb.apply(cnn_task.model, plan), plan, "digits-cnn")
    header = read_header(path)
    header["model"] = "digits-mlp"
    save_file(load_file(str(path)), str(path), metadata={HEADER_KEY: json.dumps(header)})
    with pytest.raises(WorkbenchError, match=r"names layers \['conv1'\].*different model"):
        load_compressed(path)


def test_same_layer_names_other_shapes_are_refused(mlp_task, tmp_path):
    """Same names, different weights shapes: the file's tensors do not fit the rebuilt structure."""
    plan = Plan({"fc2": LayerPlan("svd", {"rank": 8})})
    path = save_compressed(tmp_path / "m.safetensors", wb.apply(mlp_task.model, plan), plan, "digits-mlp")
    header = read_header(path)
    header["plan"]["layers"]["fc2"]["rank"] = 9
    save_file(load_file(str(path)), str(path), metadata={HEADER_KEY: json.dumps(header)})
    with pytest.raises(WorkbenchError, match=r"'fc2.first.weight' has shape \[8, 256\] in the file"):
        load_compressed(path)


@pytest.fixture
def saved(mlp_task, tmp_path):
    plan = Plan({"fc2": LayerPlan("svd", {"rank": 8})})
    return save_compressed(tmp_path / "m.safetensors", wb.apply(mlp_task.model, plan), plan, "digits-mlp")


def test_truncated_file_is_a_clear_error(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(WorkbenchError, match="truncated or corrupted"):
        load_compressed(saved)


def test_damaged_weight_bytes_are_caught_by_their_checksums(saved):
    """A flipped byte inside the payload leaves a readable file; the per-tensor SHA-256 in the
    header catches it, naming the tensor, instead of loading NaNs."""
    data = bytearray(saved.read_bytes())
    data[-40] ^= 0xFF
    saved.write_bytes(bytes(data))
    with pytest.raises(WorkbenchError, match=r"is corrupted: the bytes of 1 tensor\(s\) do not match"):
        load_compressed(saved)


def test_corrupted_header_is_a_clear_error(saved):
    data = bytearray(saved.read_bytes())
    data[0:8] = struct.pack("<Q", 10 ** 12)  # header length beyond the file
    saved.write_bytes(bytes(data))
    with pytest.raises(WorkbenchError, match="truncated or corrupted"):
        load_compressed(saved)


def test_not_a_workbench_file(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(WorkbenchError, match="not one saved by the workbench"):
        load_compressed(tmp_path / "plain.safetensors")
    with pytest.raises(WorkbenchError, match="no such file"):
        load_compressed(tmp_path / "missing.safetensors")


def test_newer_format_version_is_refused(saved):
    header = read_header(saved)
    header["format_version"] = EXPORT_FORMAT_VERSION + 1
    save_file(load_file(str(saved)), str(saved), metadata={HEADER_KEY: json.dumps(header)})
    with pytest.raises(WorkbenchError, match=f"format_version={EXPORT_FORMAT_VERSION + 1}, newer"):
        load_compressed(saved)


def test_newer_plan_version_is_refused(saved):
    header = read_header(saved)
    header["plan"]["format_version"] = 99
    save_file(load_file(str(saved)), str(saved), metadata={HEADER_KEY: json.dumps(header)})
    with pytest.raises(WorkbenchError, match="format_version=99 is newer"):
        load_compressed(saved)


def _unwritable_folder(tmp_path):
    if os.geteuid() == 0:  # root ignores permission bits; /proc refuses new files even to root
        return "/proc"
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


def test_unwritable_folder_is_a_clear_error_and_leaves_nothing(mlp_task, tmp_path):
    folder = _unwritable_folder(tmp_path)
    with pytest.raises(WorkbenchError, match="not writable|cannot write"):
        save_compressed(os.path.join(folder, "m.safetensors"), mlp_task.model, Plan(), "digits-mlp")
    with pytest.raises(WorkbenchError, match="does not exist"):
        save_compressed(tmp_path / "missing" / "m.safetensors", mlp_task.model, Plan(), "digits-mlp")


def test_failed_write_leaves_the_old_file_and_no_temporary(saved, monkeypatch):
    before = saved.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("workbench.export.files.save_file", boom)
    model = wb.load("digits-mlp").model
    with pytest.raises(WorkbenchError, match="No space left"):
        save_compressed(saved, model, Plan(), "digits-mlp")
    assert saved.read_bytes() == before
    assert sorted(p.name for p in saved.parent.iterdir()) == sorted([saved.name, plan_sidecar(saved).name])


def test_torch_ao_dynamic_int8_state_round_trips(mlp_task, tmp_path):
    """Quantized tensors and packed-parameter tuples are stored as int8 codes + scales."""
    quantized = torch.ao.quantization.quantize_dynamic(mlp_task.model, {nn.Linear}, dtype=torch.qint8)
    from workbench.export.files import _decode_state, _encode_state
    tensors, encoded = _encode_state(quantized.state_dict())
    assert tensors["fc2._packed_params._packed_params::0::int_repr"].dtype == torch.int8
    fresh = torch.ao.quantization.quantize_dynamic(nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)), {nn.Linear},
        dtype=torch.qint8)
    fresh = nn.Sequential(OrderedDict(
        (name, module) for name, module in zip(["fc1", "act1", "fc2", "act2", "fc3"], fresh)))
    state = OrderedDict(_decode_state(tensors, encoded))
    state._metadata = quantized.state_dict()._metadata
    fresh.load_state_dict(state)
    x = mlp_task.eval_inputs[:32]
    assert torch.equal(outputs(fresh, x), outputs(quantized, x))


def test_data_aware_methods_rebuild_without_real_calibration_data(tmp_path):
    """Structure only: stand-in inputs of the recorded shape; the weights come from the file."""
    aware = [m.name for m in methods().values() if m.needs_inputs and m.kind == "layer"
             and nn.Linear in m.layer_types]
    if not aware:
        pytest.skip("no data-aware Linear method registered yet")
    torch.manual_seed(2)
    mine = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 4))
    inputs = torch.randn(200, 16)
    for method_name in aware:
        candidates = [{"rank": 4}, {"bits": 8}, {"ratio": 0.5}]
        for params in candidates:
            plan = Plan({"0": LayerPlan(method_name, params)})
            try:
                compressed = wb.apply(mine, plan, calibration_inputs=inputs)
            except (WorkbenchError, TypeError, KeyError):
                continue
            path = save_compressed(tmp_path / f"{method_name}.safetensors", compressed, plan, "my-net",
                                   original=mine, example_input=inputs[:1])
            loaded = load_compressed(path, original=mine)
            assert torch.equal(outputs(loaded.model, inputs), outputs(compressed, inputs)), method_name
            break
