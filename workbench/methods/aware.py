"""``svd_aware``: activation-aware truncated SVD (whitening or diagonal scaling) for Linear/Conv2d.

Settings: ``rank`` (int), ``aware`` ("whiten" | "scale"), optional ``ridge`` (whiten) and ``alpha``
(scale). The layer's calibration inputs come from ``apply(..., calibration_inputs=...)``. The result
is the same real factorized layer as plain ``svd`` (`LowRankLinear` / `LowRankConv2d`), only the
factors differ. The ``svd`` recipe emits this method when given ``activation_aware=...``
(CLI: ``--method svd --activation-aware whiten|scale``).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.kernels import aware as aware_kernels
from workbench.layers.lowrank import LowRankConv2d, LowRankLinear
from workbench.registry import LayerContext, Method, register_method


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
    if isinstance(module, nn.Linear):
        x = context.inputs.reshape(-1, context.inputs.shape[-1])
        factors = aware_kernels.aware_factors(module.weight, rank, x=x, **options)
        return LowRankLinear.from_linear(module, rank, factors=factors, name=context.name)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise UnsupportedLayerError(
                f"layer {context.name!r} is a grouped conv (groups={module.groups}); SVD needs groups=1")
        matrix = module.weight.reshape(module.out_channels, -1)
        factors = aware_kernels.aware_factors(matrix, rank, x=conv_patches(module, context.inputs), **options)
        return LowRankConv2d.from_conv(module, rank, factors=factors, name=context.name)
    raise UnsupportedLayerError(f"svd_aware handles Linear and Conv2d; layer {context.name!r} is "
                                f"{type(module).__name__}")


register_method(Method("svd_aware", build_svd_aware, (nn.Linear, nn.Conv2d), needs_inputs=True,
                       description="activation-aware truncated SVD (whiten: Cholesky of X^T X; "
                                   "scale: diagonal rms) into two real factor layers"))
