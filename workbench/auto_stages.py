"""Stages found automatically: a model's forward pass cut at its list of blocks.

A model that declares no stages (`workbench.stages.model_stages` gives one) but whose forward runs
a list of same-type blocks one after another (``encoder.layer`` of BERT, ``transformer.h`` of
GPT-2, ``model.layers`` of Llama, the blocks of a hand-written residual network) is cut there,
with no per-architecture code (the outermost lists taken together first, when they run one after
another like a ResNet's ``layer1`` .. ``layer4``, else each list alone, largest first):

* stage 0 runs the model's forward until the first block is called: a forward pre-hook records
  the block's arguments (hidden state, masks, position embeddings) and stops the pass;
* stage ``i`` (1..n) runs block ``i-1`` on the carried hidden state with the recorded arguments;
* the last stage runs the model's forward again with every block's ``forward`` replaced by a stub
  returning the last block's output (tensor or tuple, exactly as the real block returned it), so
  what follows the blocks (final norm, pooling, heads) runs as in the original.

Between stages flows `Carried` (the model input, the hidden state, the recorded arguments). The
hooks and stubs exist only during a stage's run (removed in ``finally``). The cut is checked once
on an example input: every block is called once, in order, each on the previous one's output, the
same arguments for every block, and the staged outputs equal the forward's (`torch.allclose`,
``rtol=1e-5, atol=1e-6``); otherwise (or when the model has no such list) its `torch.fx` graph is
cut where one tensor carries the state (`workbench.graph_stages`), checked the same way; when that
fails too the model is one stage and `FoundStages.why` gives the reasons of both.

A layer belongs to stage 0 when it is called before the first block, to the last stage when it is
called only after the last block (and shares no parameter with an earlier stage's layers), to
block ``i``'s stage when it lies inside it; any other layer belongs to no stage (the engine then
re-runs the whole model for it: slower, never wrong).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from workbench.device import model_device, to_device
from workbench.errors import WorkbenchError
from workbench.graph_stages import graph_stages
from workbench.stages import Stage, model_stages

RTOL, ATOL = 1e-5, 1e-6
MAX_TRIES = 3  # block lists tried, largest first


class FoundStages(NamedTuple):
    """``stages`` of a model and ``why``: a sentence saying what they are and where they come from."""

    stages: list[Stage]
    why: str


class Carried(NamedTuple):
    """The state between automatic stages.

    ``inputs``: the model's input (the last stage runs the forward on it again); ``hidden``: the
    first block's input (after stage 0) or the previous block's output as it returned it (tensor,
    or tuple whose element 0 is the hidden state); ``args`` / ``kwargs``: the first block's other
    arguments, caches (transformers' ``Cache`` objects) replaced by None.
    """

    inputs: Any
    hidden: Any
    args: tuple
    kwargs: dict


class _Stop(Exception):
    """Raised by the pre-hook of the first block: stage 0 is done."""


def find_stages(model: nn.Module, example: Any = None) -> FoundStages:
    """Stages of ``model``: declared ones (`workbench.stages.model_stages`), else cut at a list of
    blocks when running them on ``example`` (a batch the model takes, ``model(example)``) equals
    the forward, else one stage. ``model`` is left as it was."""
    declared = model_stages(model)
    if len(declared) > 1 or declared[0].name != "":
        return FoundStages(declared, f"{len(declared)} stages declared by the model: {', '.join(s.label for s in declared)}")
    if example is None:
        return FoundStages(declared, "1 stage: no example input to check cut points on")
    example = to_device(example, model_device(model))
    candidates = block_lists(model)
    reasons = [] if candidates else ["no nn.ModuleList / nn.Sequential of two or more same-type blocks found"]
    # the outermost lists in the model's order (layer1, layer2, ... of a ResNet), tried as one chain first
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    outer = tuple(sorted((name for name in candidates if not any(name.startswith(other + ".") for other in candidates)),
                         key=order.__getitem__))
    tries = ([outer] if len(outer) > 1 else []) + [(name,) for name in candidates[:MAX_TRIES]]
    for containers in tries:
        name = ", ".join(containers)
        try:
            stages = _checked_stages(model, containers, example)
        except WorkbenchError as error:
            reasons.append(f"{name}: {error}")
            continue
        except Exception as error:  # a forward that does not survive the cut: not cut, said why
            reasons.append(f"{name}: the staged run fails ({type(error).__name__}: {error})")
            continue
        blocks = len(stages) - 2
        return FoundStages(stages, f"{len(stages)} stages: {stages[0].title} + {blocks} blocks of {name} + {stages[-1].title}"
                                   " (found automatically, checked on an example input)")
    try:  # else the points of the torch.fx graph where one tensor carries the state
        stages = _checked_graph_stages(model, example)
    except WorkbenchError as error:
        reasons.append(f"torch.fx: {error}")
    except Exception as error:
        reasons.append(f"torch.fx: the staged run fails ({type(error).__name__}: {error})")
    else:
        return FoundStages(stages, f"{len(stages)} stages: segments of the torch.fx graph cut where one tensor carries "
                                   "the state (found automatically, checked on an example input; "
                                   + "; ".join(reasons) + ")")
    return FoundStages(declared, "1 stage: " + "; ".join(reasons))


def block_lists(model: nn.Module) -> list[str]:
    """Names of the ``nn.ModuleList`` / ``nn.Sequential`` modules holding two or more blocks of one
    type, each with parameters, largest (in parameters) first."""
    found = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
            continue
        children = list(module)
        if len({type(child) for child in children}) != 1:
            continue
        if any(next(child.parameters(), None) is None for child in children):
            continue
        found.append((-sum(p.numel() for p in module.parameters()), len(found), name))
    return [name for _, _, name in sorted(found)]


# ---------------------------------------------------------------------------- the stages' calls

def _hidden_of(output: Any) -> Any:
    return output[0] if isinstance(output, tuple) else output


def _is_cache(value: Any) -> bool:
    return any(cls.__name__ == "Cache" for cls in type(value).__mro__)


def _without_caches(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Caches filled by a block are dropped: a block run twice on one would attend to its past."""
    return (tuple(None if _is_cache(a) else a for a in args),
            {k: None if _is_cache(v) else v for k, v in kwargs.items()})


def _split_hidden(args: tuple, kwargs: dict) -> tuple[Any, tuple, dict]:
    if args and isinstance(args[0], torch.Tensor):
        return args[0], args[1:], kwargs
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        rest = dict(kwargs)
        return rest.pop("hidden_states"), args, rest
    raise WorkbenchError("the first block is called without a tensor as its first argument or hidden_states=")


def _prefix_call(blocks: tuple[str, ...]):
    """Stage 0: the forward until the first block is called; returns `Carried`."""

    def run(model: nn.Module, x: Any) -> Carried:
        recorded = {}

        def stop(module, args, kwargs):
            recorded["args"], recorded["kwargs"] = args, kwargs
            raise _Stop

        handle = model.get_submodule(blocks[0]).register_forward_pre_hook(stop, with_kwargs=True)
        try:
            model(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not recorded:
            raise WorkbenchError(f"the forward pass finished without calling {blocks[0]}")
        hidden, args, kwargs = _split_hidden(recorded["args"], recorded["kwargs"])
        args, kwargs = _without_caches(args, kwargs)
        return Carried(x, hidden, args, kwargs)

    return run


def _block_call(block: nn.Module, state: Carried) -> Carried:
    return state._replace(hidden=block(_hidden_of(state.hidden), *state.args, **state.kwargs))


def _suffix_call(blocks: tuple[str, ...]):
    """The last stage: the forward with every block stubbed by the carried output."""

    def run(model: nn.Module, state: Carried) -> Any:
        stubbed = [model.get_submodule(name) for name in blocks]

        def stub(*args, **kwargs):
            return state.hidden

        try:
            for block in stubbed:
                block.forward = stub
            return model(state.inputs)
        finally:
            for block in stubbed:
                if "forward" in block.__dict__:
                    del block.forward

    return run


# ---------------------------------------------------------------------------- the check

def tensor_leaves(value: Any) -> list[torch.Tensor]:
    """The tensors of an output, depth first: tuples, lists, mappings (``ModelOutput``), dataclasses."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        items = list(value.values())
    elif isinstance(value, (tuple, list)):
        items = list(value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [getattr(value, f.name) for f in dataclasses.fields(value)]
    else:
        return []
    return [leaf for item in items for leaf in tensor_leaves(item)]


def compared_tensors(value: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a stage's output that say what it computed: a `Carried`'s
    hidden state (element 0 when the block returned a tuple; not the carried input or masks),
    else every floating tensor leaf of ``value`` (a tensor, tuple, ``ModelOutput``, dict)."""
    if isinstance(value, Carried):
        value = _hidden_of(value.hidden)
    return [t for t in tensor_leaves(value) if t.is_floating_point()]


def per_sample(value: Any) -> torch.Tensor:
    """``(batch, features)`` float32: the `compared_tensors` of a model's or stage's output, each
    flattened per sample and concatenated (scalars, and leaves with another leading size than the
    first, are left out). A plain ``(batch, ...)`` tensor gives ``value.flatten(1).float()``."""
    tensors = compared_tensors(value)
    if not tensors:
        raise WorkbenchError(f"the output ({type(value).__name__}) holds no floating-point tensor to compare")
    sized = [t for t in tensors if t.dim()]
    if not sized:  # scalars only (a loss): one row
        return torch.stack([t.float() for t in tensors])[None]
    kept = [t for t in sized if t.shape[0] == sized[0].shape[0]]
    return torch.cat([t.float().reshape(len(t), -1) for t in kept], dim=1)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and (a is b or torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or (_is_cache(a) and _is_cache(b)) or (type(a) is type(b) and a == b)


def _trace_blocks(model: nn.Module, blocks: tuple[str, ...], example: Any) -> Any:
    """Run the forward once, checking that the blocks form a chain; returns its output."""
    container = [model.get_submodule(name) for name in blocks]
    calls: list[tuple[int, tuple, dict]] = []
    outputs: list[Any] = []
    handles = []
    for index, block in enumerate(container):
        def before(module, args, kwargs, index=index):
            calls.append((index, args, kwargs))

        def after(module, args, kwargs, output):
            outputs.append(output)

        handles.append(block.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(block.register_forward_hook(after, with_kwargs=True))
    try:
        reference = model(example)
    finally:
        for handle in handles:
            handle.remove()
    order = [index for index, _, _ in calls]
    if order != list(range(len(container))):
        twice = next((i for i in range(len(container)) if order.count(i) > 1), None)
        why = f"block {blocks[twice]} is called {order.count(twice)} times" if twice is not None else \
            f"its blocks are called in the order {[blocks[i] for i in order]}, not once each in order"
        raise WorkbenchError(f"{why} in one forward pass")
    first = _split_hidden(calls[0][1], calls[0][2])
    for index, args, kwargs in calls[1:]:
        hidden, rest, rest_kwargs = _split_hidden(args, kwargs)
        if hidden is not _hidden_of(outputs[index - 1]):
            raise WorkbenchError(f"block {blocks[index]} does not take the output of block {blocks[index - 1]}")
        if not (_same(rest, first[1]) and _same(rest_kwargs, first[2])):
            raise WorkbenchError(f"block {blocks[index]} is called with other arguments than block {blocks[0]}")
    return reference


def _owned(model: nn.Module, blocks: tuple[str, ...], stages: list[Stage], example: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Names of the modules called before the first block and only after the last one, in a staged run."""
    skip = {name for name, _ in model.named_modules() if name == "" or any(b.startswith(name + ".") for b in blocks)}
    before: list[str] = []
    after: list[str] = []
    phase = {"calls": before}
    last = model.get_submodule(blocks[-1])
    handles = []
    for name, module in model.named_modules():
        if name in skip or name in blocks or any(name.startswith(b + ".") for b in blocks):
            continue

        def called(module, args, name=name):
            phase["calls"].append(name)

        handles.append(module.register_forward_pre_hook(called))

    def last_stub_called(module, args, output):
        phase["calls"] = after

    try:
        state = stages[0].run(model, example)
        phase["calls"] = []
        for stage in stages[1:-1]:
            state = stage.run(model, state)
        handles.append(last.register_forward_hook(last_stub_called))
        stages[-1].run(model, state)
    finally:
        for handle in handles:
            handle.remove()
    first = set(before)
    earlier = {id(p) for name in first for p in model.get_submodule(name).parameters()}
    earlier |= {id(p) for name in blocks for p in model.get_submodule(name).parameters()}
    later = [name for name in dict.fromkeys(after) if name not in first
             and not any(id(p) in earlier for p in model.get_submodule(name).parameters())]
    return tuple(dict.fromkeys(before)), tuple(later)


@torch.no_grad()
def _checked_stages(model: nn.Module, containers: tuple[str, ...], example: Any) -> list[Stage]:
    """Stages cut at the blocks of ``containers`` (run one after another), checked on ``example``."""
    blocks = tuple(f"{c}.{i}" for c in containers for i in range(len(model.get_submodule(c))))
    reference = _trace_blocks(model, blocks, example)
    stages = ([Stage("", _prefix_call(blocks), title=f"before {containers[0]}")]
              + [Stage(name, _block_call) for name in blocks]
              + [Stage("", _suffix_call(blocks), title=f"after {containers[-1]}")])
    state = example
    for stage in stages:
        state = stage.run(model, state)
    _check_equal(reference, state)
    before, after = _owned(model, blocks, stages, example)
    return ([Stage("", stages[0].call, owned=before, title=stages[0].title)] + stages[1:-1]
            + [Stage("", stages[-1].call, owned=after, title=stages[-1].title)])


@torch.no_grad()
def _checked_graph_stages(model: nn.Module, example: Any) -> list[Stage]:
    """`workbench.graph_stages.graph_stages`, their run on ``example`` checked against the forward."""
    stages = graph_stages(model, example)
    state = example
    for stage in stages:
        state = stage.run(model, state)
    _check_equal(model(example), state)
    return stages


def _check_equal(reference: Any, state: Any) -> None:
    """`WorkbenchError` unless the staged output ``state`` equals the forward's ``reference``."""
    want, got = tensor_leaves(reference), tensor_leaves(state)
    if len(want) != len(got) or not want:
        raise WorkbenchError(f"the staged run returns {len(got)} tensors, the forward {len(want)}")
    for index, (a, b) in enumerate(zip(want, got)):
        if a.shape != b.shape or not torch.allclose(a, b, rtol=RTOL, atol=ATOL):
            error = float((a - b).abs().max()) if a.shape == b.shape else f"shape {tuple(b.shape)} vs {tuple(a.shape)}"
            raise WorkbenchError(f"the staged run differs from the forward (output tensor {index}: max |difference| {error})")
