"""Quantization-aware training: STE and LSQ gradients against the paper's formulas, PTQ start,
QAT beating PTQ at low bit widths, and the exported result stored as integer codes."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import WorkbenchError
from workbench.recovery.lsq import (FakeQuantLayer, codes_of, grad_scale, lsq_fake_quant, mse_scale,
                                    round_ste, signed_range)


def test_round_ste_rounds_forward_and_passes_gradient_through():
    x = torch.tensor([-1.7, -0.2, 0.49, 2.5, 3.51], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_grad_scale_is_identity_forward_and_scales_backward():
    x = torch.tensor([2.0, -3.0], requires_grad=True)
    y = grad_scale(x, 0.25)
    assert torch.equal(y, x.detach())
    y.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 0.25))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_signed_range(bits):
    qn, qp = signed_range(bits)
    assert qn + qp + 1 == 2 ** bits and qn == qp + 1


@pytest.mark.parametrize("bits", [1, 9, 2.0, True])
def test_bad_bits_refused(bits):
    with pytest.raises(WorkbenchError, match=f"bits={bits!r} must be an integer from 2 to 8"):
        signed_range(bits)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_ste_gradient_is_identity_inside_the_clip_range_and_zero_outside(bits):
    qn, qp = signed_range(bits)
    scale = torch.tensor(0.1)
    w = (torch.linspace(-1.0, 1.0, 201) + 0.0037).requires_grad_()  # no weight on a clip edge
    out = lsq_fake_quant(w, scale, qn, qp)
    upstream = torch.randn(201)
    out.backward(upstream)
    v = w.detach() / scale
    inside = (v > -qn) & (v < qp)
    torch.testing.assert_close(w.grad[inside], upstream[inside])  # (1/s)*s up to rounding
    assert torch.equal(w.grad[~inside], torch.zeros_like(w.grad[~inside]))
    assert torch.allclose(out.detach(), torch.clamp(torch.round(v), -qn, qp) * scale)


def test_lsq_step_gradient_matches_the_paper_formula():
    # Esser et al. 2019, eq. 3: d w_hat / d s = -v/s + round(v/s) inside, -Qn below, Qp above; times g.
    qn, qp = signed_range(3)
    w = torch.tensor([-0.95, -0.41, -0.07, 0.0, 0.13, 0.26, 0.38, 0.9], dtype=torch.float64)
    s = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    upstream = torch.tensor([0.3, -1.0, 0.5, 2.0, -0.7, 1.1, 0.2, -0.4], dtype=torch.float64)
    g = 1.0 / math.sqrt(w.numel() * qp)
    lsq_fake_quant(w, s, qn, qp).backward(upstream)
    v = w / 0.1
    per_weight = torch.where(v <= -qn, torch.tensor(-float(qn), dtype=torch.float64),
                             torch.where(v >= qp, torch.tensor(float(qp), dtype=torch.float64),
                                         torch.round(v) - v))
    assert float(s.grad) == pytest.approx(g * float((per_weight * upstream).sum()), rel=1e-12)
    # default g is the paper's 1 / sqrt(N_W * Q_P)
    s2 = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    lsq_fake_quant(w, s2, qn, qp, g=None).backward(upstream)
    assert float(s2.grad) == pytest.approx(float(s.grad), rel=1e-12)


def test_per_channel_steps_get_their_own_gradient():
    qn, qp = signed_range(4)
    w = torch.randn(3, 5, dtype=torch.float64)
    s = torch.tensor([[0.05], [0.1], [0.2]], dtype=torch.float64, requires_grad=True)
    lsq_fake_quant(w, s, qn, qp, g=1.0).sum().backward()
    for row in range(3):
        v = w[row] / s[row].detach()
        expected = torch.where(v <= -qn, -float(qn), torch.where(v >= qp, float(qp), torch.round(v) - v)).sum()
        assert float(s.grad[row, 0]) == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_scale_beats_max_scaling(bits):
    torch.manual_seed(0)
    qn, qp = signed_range(bits)
    w = torch.randn(16, 32)
    best = mse_scale(w, qn, qp, per_channel=True)
    naive = w.abs().amax(dim=1, keepdim=True) / qp
    err = lambda s: ((codes_of(w, s, qn, qp).float() * s - w) ** 2).sum()  # noqa: E731
    assert err(best) <= err(naive) + 1e-6
    assert best.shape == (16, 1)


def test_fake_quant_layer_forward_uses_the_integer_grid():
    torch.manual_seed(0)
    linear = nn.Linear(12, 5)
    before = linear.weight.detach().clone()
    view = FakeQuantLayer.from_float(linear, bits=3)
    assert torch.equal(linear.weight, before)  # original untouched
    codes = view.codes()
    assert codes.dtype == torch.int8 and int(codes.min()) >= -4 and int(codes.max()) <= 3
    x = torch.randn(7, 12)
    expected = F.linear(x, codes.float() * view.scale.detach(), linear.bias)
    torch.testing.assert_close(view(x), expected)
    conv = nn.Conv2d(2, 4, 3, padding=1)
    cview = FakeQuantLayer.from_float(conv, bits=4)
    img = torch.randn(1, 2, 6, 6)
    expected = F.conv2d(img, cview.codes().float() * cview.scale.detach(), conv.bias, padding=1)
    torch.testing.assert_close(cview(img), expected)


def test_a_view_without_packer_refuses_to_export():
    view = FakeQuantLayer.from_float(nn.Linear(4, 4), bits=2)
    with pytest.raises(WorkbenchError, match="no packer"):
        view.repack()


# ---------------------------------------------------------------- QAT on a packed PTQ model
import json  # noqa: E402

import workbench as wb  # noqa: E402
from conftest import state_bytes  # noqa: E402
from workbench.cli import main  # noqa: E402
from workbench.export import load_compressed  # noqa: E402
from workbench.layers.quantized import QuantLinear  # noqa: E402
from workbench.recovery import finetune, qat  # noqa: E402
from workbench.recovery.views import repack, trainable  # noqa: E402
from workbench.registry import get_recipe  # noqa: E402


def _ptq(task, bits, per_channel=False, clip=None):
    return wb.apply(task.model, get_recipe("qat")(task.model, bits=bits, per_channel=per_channel, clip=clip))


@pytest.mark.parametrize("per_channel", [False, True])
def test_views_of_packed_layers_start_exactly_at_ptq(mlp_task, per_channel):
    packed = _ptq(mlp_task, 3, per_channel)
    view = trainable(__import__("copy").deepcopy(packed))
    assert isinstance(view.fc2, FakeQuantLayer) and view.fc2.qn == view.fc2.qp == 3
    with torch.no_grad():
        torch.testing.assert_close(view(mlp_task.eval_inputs), packed(mlp_task.eval_inputs))
    assert state_bytes(repack(view)) == state_bytes(packed)  # re-packing untrained views changes nothing


def test_qat_beats_ptq_at_2_bits_and_stays_packed(mlp_task):
    packed = _ptq(mlp_task, 2, clip="max")  # the grid from the largest weight: heavy damage to recover
    before = state_bytes(packed)
    result = qat(packed, mlp_task, epochs=8, lr=2e-3, progress=False)
    assert state_bytes(packed) == before
    assert mlp_task.evaluate(result.model) > mlp_task.evaluate(packed) + 0.2
    for name in ("fc1", "fc2", "fc3"):
        layer = getattr(result.model, name)
        assert isinstance(layer, QuantLinear) and layer.bits == 2 and layer.packed.dtype == torch.uint8
        signed = layer.codes().to(torch.int16) - 2
        assert int(signed.min()) >= -1 and int(signed.max()) <= 1  # still on PTQ's 3-level grid
    steps = [float(result.model.fc2.scale), float(packed.fc2.scale)]
    assert steps[0] != steps[1]  # the step was learned


def test_finetune_keeps_ptq_steps_fixed(mlp_task):
    packed = _ptq(mlp_task, 2)
    result = finetune(packed, mlp_task, epochs=3, progress=False, patience=None)
    assert result.best_epoch > 0 and mlp_task.evaluate(result.model) > mlp_task.evaluate(packed)
    for name in ("fc1", "fc2", "fc3"):
        assert torch.equal(getattr(result.model, name).scale, getattr(packed, name).scale)


def test_cli_qat_json_history_and_saved_model_loads_back(capsys, tmp_path, mlp_task):
    out = tmp_path / "qat.safetensors"
    assert main(["compress", "digits-mlp", "--method", "qat", "--bits", "4", "--epochs", "2",
                 "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    history = result["history"]
    assert history["kind"] == "qat" and 1 <= len(history["loss"]) == len(history["metric"]) <= 2
    assert result["after"]["bytes"] < result["before"]["bytes"] / 4
    model, plan, _ = load_compressed(out)
    assert isinstance(model.fc2, QuantLinear)
    assert mlp_task.evaluate(model) == pytest.approx(result["after"]["metric"])


@pytest.mark.parametrize("argv, message", [
    (["--method", "qat"], r"qat needs bits"),
    (["--method", "qat", "--bits", "1"], r"bits=1 must be an integer from 2 to 8"),
    (["--method", "qat", "--bits", "4", "--scheme", "kmeans"], "symmetric uniform"),
    (["--method", "qat", "--bits", "4", "--epochs", "0"], r"epochs=0 must be a positive integer"),
    (["--method", "svd", "--ratio", "0.5", "--finetune", "-1"], r"epochs=-1 must be a positive integer"),
    (["--method", "svd", "--ratio", "0.5", "--finetune", "2", "--distill", "--temperature", "0"],
     r"temperature=0.0 must be a number > 0"),
    (["--method", "svd", "--ratio", "0.5", "--finetune", "2", "--distill", "--alpha", "1.5"],
     r"alpha=1.5 must be in \[0, 1\]"),
    (["--method", "svd", "--ratio", "0.5", "--distill"], "need --finetune EPOCHS"),
])
def test_cli_recovery_bad_input_exits_2(capsys, argv, message):
    assert main(["compress", "digits-mlp", *argv]) == 2
    err = capsys.readouterr().err
    assert __import__("re").search(message, err), err


def test_int8_layers_train_on_their_grid_and_repack_to_int8(mlp_task):
    from workbench.layers.quantized import Int8Linear

    packed = wb.apply(mlp_task.model, get_recipe("int8")(mlp_task.model))
    view = trainable(__import__("copy").deepcopy(packed))
    assert isinstance(view.fc2, FakeQuantLayer) and view.fc2.qp == 127
    assert state_bytes(repack(view)) == state_bytes(packed)
    result = finetune(packed, mlp_task, epochs=1, progress=False, patience=None)
    assert isinstance(result.model.fc2, Int8Linear) and result.untrained_layers == []


def test_layers_without_a_view_are_reported_frozen(mlp_task):
    kmeans = wb.apply(mlp_task.model, get_recipe("quant")(mlp_task.model, bits=3, scheme="kmeans"))
    result = finetune(kmeans, mlp_task, epochs=1, progress=False, patience=None)
    assert result.untrained_layers == ["fc1", "fc2", "fc3"]
    assert torch.equal(result.model.fc2.packed, kmeans.fc2.packed)  # codes untouched; only biases train
