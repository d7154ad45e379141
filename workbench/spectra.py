"""Singular-value spectra of every compressible layer (SVDs from the one cache, `workbench.svd_cache`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workbench.inventory import matrix_layers, weight_matrix
from workbench.kernels import svd as svd_kernels
from workbench.svd_cache import cached_svd

@dataclass(frozen=True)
class Spectrum:
    """Spectrum of one layer's ``(out, in)`` matrix.

    ``singular_values: (k,)`` descending, ``energy: (k,)`` cumulative sigma^2 fraction,
    ``effective_rank``: entropy effective rank, ``breakeven_rank``: the largest rank that saves weights.
    """

    name: str
    kind: str
    shape: tuple[int, int]
    singular_values: torch.Tensor
    energy: torch.Tensor
    effective_rank: float
    breakeven_rank: int

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape),
                "singular_values": [float(v) for v in self.singular_values],
                "effective_rank": self.effective_rank, "breakeven_rank": self.breakeven_rank}


def layer_svd(module: nn.Module) -> svd_kernels.SVD:
    """The thin SVD of ``module``'s weight matrix ``(out, in)`` (conv: ``(out, in*kh*kw)``), cached by content."""
    return cached_svd(weight_matrix(module))


def model_spectra(model: nn.Module) -> list[Spectrum]:
    """`Spectrum` of every Linear / ungrouped Conv2d in ``model``, in module order."""
    spectra = []
    for info in matrix_layers(model):
        s = layer_svd(model.get_submodule(info.name)).s
        spectra.append(Spectrum(info.name, info.kind, info.shape, s, svd_kernels.energy(s),
                                svd_kernels.effective_rank(s), svd_kernels.breakeven_rank(info.shape)))
    return spectra
