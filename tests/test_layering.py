"""The shape of the house: small modules, one front door."""
import pathlib

import workbench as wb

ROOT = pathlib.Path(wb.__file__).parent
MAX_LINES = 450


def test_no_module_is_over_the_size_limit():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in ROOT.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_the_front_door_reaches_every_public_name():
    missing = [name for name in wb.__all__ if not hasattr(wb, name)]
    assert missing == []


def test_the_registry_lists_the_built_in_families_without_importing_them():
    source = (ROOT / "registry.py").read_text()
    assert "workbench.methods" not in source.split('"""', 2)[2]  # only its docstring names the package
    assert {"svd", "svd_aware", "prune", "quant", "int8", "tucker", "cp", "svd_rnn"} <= set(wb.methods())
