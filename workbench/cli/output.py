"""Printing results: JSON for scripts, a short table for people.

Every JSON the command line writes (stdout with ``--json``, files such as ``pareto.json``) goes
through `dumps`: strict JSON (RFC 8259), never a bare ``NaN`` or ``Infinity``. A non-finite
number becomes ``null``; in a dict, a key ``k`` whose value became ``null`` gets a sibling
``k_error`` saying why, unless the producer already put one there (its reason is kept).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

ERROR_SUFFIX = "_error"


def _reason(value: float) -> str:
    return f"not a finite number ({value!r}): no value could be computed"


def finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (dicts, lists, tuples walked), and a
    ``KEY_error`` reason added beside each dict key whose value was replaced (an existing one kept).
    numpy / torch scalars become Python numbers; a `Path` becomes its string."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        out: dict = {}
        for key, item in value.items():
            clean = finite(item)
            if clean is None and key in out:
                continue  # a ``KEY_error`` of None after a reason was put there for KEY
            out[key] = clean
            if clean is None and isinstance(item, float) and isinstance(key, str):
                error_key = f"{key}{ERROR_SUFFIX}"
                if value.get(error_key) is None:  # the producer's own reason wins
                    out[error_key] = _reason(item)
        return out
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item) and getattr(value, "ndim", 0) == 0:
        return finite(item())
    return value


def dumps(result: Any, indent: int | None = None, default: Callable[[Any], Any] | None = None) -> str:
    """Strict JSON text of ``result`` (see `finite`); raises ValueError if a NaN slipped through
    (e.g. from ``default``), so a non-standard file is never written."""
    return json.dumps(finite(result), indent=indent, allow_nan=False, default=default)


def emit(result: Any, as_json: bool, text: str | None = None) -> None:
    """Print ``result`` as strict JSON (``as_json``; also when there is no ``text``) or ``text``."""
    if as_json or text is None:
        sys.stdout.write(dumps(result, indent=None if as_json else 2) + "\n")
    else:
        print(text)
