"""Printing results: JSON for scripts, a short table for people.

Every JSON the command line writes (stdout with ``--json``, files such as ``pareto.json``) goes
through `dumps`: strict JSON (RFC 8259), never a bare ``NaN`` or ``Infinity``. A non-finite
number becomes ``null``; in a dict, a key ``k`` whose value became ``null`` gets a sibling
``k_error`` saying why, unless the producer already put one there (its reason is kept).
"""
from __future__ import annotations

import sys
from typing import Any

from workbench.results import ERROR_SUFFIX, dumps, finite  # noqa: F401  (the CLI's JSON goes through them)


def emit(result: Any, as_json: bool, text: str | None = None) -> None:
    """Print ``result`` as strict JSON (``as_json``; also when there is no ``text``) or ``text``."""
    if as_json or text is None:
        sys.stdout.write(dumps(result, indent=None if as_json else 2) + "\n")
    else:
        print(text)
