"""Choose one setting per layer under a whole-model budget of parameters, bytes or FLOPs.

Allocators
----------
``uniform``: the same kept ratio in every layer (the largest that meets the budget).
``energy``: the same fraction E of sigma^2 kept in every layer (the largest E that fits).
``greedy``: AIMET-style: from the original, repeatedly take the cheaper option of some layer that
    costs the least predicted loss of quality per unit of budget saved, until the budget is met; then spend
    what is left on the upgrades that buy the most.
``convex``: multiple-choice knapsack solved with cvxpy: binary ``x[l, o]`` (one option per
    layer), ``sum cost * x <= budget``, minimize ``sum predicted_loss * x``; exact MILP with HiGHS
    when available, else the LP relaxation rounded and repaired.

Predicted loss of an option is either measured (``loss="sensitivity"``: the loss of quality with
that layer alone compressed, in the metric's direction: an accuracy's drop, a perplexity's rise;
`SensitivityResult.drop` from `workbench.select._sensitivity`) or a proxy
(``loss="proxy"``: discarded sigma^2 weighted by the input activation energy along each singular
direction, relative to the layer's output energy). Every allocation is then applied and
evaluated for real; ``metric`` is measured on the task's test data, while choices use the
validation split (`workbench.select._sensitivity.selection_task`: the task's held-out split, or
samples of the training split for a task without one).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workbench.compress import apply
from workbench.hooks import collect_layer_inputs
from workbench.errors import WorkbenchError
from workbench.measure import saved_bytes
from workbench.plan import LayerPlan, Plan
from workbench.registry import get_method, get_recipe
from workbench.select._sensitivity import (COSTS, SensitivityResult, model_costs, selection_task,
                                          sensitivity)
from workbench.spectra import layer_svd
from workbench.zoo.task import Task
from workbench.inventory import matrix_layers

ALLOCATORS = ("uniform", "energy", "greedy", "convex")
#: Kept-ratio grid the options of greedy / convex come from (0.005 reaches rank 1 in small layers).
ALLOCATION_GRID = (0.005, 0.02, 0.05, 0.08, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8)
#: Tie-break: each option's loss grows by this much per unit of its layer's cost saved, so that
#: among options predicted equally good, the larger (safer) one wins and the budget gets used.
TIE_BREAK = 1e-4


@dataclass
class Allocation:
    """An allocation, applied and measured.

    ``choices``: ``{layer: LayerPlan or None (dense)}``; ``budget``: the fraction asked;
    ``limit`` / ``used`` / ``total``: absolute ``by`` units allowed, used by the result, of the
    original; ``metric``: measured on the test data; ``validation_metric``: on the selection split;
    ``predicted_loss``: sum of the options' predicted losses (greedy / convex);
    ``saved_bytes``: size of the state_dict written with torch.save.
    """

    allocator: str
    by: str
    budget: float
    limit: float
    used: int
    total: int
    choices: dict[str, LayerPlan | None]
    plan: Plan
    metric: float
    validation_metric: float
    params: int
    bytes: int
    flops: int
    saved_bytes: int
    predicted_loss: float | None = None
    solver: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ranks(self) -> dict[str, int | None]:
        """``{layer: rank}`` (None where the layer stays dense or the method has no rank)."""
        return {name: (choice.get("rank") if choice is not None else None)
                for name, choice in self.choices.items()}

    @property
    def fraction_used(self) -> float:
        return self.used / self.total

    def to_dict(self) -> dict:
        return {"allocator": self.allocator, "by": self.by, "budget": self.budget,
                "limit": self.limit, "used": self.used, "total": self.total,
                "fraction_used": self.fraction_used, "metric": self.metric,
                "validation_metric": self.validation_metric, "params": self.params,
                "bytes": self.bytes, "flops": self.flops, "saved_bytes": self.saved_bytes,
                "predicted_loss": self.predicted_loss, "solver": self.solver,
                "layers": {name: (choice.to_dict() if choice is not None else {"method": "dense"})
                           for name, choice in self.choices.items()},
                "ranks": self.ranks, "plan": self.plan.to_dict()}


@dataclass
class OptionTable:
    """Per layer: candidate choices (index 0 = dense), their cost in ``by`` units and predicted loss."""

    layers: list[str]
    choices: list[list[LayerPlan | None]]
    costs: list[np.ndarray]
    losses: list[np.ndarray]
    fixed: float
    total: float

    def smallest(self) -> float:
        return self.fixed + sum(float(c.min()) for c in self.costs)

    def cost_of(self, picks: Sequence[int]) -> float:
        return self.fixed + sum(float(c[k]) for c, k in zip(self.costs, picks))

    def loss_of(self, picks: Sequence[int]) -> float:
        return sum(float(l[k]) for l, k in zip(self.losses, picks))


def _check_budget(budget: float, by: str) -> None:
    if by not in COSTS:
        raise WorkbenchError(f"by={by!r} must be one of {', '.join(COSTS)}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not (0 < budget <= 1):
        raise WorkbenchError(f"budget={budget!r} must be a fraction of the original model's {by} in (0, 1]")


def _infeasible(budget: float, by: str, limit: float, smallest: float, total: float, how: str) -> WorkbenchError:
    floor = math.ceil(smallest / total * 1000) / 1000
    return WorkbenchError(
        f"budget={budget} of {by} ({limit:,.0f} {by}) is below the smallest model {how} can reach: "
        f"{smallest:,.0f} {by} ({smallest / total:.3f} of the original {total:,.0f}); "
        f"use a budget of at least {floor}")


def proxy_losses(task: Task, result: SensitivityResult, n_inputs: int = 512) -> list[np.ndarray]:
    """Predicted loss of every SVD option of ``result`` from the spectra and calibration inputs.

    For a layer ``W = U S V^T`` with inputs ``X`` (unfolded patches for a conv), truncating to
    rank r changes the outputs by ``sum_{i>r} s_i^2 ||X v_i||^2``; divided by ``||X W^T||^2``
    this is the relative output error. Returns ``losses[layer][grid index]`` (NaN for options
    that are not an SVD rank).
    """
    model = task.model
    inputs = collect_layer_inputs(model, result.layers, task.calibration_inputs(n_inputs))
    out: list[np.ndarray] = []
    for i, name in enumerate(result.layers):
        module = model.get_submodule(name)
        x = inputs[name]
        if isinstance(module, nn.Conv2d):
            x = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                         stride=module.stride).transpose(1, 2).reshape(-1, module.weight[0].numel())
        svd = layer_svd(module)
        directional = ((x.double() @ svd.vh.double().T) ** 2).sum(0)  # ||X v_i||^2
        weighted = svd.s.double() ** 2 * directional
        total = float(weighted.sum()) or 1.0
        tail = torch.flip(torch.cumsum(torch.flip(weighted, [0]), 0), [0])  # tail[r] = sum_{i>=r}
        row = []
        for choice in result.choices[i]:
            rank = choice.get("rank") if choice is not None and choice.method.startswith("svd") else None
            row.append(float(tail[rank]) / total if rank is not None and rank < len(tail) else
                       (0.0 if rank is not None else float("nan")))
        out.append(np.array(row))
    return out


def option_table(result: SensitivityResult, by: str, loss: str = "sensitivity",
                 task: Task | None = None) -> OptionTable:
    """Candidate options per layer from a sensitivity analysis (dense first, duplicates merged)."""
    if loss not in ("sensitivity", "proxy"):
        raise WorkbenchError(f"loss={loss!r} must be 'sensitivity' (measured) or 'proxy' (sigma^2 x activations)")
    proxy = proxy_losses(task, result) if loss == "proxy" else None
    choices, costs, losses = [], [], []
    for i, name in enumerate(result.layers):
        dense_cost = result.dense[by][i]
        row_choices: list[LayerPlan | None] = [None]
        row_costs, row_losses = [float(dense_cost)], [0.0]
        for j, choice in enumerate(result.choices[i]):
            cost = result.costs[by][i][j]
            value = result.metric[i][j] if proxy is None else proxy[i][j]
            if choice is None or cost < 0 or cost >= dense_cost or not math.isfinite(value) \
                    or choice in row_choices:
                continue
            if get_method(choice.method).kind != "layer":
                raise WorkbenchError(f"method {choice.method!r} is a whole-model step; allocation needs per-layer methods")
            predicted = max(0.0, result.drop(i, j)) if proxy is None else value
            row_choices.append(choice)
            row_costs.append(float(cost))
            row_losses.append(predicted + TIE_BREAK * (dense_cost - cost) / max(result.total[by], 1))
        choices.append(row_choices)
        costs.append(np.array(row_costs))
        losses.append(np.array(row_losses))
    return OptionTable(list(result.layers), choices, costs, losses, float(result.fixed[by]),
                       float(result.total[by]))


def _improve(table: OptionTable, picks: list[int], limit: float) -> list[int]:
    """Greedy repair then fill: move to cheaper options (least loss per unit saved) until within
    ``limit``, then take upgrades (most loss removed per unit spent) while they fit."""
    picks = list(picks)
    while table.cost_of(picks) > limit + 1e-9:
        best = None
        for l, (c, lo) in enumerate(zip(table.costs, table.losses)):
            for k in range(len(c)):
                saved = c[picks[l]] - c[k]
                if saved <= 0:
                    continue
                key = ((lo[k] - lo[picks[l]]) / saved, -saved)
                if best is None or key < best[0]:
                    best = (key, l, k)
        if best is None:
            break
        picks[best[1]] = best[2]
    while True:
        spare = limit - table.cost_of(picks)
        best = None
        for l, (c, lo) in enumerate(zip(table.costs, table.losses)):
            for k in range(len(c)):
                extra = c[k] - c[picks[l]]
                gain = lo[picks[l]] - lo[k]
                if gain <= 0 or extra > spare + 1e-9:
                    continue
                key = -gain / max(extra, 1e-12)
                if best is None or key < best[0]:
                    best = (key, l, k)
        if best is None:
            return picks
        picks[best[1]] = best[2]


def greedy_picks(table: OptionTable, limit: float) -> list[int]:
    """AIMET-style greedy from the original model (every layer dense)."""
    return _improve(table, [0] * len(table.layers), limit)


def convex_picks(table: OptionTable, limit: float, solver: str = "auto") -> tuple[list[int], str]:
    """Multiple-choice knapsack with cvxpy. ``solver``: "auto" (MILP with HiGHS if installed,
    else LP), "milp" or "lp" (relaxation, then rounding to each layer's largest x and repair)."""
    import cvxpy as cp  # noqa: PLC0415 (optional heavy dependency, loaded on first use)

    if solver not in ("auto", "milp", "lp"):
        raise WorkbenchError(f"solver={solver!r} must be 'auto', 'milp' or 'lp'")
    have_highs = "HIGHS" in cp.installed_solvers()
    if solver == "milp" and not have_highs:
        raise WorkbenchError("solver='milp' needs HiGHS (pip install highspy); use solver='lp'")
    milp = solver == "milp" or (solver == "auto" and have_highs)
    sizes = [len(c) for c in table.costs]
    n = sum(sizes)
    group = np.zeros((len(sizes), n))
    start = 0
    for g, size in enumerate(sizes):
        group[g, start:start + size] = 1
        start += size
    cost = np.concatenate(table.costs) / table.total
    loss = np.concatenate(table.losses)
    capacity = (limit - table.fixed) / table.total
    x = cp.Variable(n, boolean=milp)
    constraints = [group @ x == 1, cost @ x <= capacity + 1e-12]
    if not milp:
        constraints += [x >= 0, x <= 1]
    problem = cp.Problem(cp.Minimize(loss @ x), constraints)
    try:
        with _quiet_native_stdout():
            # HiGHS stops at a relative gap of 1e-4 by default: gaps of 0 make the MILP exact
            gaps = {"mip_rel_gap": 0.0, "mip_abs_gap": 0.0} if milp else {}
            problem.solve(solver="HIGHS", **gaps) if have_highs else problem.solve()
    except cp.error.SolverError as exc:
        raise WorkbenchError(f"convex allocation: the solver failed ({exc}); try allocator='greedy'") from None
    if problem.status in ("infeasible", "infeasible_inaccurate"):
        raise WorkbenchError(f"convex allocation: no choice of options fits {limit:,.0f} "
                             f"(smallest possible {table.smallest():,.0f})")
    if problem.status not in ("optimal", "optimal_inaccurate") or x.value is None:
        raise WorkbenchError(f"convex allocation: the solver stopped with status {problem.status!r}; "
                             "try allocator='greedy'")
    values = np.asarray(x.value)
    picks, start = [], 0
    for size in sizes:
        picks.append(int(np.argmax(values[start:start + size])))
        start += size
    if milp:
        return picks, "milp (HiGHS)"
    return _improve(table, picks, limit), "lp relaxation + rounding"


@contextlib.contextmanager
def _quiet_native_stdout():
    """Silence what native solvers write straight to file descriptor 1 (HiGHS prints a banner),
    so that ``--json`` output stays valid JSON."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no real descriptor (some notebook front ends): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _bisect_recipe(task: Task, method: str, option: str, by: str, limit: float,
                   low: float = 1e-4, high: float = 1.0, steps: int = 16) -> Plan:
    """The plan of ``recipe(option=v)`` for the largest ``v`` in (low, high] whose cost fits."""
    recipe = get_recipe(method)
    example = task.example_input

    def cost(value: float) -> tuple[float, Plan]:
        plan = recipe(task.model, task=task, **{option: value})
        return model_costs(apply(task.model, plan), example, only=by)[by], plan

    top_cost, top_plan = cost(high)
    if top_cost <= limit:
        return top_plan
    lo_cost, lo_plan = cost(low)
    if lo_cost > limit:
        raise _infeasible_marker(lo_cost)
    for _ in range(steps):
        mid = (low + high) / 2
        mid_cost, mid_plan = cost(mid)
        if mid_cost <= limit:
            low, lo_plan = mid, mid_plan
        else:
            high = mid
    return lo_plan


class _infeasible_marker(Exception):
    def __init__(self, smallest: float):
        super().__init__(smallest)
        self.smallest = smallest


def measure_allocation(task: Task, allocator: str, by: str, budget: float, limit: float,
                       total: float, plan: Plan, layers: Sequence[str], split: str = "validation",
                       predicted_loss: float | None = None, solver: str = "") -> Allocation:
    """Apply ``plan`` to the task's model and measure it (metric on test, and on the selection split)."""
    new = apply(task.model, plan, calibration_inputs=task.calibration_inputs())
    costs = model_costs(new, task.example_input)
    return Allocation(
        allocator=allocator, by=by, budget=budget, limit=limit, used=int(costs[by]), total=int(total),
        choices={name: plan.layers.get(name) for name in layers}, plan=plan,
        metric=float(task.evaluate(new)), validation_metric=float(selection_task(task, split).evaluate(new)),
        params=costs["params"], bytes=costs["bytes"], flops=costs["flops"], saved_bytes=saved_bytes(new),
        predicted_loss=predicted_loss, solver=solver)


def allocate(task: Task, budget: float = 0.3, by: str = "params", allocator: str = "greedy", *,
             method: str = "svd", result: SensitivityResult | None = None,
             grid: Sequence[float] | None = None, loss: str = "sensitivity", solver: str = "auto",
             split: str = "validation", executor: Any = None, progress: bool = True) -> Allocation:
    """Allocate ``method``'s per-layer settings so that the model keeps ``budget`` of its ``by``.

    Parameters
    ----------
    task : model, data and metric; ``task.model`` is never modified.
    budget : fraction in (0, 1] of the original's ``by`` (``params``: stored weights, ``bytes``:
        payload bytes of the state_dict, ``flops``: FLOPs of one sample).
    allocator : "uniform", "energy" (SVD only), "greedy" or "convex".
    result : a sensitivity analysis to reuse (default: computed with ``grid``, cached).
    loss : "sensitivity" (measured losses of quality in the task's direction, which the
        allocators minimise) or "proxy" (activation-weighted discarded sigma^2).
    solver : for "convex": "auto", "milp" or "lp".

    Raises
    ------
    WorkbenchError
        When the budget is below the smallest model the options can reach (the message names
        that size), for an unknown allocator, or when the solver fails.
    """
    _check_budget(budget, by)
    if allocator not in ALLOCATORS:
        raise WorkbenchError(f"allocator={allocator!r} must be one of {', '.join(ALLOCATORS)}")
    example = task.example_input
    total = float(model_costs(task.model, example)[by])
    limit = budget * total
    if allocator in ("uniform", "energy"):
        if allocator == "energy" and method != "svd":
            raise WorkbenchError(f"the energy rule keeps a fraction of sigma^2: method must be 'svd', got {method!r}")
        option = "ratio" if allocator == "uniform" else "energy"
        try:
            plan = _bisect_recipe(task, method, option, by, limit)
        except _infeasible_marker as exc:
            raise _infeasible(budget, by, limit, exc.smallest, total,
                              f"{allocator} {method} (smallest {option})") from None
        layers = [info.name for info in matrix_layers(task.model)]
        return measure_allocation(task, allocator, by, budget, limit, total, plan, layers, split)

    if result is None:
        result = sensitivity(task, method, ALLOCATION_GRID if grid is None and method == "svd" else grid,
                             split=split, executor=executor, progress=progress)
    table = option_table(result, by, loss, task)
    if table.smallest() > limit + 1e-9:
        raise _infeasible(budget, by, limit, table.smallest(), total,
                          f"{allocator} {method} (smallest option in every layer)")
    if allocator == "greedy":
        picks, solver_used = greedy_picks(table, limit), "greedy"
    else:
        picks, solver_used = convex_picks(table, limit, solver)
    plan = Plan({name: table.choices[l][k] for l, (name, k) in enumerate(zip(table.layers, picks))
                 if table.choices[l][k] is not None})
    return measure_allocation(task, allocator, by, budget, limit, total, plan, table.layers, split,
                              predicted_loss=table.loss_of(picks), solver=solver_used)


def compare_allocators(task: Task, budget: float = 0.3, by: str = "params",
                       allocators: Sequence[str] = ALLOCATORS, **options: Any) -> dict[str, Allocation]:
    """``{allocator: Allocation}`` at the same budget (one shared, cached sensitivity analysis)."""
    return {name: allocate(task, budget, by, name, **options) for name in allocators}
