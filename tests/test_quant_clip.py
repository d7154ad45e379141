"""Uniform grids' range (``clip``): MSE search never worse than the max range, percentile equals
numpy's, the default by bit width, the setting through recipe, plan, saved file and CLI."""
import json
import re

import numpy as np
import pytest
import torch
from torch import nn

import workbench as wb
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.export import load_compressed, save_compressed
from workbench.inventory import matrix_layers
from workbench.kernels import quant as qk
from workbench.plan import LayerPlan, Plan


def heavy_tailed(*shape, seed=0):
    """Student-t (3 degrees of freedom) weights: a few large ones, as trained layers have."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_t(3, size=shape).astype(np.float32))


def group_errors(w, codes, scale, zero, per_channel):
    """Squared rounding error per group ``(groups,)``: per output channel, or the whole tensor."""
    err = (qk.dequantize_uniform(codes, scale, zero) - w) ** 2
    return err.reshape(w.shape[0], -1).sum(1) if per_channel else err.sum().reshape(1)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("weights", ["normal", "heavy"])
def test_mse_clip_is_never_worse_than_max(bits, per_channel, asymmetric, weights):
    w = torch.randn(12, 40) + 0.3 if weights == "normal" else heavy_tailed(12, 40)
    by_max = group_errors(w, *qk.quantize_uniform(w, bits, per_channel, asymmetric, clip="max"), per_channel)
    by_mse = group_errors(w, *qk.quantize_uniform(w, bits, per_channel, asymmetric, clip="mse"), per_channel)
    assert torch.all(by_mse <= by_max)


@pytest.mark.parametrize("asymmetric", [False, True])
def test_mse_clip_is_the_best_fraction_of_its_grid(asymmetric):
    """Oracle: the squared error of every candidate range, computed independently in numpy."""
    w = heavy_tailed(300, seed=1)
    x = w.double().numpy()
    bits = 2
    errors = []
    for f in qk.MSE_FRACTIONS:
        if asymmetric:
            lo, hi = min(x.min(), 0) * f, max(x.max(), 0) * f
            step = (hi - lo) / 3
            zero = np.clip(np.round(-lo / step), 0, 3)
            w_hat = step * (np.clip(np.round(x / step) + zero, 0, 3) - zero)
        else:
            step = np.abs(x).max() * f
            w_hat = step * np.clip(np.round(x / step), -1, 1)
        errors.append(((x - w_hat) ** 2).sum())
    codes, scale, zero = qk.quantize_uniform(w, bits, asymmetric=asymmetric, clip="mse")
    found = float(((qk.dequantize_uniform(codes, scale, zero).double() - w.double()) ** 2).sum())
    assert found == pytest.approx(min(errors), rel=1e-4)
    assert found < 0.7 * errors[0]  # the max range (fraction 1.0) is far from the best at 2 bits


@pytest.mark.parametrize("per_channel", [False, True])
def test_percentile_clip_equals_numpys(per_channel):
    w = heavy_tailed(6, 2000, seed=2)
    rows = w.numpy().reshape(6, -1) if per_channel else w.numpy().reshape(1, -1)
    _, scale, _ = qk.quantize_uniform(w, 4, per_channel, clip="percentile")
    expected = np.percentile(np.abs(rows), qk.CLIP_PERCENTILE, axis=1) / 7
    np.testing.assert_allclose(scale.reshape(-1).numpy(), expected, rtol=1e-6)
    codes, scale, zero = qk.quantize_uniform(w, 4, per_channel, asymmetric=True, clip="percentile")
    lo = np.minimum(np.percentile(rows, 100 - qk.CLIP_PERCENTILE, axis=1), 0)
    hi = np.maximum(np.percentile(rows, qk.CLIP_PERCENTILE, axis=1), 0)
    np.testing.assert_allclose(scale.reshape(-1).numpy(), (hi - lo) / 15, rtol=1e-6)
    # the weights beyond the clipped range get the end codes
    assert int(codes.max()) == 15 and int(codes.min()) == 0


def test_max_clip_is_the_kernels_default_and_spans_the_largest_weight():
    w = heavy_tailed(8, 30, seed=3)
    default = qk.quantize_uniform(w, 3, per_channel=True)
    explicit = qk.quantize_uniform(w, 3, per_channel=True, clip="max")
    assert all(torch.equal(a, b) for a, b in zip(default, explicit))
    assert torch.allclose(default[1].reshape(-1), w.abs().amax(dim=1) / 3)


def test_binarization_is_the_same_under_every_clip():
    w = heavy_tailed(5, 20, seed=4)
    results = [qk.quantize_uniform(w, 1, per_channel=True, clip=clip) for clip in qk.CLIPS]
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("clip, message", [
    ("mes", "clip='mes' must be one of max, mse, percentile (did you mean 'mse'?)"),
    ("MAX", "clip='MAX' must be one of max, mse, percentile"),
    (None, "clip=None must be one of"),
    (0.999, "clip=0.999 must be one of"),
])
def test_bad_clip_is_refused_everywhere(mlp_task, clip, message):
    with pytest.raises(WorkbenchError, match=re.escape(message)):
        qk.quantize_uniform(torch.randn(4, 4), 2, clip=clip)
    with pytest.raises(WorkbenchError, match="must be one of max, mse, percentile"):
        wb.recipe("quant")(mlp_task.model, bits=2, clip=clip) if clip is not None else qk.check_clip(clip)
    with pytest.raises(WorkbenchError, match="for layer 'fc1' must be one of"):
        wb.apply(mlp_task.model, Plan({"fc1": LayerPlan("quant", {"bits": 2, "clip": clip})}))


def test_clip_is_refused_for_kmeans_and_misspelled_options(mlp_task):
    with pytest.raises(WorkbenchError, match="clip='mse' applies to the uniform scheme"):
        wb.recipe("quant")(mlp_task.model, bits=2, scheme="kmeans", clip="mse")
    with pytest.raises(WorkbenchError, match="applies to the uniform scheme"):
        wb.apply(mlp_task.model, Plan({"fc1": LayerPlan("quant", {"bits": 2, "scheme": "kmeans", "clip": "max"})}))
    with pytest.raises(WorkbenchError, match="did you mean 'clip'"):
        wb.recipe("quant")(mlp_task.model, bits=2, clipp="mse")


@pytest.mark.parametrize("bits, default", [(2, "mse"), (4, "mse"), (5, "max"), (8, "max")])
def test_a_plan_without_clip_gets_the_default_for_its_width(mlp_task, bits, default):
    assert qk.default_clip(bits) == default
    implicit = wb.apply(mlp_task.model, wb.recipe("quant")(mlp_task.model, bits=bits, per_channel=True))
    plan = wb.recipe("quant")(mlp_task.model, bits=bits, per_channel=True, clip=default)
    assert plan.layers["fc1"].params["clip"] == default
    explicit = wb.apply(mlp_task.model, plan)
    assert implicit.fc2.clip == explicit.fc2.clip == default
    for a, b in zip(implicit.state_dict().values(), explicit.state_dict().values()):
        assert torch.equal(a, b)


def test_two_bits_beat_one_bit_on_digits_with_the_default_and_not_with_max(mlp_task):
    """The lesson's surprise: from the largest weight, a 2-bit grid leaves 3 levels for almost every
    weight and scores below binarization; the MSE-chosen range (the default) scores above it."""
    names = [info.name for info in matrix_layers(mlp_task.model)]

    def accuracy(bits, **extra):
        plan = Plan({n: LayerPlan("quant", {"bits": bits, "scheme": "uniform", **extra}) for n in names})
        return mlp_task.evaluate(wb.apply(mlp_task.model, plan))

    one, two_default, two_max = accuracy(1), accuracy(2), accuracy(2, clip="max")
    assert two_max < one < two_default


def test_clip_round_trips_in_a_saved_file(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    plan = wb.recipe("quant")(model, bits=3, clip="percentile", per_channel=True)
    small = wb.apply(model, plan)
    path = tmp_path / "clip.safetensors"
    save_compressed(path, small, plan, "tiny", original=model)
    loaded, loaded_plan, _ = load_compressed(path, original=model)
    assert loaded_plan == plan and loaded_plan.layers["0"].params["clip"] == "percentile"
    assert Plan.from_json(plan.to_json()) == plan
    for a, b in zip(small.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    assert "clip=percentile" in repr(loaded)


def test_cli_clip_goes_into_the_plan_and_a_bad_one_exits_2(capsys, tmp_path):
    out = tmp_path / "q.safetensors"
    assert main(["compress", "digits-mlp", "--method", "quant", "--bits", "2", "--clip", "max",
                 "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {layer["clip"] for layer in result["plan"]["layers"].values()} == {"max"}
    assert load_compressed(out).plan == Plan.from_dict(result["plan"])
    assert main(["compress", "digits-mlp", "--method", "quant", "--bits", "2", "--clip", "nse"]) == 2
    assert "clip='nse' must be one of max, mse, percentile (did you mean 'mse'?)" in capsys.readouterr().err
    assert main(["compress", "digits-mlp", "--method", "svd", "--ratio", "0.5", "--clip", "mse"]) == 2
    assert "--clip does not apply to --method svd" in capsys.readouterr().err
