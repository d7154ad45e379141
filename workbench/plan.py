"""Plans: data that says what to do to which layer. Applying a plan returns a new model.

A plan is immutable and JSON-serialisable, so "undo" is applying the previous plan, and a saved
plan restores a session. ``LayerPlan(method, params)`` names a registered method
(`workbench.registry`) and its settings for one layer; ``Plan.steps`` are whole-model
transforms (structured pruning, folding) applied, in order, before the per-layer swaps.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from workbench.errors import WorkbenchError

PLAN_FORMAT_VERSION = 1


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(sorted((mapping or {}).items())))


def _tuples(value: Any) -> Any:
    """JSON lists (nested too) as tuples, so a plan read back is hashable and equal to the one written."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class LayerPlan:
    """One method with its settings, e.g. ``LayerPlan("svd", {"rank": 32})``."""

    method: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "params", _frozen(self.params))

    def __getitem__(self, key: str) -> Any:
        return self.params[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.params.get(key, default)

    def with_params(self, **changes: Any) -> "LayerPlan":
        """A copy with some settings changed (the plan itself stays as it was)."""
        return LayerPlan(self.method, {**self.params, **changes})

    def to_dict(self) -> dict:
        return {"method": self.method, **dict(self.params)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerPlan":
        if "method" not in data:
            raise WorkbenchError(f"a layer entry needs a 'method'; got keys {sorted(data)}")
        params = {k: _tuples(v) for k, v in data.items() if k != "method"}
        return cls(str(data["method"]), params)

    def __hash__(self) -> int:
        return hash((self.method, tuple(self.params.items())))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, LayerPlan) and self.method == other.method
                and dict(self.params) == dict(other.params))


@dataclass(frozen=True)
class Plan:
    """Per-layer choices ``{qualified module name: LayerPlan}`` plus whole-model ``steps``.

    ``left_dense``: ``{tied group (layer names): reason}``, the tied groups the recipe that made
    this plan could not compress (`workbench.inventory.tied_groups`), each with why. A note
    for the reader, not an instruction: it is not part of the plan's equality, hash or JSON.
    """

    layers: Mapping[str, LayerPlan] = field(default_factory=dict)
    steps: tuple[LayerPlan, ...] = ()
    left_dense: Mapping[tuple[str, ...], str] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "layers", _frozen(self.layers))
        object.__setattr__(self, "steps", tuple(self.steps))
        object.__setattr__(self, "left_dense", MappingProxyType({tuple(k): str(v) for k, v in
                                                                  (self.left_dense or {}).items()}))

    def with_layer(self, name: str, choice: LayerPlan | None) -> "Plan":
        """A new plan where ``name`` gets ``choice`` (``None`` removes it: the layer stays original).
        Notes of ``left_dense`` about a group holding ``name`` are dropped (no longer the recipe's)."""
        layers = dict(self.layers)
        if choice is None:
            layers.pop(name, None)
        else:
            layers[name] = choice
        return Plan(layers, self.steps, {k: v for k, v in self.left_dense.items() if name not in k})

    def to_dict(self) -> dict:
        return {"format_version": PLAN_FORMAT_VERSION,
                "layers": {name: choice.to_dict() for name, choice in self.layers.items()},
                "steps": [step.to_dict() for step in self.steps]}

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        version = data.get("format_version", PLAN_FORMAT_VERSION)
        if not isinstance(version, int) or version > PLAN_FORMAT_VERSION:
            raise WorkbenchError(
                f"plan format_version={version!r} is newer than this workbench reads "
                f"(up to {PLAN_FORMAT_VERSION}); upgrade compression-workbench")
        layers = {name: LayerPlan.from_dict(entry) for name, entry in data.get("layers", {}).items()}
        steps = tuple(LayerPlan.from_dict(entry) for entry in data.get("steps", []))
        return cls(layers, steps)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WorkbenchError(f"plan is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise WorkbenchError(f"a plan is a JSON object; got {type(data).__name__}")
        return cls.from_dict(data)

    def __hash__(self) -> int:
        return hash((tuple(self.layers.items()), self.steps))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Plan) and dict(self.layers) == dict(other.layers)
                and self.steps == other.steps)
