"""Output errors of every rank of a layer's truncated SVD, from one product per layer.

With ``W = U S V^T``, ``||X (W - W_r)^T||_F^2 = sum_{j >= r} s_j^2 ||X v_j||^2`` (U has orthonormal
columns), so one product ``X V`` per layer gives every rank's output error: the engine's O(1)
``preview(layer, rank)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workbench.engine.factors import FactorCache
from workbench.inventory import weight_matrix


@torch.no_grad()
def output_error_tails(model: nn.Module, inputs: dict[str, torch.Tensor],
                       factors: FactorCache) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (tail, total)}``: ``tail[r] = ||X (W - W_r)^T||_F^2`` for every rank r (float64,
    ``(k,)``) and ``total = ||X W^T||_F^2``, for each layer of ``inputs`` (``{name: X}``; Linear:
    ``(tokens, in)``, Conv2d: ``(n, c, h, w)``). ``inputs`` is emptied as it goes (memory)."""
    tails = {}
    for name in list(inputs):
        module = model.get_submodule(name)
        x = inputs.pop(name).double()
        f = factors.get(name)
        if isinstance(module, nn.Conv2d):
            # patches projected on each right singular vector = a conv with the v_j as kernels
            def project(kernels: torch.Tensor) -> torch.Tensor:
                return F.conv2d(x, kernels.reshape(-1, *module.weight.shape[1:]), None, module.stride,
                                module.padding, module.dilation)
            col_sq = project(f.vh.double()).pow(2).sum((0, 2, 3))          # (k,) ||X v_j||^2
            total = project(weight_matrix(module).double()).pow(2).sum()
        else:
            col_sq = (x @ f.vh.double().T).pow(2).sum(0)                   # (k,) ||X v_j||^2
            total = (x @ weight_matrix(module).double().T).pow(2).sum()
        weighted = f.s.double().pow(2) * col_sq                            # (k,)
        tail = weighted.flip(0).cumsum(0).flip(0)                          # tail[r] = sum_{j>=r}
        tails[name] = (tail, total.clamp_min(1e-300))
    return tails
