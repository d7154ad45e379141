"""Results a user sees are typed (attribute access) and stay JSON-serialisable."""
import json

import pytest

import workbench as wb
from workbench.results import Evaluation, Measurement, Preview


def test_measure_returns_a_typed_record_that_is_still_json(mlp_task):
    result = wb.measure(mlp_task.model, mlp_task, latency=False)
    assert isinstance(result, Measurement)
    assert result.metric == result["metric"] and result.params == sum(p.numel() for p in mlp_task.model.parameters())
    assert json.loads(json.dumps(result)) == dict(result)
    with pytest.raises(AttributeError, match="no 'accuracy'; it has: metric, params"):
        result.accuracy


def test_engine_results_are_typed(mlp_task):
    engine = wb.Engine(mlp_task, freeze_gc=False)
    plan = wb.Plan({"fc2": wb.LayerPlan("svd", {"rank": 8})})
    evaluation = engine.evaluate(plan)
    assert isinstance(evaluation, Evaluation)
    assert evaluation.metric == pytest.approx(mlp_task.evaluate(wb.apply(mlp_task.model, plan)))
    preview = engine.preview("fc2", 8)
    assert isinstance(preview, Preview) and 0 < preview.weight_error < 1
    json.dumps(evaluation)
