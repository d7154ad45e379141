"""Live explorers (ipywidgets ``VBox`` subclasses): compute and render kept apart, testable headless.

Names are imported lazily so that ``import workbench.widgets.pruning`` does not pull in the others.
"""
from __future__ import annotations

__all__ = ["Coalescer", "Dashboard"]


def __getattr__(name: str):
    if name == "Dashboard":
        from workbench.widgets.dashboard import Dashboard
        return Dashboard
    if name == "Coalescer":
        from workbench.widgets.throttle import Coalescer
        return Coalescer
    raise AttributeError(f"module 'workbench.widgets' has no attribute {name!r}")
