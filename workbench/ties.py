"""Tied weights: one tensor reachable under several names, counted, stored and compressed once.

A tie is one tensor object held by several modules (``dec.weight = enc.weight``; a language model's
head sharing its embedding matrix) or one module registered under several names. PyTorch's
``model.parameters()`` yields it once, but ``model.state_dict()`` lists it under every name, and
safetensors refuses to write two names of one storage. This module holds the rules, bottom up:

* groups: `tied_module_groups` (modules whose own parameters are shared), `shared_state_groups`
  (state-dict keys that are the same tensor);
* counting once: `payload_bytes` (each tensor's bytes once);
* storing once: `store_once` (the tensors to write and the names dropped, each with its kept
  partner) and `fill_tied` (names a file dropped, filled from their tie partner, as
  ``safetensors.torch.load_model`` does);
* compressing once: `check_shareable` and `build_shared` (one replacement for a whole group,
  the same module object at every name, plus each member's own bias where biases differ).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Mapping

import torch
from torch import nn

from workbench.errors import WorkbenchError


# --------------------------------------------------------------------------- groups
def tied_module_groups(model: nn.Module) -> list[tuple[str, ...]]:
    """Names of modules that share a parameter of their own (not a child's), one tuple per group.

    Modules are joined when they hold the same ``nn.Parameter`` object (``dec.weight =
    enc.weight``) or are one module registered under several names; a group chains (a shares its
    weight with b, b its bias with c: one group a, b, c). Names are in module order; groups of one
    are left out.
    """
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    owner: dict[int, str] = {}
    order: list[str] = []
    for name, module in model.named_modules(remove_duplicate=False):
        params = [p for p in module._parameters.values() if p is not None]
        if not params or name in parent:
            continue
        parent[name] = name
        order.append(name)
        for p in params:
            if id(p) in owner:
                parent[root(name)] = root(owner[id(p)])
            else:
                owner[id(p)] = name
    groups: dict[str, list[str]] = {}
    for name in order:
        groups.setdefault(root(name), []).append(name)
    return [tuple(names) for names in groups.values() if len(names) > 1]


def _view_key(tensor: torch.Tensor) -> tuple | None:
    """What makes two tensors the same stored values: one storage, one view of it (None: never shared)."""
    if tensor.is_quantized or tensor.layout != torch.strided or tensor.device.type == "meta":
        return None
    ptr = tensor.untyped_storage().data_ptr()
    if ptr == 0 or tensor.numel() == 0:
        return None
    return (tensor.device, ptr, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)


def shared_state_groups(state: Mapping[str, Any]) -> list[list[str]]:
    """Keys of ``state`` (a state dict) whose values are the same tensor, one list per tensor.

    Same tensor = one storage viewed with the same offset, shape, strides and dtype (what a tied
    parameter gives under each of its names). Keys are in ``state``'s order; groups of one are
    left out.
    """
    groups: dict[tuple, list[str]] = {}
    for key, value in state.items():
        view = _view_key(value) if isinstance(value, torch.Tensor) else None
        if view is not None:
            groups.setdefault(view, []).append(key)
    return [keys for keys in groups.values() if len(keys) > 1]


# --------------------------------------------------------------------------- counting once
def payload_bytes(state: Mapping[str, Any]) -> int:
    """Bytes of the tensors of ``state`` (``numel * element_size``), each shared tensor once.

    Entries that are not tensors (``None``, dtypes) count 0; quantized tensors count their codes.
    """
    seen: set[tuple] = set()
    total = 0
    for value in state.values():
        if not isinstance(value, torch.Tensor):
            continue
        view = _view_key(value)
        if view is not None:
            if view in seen:
                continue
            seen.add(view)
        total += value.numel() * value.element_size()
    return total


# --------------------------------------------------------------------------- storing once
def store_once(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(to_write, tied)``: each shared tensor once, under the first of its names, and
    ``{dropped name: kept name}`` to restore the others on load.

    Tensors that share a storage without being the same view (two slices of one buffer) are
    copied, so that safetensors accepts them; they come back as separate tensors.
    """
    tied: dict[str, str] = {}
    for keys in shared_state_groups(tensors):
        for key in keys[1:]:
            tied[key] = keys[0]
    to_write: dict[str, torch.Tensor] = {}
    storages: set[tuple] = set()
    for key, value in tensors.items():
        if key in tied:
            continue
        view = _view_key(value)
        if view is not None:
            if view[:2] in storages:
                value = value.clone()
            storages.add(view[:2])
        to_write[key] = value
    return to_write, tied


def fill_tied(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` (read from a file) with the names ``model`` ties filled from their tie partner.

    A file written by ``safetensors.torch.save_model`` (or `store_once`) keeps one name of each
    shared tensor; ``model.load_state_dict(strict=True)`` wants them all. For each group of
    ``model.state_dict()`` keys that are one tensor, keys missing in ``state`` get the value of
    a present member (as ``safetensors.torch.load_model`` does). ``state`` is not modified.
    Raises `WorkbenchError` when the file holds different values for names the model ties (the
    model cannot hold both). Keys the file lacks entirely are left for the caller to report.
    """
    filled = dict(state)
    for keys in shared_state_groups(model.state_dict()):
        present = [k for k in keys if k in state]
        if not present:
            continue
        kept = state[present[0]]
        for key in present[1:]:
            other = state[key]
            if tuple(other.shape) == tuple(kept.shape) and not torch.equal(other, kept):
                raise WorkbenchError(f"the file holds different values for {present[0]!r} and {key!r}, which this "
                                     f"model ties (one tensor under names {keys}); it was saved from a model "
                                     "without that tie")
        for key in keys:
            filled.setdefault(key, kept)
    return filled


# --------------------------------------------------------------------------- compressing once
def _bias_free(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` without its bias (the same weight tensor; ``module`` untouched)."""
    clone = copy.copy(module)
    clone._parameters = {**module._parameters, "bias": None}
    return clone


def _channel_dim(module: nn.Module) -> int:
    """Axis of the output channels a bias is added on: -1 for a Linear, -(n+1) for an n-d conv."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return -(len(module.kernel_size) + 1)
    return -1


def _embedding_with_heads(members: Mapping[str, nn.Module]) -> bool:
    """An embedding table tied to LM heads: ``nn.Embedding`` members configured alike and bias-free
    ``nn.Linear`` heads, all holding the one ``(vocab, dim)`` weight (the head's ``(out, in)``).
    One row-wise replacement serves both (`workbench.layers.quant_embedding`)."""
    modules = list(members.values())
    tables = [m for m in modules if type(m) is nn.Embedding]
    heads = [m for m in modules if type(m) is nn.Linear]
    if not tables or not heads or len(tables) + len(heads) != len(modules):
        return False
    weight = tables[0].weight
    return (all(m.weight is weight for m in modules) and all(h.bias is None for h in heads)
            and len({m.extra_repr() for m in tables}) == 1)


def check_shareable(members: Mapping[str, nn.Module]) -> None:
    """Raise `WorkbenchError` unless the modules of one tied group can share one replacement.

    ``members``: ``{name: module}`` of the group. They must be the same type with the same
    configuration (``extra_repr`` without the bias: features, kernel, stride, ...) and hold the
    same tensors, except that each may have its own bias; or be an embedding table with the
    bias-free LM heads tied to it (one weight: `_embedding_with_heads`).
    """
    names = list(members)
    first_name, first = names[0], members[names[0]]
    if _embedding_with_heads(members):
        return
    for name in names[1:]:
        module = members[name]
        if type(module) is not type(first):
            raise WorkbenchError(f"tied layers {first_name!r} ({type(first).__name__}) and {name!r} "
                                 f"({type(module).__name__}) are different layer types; a tied group is "
                                 "compressed as one only when its members are the same layer: leave it dense")
        if _bias_free(module).extra_repr() != _bias_free(first).extra_repr():
            raise WorkbenchError(f"tied layers {first_name!r} ({_bias_free(first).extra_repr()}) and {name!r} "
                                 f"({_bias_free(module).extra_repr()}) are configured differently; a tied group is "
                                 "compressed as one only when its members are the same layer: leave it dense")
        own = sorted(k for k in {*module._parameters, *module._buffers, *first._parameters, *first._buffers}
                     if k != "bias" and (module._parameters.get(k, module._buffers.get(k))
                                         is not first._parameters.get(k, first._buffers.get(k))))
        if own:
            raise WorkbenchError(f"tied layers {first_name!r} and {name!r} do not share {', '.join(own)}; a tied "
                                 "group is compressed as one only when its members share every tensor but "
                                 "their biases: leave it dense")


class TiedLayer(nn.Module):
    """One member of a tied group whose members have their own biases.

    ``core``: the group's compressed layer, built once without a bias; the SAME module object
    is the ``core`` of every member, so its factors / codes are stored and counted once.
    ``bias``: this member's own bias ``(out,)``, added on ``channel_dim`` of ``core(x)``.
    """

    def __init__(self, core: nn.Module, bias: nn.Parameter, channel_dim: int = -1):
        super().__init__()
        self.core = core
        self.bias = bias
        self.channel_dim = channel_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.core(x)
        shape = [1] * out.dim()
        shape[self.channel_dim] = -1
        return out + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"channel_dim={self.channel_dim}"


def build_shared(members: Mapping[str, nn.Module], build: Callable[[nn.Module], nn.Module]) -> dict[str, nn.Module]:
    """``{name: replacement}`` for a tied group, compressed as one.

    ``members``: ``{name: module}`` of the group (checked by `check_shareable`); ``build(module)
    -> replacement``: the method's builder, called ONCE. When the members share their bias too
    (or have none), every name gets the same replacement object. Otherwise the replacement is
    built from a bias-free view of the first member and each member with a bias gets a
    `TiedLayer` around that one core (biases that members shared stay shared); a member without
    bias gets the core itself. A build that leaves the layer as it is (returns the module it was
    given) leaves every member as it is. The members are not modified.
    """
    check_shareable(members)
    modules = list(members.values())
    biases = [m._parameters.get("bias") for m in modules]
    shared_bias = all(b is biases[0] for b in biases)
    source = modules[0] if shared_bias else _bias_free(modules[0])
    core = build(source)
    if core is source:
        return dict(members)
    if shared_bias:
        return {name: core for name in members}
    copies: dict[int, nn.Parameter] = {}
    result: dict[str, nn.Module] = {}
    for (name, module), bias in zip(members.items(), biases):
        if bias is None:
            result[name] = core
            continue
        if id(bias) not in copies:
            copies[id(bias)] = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        result[name] = TiedLayer(core, copies[id(bias)], _channel_dim(module))
    return result
