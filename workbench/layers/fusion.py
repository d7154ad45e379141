"""Fusing an embedding into the input projection of the GRU/LSTM that reads it.

``gru(embed(tokens))`` computes, at every step, ``W_ih @ E[token] + b_ih`` with
``E: (vocab, E)`` and ``W_ih: (G*H, E)``. That product depends on the token only, so it can be
tabulated once: ``T = E @ W_ih.T + b_ih``, ``T: (vocab, G*H)``. The fused model looks the input
gates up in ``T`` (an ``nn.Embedding``) and runs a `LowRankRNN` with ``fused_input=True``, which
skips the input matmul. The result is the exact product (computed in float64, then cast).

Size trade-off, stated honestly: the fused table holds ``vocab * G*H`` weights in place of
``vocab * E + G*H * E`` (+ ``G*H`` bias), so fusion *grows* the model whenever
``vocab * G*H > vocab * E + G*H * E + G*H`` (always when ``G*H > E`` and the vocabulary is large);
it saves the ``2 * E * G*H`` FLOPs of the input projection per token.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.layers.recurrent import GATES, LowRankRNN, check_rnn


def fused_table(embedding: torch.Tensor, w_ih: torch.Tensor, b_ih: torch.Tensor | None) -> torch.Tensor:
    """``embedding: (vocab, E)``, ``w_ih: (G*H, E)``, ``b_ih: (G*H,)`` -> ``(vocab, G*H)`` table."""
    if embedding.shape[1] != w_ih.shape[1]:
        raise WorkbenchError(f"embedding width {embedding.shape[1]} differs from the RNN input size "
                             f"{w_ih.shape[1]}; the embedding does not feed this RNN")
    table = embedding.detach().double() @ w_ih.detach().double().T
    if b_ih is not None:
        table = table + b_ih.detach().double()
    return table.to(embedding.dtype)


@dataclass(frozen=True)
class FusionSizes:
    """Weights before (embedding + ``W_ih`` + ``b_ih``) and after (the fused table) fusion, and
    the input-projection FLOPs per token that fusion removes."""

    vocab: int
    embed_dim: int
    gate_width: int
    before: int
    after: int
    flops_saved_per_token: int

    @property
    def grows(self) -> bool:
        return self.after > self.before

    def to_dict(self) -> dict:
        return {**asdict(self), "grows": self.grows}


def fusion_sizes(embedding: nn.Embedding, rnn: nn.Module) -> FusionSizes:
    check_rnn(rnn)
    vocab, e = embedding.weight.shape
    gh = len(GATES["GRU" if isinstance(rnn, nn.GRU) else "LSTM"]) * rnn.hidden_size
    before = vocab * e + gh * e + (gh if rnn.bias else 0)
    return FusionSizes(vocab, e, gh, before, vocab * gh, 2 * e * gh)


def fuse_embedding_rnn(embedding: nn.Embedding, rnn: nn.Module, rank_hh: int | None = None,
                       per_gate: bool = True, name: str = "") -> tuple[nn.Embedding, LowRankRNN]:
    """``(table lookup, RNN without input projection)`` computing what ``rnn(embedding(x))`` does.

    ``rank_hh``: also factorize ``weight_hh`` (None keeps it dense). Neither input is modified.
    """
    if not isinstance(embedding, nn.Embedding):
        raise UnsupportedLayerError(f"fusion needs an nn.Embedding, got {type(embedding).__name__}")
    if embedding.max_norm is not None:
        raise UnsupportedLayerError(f"embedding with max_norm={embedding.max_norm} renormalises rows at lookup "
                                    "time, so its product with W_ih cannot be tabulated; left unfused")
    kind = check_rnn(rnn, name)
    if rnn.input_size != embedding.embedding_dim:
        raise WorkbenchError(f"embedding width {embedding.embedding_dim} differs from the RNN input size "
                             f"{rnn.input_size}; the embedding does not feed this RNN")
    table = fused_table(embedding.weight, rnn.weight_ih_l0, rnn.bias_ih_l0 if rnn.bias else None)
    lookup = nn.Embedding(table.shape[0], table.shape[1], _weight=table.clone())
    lookup.weight.requires_grad_(embedding.weight.requires_grad)
    reference = LowRankRNN.from_rnn(rnn, None, rank_hh, per_gate=per_gate, name=name)
    fused = LowRankRNN(kind, table.shape[1], rnn.hidden_size, None, rank_hh, per_gate=per_gate,
                       bias=rnn.bias, batch_first=rnn.batch_first, fused_input=True).to(table.dtype)
    own = fused.state_dict()
    fused.load_state_dict({k: v for k, v in reference.state_dict().items() if k in own}, strict=True)
    return lookup, fused
