"""Rank allocation under one parameter budget: brute-force oracle, budget, plans that apply."""
import itertools

import pytest
import torch

import workbench as wb
from workbench.kernels import svd as svd_kernels
from workbench.measure import count_params
from workbench.registry import get_recipe
from workbench.select.aware_budget import allocate_ranks, allocated_plan


def _loss(spectra, ranks, scales):
    return sum(scales[n] * float((s[ranks[n]:] ** 2).sum() / (s ** 2).sum()) for n, s in spectra.items())


def test_greedy_allocation_equals_brute_force_when_rank_costs_are_equal():
    # Every layer has m + n = 22, so the greedy over sorted singular values is exact.
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (12, 10), "b": (10, 12), "c": (11, 11)}
    spectra = {n: torch.sort(torch.rand(min(s), generator=g, dtype=torch.float64) ** k, descending=True).values
               for (n, s), k in zip(shapes.items(), (1, 3, 6))}
    scales = {"a": 1.0, "b": 2.5, "c": 0.7}
    ratio = 0.35
    ranks = allocate_ranks(spectra, shapes, ratio, scales)
    budget = ratio * sum(m * n for m, n in shapes.values())
    assert sum(ranks[n] * sum(shapes[n]) for n in shapes) <= budget
    caps = {n: svd_kernels.breakeven_rank(s) for n, s in shapes.items()}
    best = min(_loss(spectra, dict(zip(shapes, combo)), scales)
               for combo in itertools.product(*[range(1, caps[n] + 1) for n in shapes])
               if sum(r * sum(shapes[n]) for n, r in zip(shapes, combo)) <= budget)
    assert _loss(spectra, ranks, scales) == pytest.approx(best, rel=1e-12)


def test_ratio_below_the_rank_one_minimum_is_refused():
    with pytest.raises(wb.errors.WorkbenchError, match="ratio=0.01"):
        allocate_ranks({"a": torch.ones(4)}, {"a": (4, 4)}, 0.01)


@pytest.mark.parametrize("weigh", ["energy", "sensitivity", "measured"])
def test_allocated_plan_keeps_the_total_budget_and_applies(mlp_task, weigh):
    model, calib = mlp_task.model, mlp_task.calibration_inputs()
    plan = allocated_plan(model, calib, 0.3, weigh=weigh)
    new = wb.apply(model, plan, calibration_inputs=calib)
    names = ["fc1", "fc2", "fc3"]  # the budget covers every layer, dense ones included
    before = sum(count_params(model.get_submodule(n)) for n in names)
    after = sum(count_params(new.get_submodule(n)) for n in names)
    biases = sum(model.get_submodule(n).bias.numel() for n in names)
    assert after - biases <= 0.3 * (before - biases)
    uniform = get_recipe("svd")(model, ratio=0.3, activation_aware="whiten")
    assert {n: c["rank"] for n, c in plan.layers.items()} != {n: c["rank"] for n, c in uniform.layers.items()}
    assert mlp_task.evaluate(new) > mlp_task.evaluate(wb.apply(model, uniform, calibration_inputs=calib))


def test_measured_allocation_keeps_sensitive_layers_dense_and_beats_uniform(mlp_task):
    """With room to spare, measured losses keep the layers that matter dense (they are left out
    of the plan) rather than capping every layer at its breakeven rank."""
    model, calib = mlp_task.model, mlp_task.calibration_inputs()
    plan = allocated_plan(model, calib, 0.6)
    assert set(plan.layers) < {"fc1", "fc2", "fc3"}
    with pytest.raises(wb.errors.WorkbenchError, match="ratio=0.001 is below"):
        allocated_plan(model, calib, 0.001)


def test_unknown_layer_and_rule_are_refused(mlp_task):
    with pytest.raises(wb.errors.WorkbenchError, match="nope"):
        allocated_plan(mlp_task.model, mlp_task.calibration_inputs(), 0.5, layers=["nope"])
    with pytest.raises(wb.errors.WorkbenchError, match="weigh='magic' is not a rule; use 'measured'"):
        allocated_plan(mlp_task.model, mlp_task.calibration_inputs(), 0.5, weigh="magic")


def test_probes_on_a_user_transformer_run_per_block_and_equal_the_whole_model_run(monkeypatch):
    """On a BERT built from a config (stages found automatically; its output a ModelOutput) each
    probed layer re-runs from its block only, and the losses equal those of whole-model runs."""
    import copy

    import numpy as np
    from workbench.auto_stages import FoundStages
    from workbench.select import aware_budget
    from workbench.stages import model_stages
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128, vocab_size=200,
        max_position_embeddings=64)).eval()
    ids = torch.randint(0, 200, (16, 12), generator=torch.Generator().manual_seed(1))
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    grams = aware_budget.layer_grams(model, names, ids)
    decompositions = {n: aware_budget._decomposition(model.get_submodule(n).weight, *grams[n], "whiten") for n in names}
    probe = {n: 4 for n in names}
    staged_table = aware_budget.measured_options(copy.deepcopy(model), ids, decompositions)
    staged_scales = aware_budget.probe_sensitivity(copy.deepcopy(model), ids, decompositions, probe)
    assert len(aware_budget.find_stages(model, ids[:2]).stages) == 5
    assert staged_table.layers == names and set(staged_scales) == set(names)
    assert all(np.isfinite(row).all() and row[0] == 0 for row in staged_table.losses)
    assert all(np.isfinite(v) and v >= 0 for v in staged_scales.values())
    assert sum(row[1] > 0 for row in staged_table.losses) >= len(names) // 2  # rank cuts are felt
    monkeypatch.setattr(aware_budget, "find_stages", lambda m, example: FoundStages(model_stages(m), "one"))
    whole_table = aware_budget.measured_options(copy.deepcopy(model), ids, decompositions)
    whole_scales = aware_budget.probe_sensitivity(copy.deepcopy(model), ids, decompositions, probe)
    for staged, whole in zip(staged_table.losses, whole_table.losses):
        np.testing.assert_allclose(staged, whole, rtol=1e-5, atol=1e-7)
    assert staged_scales == pytest.approx(whole_scales, rel=1e-3, abs=1e-6)


def test_allocated_plan_of_a_user_transformer_keeps_the_budget_and_applies():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128, vocab_size=200,
        max_position_embeddings=64)).eval()
    ids = torch.randint(0, 200, (32, 12), generator=torch.Generator().manual_seed(1))
    plan = allocated_plan(model, ids, 0.3, probe_samples=16)
    new = wb.apply(model, plan, calibration_inputs=ids)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    weights = sum(model.get_submodule(n).weight.numel() for n in names)
    kept = sum(count_params(new.get_submodule(n)) - model.get_submodule(n).bias.numel() for n in names)
    assert 0 < kept <= 0.3 * weights and plan.layers
