"""Low-rank GRU and LSTM: real factors of ``weight_ih`` and ``weight_hh`` inside a loop that runs them.

PyTorch stacks the gates: ``weight_ih: (G*H, in)``, ``weight_hh: (G*H, H)`` with ``G = 3`` gates
(r, z, n) for a GRU and ``G = 4`` (i, f, g, o) for an LSTM. Each matrix is stored either

* **per gate** (``per_gate=True``): ``a: (G, H, r)`` and ``b: (G, r, in)``, one rank-``r``
  factorization per gate (gates often have different spectra), weights ``G*r*(H + in)``; or
* **stacked** (``per_gate=False``): one rank-``r`` factorization of the whole ``(G*H, in)``
  matrix, ``a: (1, G*H, r)``, ``b: (1, r, in)``, weights ``r*(G*H + in)``;

or kept dense when its rank is ``None``. The input projection is computed for all time steps at
once; the hidden projection runs at every step, so its FLOP saving is multiplied by the sequence
length. At full rank the outputs equal ``nn.GRU`` / ``nn.LSTM`` to float tolerance.

Supported: one layer, one direction, ``batch_first`` either way, batched ``(n, T, in)`` /
``(T, n, in)`` or unbatched ``(T, in)`` input, optional initial state. Refused with an error that
names the setting: ``num_layers > 1``, ``bidirectional=True``, LSTM ``proj_size > 0``, packed
sequences.
"""
from __future__ import annotations

import torch
from torch import nn

from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.kernels import svd as svd_kernels

GATES = {"GRU": ("reset", "update", "new"), "LSTM": ("input", "forget", "cell", "output")}


def rnn_kind(module: nn.Module) -> str:
    """``"GRU"`` or ``"LSTM"``; raise `UnsupportedLayerError` for anything else."""
    if isinstance(module, nn.GRU):
        return "GRU"
    if isinstance(module, nn.LSTM):
        return "LSTM"
    raise UnsupportedLayerError(f"low-rank recurrent layers need nn.GRU or nn.LSTM, got {type(module).__name__}")


def with_article(kind: str) -> str:
    """``"a GRU"`` / ``"an LSTM"``."""
    return f"an {kind}" if kind == "LSTM" else f"a {kind}"


def unsupported_reason(rnn: nn.Module) -> str | None:
    """What makes ``rnn`` (a GRU/LSTM) unsupported by `LowRankRNN`, or None if it is supported."""
    reasons = []
    if rnn.num_layers != 1:
        reasons.append(f"num_layers={rnn.num_layers} (only single-layer RNNs are supported)")
    if rnn.bidirectional:
        reasons.append("bidirectional=True (only one direction is supported)")
    if getattr(rnn, "proj_size", 0):
        reasons.append(f"proj_size={rnn.proj_size} (LSTM projections are not supported)")
    return "; ".join(reasons) or None


def check_rnn(rnn: nn.Module, name: str = "") -> str:
    kind = rnn_kind(rnn)
    reason = unsupported_reason(rnn)
    if reason:
        raise UnsupportedLayerError(f"layer {name!r} is {with_article(kind)} with {reason}; it is left dense")
    return kind


def gate_matrices(rnn: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """``{"ih"|"hh": {gate name: (H, in) or (H, H) matrix}}`` of a single-layer GRU/LSTM."""
    kind = rnn_kind(rnn)
    h = rnn.hidden_size
    return {side: {gate: getattr(rnn, f"weight_{side}_l0").detach()[g * h:(g + 1) * h]
                   for g, gate in enumerate(GATES[kind])} for side in ("ih", "hh")}


def max_rank(kind: str, side: str, input_size: int, hidden: int, per_gate: bool) -> int:
    """Largest rank of ``weight_<side>`` (per gate: ``min(H, cols)``; stacked: ``min(G*H, cols)``)."""
    cols = input_size if side == "ih" else hidden
    rows = hidden if per_gate else len(GATES[kind]) * hidden
    return min(rows, cols)


def factored_weights(kind: str, side: str, input_size: int, hidden: int, rank: int | None,
                     per_gate: bool) -> int:
    """Weights stored for ``weight_<side>`` at ``rank`` (``None``: dense ``G*H*cols``)."""
    g = len(GATES[kind])
    cols = input_size if side == "ih" else hidden
    if rank is None:
        return g * hidden * cols
    return g * rank * (hidden + cols) if per_gate else rank * (g * hidden + cols)


def _factor(w: torch.Tensor, gates: int, rank: int, per_gate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``w: (G*H, cols)`` -> ``a: (G', H', r)``, ``b: (G', r, cols)`` (G'=G per gate, else 1)."""
    blocks = w.chunk(gates, 0) if per_gate else (w,)
    pairs = [svd_kernels.truncate(block, rank) for block in blocks]
    return torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])


class LowRankRNN(nn.Module):
    """A single-layer, unidirectional GRU or LSTM whose weight matrices are stored as factors.

    ``forward(x, hx=None)`` has the signature and output of ``nn.GRU`` / ``nn.LSTM``:
    ``(output, h_n)`` or ``(output, (h_n, c_n))``, ``output: (n, T, H)`` when ``batch_first``.
    """

    def __init__(self, kind: str, input_size: int, hidden_size: int, rank_ih: int | None,
                 rank_hh: int | None, per_gate: bool = True, bias: bool = True, batch_first: bool = False,
                 fused_input: bool = False):
        super().__init__()
        if kind not in GATES:
            raise WorkbenchError(f"kind={kind!r} must be 'GRU' or 'LSTM'")
        self.kind, self.input_size, self.hidden_size = kind, input_size, hidden_size
        self.rank_ih, self.rank_hh, self.per_gate = rank_ih, rank_hh, per_gate
        self.batch_first, self.fused_input = batch_first, fused_input
        g = len(GATES[kind])
        g_store = g if per_gate else 1
        rows = hidden_size if per_gate else g * hidden_size
        sides = (("ih", input_size, rank_ih), ("hh", hidden_size, rank_hh))
        for side, cols, rank in sides[1:] if fused_input else sides:
            if rank is None:
                self.register_parameter(f"weight_{side}", nn.Parameter(torch.empty(g * hidden_size, cols)))
            else:
                self.register_parameter(f"a_{side}", nn.Parameter(torch.empty(g_store, rows, rank)))
                self.register_parameter(f"b_{side}", nn.Parameter(torch.empty(g_store, rank, cols)))
        if bias and not fused_input:
            self.bias_ih = nn.Parameter(torch.zeros(g * hidden_size))
            self.bias_hh = nn.Parameter(torch.zeros(g * hidden_size))
        elif bias:
            self.bias_ih = None
            self.bias_hh = nn.Parameter(torch.zeros(g * hidden_size))
            self.bias_hh = nn.Parameter(torch.zeros(g * hidden_size))
        else:
            self.bias_ih = self.bias_hh = None

    @classmethod
    def from_rnn(cls, rnn: nn.Module, rank_ih: int | None, rank_hh: int | None, per_gate: bool = True,
                 name: str = "") -> "LowRankRNN":
        """Factorize ``rnn.weight_ih_l0`` at ``rank_ih`` and ``rnn.weight_hh_l0`` at ``rank_hh``
        (``None`` keeps that matrix dense); ``rnn`` is not modified."""
        kind = check_rnn(rnn, name)
        where = f" for layer {name!r}" if name else ""
        layer = cls(kind, rnn.input_size, rnn.hidden_size, rank_ih, rank_hh, per_gate=per_gate,
                    bias=rnn.bias, batch_first=rnn.batch_first)
        g = len(GATES[kind])
        with torch.no_grad():
            for side, rank in (("ih", rank_ih), ("hh", rank_hh)):
                w = getattr(rnn, f"weight_{side}_l0").detach()
                if rank is None:
                    getattr(layer, f"weight_{side}").copy_(w)
                    continue
                limit = max_rank(kind, side, rnn.input_size, rnn.hidden_size, per_gate)
                rows = rnn.hidden_size if per_gate else g * rnn.hidden_size
                svd_kernels.check_rank(rank, (rows, w.shape[1]), name)
                if rank > limit:  # pragma: no cover - check_rank already refuses it
                    raise WorkbenchError(f"rank_{side}={rank} is above {limit}{where}")
                a, b = _factor(w, g, rank, per_gate)
                getattr(layer, f"a_{side}").copy_(a)
                getattr(layer, f"b_{side}").copy_(b)
            if rnn.bias:
                layer.bias_ih.copy_(rnn.bias_ih_l0.detach())
                layer.bias_hh.copy_(rnn.bias_hh_l0.detach())
        return layer.to(device=rnn.weight_ih_l0.device, dtype=rnn.weight_ih_l0.dtype)

    # ------------------------------------------------------------------ compute
    def project(self, x: torch.Tensor, side: str) -> torch.Tensor:
        """``x: (..., cols) -> (..., G*H)``: ``x @ weight_<side>.T`` through the stored factors.

        With ``fused_input`` the input already is the ``(..., G*H)`` input projection (bias included).
        """
        if side == "ih" and self.fused_input:
            return x
        dense = getattr(self, f"weight_{side}", None)
        if dense is not None:
            return x @ dense.T
        a, b = getattr(self, f"a_{side}"), getattr(self, f"b_{side}")
        g_store, rank = b.shape[0], b.shape[1]
        inner = (x @ b.reshape(g_store * rank, -1).T).unflatten(-1, (g_store, rank))  # (..., G', r)
        return torch.einsum("...gr,ghr->...gh", inner, a).flatten(-2)

    def dense_weight_preview(self, side: str) -> torch.Tensor:
        """PREVIEW ONLY: the dense ``(G*H, cols)`` matrix of ``side`` ("ih"/"hh"). Not used by forward."""
        dense = getattr(self, f"weight_{side}", None)
        if dense is not None:
            return dense.detach()
        a, b = getattr(self, f"a_{side}"), getattr(self, f"b_{side}")
        return torch.bmm(a, b).reshape(-1, b.shape[-1]).detach()

    def forward(self, x, hx=None):
        if isinstance(x, nn.utils.rnn.PackedSequence):
            raise WorkbenchError("LowRankRNN does not take packed sequences; pass a padded (n, T, in) tensor")
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1)  # (T, 1, in)
        elif self.batch_first:
            x = x.transpose(0, 1)  # (T, n, in)
        steps, batch = x.shape[0], x.shape[1]
        h_size = self.hidden_size
        zeros = x.new_zeros(batch, h_size)
        if self.kind == "LSTM":
            h, c = (zeros, zeros) if hx is None else hx
            if hx is not None:
                h, c = (h.unsqueeze(1) if unbatched else h)[0], (c.unsqueeze(1) if unbatched else c)[0]
        else:
            h = zeros if hx is None else (hx.unsqueeze(1) if unbatched else hx)[0]
        gi = self.project(x, "ih")  # (T, n, G*H): all steps at once
        if self.bias_ih is not None:
            gi = gi + self.bias_ih
        outputs = []
        for t in range(steps):
            gh = self.project(h, "hh")
            if self.bias_hh is not None:
                gh = gh + self.bias_hh
            if self.kind == "GRU":
                i_r, i_z, i_n = gi[t].chunk(3, -1)
                h_r, h_z, h_n = gh.chunk(3, -1)
                r = torch.sigmoid(i_r + h_r)
                z = torch.sigmoid(i_z + h_z)
                n = torch.tanh(i_n + r * h_n)
                h = (1 - z) * n + z * h
            else:
                i, f, g, o = (gi[t] + gh).chunk(4, -1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        out = torch.stack(outputs)  # (T, n, H)
        if unbatched:
            out, h_last = out[:, 0], h.unsqueeze(0)[:, 0]
            c_last = c.unsqueeze(0)[:, 0] if self.kind == "LSTM" else None
        else:
            out = out.transpose(0, 1) if self.batch_first else out
            h_last = h.unsqueeze(0)
            c_last = c.unsqueeze(0) if self.kind == "LSTM" else None
        return (out, (h_last, c_last)) if self.kind == "LSTM" else (out, h_last)

    def extra_repr(self) -> str:
        return (f"{self.kind}, input_size={self.input_size}, hidden_size={self.hidden_size}, "
                f"rank_ih={self.rank_ih}, rank_hh={self.rank_hh}, per_gate={self.per_gate}, "
                f"batch_first={self.batch_first}" + (", fused_input=True" if self.fused_input else ""))


def recurrent_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(qualified name, module)]`` of every nn.GRU / nn.LSTM in ``model``, supported or not."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.GRU, nn.LSTM))]
