"""Registry of compression methods and of recipes that turn user options into plans.

A *layer method* builds a replacement module from an original one and its settings:
``build(module, params, context) -> nn.Module``. A *model step* transforms a whole (already
copied) model: ``build(model, params, context) -> nn.Module``. A *recipe* turns options such as
``ratio=0.5`` into a `Plan` for a given model: ``recipe(model, **options) -> Plan``.
Method families register themselves in `workbench.methods`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from workbench.errors import WorkbenchError


@dataclass
class LayerContext:
    """What a builder may need besides the module: its name and, for data-aware methods,
    ``inputs``: the layer's calibration inputs ``(tokens, in_features)`` (None otherwise).
    ``reference_inputs``: under sequential calibration (`workbench.sequential`), the same
    positions' inputs in the ORIGINAL model, when ``inputs`` come from the partly compressed one."""

    name: str
    inputs: torch.Tensor | None = None
    reference_inputs: torch.Tensor | None = None


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable[[nn.Module, Mapping[str, Any], LayerContext], nn.Module]
    layer_types: tuple[type, ...]
    kind: str = "layer"  # "layer" or "step"
    needs_inputs: bool = False
    description: str = ""
    # Optional: build the replacement's structure only (right shapes, arbitrary weights), computing
    # nothing from the original's weights or data. Used when the weights come from a saved file.
    skeleton: Callable[[nn.Module, Mapping[str, Any], LayerContext], nn.Module] | None = None
    # Optional: integer settings (ranks) in which the replacement's params, bytes and FLOPs are
    # affine and separable (each adds its own factor rows and columns; ``None`` keeps that part
    # dense). The engine then sizes any ranks exactly from builds at ranks 1 and 2.
    rank_params: tuple[str, ...] = ()


_METHODS: dict[str, Method] = {}
_RECIPES: dict[str, Callable[..., Any]] = {}


def register_method(method: Method) -> Method:
    _METHODS[method.name] = method
    return method


def register_recipe(name: str, recipe: Callable[..., Any]) -> None:
    _RECIPES[name] = recipe


def _ensure_loaded() -> None:
    import workbench.methods  # noqa: F401  (registers the built-in families)


def get_method(name: str) -> Method:
    _ensure_loaded()
    if name not in _METHODS:
        raise WorkbenchError(f"unknown method {name!r}; known methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def get_recipe(name: str) -> Callable[..., Any]:
    _ensure_loaded()
    if name not in _RECIPES:
        raise WorkbenchError(f"unknown method {name!r}; available: {', '.join(sorted(_RECIPES))}")
    return _RECIPES[name]


def methods() -> dict[str, Method]:
    _ensure_loaded()
    return dict(_METHODS)


def recipes() -> list[str]:
    _ensure_loaded()
    return sorted(_RECIPES)
