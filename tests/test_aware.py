"""Activation-aware SVD: output-error oracles, the svd_aware method, the recipe and the CLI flag."""
import pytest
import torch

import workbench as wb
from workbench.errors import WorkbenchError
from workbench.kernels import aware, svd as svd_kernels
from workbench.layers.lowrank import LowRankConv2d, LowRankLinear
from workbench.measure import count_params
from workbench.registry import get_recipe
from tests.conftest import state_bytes


def _correlated_inputs(tokens, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, n, dtype=torch.float64)
    return torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix.T


@pytest.mark.parametrize("shape,rank", [((24, 16), 4), ((16, 40), 7), ((32, 32), 31)])
def test_whiten_reaches_the_eckart_young_bound_of_the_outputs(shape, rank):
    # Oracle: the best rank-r W' minimises ||(W - W') X^T||; its error is the tail of svd(W X^T).
    out, inp = shape
    w = torch.randn(out, inp, dtype=torch.float64)
    x = _correlated_inputs(200, inp)
    a, b = aware.aware_factors(w, rank, x=x, mode="whiten", ridge=1e-12)
    assert a.shape == (out, rank) and b.shape == (rank, inp)
    optimum = svd_kernels.truncation_error(torch.linalg.svdvals(w @ x.T), rank)
    assert aware.output_error(w, a, b, x) == pytest.approx(optimum, rel=1e-4)
    plain_a, plain_b = svd_kernels.truncate(w, rank)
    assert aware.output_error(w, plain_a, plain_b, x) > optimum


def test_scale_with_alpha_one_equals_whiten_for_uncorrelated_inputs():
    # X with orthogonal columns: X^T X is diagonal, so diagonal rms scaling IS exact whitening.
    q, _ = torch.linalg.qr(torch.randn(300, 12, dtype=torch.float64))
    x = q * torch.logspace(1, -2, 12, dtype=torch.float64)
    w = torch.randn(10, 12, dtype=torch.float64)
    aw = aware.aware_factors(w, 3, x=x, mode="whiten", ridge=1e-14)
    sc = aware.aware_factors(w, 3, x=x, mode="scale", alpha=1.0)
    assert aware.output_error(w, *sc, x) == pytest.approx(aware.output_error(w, *aw, x), rel=1e-6)


def test_full_rank_reconstructs_the_weight_and_dtype_is_kept():
    w = torch.randn(8, 6)
    x = torch.randn(100, 6)
    for mode in aware.AWARE_MODES:
        a, b = aware.aware_factors(w, 6, x=x, mode=mode)
        assert a.dtype == torch.float32
        torch.testing.assert_close(a @ b, w, atol=1e-4, rtol=1e-4)


def test_rank_deficient_inputs_are_handled_by_the_ridge():
    w = torch.randn(5, 20, dtype=torch.float64)
    x = torch.randn(6, 20, dtype=torch.float64)  # 6 tokens < 20 features: X^T X is singular
    a, b = aware.aware_factors(w, 3, x=x, mode="whiten")
    assert torch.isfinite(a).all() and torch.isfinite(b).all()


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "diag"}, "aware='diag'"),
    ({"rank": 9}, "rank=9 is above"),
    ({"x": torch.randn(10, 7)}, "in_features=6"),
])
def test_bad_input_is_refused_with_value_and_rule(kwargs, match):
    args = {"rank": 2, "x": torch.randn(10, 6), "mode": "whiten", **kwargs}
    with pytest.raises(WorkbenchError, match=match):
        aware.aware_factors(torch.randn(8, 6), args.pop("rank"), **args)


def test_svd_aware_beats_plain_on_the_outputs_and_never_mutates(mlp_task):
    model, calib = mlp_task.model, mlp_task.calibration_inputs()
    before = state_bytes(model)
    plain = wb.apply(model, get_recipe("svd")(model, ratio=0.3))
    for mode in ("whiten", "scale"):
        plan = get_recipe("svd")(model, ratio=0.3, activation_aware=mode)
        assert {c.method for c in plan.layers.values()} == {"svd_aware"}
        new = wb.apply(model, plan, calibration_inputs=calib)
        assert isinstance(new.fc2, LowRankLinear) and count_params(new) == count_params(plain)
        x = calib[:200]
        with torch.no_grad():
            ref, err_plain = model(x), (plain(x) - model(x)).norm()
            assert (new(x) - ref).norm() < err_plain
    assert state_bytes(model) == before


def test_svd_aware_factorizes_convolutions_with_lower_output_error(cnn_task):
    from workbench.hooks import collect_layer_inputs
    model, calib = cnn_task.model, cnn_task.calibration_inputs(256)
    plan = get_recipe("svd")(model, ranks={"conv2": 8}, activation_aware="whiten")
    new = wb.apply(model, plan, calibration_inputs=calib)
    plain = wb.apply(model, get_recipe("svd")(model, ranks={"conv2": 8}))
    assert isinstance(new.conv2, LowRankConv2d) and count_params(new) == count_params(plain)
    x = collect_layer_inputs(model, ["conv2"], calib)["conv2"]
    with torch.no_grad():
        ref = model.conv2(x)
        assert (new.conv2(x) - ref).norm() < (plain.conv2(x) - ref).norm()


def test_svd_aware_without_calibration_inputs_is_refused(mlp_task):
    plan = get_recipe("svd")(mlp_task.model, ratio=0.5, activation_aware="whiten")
    with pytest.raises(WorkbenchError, match="calibration_inputs"):
        wb.apply(mlp_task.model, plan)


def test_cli_activation_aware_flag(capsys, mlp_task):
    import json
    from workbench.cli import main
    assert main(["compress", "digits-mlp", "--method", "svd", "--ratio", "0.4",
                 "--activation-aware", "whiten", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {entry["method"] for entry in result["plan"]["layers"].values()} == {"svd_aware"}
    assert result["after"]["params"] < result["before"]["params"]


def test_decomposition_slices_equal_the_factors_at_every_rank():
    w, x = torch.randn(9, 14, dtype=torch.float64), torch.randn(80, 14, dtype=torch.float64)
    for mode in aware.AWARE_MODES:
        u, sig, bt = aware.aware_decomposition(w, aware.gram(x), len(x), mode)
        for rank in (1, 5, 9):
            a, b = aware.aware_factors(w, rank, x=x, mode=mode)
            root = sig[:rank].sqrt()
            torch.testing.assert_close((u[:, :rank] * root) @ (root[:, None] * bt[:rank]), a @ b)
