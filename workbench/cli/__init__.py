"""``python -m workbench COMMAND``: the notebooks' headless twin. JSON on stdout with ``--json``.

Each module in this package that defines ``register(subparsers)`` adds one command; it sets
``func(args) -> int`` as the parser default. Bad input exits with status 2 and one line on stderr.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from workbench.errors import WorkbenchError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workbench",
                                     description="Compression Workbench command line")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except WorkbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
