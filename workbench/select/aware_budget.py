"""Rank allocation for activation-aware SVD under one parameter budget for all chosen layers.

Instead of the same kept ratio in every layer, keep the TOTAL at ``ratio`` of the chosen layers'
parameters and give ranks where they buy the most output energy. For layer ``l`` with whitened
singular values ``sigma_l`` (the SVD of ``W S``, ``S S^T = X^T X``; `kernels.aware.aware_decomposition`)
the output error of rank ``r`` is ``sum_{i>r} sigma_{l,i}^2``, relative to its output energy
``sum_i sigma_{l,i}^2 = ||W X^T||^2``, times a per-layer weight. Each rank unit costs ``m + n``
parameters. The errors are convex in ``r`` (sigma sorted), so taking singular directions in
decreasing order of ``weight * sigma_{l,i}^2 / (||W X^T||^2 (m + n))`` until the budget is spent
is optimal for the summed weighted errors (exactly when every layer has the same ``m + n``, else up
to the last rank unit that no longer fits). Ranks are capped at the breakeven rank.

Weights (``weigh``): ``"energy"``, all 1 (relative output errors summed); ``"sensitivity"``, each
layer's measured loss per unit of relative output error: the layer alone at the uniform-ratio
rank, ``1 - cosine`` of the model's outputs to the original's on calibration samples (never the
evaluation data), divided by the relative error its spectrum predicts (`probe_sensitivity`).
Layers whose errors the network damps (MiniLM's query/key) then give ranks to those it passes on
(attention output, FFN).

``"measured"`` (the default) drops the spectrum model: each layer gets a few candidate ranks
(fractions of its breakeven rank) and the option to stay dense, each candidate's loss is measured
alone on the calibration probe (`measured_options`), and one option per layer is chosen by the
multiple-choice knapsack of `workbench.select._allocate.convex_picks` (exact MILP with HiGHS).
Keeping the most sensitive layers dense is what the other two rules cannot do: their ranks stop
at the breakeven rank, half the rank of a square matrix.
"""
from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workbench.auto_stages import find_stages, per_sample
from workbench.errors import WorkbenchError
from workbench.hooks import feed_layers
from workbench.inventory import matrix_layers
from workbench.kernels import aware as aware_kernels
from workbench.kernels import svd as svd_kernels
from workbench.plan import LayerPlan, Plan
from workbench.select._allocate import OptionTable, convex_picks

EXAMPLE = 2  # probe samples the automatic stage cut is checked on


def layer_grams(model: nn.Module, names: Sequence[str], inputs: torch.Tensor,
                batch_size: int = 64) -> dict[str, tuple[torch.Tensor, int]]:
    """``{name: (X^T X (in, in) float64, tokens)}`` of each Linear's inputs, without storing X."""

    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise WorkbenchError(f"layer {name!r} is {type(module).__name__}; aware rank allocation handles Linear")
    grams: dict[str, list] = {}

    def accumulate(name: str, module: nn.Module, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        entry = grams.setdefault(name, [torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device), 0])
        entry[0] += aware_kernels.gram(x)
        entry[1] += len(x)

    feed_layers(model, list(names), inputs, accumulate, batch_size)
    return {name: (g, n) for name, (g, n) in grams.items()}


def allocate_ranks(spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
                   ratio: float, scales: dict[str, float] | None = None) -> dict[str, int]:
    """Ranks ``{name: r >= 1}`` with ``sum r (m + n) <= ratio * sum m n`` maximising kept energy.

    ``spectra``: each layer's whitened singular values ``(k,)`` (descending); ``shapes``: ``(m, n)``.
    ``scales``: the loss of discarding the layer's whole output energy (default 1 for every
    layer: the summed relative output errors are minimised).
    """
    svd_kernels.check_fraction(ratio, "ratio")
    budget = ratio * sum(m * n for m, n in shapes.values())
    ranks = {name: 1 for name in spectra}
    spent = sum(m + n for m, n in shapes.values())
    if spent > budget:
        raise WorkbenchError(f"ratio={ratio:g} is below the rank-1 minimum "
                             f"{spent / (budget / ratio):.4f} of these layers")
    candidates = []
    for name, sig in spectra.items():
        m, n = shapes[name]
        energy = sig.double().pow(2)
        relative = energy / energy.sum().clamp(min=1e-300) * (1.0 if scales is None else scales[name])
        cap = max(1, svd_kernels.breakeven_rank((m, n)))
        for i in range(1, min(cap, len(sig))):
            candidates.append((float(relative[i]) / (m + n), name, i + 1))
    candidates.sort(key=lambda c: -c[0])
    for _, name, rank in candidates:     # within a layer, in rank order (values descending)
        m, n = shapes[name]
        if rank == ranks[name] + 1 and spent + m + n <= budget:
            ranks[name], spent = rank, spent + m + n
    return ranks


def _decomposition(weight: torch.Tensor, g: torch.Tensor, tokens: int, mode: str):
    """`aware_decomposition` with the SVD in float32: only used to choose ranks (and probe),
    the factors themselves are computed in float64 when the plan is applied."""
    if mode != "whiten":
        return aware_kernels.aware_decomposition(weight, g, tokens, mode)
    s = aware_kernels.whitening_factor(g).float()
    u, sig, vh = torch.linalg.svd(weight.detach().float() @ s, full_matrices=False)
    return u, sig, torch.linalg.solve_triangular(s.T, vh.T, upper=True).T


def _probe_run(model: nn.Module, inputs: torch.Tensor) -> tuple[list, list, torch.Tensor]:
    """``(stages, entering, reference)``: the stages `find_stages` gives on the first inputs,
    ``entering[i]`` the input of stage ``i`` on ``inputs`` (original weights), and the model's
    output as `per_sample` rows ``(n, features)``."""
    stages = find_stages(model, inputs[:EXAMPLE]).stages
    entering = [inputs]
    for stage in stages:
        entering.append(stage.run(model, entering[-1]))
    return stages, entering, per_sample(entering[-1])


def _rerun(model: nn.Module, stages: list, entering: list, name: str) -> torch.Tensor:
    """The model's output rows ``(n, features)``, re-run from the stage owning layer ``name``
    (from the first stage when none owns it)."""
    first = next((i for i, stage in enumerate(stages) if stage.owns(name)), 0)
    x = entering[first]
    for stage in stages[first:]:
        x = stage.run(model, x)
    return per_sample(x)


@torch.no_grad()
def probe_sensitivity(model: nn.Module, inputs: torch.Tensor, decompositions: dict, ranks: dict[str, int]
                      ) -> dict[str, float]:
    """``{name: loss per unit of relative output error}`` measured one layer at a time.

    Each layer alone gets its rank-``ranks[name]`` aware approximation (the dense product, swapped
    in for the measurement only); the loss is ``1 - mean cosine`` (`per_sample` rows of the outputs) of
    the model's outputs on ``inputs`` to the original's, divided by the relative output error
    ``tail(r) / total`` the whitened spectrum predicts. ``decompositions``: ``{name: (u, sig, bt)}``.
    """
    stages, entering, reference = _probe_run(model, inputs)
    scales = {}
    for name, (u, sig, bt) in decompositions.items():
        module = model.get_submodule(name)
        saved = module.weight.data
        r = ranks[name]
        module.weight.data = ((u[:, :r] * sig[:r]) @ bt[:r]).to(saved.dtype)
        try:
            loss = 1.0 - float(F.cosine_similarity(_rerun(model, stages, entering, name), reference, dim=-1).mean())
        finally:
            module.weight.data = saved
        energy = sig.double().pow(2)
        predicted = float(energy[r:].sum() / energy.sum().clamp(min=1e-300))
        scales[name] = max(loss, 0.0) / max(predicted, 1e-12)
    return scales


MEASURED_FRACTIONS = (0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0)


@torch.no_grad()
def measured_options(model: nn.Module, inputs: torch.Tensor, decompositions: dict,
                     fractions: Sequence[float] = MEASURED_FRACTIONS):
    """`workbench.select._allocate.OptionTable` of each layer: dense (index 0), then the ranks
    ``max(1, int(f * breakeven))`` for ``f`` in ``fractions``; costs in weights, losses
    ``1 - mean cosine`` of the model's outputs on ``inputs`` with that layer alone truncated
    (the dense product swapped in for the measurement; `probe_sensitivity` does the same)."""
    stages, entering, reference = _probe_run(model, inputs)
    names, choices, costs, losses = [], [], [], []
    for name, (u, sig, bt) in decompositions.items():
        module = model.get_submodule(name)
        m, n = module.weight.shape
        ranks = sorted({max(1, int(f * svd_kernels.breakeven_rank((m, n)))) for f in fractions})
        saved, row_loss = module.weight.data, [0.0]
        try:
            for r in ranks:
                module.weight.data = ((u[:, :r] * sig[:r]) @ bt[:r]).to(saved.dtype)
                x = _rerun(model, stages, entering, name)
                row_loss.append(max(0.0, 1.0 - float(F.cosine_similarity(x, reference).mean())))
        finally:
            module.weight.data = saved
        names.append(name)
        choices.append([None] + [LayerPlan("svd_aware", {"rank": r}) for r in ranks])
        costs.append(np.array([m * n] + [r * (m + n) for r in ranks], dtype=float))
        losses.append(np.array(row_loss))
    total = float(sum(c[0] for c in costs))
    return OptionTable(names, choices, costs, losses, fixed=0.0, total=total)


def allocated_plan(model: nn.Module, calibration_inputs: torch.Tensor, ratio: float, *,
                   mode: str = "whiten", layers: Sequence[str] | None = None,
                   sequential: bool = False, refit: bool = True, weigh: str = "measured",
                   probe_samples: int = 64) -> Plan:
    """An ``svd_aware`` plan whose ranks share one budget: ``ratio`` of the layers' weights.

    ``layers``: Linear layer names (default: every Linear); ``mode``: "whiten" | "scale" (the
    spectra and the factors); ``sequential``/``refit``: as in the ``svd`` recipe; ``weigh``:
    "measured" (default; layers may stay dense, and are then left out of the plan),
    "sensitivity" or "energy" (see the module doc); ``probe_samples``: calibration samples
    (the last ones) the losses are measured on.
    """
    infos = {info.name: info for info in matrix_layers(model) if info.kind == "linear"}
    names = list(layers) if layers is not None else list(infos)
    unknown = [n for n in names if n not in infos]
    if unknown:
        raise WorkbenchError(f"layers {unknown} are not Linear layers of the model; choose from: {', '.join(infos)}")
    grams = layer_grams(model, names, calibration_inputs)
    spectra, shapes, decompositions = {}, {}, {}
    for name in names:
        weight = model.get_submodule(name).weight
        g, tokens = grams[name]
        decompositions[name] = _decomposition(weight, g, tokens, mode)
        spectra[name], shapes[name] = decompositions[name][1], tuple(weight.shape)
    if weigh not in ("measured", "sensitivity", "energy"):
        raise WorkbenchError(f"weigh={weigh!r} is not a rule; use 'measured', 'sensitivity' or 'energy'")
    extra = {"aware": mode}
    if sequential:
        extra.update(sequential=True, refit=bool(refit))
    if weigh == "measured":

        svd_kernels.check_fraction(ratio, "ratio")
        table = measured_options(copy.deepcopy(model).eval(), calibration_inputs[-probe_samples:], decompositions)
        smallest = table.smallest() / table.total
        if ratio < smallest:
            raise WorkbenchError(f"ratio={ratio:g} is below the smallest option mix {smallest:.4f} of these layers")
        picks, _ = convex_picks(table, ratio * table.total)
        chosen = {name: options[k] for name, options, k in zip(table.layers, table.choices, picks)}
        return Plan({name: LayerPlan("svd_aware", {"rank": choice["rank"], **extra})
                     for name, choice in chosen.items() if choice is not None})
    scales = None
    if weigh == "sensitivity":
        probe = {n: max(1, svd_kernels.rank_for_ratio(shapes[n], ratio)) for n in names}
        scales = probe_sensitivity(copy.deepcopy(model).eval(), calibration_inputs[-probe_samples:],
                                   decompositions, probe)
    ranks = allocate_ranks(spectra, shapes, ratio, scales)
    return Plan({name: LayerPlan("svd_aware", {"rank": ranks[name], **extra}) for name in names})
