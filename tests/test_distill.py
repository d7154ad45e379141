"""Knowledge distillation: the loss against a hand computation, its gradient against the closed
form, feature adapters, students of equal size, and bad input refused."""
import numpy as np
import pytest
import torch
from torch import nn

import workbench as wb
from conftest import state_bytes
from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.measure import count_params
from workbench.recovery import Distillation, build_student, distill_finetune, distillation_loss, soft_loss
from workbench.recovery.distill import FeatureMatcher
from workbench.recovery.student import narrowed


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_distillation_loss_equals_hand_computed_kl_t2_mix(temperature, alpha):
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(4, 5)) * 3, rng.normal(size=(4, 5)) * 3
    y = np.array([0, 3, 1, 4])
    p_t, p_s = _softmax(t / temperature), _softmax(s / temperature)
    kl = np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1))
    ce = np.mean(-np.log(_softmax(s)[np.arange(4), y]))
    expected = alpha * temperature ** 2 * kl + (1 - alpha) * ce
    got = distillation_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), temperature, alpha)
    assert float(got) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_soft_loss_gradient_is_t_times_probability_gap(temperature):
    # d/ds [T^2 KL(p_t || p_s)] = T (p_s - p_t) / batch: the T^2 keeps the scale of the hard loss.
    s = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 6, dtype=torch.float64)
    soft_loss(s, t, temperature).backward()
    expected = temperature * (torch.softmax(s / temperature, -1) - torch.softmax(t / temperature, -1)) / 3
    torch.testing.assert_close(s.grad, expected.detach())
    assert float(soft_loss(t, t, temperature)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": 0.0}, r"temperature=0.0 must be a number > 0"),
    ({"temperature": -2}, r"temperature=-2 must be"),
    ({"alpha": 1.5}, r"alpha=1.5 must be in \[0, 1\]"),
    ({"alpha": -0.1}, r"alpha=-0.1 must be in \[0, 1\]"),
])
def test_bad_temperature_or_alpha_is_refused(kwargs, message):
    with pytest.raises(WorkbenchError, match=message):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), **kwargs)
    with pytest.raises(WorkbenchError, match=message):
        Distillation(nn.Linear(2, 3), **kwargs)


def test_teacher_output_shape_mismatch_is_a_clear_error(mlp_task):
    wrong_teacher = nn.Linear(64, 7)
    with pytest.raises(WorkbenchError, match=r"teacher outputs \(2, 7\) do not match student outputs \(2, 10\)"):
        distill_finetune(mlp_task.model, mlp_task, epochs=1, teacher=wrong_teacher, progress=False)
    with pytest.raises(WorkbenchError, match="do not match"):
        soft_loss(torch.zeros(2, 10), torch.zeros(2, 7), 2.0)


def test_feature_matcher_builds_adapters_only_where_widths_differ():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    student = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
    matcher = FeatureMatcher({"1": "1", "2": "2"})
    matcher.attach(student, teacher)
    x = torch.randn(5, 8)
    student(x), teacher(x)
    matcher.build()
    adapter = matcher.adapter("1")
    assert isinstance(adapter, nn.Linear) and tuple(adapter.weight.shape) == (16, 4)
    assert isinstance(matcher.adapter("2"), nn.Identity)
    h_s, h_t = torch.relu(student[0](x)), torch.relu(teacher[0](x))
    expected = ((adapter(h_s) - h_t) ** 2).mean() + ((student(x) - teacher(x)) ** 2).mean()
    torch.testing.assert_close(matcher.loss(), expected)
    matcher.detach()
    assert not student[1]._forward_hooks and not teacher[1]._forward_hooks


def test_unknown_feature_layer_names_the_layers():
    with pytest.raises(WorkbenchError, match="unknown student layer 'fc9'"):
        FeatureMatcher({"fc9": "fc1"}).attach(nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2)))


def test_distillation_recovers_a_compressed_mlp_and_touches_neither_model(mlp_task):
    plan = wb.Plan({"fc2": wb.LayerPlan("svd", {"rank": 4})})
    small = wb.apply(mlp_task.model, plan)
    before_teacher, before_small = state_bytes(mlp_task.model), state_bytes(small)
    result = distill_finetune(small, mlp_task, epochs=6, temperature=4.0, alpha=0.9,
                              features={"act1": "act1"}, progress=False)
    assert mlp_task.evaluate(result.model) > mlp_task.evaluate(small) + 0.02
    assert type(result.model.fc2).__name__ == "LowRankLinear" and result.model.fc2.rank == 4
    assert count_params(result.model) == count_params(small)  # adapters are not part of the result
    assert state_bytes(mlp_task.model) == before_teacher and state_bytes(small) == before_small
    assert not mlp_task.model.act1._forward_hooks


@pytest.mark.parametrize("budget", [3000, 8532, 40000])
def test_student_is_the_widest_narrowed_mlp_within_budget(mlp_task, budget):
    student = build_student(mlp_task.model, budget)
    params = count_params(student)
    hidden = student.fc1.out_features
    assert params <= budget
    bigger = narrowed(mlp_task.model, (hidden + 1) / 256)
    assert count_params(bigger) > budget  # one more hidden unit would not fit
    assert student.fc1.in_features == 64 and student.fc3.out_features == 10
    assert student(torch.zeros(2, 64)).shape == (2, 10)


def test_student_of_a_cnn_follows_flattened_widths(cnn_task):
    student = build_student(cnn_task.model, count_params(cnn_task.model) // 5)
    assert student.fc1.in_features == student.conv2.out_channels * 16
    assert student(cnn_task.eval_inputs[:3]).shape == (3, 10)


def test_student_bad_input(mlp_task, gru_task):
    with pytest.raises(WorkbenchError, match="not below the teacher"):
        build_student(mlp_task.model, count_params(mlp_task.model))
    with pytest.raises(WorkbenchError, match="below the smallest student"):
        build_student(mlp_task.model, 5)
    with pytest.raises(UnsupportedLayerError, match="RowReader"):
        build_student(gru_task.model, 1000)


def test_student_distilled_through_hidden_layers_with_an_adapter(mlp_task):
    from workbench.recovery import train_student

    result = train_student(mlp_task, 8458, epochs=2, features={"act2": "act2"}, progress=False)
    assert result.model.fc2.out_features < 256  # widths differ: the adapter mapped them
    assert count_params(result.model) <= 8458  # the adapter is not part of the student
    plain = train_student(mlp_task, 8458, epochs=2, progress=False)
    assert result.history[0]["loss"] > plain.history[0]["loss"]  # the feature term is in the loss
