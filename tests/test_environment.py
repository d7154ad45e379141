"""environment.yml (conda) and pyproject.toml list the same dependencies."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"]}
    wanted |= {_name(r) for r in project["optional-dependencies"]["test"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    listed = set()
    for entry in env["dependencies"]:
        if isinstance(entry, dict):
            listed |= {_name(r) for r in entry.get("pip", [])}
        else:
            listed.add(_name(entry.split("=")[0]))
    listed -= {"python", "pip"}
    assert wanted == listed, f"only in pyproject: {wanted - listed}; only in environment.yml: {listed - wanted}"


def test_torch_is_pinned_everywhere():
    assert '"torch==2.13.0"' in (ROOT / "pyproject.toml").read_text()
    assert "torch==2.13.0" in (ROOT / "environment.yml").read_text()
    assert "torch==2.13.0\n" in (ROOT / "constraints.txt").read_text()
