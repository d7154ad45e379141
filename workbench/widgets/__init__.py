"""Live explorers (ipywidgets ``VBox`` subclasses), all on one contract (`workbench.widgets.explorer`):
compute through a `Plan` and the `Engine` off the UI thread, render from the result, testable headless.

Names are imported lazily so that ``import workbench.widgets.pruning`` does not pull in the others
(and ``import workbench.widgets`` pulls in none: ipywidgets is an optional extra).
"""
from __future__ import annotations

import importlib

_HOMES = {
    "Coalescer": "workbench.widgets.throttle",
    "Dashboard": "workbench.widgets.dashboard",
    "BudgetExplorer": "workbench.widgets.budget",
    "ExportView": "workbench.widgets.techniques",
    "Explorer": "workbench.widgets.explorer",
    "FigureImage": "workbench.widgets.figure_view",
    "FoldView": "workbench.widgets.techniques",
    "GateRankExplorer": "workbench.widgets.conv_rnn",
    "HeadKnob": "workbench.widgets.structured_heads",
    "L1View": "workbench.widgets.techniques",
    "LiveFigure": "workbench.widgets.techniques",
    "PruningExplorer": "workbench.widgets.pruning",
    "QuantizationExplorer": "workbench.widgets.quantization",
    "RealModelExplorer": "workbench.widgets.real_model",
    "RecoveryExplorer": "workbench.widgets.recovery",
    "SaveLoadBar": "workbench.widgets.persistence",
    "StructuredExplorer": "workbench.widgets.structured",
    "SweepView": "workbench.widgets.techniques",
    "TuckerExplorer": "workbench.widgets.conv_rnn",
    "head_knobs": "workbench.widgets.structured_heads",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'workbench.widgets' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
