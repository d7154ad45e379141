"""Compression Workbench: interactive compression of PyTorch networks.

Public API (no side effects on import: no matplotlib backend or style is set here).
"""
from workbench.plan import LayerPlan, Plan
from workbench.zoo import Task, available_models, load
from workbench.compress import apply
from workbench.measure import measure
from workbench.export import load_compressed, save_compressed

__all__ = ["LayerPlan", "Plan", "Task", "apply", "available_models", "load", "load_compressed", "measure",
           "save_compressed"]
__version__ = "0.1.0"
