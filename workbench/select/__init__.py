"""Choosing: per-layer sensitivity, budgeted allocation, constrained refits, search, Pareto, advice.

The verbs are functions of this package (TensorLy's layout: private modules, public names here)::

    from workbench.select import sensitivity, allocate, search, collect_points, pareto_front, advise

``sensitivity(task, method, grid)``: each layer alone along a grid of settings. ``allocate(task,
budget, by, allocator)``: per-layer settings under a budget (the kept fraction of the model's
``params``/``bytes``/``flops``), measured. ``search``: small architectures trained from scratch.
``collect_points`` / ``pareto_front`` / ``advise``: every family on one size-vs-metric chart.
``joint_allocate(task, budget, by, families)``: one option per layer across every family (b-bit codes,
ranks, quantized factors, sparsity) by multiple-choice knapsack; ``joint_fronts``: each family and
the joint allocator over budgets. ``map_items``: sweeps on local processes or a Dask cluster.
"""
from workbench.select._allocate import (ALLOCATION_GRID, ALLOCATORS, Allocation, OptionTable, allocate,
                                        compare_allocators, convex_picks, greedy_picks, option_table)
from workbench.select._joint import BudgetFronts, JointAllocation, joint_allocate, joint_fronts, menu_table
from workbench.select._menu import DEFAULT_FAMILIES, FAMILIES, JointMenu, build_menu, check_families
from workbench.select._search import Candidate, search
from workbench.select._sensitivity import (COSTS, SensitivityResult, model_costs, selection_task, sensitivity,
                                           single_layer_plan)
from workbench.select.aware_budget import allocate_ranks, allocated_plan
from workbench.select.constrained import compare_on_layer
from workbench.select.pareto import Advice, Point, advise, collect_points, family_summary, pareto_front
from workbench.select.sweeps import map_items

__all__ = ["ALLOCATION_GRID", "ALLOCATORS", "Advice", "Allocation", "BudgetFronts", "COSTS", "Candidate",
           "DEFAULT_FAMILIES", "FAMILIES", "JointAllocation", "JointMenu", "OptionTable", "Point",
           "SensitivityResult", "advise", "allocate", "allocate_ranks", "allocated_plan", "build_menu", "check_families",
           "collect_points", "compare_allocators", "compare_on_layer", "convex_picks", "family_summary", "greedy_picks",
           "joint_allocate", "joint_fronts", "map_items", "menu_table", "model_costs", "option_table", "pareto_front",
           "search", "selection_task", "sensitivity", "single_layer_plan"]
