"""Low rank and quantization together: ``svd_quant`` (quantized factors) and ``svd_residual``
(float32 factors plus a quantized residual). Oracles: Eckart–Young plus the grid step, the plain
truncation's and the plain quantization's errors, closed-form bytes, bit-exact files."""
import pytest
import torch
from torch import nn

import workbench as wb
from conftest import state_bytes
from workbench.engine.sizing import state_bytes as payload
from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.export import load_compressed, save_compressed
from workbench.kernels import quant as quant_kernels
from workbench.kernels import quant_lowrank as qlr
from workbench.kernels import svd as svd_kernels
from workbench.layers.quant_lowrank import LowRankResidualLinear, QuantLowRankLinear
from workbench.measure import count_params
from workbench.methods.quant_lowrank import breakeven_rank
from workbench.plan import LayerPlan, Plan

SHAPES = [(48, 32), (20, 70), (64, 64)]


def frob(x: torch.Tensor) -> float:
    return float(x.double().norm())


def random_linear(shape, seed=0, bias=True) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(shape[1], shape[0], bias=bias)
    with torch.no_grad():  # a decaying spectrum, as trained layers have, plus noise
        u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0]))
        v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1]))
        k = min(shape)
        s = torch.exp(-torch.arange(k, dtype=torch.float32) / 6)
        linear.weight.copy_(u[:, :k] * s @ v[:, :k].T + 0.01 * torch.randn(shape))
    return linear


def plain_quant_error(w: torch.Tensor, bits: int) -> float:
    """``||W - Q(W)||_F`` of plain symmetric per-channel round-to-nearest (the ``quant`` method's grid)."""
    codes, scale, zero = quant_kernels.quantize_uniform(w, bits, per_channel=True)
    return frob(w - quant_kernels.dequantize_uniform(codes, scale, zero))


# ------------------------------------------------------------------ oracles
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [1, 5, 12])
def test_svd_quant_at_8_bits_is_the_truncation_within_the_grid_step(shape, rank):
    linear = random_linear(shape)
    w = linear.weight.detach()
    layer = QuantLowRankLinear.from_linear(linear, rank, bits=8)
    a, b = svd_kernels.truncate(w, rank)
    a_hat, b_hat = layer.second_weight(), layer.first_weight()
    # every entry within half a step of its row's grid
    assert ((a - a_hat).abs() <= layer.second_scale[:, None] / 2 + 1e-7).all()
    assert ((b - b_hat).abs() <= layer.first_scale[:, None] / 2 + 1e-7).all()
    # ||W - Â B̂|| <= Eckart–Young + ||A - Â|| ||B||_2 + ||Â||_2 ||B - B̂||, each ||X - X̂||_F <= sqrt(cols) ||scale||/2
    eckart_young = svd_kernels.truncation_error(svd_kernels.singular_values(w), rank)
    da = rank ** 0.5 * frob(layer.second_scale) / 2
    db = shape[1] ** 0.5 * frob(layer.first_scale) / 2
    bound = eckart_young + da * float(torch.linalg.matrix_norm(b, 2)) + float(torch.linalg.matrix_norm(a_hat, 2)) * db
    error = frob(w - layer.dense_weight_preview())
    assert eckart_young - 1e-5 <= error <= bound + 1e-6
    assert error - eckart_young < 0.02 * frob(w)  # 8-bit codes: a small addition to the truncation's error


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank, bits", [(1, 2), (4, 3), (8, 4), (3, 8)])
def test_svd_residual_beats_plain_truncation_and_plain_quantization(shape, rank, bits):
    w = random_linear(shape).weight.detach()
    fit = qlr.residual_fit(w, rank, bits)
    w_hat = fit.a @ fit.b + qlr.dequantize_rows(fit.codes, fit.scale, bits)
    assert fit.error == pytest.approx(frob(w - w_hat), rel=1e-6)
    assert fit.error <= svd_kernels.truncation_error(svd_kernels.singular_values(w), rank) * (1 + 1e-6)
    assert fit.error <= plain_quant_error(w, bits) * (1 + 1e-6)


def test_svd_residual_refinement_never_loses_to_its_start():
    w = random_linear((40, 30)).weight.detach()
    start, refined = qlr.residual_fit(w, 3, 3, steps=0), qlr.residual_fit(w, 3, 3, steps=3)
    assert refined.error <= start.error


def test_svd_residual_at_rank_1_and_8_bits_approaches_the_dense_weight():
    linear = random_linear((64, 48))
    w = linear.weight.detach()
    layer = LowRankResidualLinear.from_linear(linear, rank=1, bits=8)
    relative = frob(w - layer.dense_weight_preview()) / frob(w)
    assert relative < 0.01
    # the residual's grid: every entry within half a step of W - A B
    residual = w - layer.second.detach() @ layer.first.detach()
    assert ((residual - layer.residual_weight()).abs() <= layer.residual_scale[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("name", ["fc1", "fc2", "fc3"])
@pytest.mark.parametrize("rank, bits", [(2, 2), (8, 3), (4, 4)])
def test_residual_on_digits_mlp_layers_beats_both_plain_methods(mlp_task, name, rank, bits):
    linear = mlp_task.model.get_submodule(name)
    w = linear.weight.detach()
    layer = wb.apply(mlp_task.model, Plan({name: LayerPlan("svd_residual", {"rank": rank, "bits": bits})})
                     ).get_submodule(name)
    error = frob(w - layer.dense_weight_preview())
    assert error <= svd_kernels.truncation_error(svd_kernels.singular_values(w), rank) * (1 + 1e-5)
    assert error <= plain_quant_error(w, bits) * (1 + 1e-5)
    x = torch.randn(16, w.shape[1])
    torch.testing.assert_close(layer(x), x @ layer.dense_weight_preview().T + linear.bias, atol=1e-4, rtol=1e-4)


def test_forward_is_the_two_small_matmuls_on_dequantized_factors():
    linear = random_linear((30, 50))
    layer = QuantLowRankLinear.from_linear(linear, 6, bits=4, per_channel=False)
    x = torch.randn(7, 3, 50)
    expected = (x @ layer.first_weight().T) @ layer.second_weight().T + linear.bias
    torch.testing.assert_close(layer(x), expected)
    assert layer.first_scale.shape == () and layer.second_scale.shape == ()


# ------------------------------------------------------------------ bytes
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [2, 3, 5, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_svd_quant_bytes_are_the_closed_form(shape, bits, per_channel):
    rank = 7
    for bias in (True, False):
        layer = QuantLowRankLinear.from_linear(random_linear(shape, bias=bias), rank, bits, per_channel)
        m, n = shape
        codes = -(-m * rank * bits // 8) + -(-rank * n * bits // 8)
        scales = 4 * ((m + rank) if per_channel else 2)
        assert payload(layer) == codes + scales + 4 * m * bias
        assert payload(layer) == qlr.svd_quant_bytes(shape, rank, bits, per_channel) + 4 * m * bias
        assert count_params(layer) == rank * (m + n) + m * bias


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [2, 3, 7])
def test_svd_residual_bytes_are_the_closed_form(shape, bits):
    m, n = shape
    rank = 3
    layer = LowRankResidualLinear.from_linear(random_linear(shape), rank, bits)
    assert payload(layer) == 4 * rank * (m + n) + -(-m * n * bits // 8) + 4 * m + 4 * m
    assert payload(layer) == qlr.svd_residual_bytes(shape, rank, bits) + 4 * m


@pytest.mark.parametrize("method", ["svd_quant", "svd_residual"])
@pytest.mark.parametrize("ratio, bits", [(0.25, 4), (0.3, 2), (0.5, 8)])
def test_recipe_ranks_fill_the_byte_ratio(mlp_task, method, ratio, bits):
    plan = wb.recipe(method)(mlp_task.model, ratio=ratio, bits=bits)
    assert set(plan.layers) == {"fc1", "fc2", "fc3"}
    for name, choice in plan.layers.items():
        linear = mlp_task.model.get_submodule(name)
        shape, dense = tuple(linear.weight.shape), payload(linear)

        def size(rank):
            return payload(wb.apply(nn.Sequential(linear), Plan({"0": LayerPlan(method, {**choice.params, "rank": rank})})))

        rank = choice["rank"]
        assert size(rank) <= ratio * dense and size(rank) < dense
        if rank < breakeven_rank(method, shape, choice.params):  # the next rank would not fit the ratio
            assert size(rank + 1) > ratio * dense


def test_recipe_below_the_smallest_model_names_its_size(mlp_task):
    with pytest.raises(WorkbenchError, match=r"ratio=0.05 is below what svd_residual at bits=4 can reach .*'fc1'"):
        wb.recipe("svd_residual")(mlp_task.model, ratio=0.05, bits=4)


# ------------------------------------------------------------------ engine, apply, files
@pytest.mark.parametrize("method, params", [("svd_quant", {"rank": 12, "bits": 3}),
                                            ("svd_quant", {"rank": 20, "bits": 4, "per_channel": False}),
                                            ("svd_residual", {"rank": 6, "bits": 2})])
def test_engine_equals_apply_and_the_file_round_trip_is_bit_exact(mlp_task, tmp_path, method, params):
    before = state_bytes(mlp_task.model)
    plan = Plan({"fc1": LayerPlan(method, params), "fc2": LayerPlan(method, params)})
    model = wb.apply(mlp_task.model, plan)
    result = wb.Engine(mlp_task).evaluate(plan)
    assert result["metric"] == mlp_task.evaluate(model)
    assert result["bytes"] == payload(model) and result["params"] == count_params(model)
    path = save_compressed(tmp_path / "m.safetensors", model, plan, "digits-mlp")
    loaded, loaded_plan, _ = load_compressed(path)
    assert loaded_plan == plan and state_bytes(loaded) == state_bytes(model)
    x = mlp_task.eval_inputs[:64]
    assert torch.equal(loaded(x), model(x))
    assert state_bytes(mlp_task.model) == before  # the user's model untouched


def test_conv1d_is_compressed_as_its_linear():
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(24, 40)  # nf=out 24, nx=in 40
    with torch.no_grad():
        conv.bias.normal_()
    model, twin = nn.Sequential(conv), nn.Sequential(nn.Linear(40, 24))
    with torch.no_grad():
        twin[0].weight.copy_(conv.weight.T)
        twin[0].bias.copy_(conv.bias)
    x = torch.randn(5, 40)
    for method in ("svd_quant", "svd_residual"):
        plan = Plan({"0": LayerPlan(method, {"rank": 4, "bits": 4})})
        torch.testing.assert_close(wb.apply(model, plan)(x), wb.apply(twin, plan)(x))


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("method", ["svd_quant", "svd_residual"])
def test_bad_settings_are_refused_naming_layer_and_rule(mlp_task, method):
    def run(params, layer="fc2"):
        return wb.apply(mlp_task.model, Plan({layer: LayerPlan(method, params)}))

    for bits in (1, 9, 4.0, True):
        with pytest.raises(WorkbenchError, match=rf"bits={bits!r} for layer 'fc2' .*allowed: 2, 3, 4, 5, 6, 7, 8"):
            run({"rank": 4, "bits": bits})
    with pytest.raises(WorkbenchError, match=r"rank=0 for layer 'fc2' must be at least 1"):
        run({"rank": 0, "bits": 4})
    with pytest.raises(WorkbenchError, match=r"rank=300 is above min\(out, in\)=256"):
        run({"rank": 300, "bits": 4})
    with pytest.raises(WorkbenchError, match=r"'bit' \(did you mean 'bits'\?\)"):
        run({"rank": 4, "bit": 4})
    if method == "svd_residual":  # (svd_quant's codes of <= 8 bits stay below dense at any rank)
        with pytest.raises(WorkbenchError, match=r"rank=129 at bits=8 for layer 'fc2' takes .* not below the dense "
                                                 r"weight's 262144: svd_residual saves bytes up to rank 95"):
            run({"rank": 129, "bits": 8})  # 8-bit residual + fp32 factors: bigger than dense
    with pytest.raises(UnsupportedLayerError, match=rf"method '{method}' cannot compress layer '0' of type Conv2d"):
        wb.apply(nn.Sequential(nn.Conv2d(3, 8, 3)), Plan({"0": LayerPlan(method, {"rank": 2, "bits": 4})}))
    with pytest.raises(WorkbenchError, match=r"bits=1 is not allowed"):
        wb.recipe(method)(mlp_task.model, ratio=0.5, bits=1)
    with pytest.raises(WorkbenchError, match=r"does not take option 'rank'"):
        wb.recipe(method)(mlp_task.model, ratio=0.5, bits=4, rank=3)


def test_breakeven_is_computed_from_the_bytes():
    shape = (256, 256)
    for bits in (2, 4, 8):
        r = breakeven_rank("svd_residual", shape, {"bits": bits})
        assert qlr.svd_residual_bytes(shape, r, bits) < 4 * 256 * 256 <= qlr.svd_residual_bytes(shape, r + 1, bits)
    # quantized factors of 8 bits save bytes up to full rank (2 * 256 * 256 codes < 4 * 256 * 256 bytes)
    assert breakeven_rank("svd_quant", shape, {"bits": 8}) == 256
