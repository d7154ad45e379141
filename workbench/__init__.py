"""Compression Workbench: interactive compression of PyTorch networks.

The front door: ``import workbench as wb`` reaches every verb the README uses. No side effects on
import (no matplotlib backend or style is set). The explorers need the ``ui`` extra (ipywidgets)
and are imported on first use; everything else needs only the core dependencies.
"""
from workbench import methods as _methods  # noqa: F401  (registers the built-in method families once)
from workbench.compress import apply
from workbench.engine import Engine
from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.export import export_onnx, load_compressed, save_compressed
from workbench.measure import measure
from workbench.plan import LayerPlan, Plan
from workbench.recovery import distill_finetune, finetune, qat, reconstruct_blocks, train_student
from workbench.registry import Recipe, get_recipe, methods, recipe, recipes
from workbench.report import write_report
from workbench.select import (advise, allocate, collect_points, joint_allocate, joint_fronts, pareto_front, search,
                              sensitivity)
from workbench.spectra import model_spectra
from workbench.stages import Stage, register_stages
from workbench.version import __version__
from workbench.zoo import Task, available_models, load

_EXPLORERS = ("BudgetExplorer", "Dashboard", "GateRankExplorer", "PruningExplorer", "QuantizationExplorer", "RealModelExplorer",
              "RecoveryExplorer", "StructuredExplorer", "TuckerExplorer")

__all__ = ["Engine", "LayerPlan", "Plan", "Recipe", "Stage", "Task", "UnsupportedLayerError", "WorkbenchError",
           "advise", "allocate", "apply", "available_models", "collect_points", "distill_finetune", "export_onnx",
           "finetune", "get_recipe", "joint_allocate", "joint_fronts", "load", "load_compressed", "measure", "methods",
           "model_spectra", "pareto_front", "qat", "recipe", "recipes", "reconstruct_blocks", "register_stages",
           "save_compressed", "search", "sensitivity", "train_student", "write_report", "__version__", *_EXPLORERS]


def __getattr__(name: str):
    """The explorers, imported on first use (they need ipywidgets, from the ``ui`` extra)."""
    if name in _EXPLORERS:
        from workbench import widgets  # noqa: PLC0415 (explorers need the ui extra)

        return getattr(widgets, name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
