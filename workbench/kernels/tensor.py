"""Tensor decompositions of 4-D convolution kernels: Tucker-2, CP and spatial SVD.

A Conv2d kernel is ``w: (out, in, kh, kw)``. Reshaping it to a matrix (as plain SVD does) mixes
the spatial and channel modes; the decompositions here keep the four modes apart:

* **Tucker-2** (modes out and in only): ``w ≈ core x_0 u_out x_1 u_in`` with
  ``core: (r_out, r_in, kh, kw)``, ``u_out: (out, r_out)``, ``u_in: (in, r_in)``.
  Weights: ``in*r_in + r_out*r_in*kh*kw + r_out*out``.
* **CP** (rank ``R``): ``w[o,i,y,x] ≈ sum_r lam[r] a[o,r] b[i,r] c[y,r] d[x,r]``.
  Weights (lam folded into ``a``): ``R*(out + in + kh + kw)``.
* **Spatial SVD** (rank ``R``): ``w[o,i,y,x] ≈ sum_r v[r,i,y] h[o,r,x]``, i.e. a ``kh x 1`` conv
  to ``R`` channels then a ``1 x kw`` conv; the SVD of ``w`` rearranged to ``(in*kh, out*kw)``.
  Weights: ``R*(in*kh + out*kw)``.

Tucker and CP are computed with TensorLy (NumPy backend, float64) and returned as torch tensors
in the kernel's dtype. Rank estimates (energy of each mode's unfolding, or VBMF) are offered as
starting points for the user's sliders.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from workbench.errors import WorkbenchError
from workbench.kernels import svd as svd_kernels


# --------------------------------------------------------------------------- checks
def check_kernel(w: torch.Tensor) -> tuple[int, int, int, int]:
    """``(out, in, kh, kw)`` of a 4-D kernel; raise `WorkbenchError` for any other shape."""
    if not isinstance(w, torch.Tensor) or w.dim() != 4:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise WorkbenchError(f"a conv kernel must be 4-D (out, in, kh, kw); got {shape}")
    return tuple(int(d) for d in w.shape)


def check_int_rank(value, what: str, limit: int, rule: str, where: str = "") -> int:
    """``value`` as int after checking ``1 <= value <= limit``; the error names ``what`` and ``rule``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise WorkbenchError(f"{what}={value!r}{where} must be an integer between 1 and {rule}={limit}")
    if value < 1:
        raise WorkbenchError(f"{what}={value}{where} must be at least 1 (allowed: 1..{limit})")
    if value > limit:
        raise WorkbenchError(f"{what}={value} is above {rule}={limit}{where}")
    return int(value)


def check_tucker_ranks(shape: tuple[int, ...], ranks: tuple[int, int], name: str = "") -> tuple[int, int]:
    """Validate Tucker-2 ranks ``(r_out, r_in)``: ``1 <= r_out <= out`` and ``1 <= r_in <= in``."""
    where = f" for layer {name!r}" if name else ""
    if not isinstance(ranks, (tuple, list)) or len(ranks) != 2:
        raise WorkbenchError(f"Tucker-2 ranks{where} are a pair (rank_out, rank_in); got {ranks!r}")
    return (check_int_rank(ranks[0], "rank_out", shape[0], "the output-channel mode size", where),
            check_int_rank(ranks[1], "rank_in", shape[1], "the input-channel mode size", where))


def cp_max_rank(shape: tuple[int, ...]) -> int:
    """Upper bound on the CP rank of a tensor of ``shape``: product of all modes but the largest."""
    return math.prod(shape) // max(shape)


def check_cp_rank(shape: tuple[int, ...], rank: int, name: str = "") -> int:
    where = f" for layer {name!r}" if name else ""
    return check_int_rank(rank, "rank", cp_max_rank(shape), "the largest useful CP rank (product of the "
                      "three smallest modes)", where)


def spatial_matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """Shape ``(in*kh, out*kw)`` of the matrix that spatial SVD factorizes."""
    out, inp, kh, kw = shape
    return (inp * kh, out * kw)


def check_spatial_rank(shape: tuple[int, ...], rank: int, name: str = "") -> int:
    where = f" for layer {name!r}" if name else ""
    return check_int_rank(rank, "rank", min(spatial_matrix_shape(shape)), "min(in*kh, out*kw)", where)


# --------------------------------------------------------------------------- parameter counts
def tucker_params(shape: tuple[int, ...], ranks: tuple[int, int]) -> int:
    """Weights of a Tucker-2 layer sequence (bias not included)."""
    out, inp, kh, kw = shape
    r_out, r_in = ranks
    return inp * r_in + r_out * r_in * kh * kw + r_out * out


def cp_params(shape: tuple[int, ...], rank: int) -> int:
    """Weights of a CP layer sequence: ``rank * (out + in + kh + kw)`` (bias not included)."""
    return rank * sum(shape)


def spatial_params(shape: tuple[int, ...], rank: int) -> int:
    """Weights of a spatial-SVD pair: ``rank * (in*kh + out*kw)`` (bias not included)."""
    return rank * sum(spatial_matrix_shape(shape))


# --------------------------------------------------------------------------- decompositions
@dataclass(frozen=True)
class Tucker2:
    """``core: (r_out, r_in, kh, kw)``, ``u_out: (out, r_out)``, ``u_in: (in, r_in)``."""

    core: torch.Tensor
    u_out: torch.Tensor
    u_in: torch.Tensor

    def to_tensor(self) -> torch.Tensor:
        """The reconstructed kernel ``(out, in, kh, kw)``."""
        return torch.einsum("abyx,oa,ib->oiyx", self.core, self.u_out, self.u_in)


@dataclass(frozen=True)
class CP:
    """``out: (out, R)`` (weights lambda folded in), ``inp: (in, R)``, ``h: (kh, R)``, ``w: (kw, R)``."""

    out: torch.Tensor
    inp: torch.Tensor
    h: torch.Tensor
    w: torch.Tensor

    def to_tensor(self) -> torch.Tensor:
        return torch.einsum("or,ir,yr,xr->oiyx", self.out, self.inp, self.h, self.w)


@dataclass(frozen=True)
class SpatialSVD:
    """``vertical: (R, in, kh, 1)``, ``horizontal: (out, R, 1, kw)`` conv weights."""

    vertical: torch.Tensor
    horizontal: torch.Tensor

    def to_tensor(self) -> torch.Tensor:
        return torch.einsum("riy,orx->oiyx", self.vertical[..., 0], self.horizontal[:, :, 0, :])


def _numpy(w: torch.Tensor) -> np.ndarray:
    return w.detach().cpu().double().numpy()


def tucker2(w: torch.Tensor, ranks: tuple[int, int], name: str = "") -> Tucker2:
    """Tucker-2 of ``w: (out, in, kh, kw)`` on the channel modes (HOOI via ``tensorly.partial_tucker``,
    SVD initialisation, so full ranks reproduce ``w`` to float precision)."""
    import tensorly as tl  # noqa: PLC0415 (optional heavy dependency, loaded on first use)
    from tensorly.decomposition import partial_tucker  # noqa: PLC0415 (optional heavy dependency, loaded on first use)

    shape = check_kernel(w)
    r_out, r_in = check_tucker_ranks(shape, ranks, name)
    with tl.backend_context("numpy"):
        (core, factors), _ = partial_tucker(_numpy(w), rank=[r_out, r_in], modes=[0, 1], init="svd",
                                            n_iter_max=100, tol=1e-8)
    as_torch = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device=w.device, dtype=w.dtype)  # noqa: E731
    return Tucker2(as_torch(core), as_torch(factors[0]), as_torch(factors[1]))


def cp(w: torch.Tensor, rank: int, name: str = "", n_iter_max: int = 200, seed: int = 0) -> CP:
    """Rank-``rank`` CP of ``w: (out, in, kh, kw)`` by ALS (``tensorly.parafac``, SVD init, seeded)."""
    import tensorly as tl  # noqa: PLC0415 (optional heavy dependency, loaded on first use)
    from tensorly.decomposition import parafac  # noqa: PLC0415 (optional heavy dependency, loaded on first use)

    shape = check_kernel(w)
    rank = check_cp_rank(shape, rank, name)
    with tl.backend_context("numpy"), warnings.catch_warnings():
        # a CP rank above a mode's size is legal; tensorly's SVD init then warns and pads randomly
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        weights, factors = parafac(_numpy(w), rank=rank, init="svd", n_iter_max=n_iter_max, tol=1e-10,
                                   random_state=seed, normalize_factors=False)
    as_torch = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device=w.device, dtype=w.dtype)  # noqa: E731
    out = factors[0] * np.asarray(weights)[None, :]
    return CP(as_torch(out), as_torch(factors[1]), as_torch(factors[2]), as_torch(factors[3]))


def spatial_svd(w: torch.Tensor, rank: int, name: str = "") -> SpatialSVD:
    """Best (Frobenius) ``kh x 1`` then ``1 x kw`` separation of ``w`` at ``rank`` (Eckart–Young on
    ``w`` rearranged to ``(in*kh, out*kw)``)."""
    out, inp, kh, kw = check_kernel(w)
    rank = check_spatial_rank((out, inp, kh, kw), rank, name)
    matrix = w.detach().permute(1, 2, 0, 3).reshape(inp * kh, out * kw)
    a, b = svd_kernels.truncate(matrix, rank)  # a: (in*kh, R), b: (R, out*kw)
    vertical = a.T.reshape(rank, inp, kh, 1)
    horizontal = b.reshape(rank, out, kw).permute(1, 0, 2).reshape(out, rank, 1, kw)
    return SpatialSVD(vertical.contiguous(), horizontal.contiguous())


# --------------------------------------------------------------------------- rank choice
def unfolding_spectrum(w: torch.Tensor, mode: int) -> torch.Tensor:
    """Singular values of the mode-``mode`` unfolding of ``w`` (``(w.shape[mode], rest)``), descending."""
    check_kernel(w)
    matrix = w.detach().movedim(mode, 0).reshape(w.shape[mode], -1)
    return svd_kernels.singular_values(matrix)


def tucker_ranks_for_energy(w: torch.Tensor, threshold: float) -> tuple[int, int]:
    """``(r_out, r_in)``: per channel mode, the smallest rank keeping ``threshold`` of sigma^2."""
    return (svd_kernels.rank_for_energy(unfolding_spectrum(w, 0), threshold),
            svd_kernels.rank_for_energy(unfolding_spectrum(w, 1), threshold))


def _vbmf_tau(x: np.ndarray, alpha: float) -> np.ndarray:
    return 0.5 * (x - (1 + alpha) + np.sqrt(np.maximum((x - (1 + alpha)) ** 2 - 4 * alpha, 0.0)))


def vbmf_rank(matrix: torch.Tensor) -> int:
    """Rank of ``matrix: (m, n)`` estimated by empirical variational Bayesian matrix factorization
    (EVBMF, Nakajima et al., JMLR 2013): the noise variance is fitted by minimising the free
    energy, and singular values above the resulting threshold are kept. At least 1."""
    from scipy.optimize import minimize_scalar  # noqa: PLC0415 (optional heavy dependency, loaded on first use)

    y = matrix.detach().double()
    if y.shape[0] > y.shape[1]:
        y = y.T
    l_dim, m_dim = y.shape  # l <= m
    s = torch.linalg.svdvals(y).cpu().numpy()
    alpha = l_dim / m_dim
    tau_bar = 2.5129 * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    h_dim = len(s)
    residual = max(float((y ** 2).sum()) - float((s ** 2).sum()), 0.0)
    cut = min(int(math.ceil(l_dim / (1 + alpha))) - 1, h_dim) - 1
    tail = s[cut + 1:] if cut + 1 < h_dim else s[-1:]
    lower = max(float(tail[0] ** 2) / (m_dim * x_bar), float(np.mean(tail ** 2)) / m_dim)
    upper = (float((s ** 2).sum()) + residual) / (l_dim * m_dim)
    if not upper > lower > 0:
        return max(1, int((s > 1e-12 * max(s[0], 1e-300)).sum()))

    def free_energy(sigma2: float) -> float:
        x = s ** 2 / (m_dim * sigma2)
        big, small = x[x > x_bar], x[x <= x_bar]
        tau = _vbmf_tau(big, alpha)
        return float(np.sum(small - np.log(small)) + np.sum(big - tau) + np.sum(np.log((tau + 1) / big))
                     + alpha * np.sum(np.log(tau / alpha + 1)) + residual / (m_dim * sigma2)
                     + (l_dim - h_dim) * np.log(sigma2))

    sigma2 = minimize_scalar(free_energy, bounds=(lower, upper), method="bounded").x
    threshold = math.sqrt(m_dim * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
    return max(1, int((s > threshold).sum()))


def tucker_ranks_vbmf(w: torch.Tensor) -> tuple[int, int]:
    """``(r_out, r_in)`` from VBMF on the output- and input-channel unfoldings of ``w``."""
    check_kernel(w)
    return tuple(vbmf_rank(w.detach().movedim(mode, 0).reshape(w.shape[mode], -1)) for mode in (0, 1))


def tucker_ranks_for_ratio(shape: tuple[int, ...], ratio: float) -> tuple[int, int]:
    """Largest ``(r_out, r_in)``, proportional to ``(out, in)``, whose Tucker-2 weights are at most
    ``ratio`` of the dense ``out*in*kh*kw``."""
    svd_kernels.check_fraction(ratio, "ratio")
    out, inp, kh, kw = shape
    budget = ratio * out * inp * kh * kw
    best = (1, 1)
    for r_out in range(1, out + 1):
        r_in = max(1, min(inp, round(r_out * inp / out)))
        if tucker_params(shape, (r_out, r_in)) <= budget:
            best = (r_out, r_in)
    return best


def cp_rank_for_ratio(shape: tuple[int, ...], ratio: float) -> int:
    """Largest CP rank with ``rank*(out+in+kh+kw) <= ratio * out*in*kh*kw`` (at least 1)."""
    svd_kernels.check_fraction(ratio, "ratio")
    return max(1, min(cp_max_rank(shape), math.floor(ratio * math.prod(shape) / sum(shape))))


def spatial_rank_for_ratio(shape: tuple[int, ...], ratio: float) -> int:
    """Largest spatial-SVD rank with ``rank*(in*kh+out*kw) <= ratio * out*in*kh*kw`` (at least 1)."""
    return svd_kernels.rank_for_ratio(spatial_matrix_shape(shape), ratio)
