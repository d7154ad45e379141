"""Errors the workbench raises for bad input. Messages state the value and the rule."""


class WorkbenchError(ValueError):
    """Bad input from the user: the message says what was wrong and what is allowed."""


class UnsupportedLayerError(WorkbenchError):
    """A compression method was asked of a layer type it cannot handle."""
