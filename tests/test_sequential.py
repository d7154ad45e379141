"""Sequential calibration and the refit kernels: optimality oracles, order, determinism, save/load."""
import pytest
import torch
from torch import nn

import workbench as wb
from workbench.kernels import aware
from workbench.layers.lowrank import LowRankLinear
from workbench.plan import LayerPlan, Plan
from tests.conftest import random_bert, state_bytes


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


def test_a_user_transformer_is_calibrated_block_by_block_to_the_same_weights_in_fewer_passes(monkeypatch):
    # Oracle: the stage cut only saves work. Sequential calibration over the stages found
    # automatically gives the weights it gives with one stage (the whole model re-run per group).
    from workbench import sequential
    from workbench.auto_stages import FoundStages
    from workbench.stages import model_stages
    model = random_bert(layers=3)
    ids = torch.randint(0, 200, (16, 12), generator=torch.Generator().manual_seed(1))
    before = state_bytes(model)
    plan = Plan({name: LayerPlan("svd_aware", {"rank": 6, "aware": "whiten", "ridge": 1e-10, "sequential": True,
                                               "refit": True})
                 for name, m in model.named_modules() if isinstance(m, nn.Linear)})
    used, passes = [], []
    found = sequential.find_stages

    def spy(mod, example):
        result = found(mod, example)
        used.append([s.label for s in result.stages])
        return result

    def count(module, args, output):  # embeddings runs on the calibration chunk (the cut is checked on 2 rows)
        if type(module).__name__ == "BertEmbeddings" and output.shape[0] == len(ids):
            passes.append(1)

    hook = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        monkeypatch.setattr(sequential, "find_stages", spy)
        staged = wb.apply(model, plan, calibration_inputs=ids)
        staged_passes = len(passes)
        monkeypatch.setattr(sequential, "find_stages", lambda mod, example: FoundStages(model_stages(mod), "one"))
        passes.clear()
        whole = wb.apply(model, plan, calibration_inputs=ids)
    finally:
        hook.remove()
    assert used == [["before encoder.layer"] + [f"encoder.layer.{i}" for i in range(3)] + ["after encoder.layer"]]
    assert state_bytes(model) == before
    names = [n for n, m in staged.named_modules() if isinstance(m, LowRankLinear)]
    assert len(names) == len(plan.layers) == 19
    a, b = staged.state_dict(), whole.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-7), key
    # one stage: one (partial) forward per group of layers reading one input (4 per block, + pooler,
    # + reference and final runs); staged: embeddings run only in the first and last stages
    assert staged_passes < len(passes) / 2, (staged_passes, len(passes))


def test_a_layer_of_no_automatic_stage_makes_sequential_calibration_use_one_stage():
    # GPT-2's lm_head shares its weight with the token embeddings: it is called after the blocks
    # but belongs to no stage, so a plan with it is calibrated over the whole model (one stage).
    from workbench.sequential import calibration_stages
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=100, bos_token_id=0, eos_token_id=0)).eval()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    blocks = calibration_stages(model, ids, ["transformer.h.1.mlp.c_fc"])
    assert [s.label for s in blocks] == ["before transformer.h", "transformer.h.0", "transformer.h.1",
                                         "after transformer.h"]
    assert [s.label for s in calibration_stages(model, ids, ["transformer.h.1.mlp.c_fc", "lm_head"])] == [""]
