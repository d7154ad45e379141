"""Sequential calibration and the refit kernels: optimality oracles, order, determinism, save/load."""
import pytest
import torch
from torch import nn

import workbench as wb
from workbench.kernels import aware
from workbench.layers.lowrank import LowRankLinear
from workbench.plan import LayerPlan, Plan
from tests.conftest import state_bytes


def _inputs(tokens, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, n, dtype=torch.float64)
    return torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix.T


@pytest.mark.parametrize("shape,rank", [((12, 10), 3), ((8, 16), 5)])
def test_regression_factors_reach_the_reduced_rank_regression_optimum(shape, rank):
    # Oracle (independent of the whitening): Z = W' X^T lies in the row space of X^T, so the best
    # rank-r fit of T = W X_ref^T is the rank-r truncation of T Q Q^T (Q: orthonormal basis of X).
    out, inp = shape
    w = torch.randn(out, inp, dtype=torch.float64)
    x_ref = _inputs(120, inp, 1)
    x = x_ref + 0.3 * _inputs(120, inp, 2)          # perturbed inputs (earlier layers compressed)
    a, b = aware.regression_factors(w, rank, aware.gram(x), aware.cross_gram(x_ref, x), ridge=1e-13)
    target = w @ x_ref.T
    q, _ = torch.linalg.qr(x)
    projected = target @ q
    sv = torch.linalg.svdvals(projected)
    optimum = ((target - projected @ q.T).norm() ** 2 + (sv[rank:] ** 2).sum()).sqrt()
    assert float((target - a @ b @ x.T).norm()) == pytest.approx(float(optimum), rel=1e-5)
    # fitting the perturbed inputs' own outputs (one-shot whitening) is worse for the original's
    a0, b0 = aware.aware_factors(w, rank, x=x, mode="whiten", ridge=1e-13)
    assert float((target - a0 @ b0 @ x.T).norm()) > float(optimum)


def test_refit_second_is_the_least_squares_optimum_gradient_zero():
    w = torch.randn(9, 14, dtype=torch.float64)
    x_ref, x = _inputs(200, 14, 3), _inputs(200, 14, 4)
    b = torch.randn(4, 14, dtype=torch.float64)
    a = aware.refit_second(w, b, aware.gram(x), aware.cross_gram(x_ref, x), ridge=0.0)
    a = a.clone().requires_grad_(True)
    loss = (w @ x_ref.T - a @ b @ x.T).pow(2).sum()
    loss.backward()
    scale = float((2 * w @ x_ref.T @ x @ b.T).norm())   # the gradient at a = 0
    assert float(a.grad.norm()) < 1e-6 * scale            # (grams are accumulated in float32)
    with torch.no_grad():  # and any other a is worse
        assert float((w @ x_ref.T - (a + 1e-3 * torch.randn_like(a)) @ b @ x.T).pow(2).sum()) > float(loss)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10)).eval()


def _plan(model, rank=4, **extra):
    return Plan({name: LayerPlan("svd_aware", {"rank": rank, "aware": "whiten", "ridge": 1e-10, **extra})
                 for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def test_sequential_refit_lowers_the_final_output_error_and_never_mutates():
    # On the calibration data this is a theorem for the last layer: with refit it is the best
    # rank-r fit of the original outputs from the inputs it really gets; one-shot is one candidate.
    model, x = _mlp(), _inputs(400, 20, 5).float()
    before = state_bytes(model)
    one_shot = wb.apply(model, _plan(model), calibration_inputs=x)
    sequential = wb.apply(model, _plan(model, sequential=True, refit=True), calibration_inputs=x)
    no_refit = wb.apply(model, _plan(model, sequential=True, refit=False), calibration_inputs=x)
    assert isinstance(sequential[4], LowRankLinear) and sequential[4].rank == 4
    with torch.no_grad():
        ref = model(x)
        errors = {k: float((m(x) - ref).norm()) for k, m in
                  (("one_shot", one_shot), ("sequential", sequential), ("no_refit", no_refit))}
    assert errors["sequential"] < errors["one_shot"]
    assert errors["no_refit"] != errors["one_shot"]          # later layers really saw other inputs
    assert state_bytes(model) == before
    again = wb.apply(model, _plan(model, sequential=True, refit=True), calibration_inputs=x)
    assert state_bytes(again) == state_bytes(sequential)      # a plan is data: apply reproduces it


class _Branches(nn.Module):
    """Two layers read one tensor (like q, k, v), a third reads their sum."""

    def __init__(self):
        super().__init__()
        self.left, self.right, self.out = nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 6)

    def forward(self, x):
        return self.out(torch.tanh(self.left(x)) + torch.tanh(self.right(x)))


def test_layers_sharing_one_input_are_calibrated_together_and_later_ones_see_compressed_inputs(monkeypatch):
    from workbench import sequential
    torch.manual_seed(1)
    model, x = _Branches().eval(), _inputs(300, 12, 6).float()
    seen = []
    original = sequential._record_fresh

    def spy(stage, mod, states, pending):
        fresh = original(stage, mod, states, pending)
        seen.append(sorted(fresh))
        return fresh

    monkeypatch.setattr(sequential, "_record_fresh", spy)
    new = wb.apply(model, _plan(model, rank=3, sequential=True), calibration_inputs=x)
    assert seen == [["left", "right"], ["out"]]
    assert all(isinstance(getattr(new, n), LowRankLinear) for n in ("left", "right", "out"))


def test_sequential_plan_without_calibration_is_refused():
    model = _mlp()
    with pytest.raises(wb.errors.WorkbenchError, match="calibration_inputs"):
        wb.apply(model, _plan(model, sequential=True))


def test_recipe_options_and_saved_file_reloads_bit_identically_without_data(tmp_path, mlp_task):
    from workbench.export import load_compressed, save_compressed
    from workbench.registry import get_method, get_recipe
    plan = get_recipe("svd")(mlp_task.model, ratio=0.4, activation_aware="whiten", sequential=True)
    assert all(c["sequential"] and c["refit"] for c in plan.layers.values())
    with pytest.raises(wb.errors.WorkbenchError, match="activation_aware"):
        get_recipe("svd")(mlp_task.model, ratio=0.4, sequential=True)
    model = wb.apply(mlp_task.model, plan, calibration_inputs=mlp_task.calibration_inputs())
    path = save_compressed(tmp_path / "m.safetensors", model, plan, "digits-mlp")
    assert get_method("svd_aware").skeleton is not None   # structure only: no calibration at load
    loaded = load_compressed(path)
    assert state_bytes(loaded.model) == state_bytes(model)
    assert loaded.plan == plan
