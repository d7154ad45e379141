"""nbval runs every notebook cell as a pytest item; this makes a cell that writes to stderr fail.

A lesson's page must show no stderr: no warning (``warnings.warn`` prints to stderr in a kernel),
no stray traceback, no progress bar printed as text. After nbval has run a cell (and found no
error), its outputs are in ``item.test_outputs``; any ``stream`` output named ``stderr`` fails
the item with the text written. Output that a background thread writes after the cell went idle
is attributed to no cell by nbval and is not seen here.
"""
from __future__ import annotations

import pytest


def stderr_text(outputs) -> str:
    """The text of every stderr stream in a cell's ``outputs`` (nbformat output nodes), joined."""
    return "".join(out.get("text", "") for out in outputs or ()
                   if out.get("output_type") == "stream" and out.get("name") == "stderr")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    result = yield  # nbval's IPyNbCell.runtest: executes the cell, keeps its outputs
    written = stderr_text(getattr(item, "test_outputs", None))
    if written and hasattr(item, "raise_cell_error"):  # nbval's report: cell number, message, source
        item.raise_cell_error(f"the cell wrote to stderr (a lesson must not):\n{written}")
    elif written:
        pytest.fail(f"{item.name} wrote to stderr:\n{written}", pytrace=False)
    return result
