"""The engine's SVD factors of each layer, computed once and sliced at any rank."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workbench.inventory import get_submodule, weight_matrix
from workbench.svd_cache import cached_svd


@dataclass
class _Factors:
    u: torch.Tensor        # (m, k)
    s: torch.Tensor        # (k,)
    vh: torch.Tensor       # (k, n)
    valid_rank: int        # ranks 1..valid_rank may be sliced
    weight_sq: float       # ||W||_F^2 (exact, also when the SVD is partial)
    randomized: bool


class FactorCache:
    """SVD factors of each layer's weight matrix, computed once.

    ``randomized_min_dim``: layers with ``min(m, n) >= randomized_min_dim`` use
    ``torch.svd_lowrank(q=upto + oversample)`` when an ``upto`` rank is given and is at most a
    quarter of ``min(m, n)``; everything else gets the full SVD (`workbench.kernels.svd.svd`, the
    one `workbench.apply` uses, through the same cache, so the factors are identical).
    """

    def __init__(self, model: nn.Module, randomized_min_dim: int = 1024, oversample: int = 10,
                 niter: int = 4, seed: int = 0):
        self.model = model
        self.randomized_min_dim, self.oversample, self.niter, self.seed = randomized_min_dim, oversample, niter, seed
        self._factors: dict[str, _Factors] = {}
        self._split: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.recomputes = 0

    def get(self, name: str, upto: int | None = None) -> _Factors:
        """Factors of layer ``name`` valid at least up to rank ``upto`` (default: all ranks)."""
        cached = self._factors.get(name)
        if cached is not None and (upto is None and not cached.randomized or
                                   upto is not None and upto <= cached.valid_rank):
            return cached
        if cached is not None:
            self.recomputes += 1
        w = weight_matrix(get_submodule(self.model, name))
        m, n = w.shape
        k = min(m, n)
        weight_sq = float(w.double().pow(2).sum())
        if upto is not None and k >= self.randomized_min_dim and upto + self.oversample <= k // 4:
            # seeded, on the weight's device; the global generators (CPU, and that GPU's) are restored
            with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
                torch.manual_seed(self.seed)
                u, s, v = torch.svd_lowrank(w.double(), q=upto + self.oversample, niter=self.niter)
            result = _Factors(u.to(w.dtype), s.to(w.dtype), v.T.to(w.dtype), upto, weight_sq, True)
        else:
            full = cached_svd(w)
            result = _Factors(full.u, full.s, full.vh, k, weight_sq, False)
        self._factors[name] = result
        self._split.pop(name, None)
        return result

    def factors(self, name: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a: (m, rank), b: (rank, n))`` as `workbench.kernels.svd.SVD.factors` splits them.

        Views of ``u * sqrt(s)`` and ``sqrt(s) * vh``, multiplied out once per layer: element by
        element the same numbers as splitting at each rank, without the work.
        """
        f = self.get(name, upto=rank)
        if name not in self._split:
            root = f.s.sqrt()
            # row-major like the built layer's weights: a view of a column-major factor would run
            # another BLAS path and differ from `workbench.apply`'s layer in the last bits
            self._split[name] = ((f.u * root).contiguous(), (root[:, None] * f.vh).contiguous())
        a, b = self._split[name]
        return a[:, :rank], b[:rank]

    def nbytes(self) -> int:
        tensors = [t for f in self._factors.values() for t in (f.u, f.s, f.vh)]
        tensors += [t for pair in self._split.values() for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors)
