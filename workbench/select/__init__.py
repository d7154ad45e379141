"""Choosing: per-layer sensitivity, budgeted allocation, constrained refits, search, Pareto, advisor.

Submodules (their main functions share the module's name, so import them from the module)::

    from workbench.select.sensitivity import sensitivity   # each layer alone along a grid
    from workbench.select.allocate import allocate         # per-layer settings under a budget, measured
    from workbench.select.search import search             # small architectures trained from scratch
    from workbench.select.pareto import collect_points, pareto_front, advise
    from workbench.select.sweeps import map_items          # local processes or a Dask cluster
"""
from workbench.select.allocate import ALLOCATORS, Allocation, compare_allocators
from workbench.select.pareto import Advice, Point, advise, collect_points, pareto_front
from workbench.select.search import Candidate
from workbench.select.sensitivity import SensitivityResult, selection_task
from workbench.select.sweeps import map_items

__all__ = ["ALLOCATORS", "Advice", "Allocation", "Candidate", "Point", "SensitivityResult", "advise",
           "collect_points", "compare_allocators", "map_items", "pareto_front", "selection_task"]
