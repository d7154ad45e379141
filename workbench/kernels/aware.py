"""Activation-aware truncation: low-rank factors that minimise the layer's OUTPUT error.

Plain SVD minimises ``||W - W'||_F``. With calibration inputs ``X: (tokens, in)`` the output error
is ``||(W - W') X^T||_F``. Writing ``X^T X = S S^T`` it equals ``||(W - W') S||_F``, so truncating
``W S`` by SVD and mapping back with ``S^{-1}`` gives the best rank-r factors for that data:

* ``whiten`` (SVD-LLM, Wang et al. 2024): ``S`` = Cholesky factor of ``X^T X + ridge * I``
  (``ridge`` relative to the mean diagonal, for channels that are (nearly) constant);
* ``scale`` (ASVD, Yuan et al. 2023): ``S = diag(s)`` with ``s_j = rms(x_j) ** alpha``, a diagonal
  approximation that needs no matrix inverse.

Shapes: ``w: (out, in)``; factors ``a: (out, r)``, ``b: (r, in)`` with ``a @ b ≈ w`` in the
data's metric. Pure functions of tensors; nothing here knows about modules.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError
from workbench.kernels.svd import check_rank

AWARE_MODES = ("whiten", "scale")
DEFAULT_RIDGE = 1e-2
DEFAULT_ALPHA = 0.5


def gram(x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """``X^T X`` of ``x: (tokens, in)`` as ``(in, in)`` float64, accumulated in float32 chunks."""
    if x.dim() != 2:
        raise WorkbenchError(f"calibration inputs must be (tokens, in_features); got shape {tuple(x.shape)}")
    total = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, len(x), chunk):
        part = x[start:start + chunk].float()
        total += (part.T @ part).double()
    return total


def _check(w: torch.Tensor, g: torch.Tensor, rank: int, name: str) -> None:
    if w.dim() != 2:
        raise WorkbenchError(f"weight must be a matrix (out, in); got shape {tuple(w.shape)}")
    if g.shape != (w.shape[1], w.shape[1]):
        where = f" for layer {name!r}" if name else ""
        raise WorkbenchError(f"calibration inputs have {g.shape[0]} features but the weight{where} "
                             f"has in_features={w.shape[1]}")
    check_rank(rank, tuple(w.shape), name)


def whitening_factor(g: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """Lower-triangular ``S: (in, in)`` float64 with ``S S^T = g + ridge * mean(diag g) * I``.

    If Cholesky still fails (numerically indefinite), the ridge is raised tenfold, up to 5 times.
    """
    g = g.double()
    base = float(g.diagonal().mean()) or 1.0
    eye = torch.eye(len(g), dtype=torch.float64, device=g.device)
    lam = ridge
    for _ in range(6):
        factor, info = torch.linalg.cholesky_ex(g + lam * base * eye)
        if int(info) == 0:
            return factor
        lam = max(lam * 10, 1e-8)
    raise WorkbenchError(f"X^T X is not positive definite even with ridge={lam / 10:g}; "
                         "calibration inputs contain NaN or inf?")


def channel_scale(g: torch.Tensor, alpha: float = DEFAULT_ALPHA, tokens: int = 1) -> torch.Tensor:
    """ASVD-style per-input-channel scale ``s: (in,)`` = ``rms(x_j) ** alpha`` (floored at 1e-6 max)."""
    rms = (g.diagonal().double().clamp(min=0) / max(tokens, 1)).sqrt()
    s = rms.pow(alpha)
    return s.clamp(min=float(s.max()) * 1e-6 if float(s.max()) > 0 else 1.0)


@dataclass(frozen=True)
class AwareBasis:
    """What every rank's activation-aware factors of one weight share (float64): the scaling
    ``s`` (whiten: lower-triangular ``(in, in)``; scale: ``(in,)``) and the SVD ``u, sig, vh`` of
    ``W S``. `factors_at` slices it at any rank."""

    mode: str
    s: torch.Tensor
    u: torch.Tensor
    sig: torch.Tensor
    vh: torch.Tensor
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.s, self.u, self.sig, self.vh))


def aware_basis(w: torch.Tensor, gram_matrix: torch.Tensor, tokens: int | None = None, *, mode: str = "whiten",
                ridge: float = DEFAULT_RIDGE, alpha: float = DEFAULT_ALPHA, name: str = "") -> AwareBasis:
    """The rank-independent part of `aware_factors` for ``w: (out, in)`` and ``X^T X`` ``(in, in)``."""
    if mode not in AWARE_MODES:
        raise WorkbenchError(f"aware={mode!r} is not a mode; use one of {', '.join(AWARE_MODES)}")
    _check(w, gram_matrix, 1, name)
    wd = w.detach().double()
    if mode == "whiten":
        s = whitening_factor(gram_matrix, ridge)                       # (in, in) lower
        u, sig, vh = torch.linalg.svd(wd @ s, full_matrices=False)
    else:
        s = channel_scale(gram_matrix, alpha, tokens or 1)              # (in,)
        u, sig, vh = torch.linalg.svd(wd * s, full_matrices=False)
    return AwareBasis(mode, s, u, sig, vh, w.dtype)


def factors_at(basis: AwareBasis, rank: int, name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors ``(a: (out, r), b: (r, in))`` from ``basis``, in the weight's dtype."""
    check_rank(rank, (basis.u.shape[0], basis.vh.shape[1]), name)
    root = basis.sig[:rank].sqrt()
    if basis.mode == "whiten":
        # b = root * vh_r @ S^{-1}: solve S^T b^T = vh_r^T (S^T is upper triangular)
        b = torch.linalg.solve_triangular(basis.s.T, (root[:, None] * basis.vh[:rank]).T, upper=True).T
    else:
        b = root[:, None] * basis.vh[:rank] / basis.s
    a = basis.u[:, :rank] * root
    return a.to(basis.dtype), b.to(basis.dtype)


def aware_factors(w: torch.Tensor, rank: int, *, x: torch.Tensor | None = None,
                  gram_matrix: torch.Tensor | None = None, tokens: int | None = None,
                  mode: str = "whiten", ridge: float = DEFAULT_RIDGE, alpha: float = DEFAULT_ALPHA,
                  name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors ``(a: (out, r), b: (r, in))`` of ``w: (out, in)`` fitted to the data.

    Parameters
    ----------
    x : calibration inputs ``(tokens, in)`` of this layer, or give ``gram_matrix`` = ``X^T X``
        ``(in, in)`` and ``tokens`` (its row count; only ``scale`` uses it) instead.
    mode : ``"whiten"`` (Cholesky of ``X^T X``) or ``"scale"`` (diagonal rms scaling).
    ridge : whiten only; added to the diagonal as a fraction of its mean.
    alpha : scale only; exponent of the rms (ASVD uses 0.5; 1 equals whiten for uncorrelated inputs).
    """
    if mode not in AWARE_MODES:
        raise WorkbenchError(f"aware={mode!r} is not a mode; use one of {', '.join(AWARE_MODES)}")
    if (x is None) == (gram_matrix is None):
        raise WorkbenchError("aware_factors needs exactly one of x (tokens, in) or gram_matrix (in, in)")
    if x is not None:
        tokens, gram_matrix = check_inputs(x), gram(x)
    _check(w, gram_matrix, rank, name)
    return factors_at(aware_basis(w, gram_matrix, tokens, mode=mode, ridge=ridge, alpha=alpha, name=name), rank, name)


def check_inputs(x: torch.Tensor) -> int:
    """The token count of calibration inputs ``x: (tokens, in)``; `WorkbenchError` for another shape."""
    if x.dim() != 2 or x.shape[0] == 0:
        raise WorkbenchError(f"calibration inputs must be (tokens, in_features) with tokens >= 1; "
                             f"got shape {tuple(x.shape)}")
    return x.shape[0]


def aware_decomposition(w: torch.Tensor, gram_matrix: torch.Tensor, tokens: int, mode: str = "whiten",
                        ridge: float = DEFAULT_RIDGE, alpha: float = DEFAULT_ALPHA):
    """Full activation-aware decomposition ``(u (out, k), sig (k,), bt (k, in))`` for slicing.

    Rank-r factors are ``a = u[:, :r] * sqrt(sig[:r])``, ``b = sqrt(sig[:r])[:, None] * bt[:r]``:
    the same as `aware_factors` at every rank, computed once (float64).
    """
    if mode not in AWARE_MODES:
        raise WorkbenchError(f"aware={mode!r} is not a mode; use one of {', '.join(AWARE_MODES)}")
    _check(w, gram_matrix, 1, "")
    wd = w.detach().double()
    if mode == "whiten":
        s = whitening_factor(gram_matrix, ridge)
        u, sig, vh = torch.linalg.svd(wd @ s, full_matrices=False)
        return u, sig, torch.linalg.solve_triangular(s.T, vh.T, upper=True).T
    s = channel_scale(gram_matrix, alpha, tokens)
    u, sig, vh = torch.linalg.svd(wd * s, full_matrices=False)
    return u, sig, vh / s


def cross_gram(x_ref: torch.Tensor, x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """``X_ref^T X: (in, in)`` float64 of two aligned inputs ``(tokens, in)`` (row t = same token)."""
    if x_ref.shape != x.shape or x.dim() != 2:
        raise WorkbenchError(f"reference and calibration inputs must both be (tokens, in) and aligned; "
                             f"got {tuple(x_ref.shape)} and {tuple(x.shape)}")
    total = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, len(x), chunk):
        total += (x_ref[start:start + chunk].float().T @ x[start:start + chunk].float()).double()
    return total


def regression_factors(w: torch.Tensor, rank: int, gram_matrix: torch.Tensor, cross: torch.Tensor,
                       ridge: float = DEFAULT_RIDGE, name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` ``(a (out, r), b (r, in))`` minimising ``||W X_ref^T - a b X^T||^2 + lam ||a b||^2``.

    Reduced-rank regression: the layer sees inputs ``X`` (``gram_matrix`` = ``X^T X``) but should
    reproduce the original outputs ``W X_ref^T`` (``cross`` = ``X_ref^T X``), e.g. when earlier
    layers are already compressed. ``lam`` = ``ridge * mean(diag X^T X)``. With ``G + lam I = S S^T``
    the objective is a constant plus ``||(a b - W_ls) S||^2``, ``W_ls = W cross (G + lam I)^{-1}``,
    so the optimum truncates ``W_ls S = W cross S^{-T}`` by SVD (exact, not a heuristic).
    With ``X_ref = X`` and ``ridge -> 0`` this is `aware_factors` in ``whiten`` mode.
    """
    _check(w, gram_matrix, rank, name)
    if cross.shape != gram_matrix.shape:
        raise WorkbenchError(f"cross has shape {tuple(cross.shape)}; expected {tuple(gram_matrix.shape)}")
    s = whitening_factor(gram_matrix, ridge)                            # (in, in) lower
    m = torch.linalg.solve_triangular(s, (w.detach().double() @ cross.double()).T, upper=False).T
    u, sig, vh = torch.linalg.svd(m, full_matrices=False)               # m = W cross S^{-T}
    root = sig[:rank].sqrt()
    b = torch.linalg.solve_triangular(s.T, (root[:, None] * vh[:rank]).T, upper=True).T
    return (u[:, :rank] * root).to(w.dtype), b.to(w.dtype)


def refit_second(w: torch.Tensor, b: torch.Tensor, gram_matrix: torch.Tensor, cross: torch.Tensor,
                 ridge: float = 1e-8) -> torch.Tensor:
    """Least-squares ``a: (out, r)`` = argmin ``||W X_ref^T - a b X^T||`` for a fixed ``b: (r, in)``.

    Closed form ``a = W cross b^T (b G b^T)^{-1}`` (``G = X^T X``, ``cross = X_ref^T X``); ``ridge``
    (relative to the mean diagonal of ``b G b^T``) only guards against a singular ``b G b^T``.
    """
    wd, bd = w.detach().double(), b.double()
    inner = bd @ gram_matrix.double() @ bd.T                              # (r, r)
    inner = inner + ridge * float(inner.diagonal().mean() or 1.0) * torch.eye(len(inner), dtype=torch.float64, device=inner.device)
    rhs = wd @ cross.double() @ bd.T                                      # (out, r)
    return torch.linalg.solve(inner, rhs.T).T.to(w.dtype)


def output_error(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> float:
    """``||(w - a b) X^T||_F``: the Frobenius error of the layer's outputs on ``x: (tokens, in)``."""
    return float(((w.double() - a.double() @ b.double()) @ x.double().T).norm())
