"""Plans are immutable data that round-trip through JSON."""
import pytest

from workbench.errors import WorkbenchError
from workbench.plan import PLAN_FORMAT_VERSION, LayerPlan, Plan


def test_plan_json_round_trip():
    plan = Plan({"fc1": LayerPlan("svd", {"rank": 8}), "fc2": LayerPlan("quant", {"bits": 4})},
                steps=(LayerPlan("fold_bn"),))
    again = Plan.from_json(plan.to_json())
    assert again == plan and hash(again) == hash(plan)


def test_with_layer_returns_a_new_plan():
    plan = Plan({"fc1": LayerPlan("svd", {"rank": 8})})
    changed = plan.with_layer("fc1", LayerPlan("svd", {"rank": 4}))
    assert plan.layers["fc1"]["rank"] == 8 and changed.layers["fc1"]["rank"] == 4
    assert "fc1" not in plan.with_layer("fc1", None).layers
    with pytest.raises(TypeError):
        plan.layers["fc1"] = LayerPlan("svd", {"rank": 1})


def test_newer_format_is_refused():
    with pytest.raises(WorkbenchError, match=f"format_version=99 is newer.*up to {PLAN_FORMAT_VERSION}"):
        Plan.from_dict({"format_version": 99, "layers": {}})


@pytest.mark.parametrize("text, message", [("{", "not valid JSON"), ("[1]", "JSON object"),
                                           ('{"layers": {"fc1": {"rank": 2}}}', "needs a 'method'")])
def test_malformed_plans_are_refused(text, message):
    with pytest.raises(WorkbenchError, match=message):
        Plan.from_json(text)
