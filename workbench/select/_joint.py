"""One allocator across every family: the best option per layer under a budget of bytes, params or FLOPs.

`joint_allocate` takes each layer's menu (`workbench.select._menu.build_menu`: dense, b-bit codes,
ranks, quantized factors, residuals, sparsity; each option with its exact cost and predicted loss)
and picks one option per layer by multiple-choice knapsack: binary ``x[l, o]``, one per layer,
``sum cost * x <= budget``, minimize ``sum loss * x`` (`convex_picks`: an exact MILP with HiGHS
through cvxpy). The pick is then evaluated for real by the engine (metric on the task's test data,
exact state-dict bytes). A solve on a built menu takes milliseconds, so a budget slider can
re-solve on every move; `joint_fronts` traces every single family and the joint allocator over
a list of budgets on one menu (the data of one bytes-vs-metric chart).

Budgets are fractions of the original MODEL's cost (``relative_to="model"``, as `allocate`), or
of the candidate layers' cost only (``relative_to="layers"``: what the layers may take, the rest
of the model not counted), e.g. MiniLM's encoder Linears without its embeddings.
"""
from __future__ import annotations

import time
from typing import Mapping, Sequence

import numpy as np

from workbench.engine import Engine
from workbench.errors import WorkbenchError
from workbench.plan import LayerPlan, Plan
from workbench.results import Record
from workbench.select._allocate import OptionTable, _check_budget, _infeasible, convex_picks, greedy_picks
from workbench.select._menu import DEFAULT_FAMILIES, FAMILIES, TIE_BREAK, JointMenu, build_menu, check_families
from workbench.zoo.task import Task

RELATIVE_TO = ("model", "layers")
JOINT_ALLOCATORS = ("convex", "greedy")
Pins = Mapping[str, "LayerPlan | str | None"]


class JointAllocation(Record):
    """What `joint_allocate` chose and measured (JSON-serialisable as it is)."""

    by: str                 # "bytes" (state-dict payload), "params" or "flops" (one sample)
    budget: float           # the fraction asked
    relative_to: str        # "model": of the whole model's cost; "layers": of the candidate layers'
    limit: float            # budget in absolute ``by`` units
    used: int               # absolute ``by`` units of the result (same scope as ``limit``)
    total: int              # the original's (same scope)
    fraction_used: float    # used / total
    metric: float           # the task's metric of the compressed model (test data)
    original_metric: float  # the original's
    params: int             # of the whole compressed model
    bytes: int              # state-dict payload of the whole compressed model
    flops: int              # one sample's forward pass
    predicted_loss: float   # sum of the picked options' losses (proxy or sensitivity)
    loss: str               # how option losses were predicted
    solver: str             # "milp (HiGHS)", "lp relaxation + rounding" or "greedy"
    solve_ms: float         # time of the knapsack solve alone
    families: list          # the families offered
    choices: dict           # {layer: {"family", "method", "params", "cost", "loss"}} (loss: + tie-break < 1e-6)
    plan: dict              # `Plan.to_dict()` (`compress --plan` reads this key)

    def as_plan(self) -> Plan:
        """The chosen `Plan`."""
        return Plan.from_dict(self["plan"])


class BudgetFronts(Record):
    """Per family and for the joint allocator, one point per budget (`joint_fronts`)."""

    by: str
    relative_to: str
    metric_name: str
    original_metric: float
    budgets: list           # the fractions asked
    fronts: dict            # {label: [{"budget", "fraction_used", "metric", "bytes"} or with "reason"]}
    winners: list           # per budget: the single family with the best metric (None: none fits)

    def arrays(self, label: str) -> tuple[list[float], list[float]]:
        """``(fraction_used, metric)`` of ``label``'s feasible points, in budget order."""
        points = [p for p in self["fronts"][label] if p.get("metric") is not None]
        return [p["fraction_used"] for p in points], [p["metric"] for p in points]


def _check_pins(pinned: Pins | None, layers: Sequence[str] | None) -> dict[str, LayerPlan | None]:
    pins: dict[str, LayerPlan | None] = {}
    for name, choice in (pinned or {}).items():
        if layers is not None and name not in layers:
            raise WorkbenchError(f"pinned layer {name!r} is not a candidate layer; candidates: {', '.join(layers)}")
        if choice is None or choice == "dense":
            pins[name] = None
        elif isinstance(choice, LayerPlan):
            pins[name] = choice
        else:
            raise WorkbenchError(f"pin {choice!r} for layer {name!r} must be a LayerPlan or 'dense'")
    return pins


def menu_table(menu: JointMenu, by: str, families: Sequence[str] | None = None,
               pinned: Mapping[str, LayerPlan | None] | None = None,
               relative_to: str = "model") -> tuple[OptionTable, list[list[str]]]:
    """The knapsack's `OptionTable` in ``by`` units from ``menu``, restricted to ``families``
    (dense always offered), a pinned layer to its pin; options that save nothing left out.
    Also returns each kept option's family."""
    allowed = set(check_families(families)) | {"dense"}
    pinned = pinned or {}
    base = menu.total[by] if relative_to == "model" else menu.dense_cost(by)
    choices, fams, costs, losses = [], [], [], []
    for l, name in enumerate(menu.layers):
        cost, loss = menu.costs[by][l], menu.losses[l]
        if name in pinned:
            keep = [k for k, c in enumerate(menu.choices[l]) if c == pinned[name]]
            if not keep:
                raise WorkbenchError(f"pin {pinned[name]} of layer {name!r} is not in the menu; build the menu "
                                     "with extra={layer: [pin]}")
            keep = keep[:1]
        else:
            keep = [k for k, family in enumerate(menu.families[l])
                    if k == 0 or (family in allowed and cost[k] < cost[0] and np.isfinite(loss[k]))]
        choices.append([menu.choices[l][k] for k in keep])
        fams.append([menu.families[l][k] for k in keep])
        costs.append(cost[keep])
        losses.append(loss[keep] + TIE_BREAK * (cost[0] - cost[keep]) / max(base, 1.0))
    fixed = menu.fixed[by] if relative_to == "model" else 0.0
    return OptionTable(list(menu.layers), choices, costs, losses, fixed, float(base)), fams


def joint_allocate(task: Task, budget: float, by: str = "bytes", families: Sequence[str] | None = None, *,
                   pinned: Pins | None = None, loss: str = "proxy", relative_to: str = "model",
                   allocator: str = "convex", solver: str = "auto", layers: Sequence[str] | None = None,
                   engine: Engine | None = None, menu: JointMenu | None = None,
                   include_embeddings: bool = False) -> JointAllocation:
    """One option per layer across ``families`` so that the model keeps ``budget`` of its ``by``.

    Parameters
    ----------
    task : model, data and metric; ``task.model`` is never modified.
    budget : fraction in (0, 1] of the original's ``by`` (see ``relative_to``).
    by : "bytes" (state-dict payload), "params" or "flops" (one sample).
    families : from ``FAMILIES`` (None: ``DEFAULT_FAMILIES``, all but k-means; a comma-separated
        string is accepted).
    pinned : ``{layer: LayerPlan or "dense"}``: these layers get exactly that.
    loss : "proxy" (each layer's relative output error on calibration inputs), "sensitivity"
        (measured loss of quality with that layer alone compressed, validation split) or
        "weighted" (the proxy scaled by each layer's measured weight; see `build_menu`).
    relative_to : "model" (the budget counts the whole model) or "layers" (only the candidates).
    allocator : "convex" (multiple-choice knapsack, exact MILP with HiGHS) or "greedy".
    engine, menu : reuse an `Engine` on ``task`` and a menu built on it (a slider re-solves only).
    include_embeddings : also choose for the embedding tables (``quant_embedding`` codes); with
        ``relative_to="layers"`` the budget is then a fraction of their bytes as well.

    Raises
    ------
    WorkbenchError
        For a budget outside (0, 1] or below the smallest model the menu can reach (the message
        names that size), an unknown family, ``by``, ``allocator`` or pinned layer.
    """
    _check_budget(budget, by)
    families = check_families(families)
    if include_embeddings:
        families = tuple(dict.fromkeys([*families, "quant_embedding"]))
    if relative_to not in RELATIVE_TO:
        raise WorkbenchError(f"relative_to={relative_to!r} must be one of {', '.join(RELATIVE_TO)}")
    if allocator not in JOINT_ALLOCATORS:
        raise WorkbenchError(f"allocator={allocator!r} must be one of {', '.join(JOINT_ALLOCATORS)}")
    pins = _check_pins(pinned, menu.layers if menu is not None else None)
    if engine is None:
        engine = Engine(task, preview=False, freeze_gc=False)
    if menu is None:
        menu = build_menu(task, families, layers=layers, loss=loss, engine=engine,
                          extra={name: [c] for name, c in pins.items() if c is not None},
                          include_embeddings=include_embeddings)
        _check_pins(pins, menu.layers)
    table, fams = menu_table(menu, by, families, pins, relative_to)
    limit = budget * table.total  # the table's costs hold the bytes outside the candidates (fixed) already
    if table.smallest() > limit + 1e-9:
        raise _infeasible(budget, by, limit, table.smallest(), table.total,
                          f"families {','.join(families)}{' with the pins' if pins else ''}")
    start = time.perf_counter()
    if allocator == "greedy":
        picks, solver_used = greedy_picks(table, limit), "greedy"
    else:
        picks, solver_used = convex_picks(table, limit, solver)
    solve_ms = (time.perf_counter() - start) * 1e3
    plan = Plan({name: table.choices[l][k] for l, (name, k) in enumerate(zip(table.layers, picks))
                 if table.choices[l][k] is not None})
    evaluation = engine.evaluate(plan)
    # the same scope as ``limit``: the whole model, or the candidate layers alone
    used = int(evaluation[by]) if relative_to == "model" else int(evaluation[by] - menu.fixed[by])
    choices = {}
    for l, (name, k) in enumerate(zip(table.layers, picks)):
        choice = table.choices[l][k]
        choices[name] = {"family": fams[l][k], "method": choice.method if choice else "dense",
                         "params": dict(choice.params) if choice else {}, "cost": float(table.costs[l][k]),
                         "loss": float(table.losses[l][k])}
    return JointAllocation(
        by=by, budget=budget, relative_to=relative_to, limit=float(limit), used=used, total=int(table.total),
        fraction_used=used / table.total,
        metric=float(evaluation["metric"]), original_metric=float(engine.base["metric"]),
        params=int(evaluation["params"]), bytes=int(evaluation["bytes"]), flops=int(evaluation["flops"]),
        predicted_loss=float(table.loss_of(picks)), loss=menu.loss, solver=solver_used, solve_ms=solve_ms,
        families=list(families), choices=choices, plan=plan.to_dict())


def joint_fronts(task: Task, budgets: Sequence[float], by: str = "bytes", families: Sequence[str] | None = None,
                 *, loss: str = "proxy", relative_to: str = "model", layers: Sequence[str] | None = None,
                 engine: Engine | None = None, menu: JointMenu | None = None,
                 include_embeddings: bool = False) -> BudgetFronts:
    """Every single family and the joint allocator at each of ``budgets`` (one shared menu).

    A budget a family cannot reach gives a point with ``metric`` None and the ``reason``.
    ``winners[i]``: the single family with the best metric at ``budgets[i]``.
    """
    families = check_families(families)
    if include_embeddings:
        families = tuple(dict.fromkeys([*families, "quant_embedding"]))
    engine = engine or Engine(task, preview=False, freeze_gc=False)
    menu = menu or build_menu(task, families, layers=layers, loss=loss, engine=engine,
                              include_embeddings=include_embeddings)
    fronts: dict[str, list[dict]] = {}
    for label, offered in [*((f, [f]) for f in families), ("joint", families)]:
        fronts[label] = []
        for budget in budgets:
            try:
                result = joint_allocate(task, budget, by, offered, relative_to=relative_to, engine=engine, menu=menu)
            except WorkbenchError as exc:
                fronts[label].append({"budget": budget, "fraction_used": None, "metric": None, "bytes": None,
                                      "reason": str(exc)})
                continue
            fronts[label].append({"budget": budget, "fraction_used": result.fraction_used, "metric": result.metric,
                                  "bytes": result.bytes, "predicted_loss": result.predicted_loss})
    better = (lambda a, b: a > b) if task.higher_is_better else (lambda a, b: a < b)
    winners = []
    for i in range(len(budgets)):
        best = None
        for family in families:
            value = fronts[family][i]["metric"]
            if value is not None and (best is None or better(value, fronts[best][i]["metric"])):
                best = family
        winners.append(best)
    return BudgetFronts(by=by, relative_to=relative_to, metric_name=task.metric_name,
                        original_metric=float(engine.base["metric"]), budgets=list(budgets), fronts=fronts,
                        winners=winners)


__all__ = ["DEFAULT_FAMILIES", "FAMILIES", "BudgetFronts", "JointAllocation", "joint_allocate", "joint_fronts", "menu_table"]
