"""Registry of compression methods and of the recipes that turn user options into plans.

A *layer method* builds a replacement module from an original one and its settings:
``build(module, params, context) -> nn.Module``. A *model step* transforms a whole (already
copied) model: ``build(model, params, context) -> nn.Module``. A *recipe* turns options such as
``ratio=0.5`` into a `Plan` for a given model: ``recipe(model, **options) -> Plan``; it declares
the options it accepts and refuses any other (scikit-learn's rule for parameters).

This module never imports the method families: they register themselves when `workbench.methods`
is imported, which the package ``workbench/__init__`` does once.
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from workbench.errors import WorkbenchError
from workbench.plan import Plan

FactorSource = Callable[[int], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass
class LayerContext:
    """What a builder may need besides the module.

    ``name``: the layer's qualified name (for messages). ``inputs``: for data-aware methods, the
    layer's calibration inputs ``(tokens, in_features)`` (None otherwise). ``reference_inputs``:
    under sequential calibration (`workbench.sequential`), the same positions' inputs in the
    ORIGINAL model, when ``inputs`` come from the partly compressed one. ``factors``: where a
    caller already holds the weight's truncated SVD (the engine's factor cache), ``rank -> (a: (out,
    rank), b: (rank, in))`` split as `workbench.kernels.svd.SVD.factors` splits them.
    ``channels_last``: the caller runs convolutions on NHWC activations (views should match).
    """

    name: str
    inputs: torch.Tensor | None = None
    reference_inputs: torch.Tensor | None = None
    factors: FactorSource | None = None
    channels_last: bool = False


@dataclass(frozen=True)
class Method:
    """One compression method.

    ``build(module, params, context) -> replacement`` (``kind="layer"``) or ``build(model, params,
    context) -> model`` (``kind="step"``), for modules of ``layer_types``. Optional hooks:

    * ``check(module, params, name)``: raise `WorkbenchError` when the method cannot compress this
      particular module (beyond its type), before anything is built.
    * ``skeleton``: build the replacement's structure only (right shapes, arbitrary weights),
      computing nothing from the original's weights or data; used when weights come from a file.
    * ``rank_params``: integer settings (ranks) in which the replacement's params, bytes and FLOPs
      are affine and separable; the engine then sizes any rank exactly from builds at ranks 2 and 3.
    * ``view(module, params, context) -> module | None``: a cheap evaluation-only module computing
      exactly what ``build`` would, from ``context.factors`` (slices of cached factors, no copy);
      None when these settings have no such view. This is how a slider move costs a slice.
    * ``factorized``: the method's replacement is a function of the weight's truncated SVD, so the
      engine passes its cached factors in ``context.factors`` (and can preview errors from them).
    """

    name: str
    build: Callable[[nn.Module, Mapping[str, Any], LayerContext], nn.Module]
    layer_types: tuple[type, ...]
    kind: str = "layer"  # "layer" or "step"
    needs_inputs: bool = False
    description: str = ""
    skeleton: Callable[[nn.Module, Mapping[str, Any], LayerContext], nn.Module] | None = None
    rank_params: tuple[str, ...] = ()
    check: Callable[[nn.Module, Mapping[str, Any], str], None] | None = None
    view: Callable[[nn.Module, Mapping[str, Any], LayerContext], nn.Module | None] | None = None
    factorized: bool = False


def check_options(owner: str, given: Mapping[str, Any], accepted: tuple[str, ...]) -> None:
    """Refuse any option of ``given`` not in ``accepted``, naming the accepted ones (and a near miss)."""
    unknown = [name for name in given if name not in accepted]
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, accepted, n=1)
        hints.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    raise WorkbenchError(f"{owner} does not take option{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
                         f"it accepts: {', '.join(accepted) or '(none)'}")


@dataclass(frozen=True)
class Recipe:
    """Options -> `Plan` for a model, with its options declared.

    ``recipe(model, task=None, **options) -> Plan``. An option not in ``options`` is refused with
    the accepted list; ``task`` is handed to ``build`` only when ``needs_task`` (callers such as
    the CLI and the Pareto sweep pass it to every recipe). Built with `Recipe.from_function`, the
    options are ``build``'s keyword-only parameters.
    """

    name: str
    build: Callable[..., Plan]
    options: tuple[str, ...]
    needs_task: bool = False
    description: str = ""
    # Optional: ``report(original, compressed, task) -> dict`` of the family's extra figures and notes
    # (sparse latency, per-layer quantization errors), which `compress --json` adds to its output.
    report: Callable[..., dict] | None = None

    @classmethod
    def from_function(cls, name: str, build: Callable[..., Plan], description: str = "",
                      report: Callable[..., dict] | None = None) -> "Recipe":
        """A recipe whose options are the keyword-only parameters of ``build(model, *, ...)``."""
        parameters = inspect.signature(build).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            raise TypeError(f"recipe {name!r}: declare every option as a keyword-only parameter, not **kwargs")
        options = tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "task")
        needs_task = any(p.name == "task" for p in parameters)
        doc = description or (inspect.getdoc(build) or "").split("\n", 1)[0]
        return cls(name, build, options, needs_task, doc, report)

    def __call__(self, model: nn.Module, task: Any = None, **options: Any) -> Plan:
        check_options(f"recipe {self.name!r}", options, self.options)
        if self.needs_task:
            return self.build(model, task=task, **options)
        return self.build(model, **options)


_METHODS: dict[str, Method] = {}
_RECIPES: dict[str, Recipe] = {}


def register_method(method: Method) -> Method:
    _METHODS[method.name] = method
    return method


def register_recipe(name: str, recipe: Callable[..., Plan] | Recipe,
                    report: Callable[..., dict] | None = None) -> Recipe:
    """Register ``recipe`` (a `Recipe`, or a function ``f(model, *, option=...) -> Plan``) as ``name``."""
    entry = recipe if isinstance(recipe, Recipe) else Recipe.from_function(name, recipe, report=report)
    _RECIPES[name] = entry
    return entry


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise WorkbenchError(f"unknown method {name!r}; known methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def recipe(name: str) -> Recipe:
    """The recipe registered as ``name`` (``wb.recipe("svd")(model, ratio=0.5) -> Plan``)."""
    if name not in _RECIPES:
        raise WorkbenchError(f"unknown method {name!r}; available: {', '.join(sorted(_RECIPES))}")
    return _RECIPES[name]


get_recipe = recipe  # the name notebooks and saved scripts use


def methods() -> dict[str, Method]:
    return dict(_METHODS)


def recipes() -> list[str]:
    return sorted(_RECIPES)
