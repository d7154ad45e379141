"""``svd_aware``: activation-aware truncated SVD (whitening or diagonal scaling) for Linear/Conv2d.

Settings: ``rank`` (int), ``aware`` ("whiten" | "scale"), optional ``ridge`` (whiten) and ``alpha``
(scale). The layer's calibration inputs come from ``apply(..., calibration_inputs=...)``. The result
is the same real factorized layer as plain ``svd`` (`LowRankLinear` / `LowRankConv2d`), only the
factors differ. The ``svd`` recipe emits this method when given ``activation_aware=...``
(CLI: ``--method svd --activation-aware whiten|scale``).

Sequential calibration (`workbench.sequential`): ``"sequential": True`` builds the plan's layers in
forward order, each fitted to its inputs in the model whose earlier layers are already compressed.
``"refit": True`` (with ``sequential``) fits the ORIGINAL layer's outputs from those inputs:
``whiten`` by reduced-rank regression (`kernels.aware.regression_factors`, the exact optimum),
``scale`` by the least-squares second factor given the first (`kernels.aware.refit_second`).
A saved model reloads through `svd_aware_skeleton` (shapes only), with no calibration data.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.kernels import aware as aware_kernels
from workbench.kernels.svd import check_rank
from workbench.layers.lowrank import LowRankConv2d, LowRankLinear
from workbench.registry import LayerContext, Method, register_method
from workbench.svd_cache import cached


def conv_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The conv's input patches ``(n * positions, in * kh * kw)`` for ``x: (n, in, h, w)``."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise UnsupportedLayerError(
            f"svd_aware handles convs with numeric zero padding; got padding={conv.padding!r}, "
            f"padding_mode={conv.padding_mode!r}")
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                    stride=conv.stride)                                   # (n, in*k*k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def build_svd_aware(module: nn.Module, params: Mapping[str, Any], context: LayerContext) -> nn.Module:
    """Replace ``module`` by rank-``params['rank']`` factors fitted to its calibration inputs."""
    rank, mode = params.get("rank"), params.get("aware", "whiten")
    if context.inputs is None:
        raise WorkbenchError(f"svd_aware for layer {context.name!r} needs calibration inputs; "
                             "pass calibration_inputs to workbench.apply")
    options = {"mode": mode, "name": context.name}
    if "ridge" in params:
        options["ridge"] = float(params["ridge"])
    if "alpha" in params:
        options["alpha"] = float(params["alpha"])
    _check_module(module, context.name)
    if isinstance(module, nn.Linear):
        matrix = module.weight

        def rows(x):
            return x.reshape(-1, x.shape[-1])
    else:
        matrix = module.weight.reshape(module.out_channels, -1)

        def rows(x):
            return conv_patches(module, x)
    x = rows(context.inputs)
    if params.get("refit") and context.reference_inputs is not None:
        factors = _refit_factors(matrix, rank, x, rows(context.reference_inputs), options)
    else:
        factors = aware_kernels.factors_at(_basis(matrix, x, options), rank, context.name)
    if isinstance(module, nn.Linear):
        return LowRankLinear.from_linear(module, rank, factors=factors, name=context.name)
    return LowRankConv2d.from_conv(module, rank, factors=factors, name=context.name)


def _basis(matrix: torch.Tensor, x: torch.Tensor, options: dict) -> aware_kernels.AwareBasis:
    """The rank-independent activation-aware basis of ``matrix`` on inputs ``x: (tokens, in)``,
    from the one decomposition cache (a new rank for the same weight and data is a slice)."""
    tokens = aware_kernels.check_inputs(x)
    settings = (options["mode"], options.get("ridge", aware_kernels.DEFAULT_RIDGE),
                options.get("alpha", aware_kernels.DEFAULT_ALPHA))
    return cached("svd_aware", (matrix, x), settings, lambda: aware_kernels.aware_basis(
        matrix, aware_kernels.gram(x), tokens, mode=settings[0], ridge=settings[1], alpha=settings[2],
        name=options["name"]))


def _refit_factors(matrix: torch.Tensor, rank: int, x: torch.Tensor, x_ref: torch.Tensor,
                   options: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors reproducing ``matrix @ x_ref^T`` from inputs ``x`` (both ``(tokens, in)``)."""
    g, cross = aware_kernels.gram(x), aware_kernels.cross_gram(x_ref, x)
    if options["mode"] == "whiten":
        return aware_kernels.regression_factors(matrix, rank, g, cross, ridge=options.get(
            "ridge", aware_kernels.DEFAULT_RIDGE), name=options["name"])
    _, b = aware_kernels.aware_factors(matrix, rank, gram_matrix=g, tokens=len(x), **options)
    return aware_kernels.refit_second(matrix, b, g, cross), b


def _check_module(module: nn.Module, name: str) -> None:
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise UnsupportedLayerError(
            f"layer {name!r} is a grouped conv (groups={module.groups}); SVD needs groups=1")
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise UnsupportedLayerError(f"svd_aware handles Linear and Conv2d; layer {name!r} is "
                                    f"{type(module).__name__}")


def svd_aware_skeleton(module: nn.Module, params: Mapping[str, Any], context: LayerContext) -> nn.Module:
    """The factorized layer's structure only (weights to be loaded from a file): no data needed."""
    _check_module(module, context.name)
    rank = params.get("rank")
    shape = (module.weight.shape[0], module.weight[0].numel())
    check_rank(rank, shape, context.name)
    if isinstance(module, nn.Linear):
        return LowRankLinear(module.in_features, module.out_features, rank, bias=module.bias is not None,
                             dtype=module.weight.dtype)
    return LowRankConv2d(module, rank, dtype=module.weight.dtype)


register_method(Method("svd_aware", build_svd_aware, (nn.Linear, nn.Conv2d), needs_inputs=True,
                       skeleton=svd_aware_skeleton,
                       description="activation-aware truncated SVD (whiten: Cholesky of X^T X; "
                                   "scale: diagonal rms) into two real factor layers"))
