"""Which layers of a model can be compressed, the weight matrix each is judged by, and what is left
alone (with the reason).

Layer types reach the matrix methods through their adapters (`workbench.adapters`: ``nn.Linear``,
``nn.Conv2d``, ``transformers`` ``Conv1D``). `matrix_layers` lists the layers offered to them;
`inventory` lists every module holding weights (embeddings and LM heads with their sizes) and why
any of them is left alone. Layers sharing a weight (ties) are offered as one group
(`tied_groups`, `offered_units`) or left dense with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workbench.adapters import adapted_types, adapter_for
from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.ties import check_shareable, tied_module_groups

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)


@dataclass(frozen=True)
class LayerInfo:
    """A compressible layer: qualified ``name``, ``kind`` ("linear"/"conv"), matrix ``shape`` (out, in*k*k)."""

    name: str
    kind: str
    shape: tuple[int, int]
    params: int


@dataclass(frozen=True)
class InventoryEntry:
    """A module holding weights of its own (one row of `inventory`).

    ``type``: its class name. ``kind``: "linear"/"conv" (an adapter's), "embedding", "recurrent",
    "norm" or "other". ``shape``: the ``(out, in)`` matrix for linear/conv layers, the weight's
    shape otherwise (an embedding: ``(vocab, dim)``; ``()`` without a ``weight``). ``params``:
    entries of its own parameters (a tied tensor is counted in every module sharing it;
    ``tied_with`` names the others). ``lm_head``: it is a language model's output embeddings (the
    logits layer). ``reason``: why the matrix methods leave it alone; None when `matrix_layers`
    offers it.
    """

    name: str
    type: str
    kind: str
    shape: tuple[int, ...]
    params: int
    lm_head: bool
    tied_with: tuple[str, ...]
    reason: str | None

    def to_dict(self) -> dict:
        return {"name": self.name, "type": self.type, "kind": self.kind, "shape": list(self.shape),
                "params": self.params, "lm_head": self.lm_head, "tied_with": list(self.tied_with),
                "reason": self.reason}


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` matrix of a layer (a view, no copy): a Linear's weight, a Conv2d's kernel
    as ``(out, in*kh*kw)``, a ``transformers`` Conv1D's ``weight.T``."""
    adapter = adapter_for(module)
    if adapter is None:
        raise UnsupportedLayerError(f"no weight matrix for {type(module).__name__}; supported: {adapted_types()}")
    return adapter.matrix(module)


def skip_reason(module: nn.Module) -> str | None:
    """Why the matrix methods leave ``module`` alone, judged on the module itself (None if they take it).

    Ties between modules are a property of the model: `inventory` reports those.
    """
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"grouped conv (groups={module.groups}): no shared input to factor; left dense"
    if adapter_for(module) is not None:
        return None
    kind = type(module).__name__
    if isinstance(module, nn.Embedding):
        return ("embedding: a lookup table (one row read per token), not a matrix product; left dense by the "
                "matrix methods (quant_embedding stores its rows as b-bit codes)")
    if isinstance(module, nn.EmbeddingBag):
        return "embedding bag: a lookup table (rows read and pooled per bag), not a matrix product; left dense"
    if isinstance(module, nn.RNNBase):
        return (f"recurrent layer ({kind}): several gate matrices, not one; the svd_rnn method (and the svd "
                "recipe) factor its weight_ih / weight_hh")
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"{kind}: no matrix adapter for this convolution (adapters: {adapted_types()}); left dense"
    if isinstance(module, _NORMS):
        return f"{kind}: normalisation layer, per-channel scales/shifts (1-D weights), nothing to factor; left dense"
    if all(p.dim() <= 1 for p in module.parameters(recurse=False)):
        return f"{kind}: per-channel scales/shifts (1-D weights), nothing to factor; left dense"
    return f"{kind}: no adapter says how it uses its weights (adapters: {adapted_types()}); left dense"


def _entry_kind(module: nn.Module) -> str:
    adapter = adapter_for(module)
    if adapter is not None:
        return adapter.kind
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    if isinstance(module, nn.RNNBase):
        return "recurrent"
    if isinstance(module, _NORMS):
        return "norm"
    return "other"


def lm_head_names(model: nn.Module) -> set[str]:
    """Qualified names of the output embeddings (LM heads) of the ``transformers`` models inside
    ``model`` (their ``get_output_embeddings()``), and of any module named ``lm_head``."""
    names = {module: name for name, module in model.named_modules()}
    heads = {name for name in names.values() if name.rpartition(".")[2] == "lm_head"}
    for module in names:
        getter = getattr(module, "get_output_embeddings", None)
        if callable(getter):
            try:
                head = getter()
            except (AttributeError, NotImplementedError, TypeError):  # a model without a head
                continue
            if isinstance(head, nn.Module) and head in names:
                heads.add(names[head])
    return heads


def matrix_layers(model: nn.Module) -> list[LayerInfo]:
    """Every layer an adapter takes (Linear, ungrouped Conv2d, ``transformers`` Conv1D), in module order.

    Layers whose weight is tied to another module's are left out: compressing one copy would
    store the weight twice (factors here, dense there).
    """
    layers = []
    tied = {name for group in tied_module_groups(model) for name in group}
    for name, module in model.named_modules():
        adapter = adapter_for(module)
        if adapter is not None and skip_reason(module) is None and name not in tied:
            shape = tuple(adapter.matrix(module).shape)
            params = sum(p.numel() for p in module.parameters(recurse=False))
            layers.append(LayerInfo(name, adapter.kind, shape, params))
    return layers


@dataclass(frozen=True)
class TiedGroup:
    """Layers sharing one weight tensor (`workbench.ties.tied_module_groups`), in module order.

    ``names``: the members. ``info``: the group as one layer when the matrix methods can compress
    it as one (``info.name``: the first member; ``shape``: the shared ``(out, in)`` matrix;
    ``params``: the group's entries, each shared tensor once), else None. ``reason``: why it stays
    dense (None when ``info`` is given).
    """

    names: tuple[str, ...]
    info: LayerInfo | None
    reason: str | None

    @property
    def label(self) -> str:
        """``"enc + dec (tied)"``: the members, for sliders and reports."""
        return f"{' + '.join(self.names)} (tied)"


def tied_groups(model: nn.Module) -> list[TiedGroup]:
    """Every tied group of ``model``: offered as one layer (its members are one matrix-layer type
    and configuration, sharing every tensor but their biases: `workbench.ties.check_shareable`)
    or left dense with the reason (a member the matrix methods do not take, such as a language
    model's embedding table tied to its LM head; members of different types)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    groups = []
    for names in tied_module_groups(model):
        members = {name: modules[name] for name in names}
        reason = next((f"{name} ({type(m).__name__}): {why.removesuffix('; left dense')}" for name, m in members.items()
                       if (why := skip_reason(m)) is not None), None)
        if reason is None:
            try:
                check_shareable(members)
            except WorkbenchError as exc:
                reason = str(exc)
        if reason is not None:
            groups.append(TiedGroup(names, None, f"tied group {' + '.join(names)} stays dense: {reason}"))
            continue
        first = members[names[0]]
        adapter = adapter_for(first)
        own = {id(p): p for m in members.values() for p in m.parameters(recurse=False)}
        info = LayerInfo(names[0], adapter.kind, tuple(adapter.matrix(first).shape),
                         sum(p.numel() for p in own.values()))
        groups.append(TiedGroup(names, info, None))
    return groups


def offered_units(model: nn.Module) -> list[tuple[tuple[str, ...], LayerInfo]]:
    """What the matrix methods may compress, in module order: ``((name,), info)`` for each of
    `matrix_layers`, ``(members, info)`` for each tied group offered as one (`tied_groups`).
    A recipe gives all names of a unit the same choice."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules(remove_duplicate=False))}
    units = [((info.name,), info) for info in matrix_layers(model)]
    units += [(group.names, group.info) for group in tied_groups(model) if group.info is not None]
    return sorted(units, key=lambda unit: order[unit[0][0]])


def embedding_units(model: nn.Module) -> tuple[list[tuple[tuple[str, ...], LayerInfo]], dict[tuple[str, ...], str]]:
    """``(units, left_dense)``: the tables row-wise quantization (``quant_embedding``) may compress.

    ``units``: ``((name,), info)`` for each ``nn.Embedding`` alone and ``(members, info)`` for an
    embedding with the bias-free LM heads tied to it (one table, one choice), in module order;
    ``info``: kind "embedding", ``shape`` ``(vocab, dim)``, ``params`` the table once.
    ``left_dense``: ``{members: reason}`` for tables that cannot be compressed (``max_norm``: rows
    rewritten in forward) and tied groups holding one that cannot be compressed as one table.
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    grouped = {name: names for names in tied_module_groups(model) for name in names}
    units, dense, seen = [], {}, set()
    for name, module in model.named_modules():
        if type(module) is not nn.Embedding or name in seen:
            continue
        names = grouped.get(name, (name,))
        seen.update(names)
        members = {n: modules[n] for n in names}
        reason = None
        if module.max_norm is not None:
            reason = f"{name} has max_norm={module.max_norm} (rows rescaled in place during forward)"
        elif len(names) > 1:
            try:
                check_shareable(members)  # embeddings alike, or one table with its bias-free heads
            except WorkbenchError as exc:
                reason = str(exc)
        if reason is not None:
            dense[names] = f"{'tied group ' if len(names) > 1 else ''}{' + '.join(names)} stays dense: {reason}"
            continue
        units.append((names, LayerInfo(names[0], "embedding", tuple(module.weight.shape), module.weight.numel())))
    return units, dense


def inventory(model: nn.Module) -> list[InventoryEntry]:
    """Every module of ``model`` holding parameters of its own, in module order: what it is, its
    size, and why the matrix methods leave it alone (``reason``; None for `matrix_layers`' layers
    and members of a tied group offered as one)."""
    offered = {name for names, _ in offered_units(model) for name in names}
    tied = {name: tuple(n for n in group if n != name) for group in tied_module_groups(model) for name in group}
    heads = lm_head_names(model)
    entries = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        adapter = adapter_for(module)
        weight = getattr(module, "weight", None)
        if adapter is not None:
            shape = tuple(adapter.matrix(module).shape)
        else:
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else ()
        reason = None
        if name not in offered:
            reason = skip_reason(module)
            if reason is None:  # an adapter takes the type: it is the tie that keeps it out
                reason = next(group.reason for group in tied_groups(model) if name in group.names)
            elif name in tied:
                reason = f"{reason}; weight shared with {', '.join(tied[name])} (tied)"
        entries.append(InventoryEntry(name or "(model)", type(module).__name__, _entry_kind(module), shape,
                                      sum(p.numel() for p in own), name in heads, tied.get(name, ()), reason))
    return entries


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)`` with an error that lists the available layer names."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        known = ", ".join(info.name for info in matrix_layers(model)) or "(none)"
        raise WorkbenchError(f"unknown layer {name!r}; compressible layers: {known}") from None


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at qualified ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
