"""Recipes are typed objects with declared options: misspelled options are refused, never ignored."""
import inspect

import pytest
import torch
from torch import nn

import workbench as wb
from workbench.registry import Method, Recipe, check_options, get_method, register_method
from workbench.engine import Engine
from workbench.zoo.task import Task


@pytest.mark.parametrize("name, options, wrong, hint", [
    ("svd", {"ratio": 0.3, "sequantial": True}, "sequantial", "sequential"),
    ("svd", {"ratio": 0.3, "layer": ["fc1"]}, "layer", "layers"),
    ("prune", {"ratio": 0.3, "strucured": True}, "strucured", "structured"),
    ("quant", {"bits": 4, "per_chanel": True}, "per_chanel", "per_channel"),
    ("int8", {"bit": 8}, "bit", None),
    ("qat", {"bits": 4, "per_chanel": True}, "per_chanel", "per_channel"),
])
def test_misspelled_recipe_options_are_refused_with_the_accepted_list(mlp_task, name, options, wrong, hint):
    recipe = wb.recipe(name)
    with pytest.raises(wb.WorkbenchError) as excinfo:
        recipe(mlp_task.model, **options)
    message = str(excinfo.value)
    assert repr(wrong) in message and "it accepts:" in message
    assert all(option in message for option in recipe.options)
    if hint:
        assert f"did you mean {hint!r}" in message


def test_every_registered_recipe_declares_its_options_and_takes_no_catch_all():
    for name in wb.recipes():
        recipe = wb.recipe(name)
        assert isinstance(recipe, Recipe) and recipe.name == name
        parameters = inspect.signature(recipe.build).parameters.values()
        assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters), name
        assert "task" not in recipe.options


def test_task_reaches_only_recipes_that_declare_it(mlp_task):
    # svd does not take a task: passing one (as the CLI and the Pareto sweep do) is not an error
    assert wb.recipe("svd")(mlp_task.model, task=mlp_task, ratio=0.5) == wb.recipe("svd")(mlp_task.model, ratio=0.5)
    assert not wb.recipe("svd").needs_task and wb.recipe("prune").needs_task
    structured = wb.recipe("prune")(mlp_task.model, task=mlp_task, ratio=0.5, structured=True)
    assert structured.steps[0].params["input_shape"] == list(mlp_task.example_input.shape) or \
        tuple(structured.steps[0].params["input_shape"]) == tuple(mlp_task.example_input.shape)


def test_get_recipe_is_kept_for_notebooks_and_saved_scripts(mlp_task):
    assert wb.get_recipe("svd") is wb.recipe("svd")
    assert wb.get_recipe("svd")(mlp_task.model, ratio=0.5).layers


def test_a_recipe_with_catch_all_options_cannot_be_registered():
    def sloppy(model, *, ratio=None, **rest):
        return wb.Plan({})

    with pytest.raises(TypeError, match="keyword-only"):
        Recipe.from_function("sloppy", sloppy)


def test_check_options_names_the_value_and_the_rule():
    check_options("x", {"a": 1}, ("a", "b"))
    with pytest.raises(wb.WorkbenchError, match=r"'c'.*it accepts: a, b"):
        check_options("x", {"c": 1}, ("a", "b"))


class _Scale(nn.Module):
    def __init__(self, linear: nn.Linear, factor: float):
        super().__init__()
        self.linear, self.factor = linear, factor

    def forward(self, x):
        return self.linear(x) * self.factor


def test_the_engine_uses_a_methods_view_without_knowing_its_name():
    """A new method with a ``view`` is evaluated through it; the engine has no per-method code."""
    calls = {"view": 0, "build": 0}

    def build(module, params, context):
        calls["build"] += 1
        return _Scale(module, params["factor"])

    def view(module, params, context):
        calls["view"] += 1
        return _Scale(module, params["factor"])

    register_method(Method("test_scale_view", build, (nn.Linear,), view=view))
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
        x = torch.randn(32, 4)
        task = Task("toy", model, x, model(x).argmax(1), lambda out, y: float((out.argmax(1) == y).float().mean()))
        engine = Engine(task, freeze_gc=False)
        plan = wb.Plan({"2": wb.LayerPlan("test_scale_view", {"factor": -1.0})})
        result = engine.evaluate(plan)
        assert calls["view"] >= 1
        assert result["metric"] == pytest.approx(task.evaluate(wb.apply(model, plan)))
        assert result["params"] == sum(p.numel() for p in model.parameters())
    finally:
        from workbench import registry
        registry._METHODS.pop("test_scale_view", None)


def test_the_svd_method_declares_its_view_and_check():
    svd = get_method("svd")
    assert svd.view is not None and svd.check is not None and svd.factorized
