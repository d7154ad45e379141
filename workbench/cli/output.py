"""Printing results: JSON for scripts, a short table for people."""
from __future__ import annotations

import json
import sys
from typing import Any


def emit(result: Any, as_json: bool, text: str | None = None) -> None:
    """Print ``result`` as JSON (``as_json``) or ``text`` (default: indented JSON)."""
    if as_json or text is None:
        json.dump(result, sys.stdout, indent=None if as_json else 2)
        sys.stdout.write("\n")
    else:
        print(text)
