"""Stages: the top-level pieces of a model's forward pass, run one after another.

The engine caches the input of each stage, so a change inside stage k re-runs stages k, k+1, ...
only; sequential calibration and block-wise reconstruction walk the same stages. A model's stages
come from (first match wins) its own ``compression_stages()`` method, a provider registered with
`register_stages` for its type, the children of an ``nn.Sequential``, or else one stage: the whole
model. `workbench.auto_stages.find_stages` adds stages found automatically (a forward pass cut at
its list of blocks, else in its `torch.fx` graph) for the other models, checked on an example input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from workbench.errors import WorkbenchError


@dataclass(frozen=True)
class Stage:
    """One top-level piece of a model's forward pass.

    ``name``: qualified name of the submodule it runs ("" for the whole model); the layers it owns
    are that module and everything below it. ``call(module, x) -> y`` runs it (default
    ``module(x)``). ``then``: names of parameter-free modules (activations, pooling, reshapes) run
    on the result inside the same stage, so their outputs need no cache entry of their own. The
    forward pass of the model must equal running its stages in order.

    ``owned``: when given, the names of the modules whose layers the stage owns, instead of
    ``name`` and ``then`` (a stage that runs the whole model's forward, ``name=""``, but computes
    only part of it: the layers before or after a list of blocks). ``title``: its label when given.
    """

    name: str
    call: Callable[[nn.Module, Any], Any] | None = None
    then: tuple[str, ...] = ()
    owned: tuple[str, ...] | None = None
    title: str | None = None

    @property
    def label(self) -> str:
        """``title``, or ``name`` joined with ``then`` by ``+`` (``"fc1+act1"``)."""
        return self.title if self.title is not None else "+".join((self.name, *self.then))

    def run(self, model: nn.Module, x: Any) -> Any:
        module = model.get_submodule(self.name) if self.name else model
        x = module(x) if self.call is None else self.call(module, x)
        for name in self.then:
            x = model.get_submodule(name)(x)
        return x

    def owns(self, layer: str) -> bool:
        if self.owned is not None:
            return any(layer == n or layer.startswith(n + ".") for n in self.owned)
        return self.name == "" or any(layer == n or layer.startswith(n + ".") for n in (self.name, *self.then))


_STAGE_PROVIDERS: dict[type, Callable[[nn.Module], list]] = {}


def register_stages(model_type: type, provider: Callable[[nn.Module], list]) -> None:
    """Declare how models of ``model_type`` split into stages.

    ``provider(model)`` returns an ordered list of `Stage` or ``(name, module)`` pairs (the module
    must be ``model.get_submodule(name)``, called as ``module(x)``). A model may instead define a
    ``compression_stages(self)`` method returning the same list.
    """
    _STAGE_PROVIDERS[model_type] = provider


def _as_stage(model: nn.Module, entry: Stage | tuple[str, nn.Module]) -> Stage:
    if isinstance(entry, Stage):
        return entry
    name, module = entry
    if model.get_submodule(name) is not module:
        raise WorkbenchError(f"stage {name!r} does not name its module inside the model")
    return Stage(name)


def model_stages(model: nn.Module) -> list[Stage]:
    """Ordered stages of ``model``; ``[Stage("")]`` (the whole model) when it declares none."""
    declared = getattr(model, "compression_stages", None)
    if callable(declared):
        entries = declared()
    elif type(model) in _STAGE_PROVIDERS:
        entries = _STAGE_PROVIDERS[type(model)](model)
    elif isinstance(model, nn.Sequential):
        entries = _sequential_stages(model)
    else:
        return [Stage("")]
    return [_as_stage(model, entry) for entry in entries]


def _sequential_stages(model: nn.Sequential) -> list[Stage]:
    """One stage per child that holds parameters, each with the parameter-free children after it."""
    stages: list[Stage] = []
    for name, child in model.named_children():
        if stages and next(child.parameters(), None) is None and next(child.buffers(), None) is None:
            stages[-1] = Stage(stages[-1].name, stages[-1].call, (*stages[-1].then, name))
        else:
            stages.append(Stage(name))
    return stages
