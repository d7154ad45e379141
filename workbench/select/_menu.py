"""Per-layer option menus across compression families, each option with its exact cost and a loss.

A *family* is a way to compress one layer (``FAMILIES``): round-to-nearest b-bit codes
(``quant``), k-means codebooks (``kmeans``), error-compensated codes (``gptq``, columns in act
order: same storage, lower error), truncated SVD
(``svd``), activation-aware SVD (``svd_aware``), SVD factors in b-bit codes (``svd_quant``), fp32
factors plus a b-bit residual (``svd_residual``), magnitude pruning into sparse storage
(``prune``); and for embedding tables, row-wise b-bit codes (``quant_embedding``, with
``include_embeddings``). `family_options` gives a small default grid of settings per family and layer.

`build_menu` builds every option of every layer through the engine (`workbench.engine.Engine`,
whose factor cache the SVD families share) and records, per option:

* its exact cost: ``params``, ``bytes`` (state-dict tensor payload, each tied tensor once) and
  ``flops`` of one sample, as the engine sizes a choice (`Engine.layer_size`), so the applied
  model's cost is the sum of its layers' costs exactly;
* its loss: ``loss="proxy"`` (default): the relative output error of that layer alone on its
  calibration inputs ``X``, ``||f_hat(X) - f(X)||^2 / ||X W^T||^2`` (bias excluded from the
  denominator; a conv's output maps likewise). For a Linear it is computed from the cached Gram
  ``H = X^T X`` (`gram_output_error`: ``trace(D H D^T) / trace(W H W^T)``, ``D = W_hat - W``; the
  same number, without running every option on every calibration token). It needs no forward pass of the model, but it is a
  PROXY: it ignores how errors propagate and how much each layer matters to the metric.
  ``loss="sensitivity"``: the measured loss of quality (metric's direction, clipped at 0) with that
  layer alone compressed, on the validation split (`selection_task`: the task's held-out split, or
  samples of the training data; one incremental engine evaluation per option).
  ``loss="weighted"``: the proxy, scaled per layer by how much that layer matters to the metric
  (`layer_weights`): ``w_l = measured loss at a reference option / proxy of that option`` (the
  reference: `REFERENCE_BITS`-bit round-to-nearest codes per channel; one evaluation per layer,
  not per option). The proxy ranks a layer's options, the measurement ranks the layers: on
  MiniLM the FFN output layers matter ~100x more than the attention projections per unit of
  relative error, which the plain proxy cannot see.

Options the method refuses for a layer (a type it does not take, a rank above break-even, a group
size that does not divide the width) are left out and counted in ``JointMenu.refused``. Layers of
tied groups (a table tied to an LM head included) are not offered: they stay dense.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.adapters import canonical, matrix_kind
from workbench.engine import Engine
from workbench.errors import WorkbenchError
from workbench.inventory import embedding_units, get_submodule
from workbench.plan import LayerPlan, Plan
from workbench.select._sensitivity import COSTS, quality_loss, selection_task
from workbench.svd_cache import cached_gram
from workbench.zoo.task import Task

FAMILIES = ("quant", "kmeans", "gptq", "svd", "svd_aware", "svd_quant", "svd_residual", "prune", "quant_embedding")
#: What ``families=None`` offers: all but k-means, whose per-channel codebooks are ~50x slower to
#: fit than the rest of the menu together (name it to have it), and the embedding family (offered
#: with ``include_embeddings``).
DEFAULT_FAMILIES = tuple(f for f in FAMILIES if f not in ("kmeans", "quant_embedding"))
EMBEDDING_BITS = (2, 3, 4, 8)
LOSSES = ("proxy", "sensitivity", "weighted")
#: Bits of the reference option `layer_weights` measures each layer at.
REFERENCE_BITS = 3
#: A layer's measured loss is floored at this share of the largest one (no layer weighs nothing).
WEIGHT_FLOOR = 0.01
QUANT_BITS = (2, 3, 4, 8)
KMEANS_BITS = (2, 3, 4)
GROUP_SIZES = (128,)
#: svd / svd_aware ranks: fractions of the fp32 break-even rank ``out * in // (out + in)``.
RANK_FRACTIONS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75)
#: svd_quant ranks (fractions of ``min(out, in)``) and bits; svd_residual ranks and residual bits.
QUANT_RANK_FRACTIONS, QUANT_RANK_BITS = (0.05, 0.1, 0.25, 0.5), (4, 8)
RESIDUAL_RANK_FRACTIONS, RESIDUAL_BITS = (0.02, 0.05, 0.1), (2, 3)
#: prune: kept fraction of the weights (0.5, 0.25, 0.1: 50%, 75%, 90% pruned).
PRUNE_KEPT = (0.5, 0.25, 0.1)
#: Tie-break added to each option's loss per unit of its layer's cost saved (as `_allocate`): among
#: options predicted equally good the larger one wins.
TIE_BREAK = 1e-6


def check_families(families: Sequence[str] | None) -> tuple[str, ...]:
    """``families`` checked (None: ``DEFAULT_FAMILIES``), in the given order, duplicates dropped."""
    if families is None:
        return DEFAULT_FAMILIES
    if isinstance(families, str):
        families = [f for f in families.split(",") if f]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise WorkbenchError(f"families={list(families)!r}: {', '.join(map(repr, unknown)) or 'none given'} "
                             f"not known; families are: {', '.join(FAMILIES)}")
    return tuple(dict.fromkeys(families))


def _ranks(fractions: Sequence[float], of: int) -> list[int]:
    return sorted({max(1, int(round(f * of))) for f in fractions}, reverse=True)


def family_options(family: str, module: nn.Module) -> list[LayerPlan]:
    """The default grid of ``family``'s settings for ``module`` (weight ``(out, in)``; a conv's
    ``in`` = in_channels x kernel). Settings the layer cannot take are left to the method's check."""
    if isinstance(module, nn.Embedding) != (family == "quant_embedding"):
        return []  # tables take quant_embedding only, and only tables take it
    weight = canonical(module).weight
    out, width = weight.shape[0], weight[0].numel()
    if family == "quant_embedding":
        return [LayerPlan("quant_embedding", {"bits": b}) for b in EMBEDDING_BITS]
    if family == "quant":
        return [LayerPlan("quant", {"bits": b, "scheme": "uniform", "per_channel": True, "asymmetric": True})
                for b in QUANT_BITS]
    if family == "kmeans":
        return [LayerPlan("quant", {"bits": b, "scheme": "kmeans", "per_channel": True, "seed": 0})
                for b in KMEANS_BITS]
    if family == "gptq":
        groups = [None, *(g for g in GROUP_SIZES if width % g == 0 and width > g)]
        return [LayerPlan("gptq", {"bits": b, "act_order": True} if g is None
                          else {"bits": b, "group_size": g, "act_order": True})
                for b in QUANT_BITS for g in groups]
    if family in ("svd", "svd_aware"):
        return [LayerPlan(family, {"rank": r}) for r in _ranks(RANK_FRACTIONS, out * width // (out + width))]
    if family == "svd_quant":
        return [LayerPlan("svd_quant", {"rank": r, "bits": b}) for b in QUANT_RANK_BITS
                for r in _ranks(QUANT_RANK_FRACTIONS, min(out, width))]
    if family == "svd_residual":
        return [LayerPlan("svd_residual", {"rank": r, "bits": b}) for b in RESIDUAL_BITS
                for r in _ranks(RESIDUAL_RANK_FRACTIONS, min(out, width))]
    if family == "prune":
        return [LayerPlan("prune", {"ratio": k}) for k in PRUNE_KEPT]
    raise WorkbenchError(f"family {family!r} is not one of {', '.join(FAMILIES)}")


@dataclass
class JointMenu:
    """Every layer's options: index 0 is the dense layer (choice None, family "dense").

    ``costs[by][l][k]``: cost of option k of layer l in ``by`` units (``COSTS``: stored weights,
    state-dict payload bytes, FLOPs of one sample); ``losses[l][k]``: its predicted loss
    (``loss``: "proxy" relative output error or measured "sensitivity"); ``fixed[by]``: the cost
    of everything that is not a candidate layer; ``total[by]``: the original model's cost.
    """

    layers: list[str]
    choices: list[list[LayerPlan | None]]
    families: list[list[str]]
    costs: dict[str, list[np.ndarray]]
    losses: list[np.ndarray]
    fixed: dict[str, float]
    total: dict[str, float]
    loss: str
    refused: dict[str, int] = field(default_factory=dict)
    weights: list[float] | None = None  # loss="weighted": each layer's `layer_weights` factor

    def dense_cost(self, by: str) -> float:
        """Cost in ``by`` of the candidate layers left dense."""
        return float(sum(c[0] for c in self.costs[by]))


@torch.no_grad()
def gram_output_error(original: nn.Module, replacement: nn.Module, gram: torch.Tensor) -> float:
    """`output_error` of an affine ``replacement`` of the Linear ``original`` from the inputs' Gram
    ``gram: (in, in)`` (float64): ``trace(D H D^T) / trace(W H W^T)`` with ``W: (out, in)`` and
    ``D = W_hat - W``, ``W_hat^T = replacement(I) - replacement(0)`` (any bias cancels)."""
    weight = canonical(original).weight.detach().double()
    probe = torch.cat([torch.zeros(1, weight.shape[1]), torch.eye(weight.shape[1])]).to(canonical(original).weight)
    responses = replacement(probe).double()
    d = (responses[1:] - responses[:1]).T - weight
    energy = float(((weight @ gram) * weight).sum())
    return float(((d @ gram) * d).sum()) / energy if energy > 0 else 0.0


@torch.no_grad()
def output_error(original: nn.Module, replacement: nn.Module, x: torch.Tensor) -> float:
    """``||replacement(x) - original(x)||^2 / ||original(x) - bias||^2`` (0 when the denominator is)."""
    reference = original(x)
    bias = getattr(canonical(original), "bias", None)
    signal = reference
    if bias is not None:
        signal = reference - (bias.view(1, -1, 1, 1) if isinstance(original, nn.Conv2d) else bias)
    energy = float(signal.double().pow(2).sum())
    error = float((replacement(x) - reference).double().pow(2).sum())
    return error / energy if energy > 0 else 0.0


def _proxy_function(engine: Engine):
    def proxy(name: str, choice: LayerPlan) -> float:
        original, x = get_submodule(engine.original, name), engine.calibration_inputs(name)
        if matrix_kind(original) == "linear" and x.dim() == 2:
            return gram_output_error(original, engine.built_layer(name, choice), cached_gram(x))
        return output_error(original, engine.built_layer(name, choice), x)
    return proxy


def _measured_function(engine: Engine, task: Task):
    judge = Engine(selection_task(task, "validation"), preview=False, freeze_gc=False,
                   calibration_samples=engine.calibration_samples)
    baseline = judge.base["metric"]

    def measured(name: str, choice: LayerPlan) -> float:
        value = judge.evaluate(Plan({name: choice}))["metric"]
        drop = quality_loss(baseline, value, task.higher_is_better)
        return max(0.0, drop) if math.isfinite(drop) else math.inf
    return measured


def reference_option(module: nn.Module) -> LayerPlan:
    """The option `layer_weights` measures a layer at: `REFERENCE_BITS`-bit codes (a table's rows,
    or a matrix's output channels, each on its own asymmetric grid)."""
    if isinstance(module, nn.Embedding):
        return LayerPlan("quant_embedding", {"bits": REFERENCE_BITS})
    return LayerPlan("quant", {"bits": REFERENCE_BITS, "scheme": "uniform", "per_channel": True, "asymmetric": True})


def layer_weights(engine: Engine, task: Task, names: Sequence[str], proxy=None, measured=None) -> list[float]:
    """Per layer, ``w = max(drop, WEIGHT_FLOOR * largest drop) / proxy`` at its `reference_option`:
    the measured loss of quality with that layer alone at the reference (validation split, metric's
    direction) per unit of its proxy. A layer the reference cannot be built for, or whose proxy is
    0, gets the median of the others; all drops 0 (the metric blind at the reference): all 1."""
    proxy = proxy or _proxy_function(engine)
    measured = measured or _measured_function(engine, task)
    drops, proxies = [], []
    for name in names:
        reference = reference_option(get_submodule(engine.original, name))
        try:
            proxies.append(proxy(name, reference))
            drops.append(measured(name, reference))
        except WorkbenchError:
            proxies.append(0.0)
            drops.append(0.0)
    finite = [d for d in drops if math.isfinite(d)]
    largest = max(finite, default=0.0)
    if largest <= 0:
        return [1.0] * len(names)
    drops = [largest if not math.isfinite(d) else max(d, WEIGHT_FLOOR * largest) for d in drops]
    weights = [d / p if p > 0 else math.nan for d, p in zip(drops, proxies)]
    known = [w for w in weights if math.isfinite(w)]
    fill = float(np.median(known)) if known else 1.0
    return [w if math.isfinite(w) else fill for w in weights]


def weight_menu(menu: JointMenu, weights: Sequence[float]) -> JointMenu:
    """A copy of a proxy ``menu`` with layer l's losses times ``weights[l]`` (`layer_weights`): ``loss="weighted"``."""
    return replace(menu, losses=[values * w for values, w in zip(menu.losses, weights)], weights=list(weights),
                   loss="weighted")


def _loss_function(engine: Engine, task: Task, loss: str):
    return _measured_function(engine, task) if loss == "sensitivity" else _proxy_function(engine)


def build_menu(task: Task, families: Sequence[str] | None = None, *, layers: Sequence[str] | None = None,
               loss: str = "proxy", engine: Engine | None = None,
               extra: Mapping[str, Sequence[LayerPlan | None]] | None = None,
               include_embeddings: bool = False, progress: bool = False) -> JointMenu:
    """Every option of ``families`` for every candidate layer, built, sized and scored.

    Parameters
    ----------
    task : model, data and metric; ``task.model`` is never modified.
    families : names from ``FAMILIES`` (None: ``DEFAULT_FAMILIES``, all but k-means).
    layers : candidate layers (default: every matrix layer the engine sees, tied ones excluded).
    loss : "proxy" (relative output error on calibration inputs), "sensitivity" (measured per
        option) or "weighted" (the proxy scaled by each layer's measured weight, `layer_weights`).
    engine : an `Engine` on ``task`` to reuse (its factor and build caches).
    extra : ``{layer: [choice, ...]}`` added to those layers' menus (pins), family "pinned".
    include_embeddings : also offer the model's embedding tables (untied ones; family
        ``quant_embedding``, added to ``families``), after the matrix layers.
    progress : a tqdm bar over the layers.
    """
    families = check_families(families)
    if loss not in LOSSES:
        raise WorkbenchError(f"loss={loss!r} must be one of {', '.join(LOSSES)}")
    if loss != "proxy":
        selection_task(task, "validation")  # a task without a split to measure on: its error before any build
    engine = engine or Engine(task, preview=False, freeze_gc=False)
    tied = {name for group in engine.tied_groups for name in group}
    names = [n for n in engine.layers if n not in tied] if layers is None else list(layers)
    for name in names:
        engine.layer_info(name)  # an unknown layer: the engine's error listing the layers
    if include_embeddings:
        families = tuple(dict.fromkeys([*families, "quant_embedding"]))
        names += [unit[0] for unit, _ in embedding_units(engine.original)[0] if len(unit) == 1 and unit[0] not in names]
    engine.collect_calibration(names)  # one forward pass for every layer's calibration inputs
    score = _loss_function(engine, task, loss)
    extra = extra or {}
    menu = JointMenu(names, [], [], {by: [] for by in COSTS}, [], {}, {by: float(engine.base[by]) for by in COSTS},
                     loss)
    for name in tqdm(names, desc="menu", disable=not progress, leave=False):
        module = get_submodule(engine.original, name)
        dense = engine.layer_size(name, None)
        row: list[tuple[LayerPlan | None, str]] = [(None, "dense")]
        row += [(c, "pinned") for c in extra.get(name, ()) if c is not None]
        for family in families:
            row += [(c, family) for c in family_options(family, module)]
        choices, fams, sizes, losses = [], [], [], []
        for choice, family in row:
            if any(choice == c for c in choices):
                continue
            try:
                delta = (0, 0, 0) if choice is None else engine.layer_size(name, choice)
                value = 0.0 if choice is None else score(name, choice)
            except WorkbenchError:
                if family == "pinned":
                    raise
                menu.refused[family] = menu.refused.get(family, 0) + 1
                continue
            choices.append(choice)
            fams.append(family)
            sizes.append([d + e for d, e in zip(dense, delta)])
            losses.append(value)
        menu.choices.append(choices)
        menu.families.append(fams)
        for i, by in enumerate(COSTS):
            menu.costs[by].append(np.array([float(s[i]) for s in sizes]))
        menu.losses.append(np.array(losses, dtype=float))
    menu.fixed = {by: menu.total[by] - menu.dense_cost(by) for by in COSTS}
    return weight_menu(menu, layer_weights(engine, task, names, proxy=score)) if loss == "weighted" else menu
