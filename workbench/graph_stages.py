"""Stages found in a `torch.fx` graph: a model's forward cut where one tensor carries all the state.

For a model that declares no stages and runs no list of blocks (`workbench.auto_stages` tries
those first), the forward is traced with `torch.fx.symbolic_trace`'s tracer (the layers that the
matrix methods take, `workbench.adapters.adapter_for`, and workbench's own layers are leaves
besides ``torch.nn``'s, so the engine's swapped-in layers are called exactly where the originals
were). A *cut point* is a position in the node order where exactly one value computed before it
is used at or after it (parameters and constants, ``get_attr``, are fetched again where used):
inside a residual block the skip and the branch are both live, so the cuts fall at the block
boundaries. The segments between cut points are merged so that each stage runs at least one layer
that a method compresses (a matrix layer, a GRU / LSTM; what runs before the first one joins it,
what follows one joins its stage), at most `MAX_STAGES` stages (neighbours merged evenly).

A stage runs its nodes on the model it is given, fetching each submodule and attribute by name
at run time (``model.get_submodule(target)``): a layer the engine swapped in is the one called.
It owns the modules it calls that no other stage calls and whose parameters and buffers no other
stage touches; any other module belongs to no stage (the engine then re-runs the whole model for
it: slower, never wrong). The model is left as it was: the attributes the tracer adds for tensor
constants are taken off again and kept by the stages. `workbench.auto_stages.find_stages` checks
the staged run against the forward on an example input.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_arg

from workbench.adapters import adapter_for
from workbench.errors import WorkbenchError
from workbench.stages import Stage

MAX_STAGES = 16


class _Tracer(fx.Tracer):
    """``torch.nn``'s modules, the layers a matrix method takes and `workbench.layers`' are leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (super().is_leaf_module(m, module_qualified_name) or adapter_for(m) is not None
                or type(m).__module__.startswith("workbench.layers"))


def trace(model: nn.Module) -> tuple[fx.Graph, dict[str, Any]]:
    """``(graph, constants)``: the traced forward (arguments after the first fixed to their
    defaults) and the tensor constants the tracer stored on the model, taken off it again (any
    attribute the traced forward set is put back as it was)."""
    saved = [(name, module, _attributes(module)) for name, module in model.named_modules()]
    try:
        params = list(inspect.signature(model.forward).parameters.values())
        concrete = {p.name: p.default for p in params[1:]
                    if p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD}
        graph = _Tracer().trace(model, concrete_args=concrete or None)
    except Exception as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise WorkbenchError(f"cannot trace the forward ({type(error).__name__}: {message})") from None
    finally:
        constants = {}
        for name, module, attributes in saved:
            constants.update(_restore(module, name, attributes))
    return graph, constants


def _attributes(module: nn.Module) -> dict[str, dict[str, Any]]:
    """The module and its attribute tables: ``{"": vars, "_parameters": ..., "_buffers": ..., "_modules": ...}``."""
    return {"": dict(vars(module)), **{key: dict(getattr(module, key)) for key in ("_parameters", "_buffers", "_modules")}}


def _restore(module: nn.Module, name: str, saved: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Puts ``module``'s ``saved`` attributes back; returns the ones added since, taken off it."""
    for key in ("_parameters", "_buffers", "_modules"):
        if getattr(module, key) != saved[key]:
            getattr(module, key).clear()
            getattr(module, key).update(saved[key])
    added = {}
    for key in list(vars(module)):
        if key not in saved[""]:
            added[f"{name}.{key}" if name else key] = module.__dict__.pop(key)
        elif module.__dict__[key] is not saved[""][key]:
            module.__dict__[key] = saved[""][key]
    return added


def _fetch(model: nn.Module, target: str, constants: dict[str, Any]) -> Any:
    if target in constants:
        return constants[target]
    value = model
    for part in target.split("."):
        value = getattr(value, part)
    return value


class _Segment:
    """``call(model, x)``: runs ``nodes`` on the live ``model``, ``x`` being the value of
    ``carried_in`` (the model's input for the first segment); returns ``carried_out``'s value."""

    def __init__(self, nodes: list[fx.Node], carried_in: fx.Node, carried_out: fx.Node, constants: dict[str, Any]):
        self.nodes, self.carried_in, self.carried_out, self.constants = nodes, carried_in, carried_out, constants
        last_use = {}
        for node in nodes:
            for used in node.all_input_nodes:
                last_use[used] = node
        self.free = {node: [n for n, last in last_use.items() if last is node and n is not carried_out] for node in nodes}

    def __call__(self, model: nn.Module, x: Any, tensors: set[fx.Node] | None = None) -> Any:
        """``tensors``, when given, receives the nodes whose value is a tensor."""
        env = {self.carried_in: x}

        def load(node: fx.Node) -> Any:
            if node in env:
                return env[node]
            if node.op == "get_attr":
                return _fetch(model, node.target, self.constants)
            if node.op == "placeholder" and node.args:  # an argument after the first, fixed to its default
                return node.args[0]
            raise WorkbenchError(f"graph node {node.name} is used outside the stage computing it")

        for node in self.nodes:
            if node.op in ("placeholder", "get_attr"):
                continue
            args, kwargs = map_arg(node.args, load), map_arg(node.kwargs, load)
            if node.op == "output":
                return args[0]
            if node.op == "call_module":
                env[node] = model.get_submodule(node.target)(*args, **kwargs)
            elif node.op == "call_function":
                env[node] = node.target(*args, **kwargs)
            else:  # call_method
                env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            if tensors is not None and isinstance(env[node], torch.Tensor):
                tensors.add(node)
            for done in self.free[node]:
                env.pop(done, None)
        return env[self.carried_out]


def cut_points(nodes: list[fx.Node]) -> dict[int, fx.Node]:
    """``{k: value}``: the positions ``k`` in ``nodes`` where ``value``, computed before ``k``, is
    the one value used at or after ``k`` (``get_attr`` and fixed arguments not counted), the
    model's input (``nodes[0]``) no longer used."""
    index = {node: i for i, node in enumerate(nodes)}
    last = {n: max(index[u] for u in n.users) for n in nodes
            if n.users and n.op != "get_attr" and (n.op != "placeholder" or n is nodes[0])}
    live: set[fx.Node] = set()
    cuts = {}
    for k in range(1, len(nodes)):
        node = nodes[k - 1]
        if node in last:
            live.add(node)
        live = {n for n in live if last[n] >= k}
        if len(live) == 1 and nodes[0] not in live:
            cuts[k] = next(iter(live))
    return cuts


def _is_layer(model: nn.Module, node: fx.Node) -> bool:
    """A call of a layer that a method compresses: a matrix layer or a GRU / LSTM."""
    if node.op != "call_module":
        return False
    module = model.get_submodule(node.target)
    return adapter_for(module) is not None or isinstance(module, nn.RNNBase)


def _groups(model: nn.Module, nodes: list[fx.Node], cuts: dict[int, fx.Node]) -> list[tuple[int, int]]:
    """``[(start, end)]``: the node ranges of the stages, each calling at least one `_is_layer`."""
    bounds = [0, *sorted(cuts), len(nodes)]
    groups: list[tuple[int, int]] = []
    layered: list[bool] = []  # whether each group runs a matrix layer
    for start, end in zip(bounds, bounds[1:]):
        has_layer = any(_is_layer(model, node) for node in nodes[start:end])
        if groups and not (has_layer and layered[-1]):
            groups[-1], layered[-1] = (groups[-1][0], end), layered[-1] or has_layer
        else:
            groups.append((start, end))
            layered.append(has_layer)
    if len(groups) > MAX_STAGES:  # evenly merged
        n = len(groups)
        groups = [(groups[j * n // MAX_STAGES][0], groups[(j + 1) * n // MAX_STAGES - 1][1]) for j in range(MAX_STAGES)]
    return groups


def _touched(model: nn.Module, nodes: list[fx.Node], constants: dict[str, Any]) -> set[int]:
    """ids of the parameters and buffers that ``nodes`` read (called modules' and fetched ones)."""
    ids = set()
    for node in nodes:
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            ids |= {id(t) for t in (*module.parameters(), *module.buffers())}
        elif node.op == "get_attr":
            value = _fetch(model, node.target, constants)
            ids |= {id(t) for t in (*value.parameters(), *value.buffers())} if isinstance(value, nn.Module) else {id(value)}
    return ids


def _owned(model: nn.Module, segments: list[list[fx.Node]], constants: dict[str, Any]) -> list[tuple[str, ...]]:
    """Per segment: the modules it calls that no other segment calls or touches the tensors of."""
    called = [list(dict.fromkeys(n.target for n in nodes if n.op == "call_module")) for nodes in segments]
    touched = [_touched(model, nodes, constants) for nodes in segments]
    owned = []
    for i, names in enumerate(called):
        others = set().union(*(t for j, t in enumerate(touched) if j != i))
        owned.append(tuple(name for name in names
                           if not any(name in c for j, c in enumerate(called) if j != i)
                           and not others & {id(t) for t in (*model.get_submodule(name).parameters(),
                                                               *model.get_submodule(name).buffers())}))
    return owned


@torch.no_grad()
def graph_stages(model: nn.Module, example: Any) -> list[Stage]:
    """Stages of ``model`` cut in its `torch.fx` graph (see the module docstring), two or more,
    each handing a tensor to the next on ``example`` (``model(example)``); `WorkbenchError` saying
    why when it cannot be traced or has no such cut between two layers a method compresses. Not
    compared with the forward here: `workbench.auto_stages.find_stages` does that."""
    graph, constants = trace(model)
    nodes = list(graph.nodes)
    if not nodes or nodes[0].op != "placeholder":
        raise WorkbenchError("the traced forward takes no input")
    extra = [n.name for n in nodes[1:] if n.op == "placeholder" and not n.args]
    if extra:
        raise WorkbenchError(f"the traced forward takes {1 + len(extra)} inputs without defaults, not 1")
    tensors: set[fx.Node] = set()
    _Segment(nodes, nodes[0], nodes[-1], constants)(model, example, tensors)
    cuts = {k: value for k, value in cut_points(nodes).items() if value in tensors}
    groups = _groups(model, nodes, cuts)
    if len(groups) < 2:
        layers = sum(_is_layer(model, node) for node in nodes)
        raise WorkbenchError(f"none of the {len(cuts)} points of its graph ({len(nodes)} nodes) where one tensor carries "
                             f"the state lies between two of the {layers} layer calls a method compresses")
    segments = [nodes[start:end] for start, end in groups]
    owned = _owned(model, segments, constants)
    stages = []
    for i, ((start, end), names) in enumerate(zip(groups, owned)):
        carried_in = nodes[0] if start == 0 else cuts[start]
        carried_out = nodes[-1] if end == len(nodes) else cuts[end]
        called = [n.target for n in segments[i] if n.op == "call_module"] or [n.name for n in segments[i]]
        span = called[0] if len(called) == 1 else f"{called[0]}..{called[-1]}"
        stages.append(Stage("", _Segment(segments[i], carried_in, carried_out, constants), owned=names,
                            title=f"graph segment {i}: {span}"))
    return stages
