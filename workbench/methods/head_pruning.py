"""Attention-head and FFN-width pruning ("prune_heads"): transformer blocks rebuilt smaller.

For Hugging Face BERT-like (``attention.self.query/key/value``, ``attention.output.dense``,
``intermediate.dense``, ``output.dense``), GPT-2 (fused ``attn.c_attn``, ``attn.c_proj``,
``mlp.c_fc``, ``mlp.c_proj``; Conv1D layers) and Llama-family (``self_attn.q/k/v/o_proj``,
``mlp.gate/up/down_proj``) blocks. A head is its rows of q, k and v and its columns of the output
projection; under grouped-query attention (Llama, fewer k/v heads) the unit is one k/v head with
the query heads that share it. An FFN hidden unit is its row of each input projection and its
column of the output projection. Removing a unit drops exactly its contribution to the block's
output (the output projection's bias stays), so the smaller block computes what the block with
those units zeroed computes.

``ratio`` is the KEPT fraction of each block's Linear parameters (weights and biases of q, k, v,
o and the FFN projections): ``round(ratio * units)`` attention units, and the FFN width that
brings the block's kept parameters to ``ratio`` of them (to one hidden unit; to ``round_to``
units when given); with ``global_ranking``, ``ratio`` of all the blocks' Linear parameters
together, the units of every block ranked on one list by score per parameter
(`workbench.methods.head_allocation`). Units are ranked by the energy they send into the residual stream, measured
on calibration inputs (``importance="output"``: head ``h`` scores ``sum_t ||W_O[:, h] x_t[h]||^2``
from the Gram matrix of the output projection's inputs; an FFN unit ``j`` scores
``sum_t a_tj^2 * ||W_out[:, j]||^2``), or without data by the norms of its weights
(``importance="weights"``: ``||rows in|| * ||columns out||``).

The removed units are decided when the plan is made (`head_removals`) and recorded in the step
(original indices per block), so ``apply`` and file loading rebuild exactly the same model without
data. Each attention module's head count, and the config's per-block ``layer_heads`` /
``layer_intermediate_sizes``, describe the rebuilt model (``num_attention_heads`` and
``intermediate_size`` stay the original's: BERT and GPT-2 derive the head size from them).
``transformers`` is never imported at module level.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from workbench.adapters import is_transformers_conv1d
from workbench.errors import WorkbenchError
from workbench.methods.head_allocation import allocate
from workbench.registry import LayerContext, Method, register_method

IMPORTANCES = ("output", "weights")


@dataclass(frozen=True)
class Block:
    """One transformer block's prunable parts (qualified names in the model).

    ``qkv``: the q, k, v projections (GPT-2: the one fused ``c_attn``). ``heads``: query heads,
    ``groups``: k/v heads (units of head pruning; ``heads`` for multi-head attention), ``width``:
    FFN hidden units, ``head_dim``: features per head.
    """

    name: str
    family: str
    attention: str
    qkv: tuple[str, ...]
    out: str
    ffn_in: tuple[str, ...]
    ffn_out: str
    heads: int
    groups: int
    head_dim: int
    width: int

    @property
    def linears(self) -> tuple[str, ...]:
        return (*self.qkv, self.out, *self.ffn_in, self.ffn_out)


def _has(module: nn.Module, path: str) -> bool:
    for part in path.split("."):
        if not hasattr(module, part):
            return False
        module = getattr(module, part)
    return isinstance(module, nn.Module)


def matrix(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of a Linear or a transformers Conv1D (``weight: (in, out)``), a view."""
    return module.weight.detach().t() if is_transformers_conv1d(module) else module.weight.detach()


def _block(name: str, module: nn.Module) -> Block | None:
    prefix = f"{name}." if name else ""
    if _has(module, "attention.self.query") and _has(module, "attention.output.dense") \
            and _has(module, "intermediate.dense") and _has(module, "output.dense"):
        attn = module.attention.self
        d = int(attn.attention_head_size)
        heads = module.attention.self.query.out_features // d
        return Block(name, "bert", f"{prefix}attention.self",
                     tuple(f"{prefix}attention.self.{p}" for p in ("query", "key", "value")),
                     f"{prefix}attention.output.dense", (f"{prefix}intermediate.dense",), f"{prefix}output.dense",
                     heads, heads, d, module.intermediate.dense.out_features)
    if _has(module, "attn.c_attn") and _has(module, "attn.c_proj") and _has(module, "mlp.c_fc") \
            and _has(module, "mlp.c_proj") and is_transformers_conv1d(module.attn.c_attn):
        d = int(module.attn.head_dim)
        heads = matrix(module.attn.c_attn).shape[0] // (3 * d)
        return Block(name, "gpt2", f"{prefix}attn", (f"{prefix}attn.c_attn",), f"{prefix}attn.c_proj",
                     (f"{prefix}mlp.c_fc",), f"{prefix}mlp.c_proj", heads, heads, d, matrix(module.mlp.c_fc).shape[0])
    if all(_has(module, f"self_attn.{p}_proj") for p in "qkvo") \
            and all(_has(module, f"mlp.{p}_proj") for p in ("gate", "up", "down")):
        attn = module.self_attn
        d = int(attn.head_dim)
        return Block(name, "llama", f"{prefix}self_attn", tuple(f"{prefix}self_attn.{p}_proj" for p in "qkv"),
                     f"{prefix}self_attn.o_proj", (f"{prefix}mlp.gate_proj", f"{prefix}mlp.up_proj"),
                     f"{prefix}mlp.down_proj", attn.q_proj.out_features // d, attn.k_proj.out_features // d, d,
                     module.mlp.gate_proj.out_features)
    return None


def find_blocks(model: nn.Module) -> list[Block]:
    """The BERT / GPT-2 / Llama blocks of ``model`` in module order (empty for any other model)."""
    found = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{b.name}.") for b in found):
            continue
        block = _block(name, module)
        if block is not None:
            found.append(block)
    return found


# ------------------------------------------------------------------ sizes
def unit_costs(model: nn.Module, block: Block) -> tuple[int, int, int, int]:
    """``(per attention unit, per FFN unit, attention fixed, FFN fixed)`` Linear parameters of a
    block: a unit's rows of the input projections (with their biases) and its columns of the
    output projection; fixed: the output projections' biases."""
    def rows(name, units):
        module = model.get_submodule(name)
        out, inp = matrix(module).shape
        return (out // units) * (inp + (module.bias is not None))

    def cols(name, units):
        module = model.get_submodule(name)
        return matrix(module).shape[0] * (matrix(module).shape[1] // units)

    def bias(name):
        b = model.get_submodule(name).bias
        return 0 if b is None else b.numel()

    head = sum(rows(n, block.groups) for n in block.qkv) + cols(block.out, block.groups)
    ffn = sum(rows(n, block.width) for n in block.ffn_in) + cols(block.ffn_out, block.width)
    return head, ffn, bias(block.out), bias(block.ffn_out)


def linear_params(model: nn.Module, block: Block) -> int:
    """Parameters (weights and biases) of the block's q/k/v/o and FFN projections."""
    return sum(p.numel() for n in block.linears for p in model.get_submodule(n).parameters())


def kept_units(model: nn.Module, block: Block, ratio: float, min_heads: int = 0,
               round_to: int | None = None) -> tuple[int, int]:
    """``(attention units, FFN units)`` kept so that the block keeps ``ratio`` of its Linear
    parameters: ``round(ratio * groups)`` units (at least ``min_heads``), the FFN the rest.
    Raises `WorkbenchError` when a block would lose every head or its whole FFN."""
    head, ffn, head_fixed, ffn_fixed = unit_costs(model, block)
    total = block.groups * head + block.width * ffn + head_fixed + ffn_fixed
    heads = max(int(math.floor(ratio * block.groups + 0.5)), min_heads)
    heads = min(heads, block.groups)
    if heads < 1:
        raise WorkbenchError(f"ratio={ratio:g} keeps 0 of the {block.groups} attention units of block {block.name!r}; "
                             "raise ratio or pass min_heads=1 (a block keeps at least one head)")
    width = int(math.floor((ratio * total - head_fixed - ffn_fixed - heads * head) / ffn + 0.5))
    if round_to:
        width = round_to * int(math.floor(width / round_to + 0.5))
    width = min(width, block.width)
    if width < 1:
        raise WorkbenchError(f"ratio={ratio:g} with {heads} of {block.groups} attention units kept leaves no FFN "
                             f"hidden unit of the {block.width} in block {block.name!r}; raise ratio")
    return heads, width


# ------------------------------------------------------------------ importance
def _scores_from_weights(model: nn.Module, block: Block) -> tuple[torch.Tensor, torch.Tensor]:
    out = matrix(model.get_submodule(block.out)).float()
    o = out.reshape(out.shape[0], block.groups, -1).pow(2).sum((0, 2))
    v_name = block.qkv[-1]
    v = matrix(model.get_submodule(v_name)).float()
    if block.family == "gpt2":
        v = v[2 * block.heads * block.head_dim:]
    v = v.reshape(block.groups, -1).pow(2).sum(1)
    down = matrix(model.get_submodule(block.ffn_out)).float().pow(2).sum(0)
    up = sum(matrix(model.get_submodule(n)).float().pow(2).sum(1) for n in block.ffn_in)
    return (o * v).sqrt(), (down * up).sqrt()


def unit_scores(model: nn.Module, blocks: Sequence[Block], inputs: Any = None,
                batch_size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(attention unit scores (groups,), FFN unit scores (width,))]`` per block.

    With ``inputs`` (calibration inputs ``(n, ...)``, run through ``model`` in chunks of
    ``batch_size``): the output energy of each unit (see the module docstring); else weight norms.
    """
    if inputs is None:
        return [_scores_from_weights(model, b) for b in blocks]
    grams = {b.name: torch.zeros(b.heads, b.head_dim, b.head_dim, dtype=torch.float64) for b in blocks}
    squares = {b.name: torch.zeros(b.width, dtype=torch.float64) for b in blocks}

    def attention_hook(block):
        def hook(_, args):
            x = args[0].detach().reshape(-1, block.heads, block.head_dim).double()
            grams[block.name] += torch.einsum("nhd,nhe->hde", x, x).cpu()
        return hook

    def ffn_hook(block):
        def hook(_, args):
            squares[block.name] += args[0].detach().reshape(-1, block.width).double().pow(2).sum(0).cpu()
        return hook

    handles = []
    for b in blocks:
        handles.append(model.get_submodule(b.out).register_forward_pre_hook(attention_hook(b)))
        handles.append(model.get_submodule(b.ffn_out).register_forward_pre_hook(ffn_hook(b)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for chunk in inputs.split(batch_size):
                model(chunk)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    result = []
    for b in blocks:
        w = matrix(model.get_submodule(b.out)).double().cpu().reshape(-1, b.heads, b.head_dim)
        per_head = torch.einsum("ohd,hde,ohe->h", w, grams[b.name], w)
        heads = per_head.reshape(b.groups, -1).sum(1)
        down = matrix(model.get_submodule(b.ffn_out)).double().cpu().pow(2).sum(0)
        result.append((heads.float(), (squares[b.name] * down).float()))
    return result


def check_settings(ratio: Any, importance: Any = "output", min_heads: Any = 0, round_to: Any = None) -> None:
    """Raise `WorkbenchError` naming the value and the rule for a bad setting."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise WorkbenchError(f"ratio={ratio!r} must be in (0, 1]: it is the kept fraction of each block's Linear parameters")
    if importance not in IMPORTANCES:
        raise WorkbenchError(f"importance={importance!r} is not one of {', '.join(IMPORTANCES)} for head / FFN pruning")
    if isinstance(min_heads, bool) or not isinstance(min_heads, int) or min_heads < 0:
        raise WorkbenchError(f"min_heads={min_heads!r} must be a whole number >= 0 (attention units each block keeps)")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise WorkbenchError(f"round_to={round_to!r} must be a whole number >= 1 (FFN width kept in multiples of it)")


def global_units(model: nn.Module, blocks: Sequence[Block], ratio: float, scores, min_heads: int = 0,
                 round_to: int | None = None, max_ratio: float = 0.9, scale: str = "block") -> list[tuple[int, int]]:
    """``(attention units, FFN units)`` kept per block when ``ratio`` of ALL the blocks' Linear parameters
    is kept (`head_allocation.allocate`: best score per parameter over all blocks). Floors: each block
    keeps ``max(min_heads, 1)`` attention units and ``ceil((1 - max_ratio) * width)`` FFN units."""
    if isinstance(max_ratio, bool) or not isinstance(max_ratio, (int, float)) or not 0 < max_ratio < 1:
        raise WorkbenchError(f"max_ratio={max_ratio!r} must be in (0, 1): the largest fraction of one block's "
                             "FFN units that global ranking may remove")
    costs = [unit_costs(model, b) for b in blocks]
    total = sum(linear_params(model, b) for b in blocks)
    budget = ratio * total - sum(c[2] + c[3] for c in costs)
    return allocate([s[0] for s in scores], [s[1] for s in scores], [c[:2] for c in costs], budget,
                    [min(max(min_heads, 1), b.groups) for b in blocks],
                    [max(1, math.ceil((1 - max_ratio) * b.width - 1e-9)) for b in blocks], round_to, scale)


def head_removals(model: nn.Module, ratio: float, inputs: Any = None, min_heads: int = 0,
                  round_to: int | None = None, blocks: Sequence[Block] | None = None,
                  global_ranking: bool = False, max_ratio: float = 0.9, scale: str = "block") -> list[dict]:
    """``[{"block", "heads_removed", "ffn_removed", "heads_before", "heads_after", "ffn_before",
    "ffn_after"}]``: per block, the weakest units to remove (query-head indices, FFN unit indices,
    sorted), for ``blocks`` (default: all). Each block keeps ``ratio`` of its Linear parameters
    (`kept_units`), or with ``global_ranking`` all blocks together do (`global_units`). Every block
    is checked before scores are computed; ``model`` is not modified."""
    check_settings(ratio, "output" if inputs is not None else "weights", min_heads, round_to)
    blocks = find_blocks(model) if blocks is None else list(blocks)
    if not blocks:
        raise WorkbenchError("this model has no BERT / GPT-2 / Llama block whose heads and FFN width can be pruned")
    kept = None if global_ranking else [kept_units(model, b, ratio, min_heads, round_to) for b in blocks]
    scores = unit_scores(model, blocks, inputs)
    if global_ranking:
        kept = global_units(model, blocks, ratio, scores, min_heads, round_to, max_ratio, scale)
    rows = []
    for b, (heads, width), (hs, fs) in zip(blocks, kept, scores):
        gone = sorted(torch.argsort(hs, descending=True, stable=True)[heads:].tolist())
        per = b.heads // b.groups
        rows.append({"block": b.name, "heads_removed": [u * per + i for u in gone for i in range(per)],
                     "ffn_removed": sorted(torch.argsort(fs, descending=True, stable=True)[width:].tolist()),
                     "heads_before": b.heads, "heads_after": heads * per, "ffn_before": b.width, "ffn_after": width})
    return rows


# ------------------------------------------------------------------ rebuild
def slice_layer(module: nn.Module, keep: torch.Tensor, side: str) -> nn.Module:
    """A new Linear / Conv1D holding ``module``'s output rows (``side="out"``) or input columns
    (``"in"``) at indices ``keep``; same dtype and device, the bias kept whole for ``"in"``."""
    w = matrix(module)
    w = w[keep] if side == "out" else w[:, keep]
    bias = None if module.bias is None else (module.bias.detach()[keep] if side == "out" else module.bias.detach())
    if is_transformers_conv1d(module):
        new = type(module)(w.shape[0], w.shape[1]).to(device=w.device, dtype=w.dtype)
        w = w.t()
    else:
        new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if bias is not None:
            new.bias.copy_(bias)
    return new.train(module.training)


def _kept(size: int, removed: Sequence[int], what: str) -> torch.Tensor:
    gone = set(removed)
    if len(gone) != len(removed) or (gone and (min(gone) < 0 or max(gone) >= size)):
        raise WorkbenchError(f"{what}: removed indices {list(removed)[:8]} are repeated or outside 0..{size - 1}")
    if len(gone) >= size:
        raise WorkbenchError(f"{what}: removing all {size} would leave nothing (keep at least one)")
    return torch.tensor([i for i in range(size) if i not in gone], dtype=torch.long)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _check_groups(block: Block, removed: Sequence[int]) -> None:
    per = block.heads // block.groups
    units = {h // per for h in removed}
    if len(removed) != len(units) * per or set(removed) != {u * per + i for u in units for i in range(per)}:
        raise WorkbenchError(f"block {block.name!r} shares each k/v head among {per} query heads; removed heads "
                             f"{sorted(removed)[:8]} must be whole groups of {per}")


def rebuild_block(model: nn.Module, block: Block, heads_removed: Sequence[int], ffn_removed: Sequence[int]) -> None:
    """Replace the block's projections by their kept rows / columns and update the head counts
    (in place on ``model``, the copy `apply` made). Call after checking with `_kept`/`_check_groups`."""
    heads = _kept(block.heads, heads_removed, f"heads of block {block.name!r}")
    units = torch.tensor(sorted({int(h) // (block.heads // block.groups) for h in heads}), dtype=torch.long)
    ffn = _kept(block.width, ffn_removed, f"FFN units of block {block.name!r}")
    d = block.head_dim
    q_rows = (heads[:, None] * d + torch.arange(d)).reshape(-1)
    kv_rows = (units[:, None] * d + torch.arange(d)).reshape(-1)
    if block.family == "gpt2":
        e = block.heads * d
        _replace(model, block.qkv[0], slice_layer(model.get_submodule(block.qkv[0]),
                                                  torch.cat([q_rows, q_rows + e, q_rows + 2 * e]), "out"))
    else:
        for name, rows in zip(block.qkv, (q_rows, kv_rows, kv_rows)):
            _replace(model, name, slice_layer(model.get_submodule(name), rows, "out"))
    _replace(model, block.out, slice_layer(model.get_submodule(block.out), q_rows, "in"))
    for name in block.ffn_in:
        _replace(model, name, slice_layer(model.get_submodule(name), ffn, "out"))
    _replace(model, block.ffn_out, slice_layer(model.get_submodule(block.ffn_out), ffn, "in"))
    attn = model.get_submodule(block.attention)
    kept = len(heads)
    for attribute, value in (("num_attention_heads", kept), ("all_head_size", kept * d), ("num_heads", kept),
                             ("split_size", kept * d)):
        if hasattr(attn, attribute) and not (block.family == "llama" and attribute == "split_size"):
            setattr(attn, attribute, value)
    mlp = model.get_submodule(block.ffn_out.rpartition(".")[0])
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(ffn)


def build_heads(model: nn.Module, params: Mapping[str, Any], context: LayerContext) -> nn.Module:
    """Remove the recorded heads and FFN units (in place on the copy ``apply`` made).

    ``params``: ``blocks`` (block names), ``heads_removed`` / ``ffn_removed`` (one tuple of
    original indices per block); ``ratio``, ``importance``, ... record how they were chosen.
    Every block is checked before the first edit.
    """
    names, heads, ffn = params.get("blocks"), params.get("heads_removed"), params.get("ffn_removed")
    if names is None or heads is None or ffn is None or not len(names) == len(heads) == len(ffn):
        raise WorkbenchError("prune_heads needs one 'heads_removed' and one 'ffn_removed' list per entry of 'blocks' "
                             "(make the plan with get_recipe('prune')(model, ratio=..., structured=True))")
    found = {b.name: b for b in find_blocks(model)}
    todo = []
    for name, h, f in zip(names, heads, ffn):
        if name not in found:
            raise WorkbenchError(f"block {name!r} is not a BERT / GPT-2 / Llama block of this model; "
                                 f"its blocks: {', '.join(found) or '(none)'}")
        block = found[name]
        _kept(block.heads, h, f"heads of block {name!r}")
        _kept(block.width, f, f"FFN units of block {name!r}")
        _check_groups(block, h)
        todo.append((block, h, f))
    for block, h, f in todo:  # all validated before the first edit
        rebuild_block(model, block, h, f)
    config = getattr(model.get_submodule(todo[0][0].attention), "config", None) if todo else None
    if config is not None:
        after = {b.name: b for b in find_blocks(model)}
        config.layer_heads = [after[b.name].heads for b in found.values()]
        config.layer_intermediate_sizes = [after[b.name].width for b in found.values()]
    return model


register_method(Method("prune_heads", build_heads, (nn.Module,), kind="step",
                       description="remove attention heads and FFN hidden units of transformer blocks"))


def head_rows(original: nn.Module, compressed: nn.Module, plan) -> list[dict]:
    """``[{"block", "heads_before", "heads_after", "ffn_before", "ffn_after", "linear_params_before",
    "linear_params_after"}]`` of every ``prune_heads`` step, read from the built models."""
    before = {b.name: b for b in find_blocks(original)}
    after = {b.name: b for b in find_blocks(compressed)}
    rows = []
    for step in plan.steps:
        if step.method != "prune_heads":
            continue
        for name in step["blocks"]:
            b, a = before[name], after[name]
            rows.append({"block": name, "heads_before": b.heads, "heads_after": a.heads, "ffn_before": b.width,
                         "ffn_after": a.width, "linear_params_before": linear_params(original, b),
                         "linear_params_after": linear_params(compressed, a)})
    return rows
