"""Shared fixtures. The embedded models train once per machine and are cached on disk."""
import pytest
import torch
from torch import nn

import workbench as wb


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def mlp_task():
    return wb.load("digits-mlp")


@pytest.fixture(scope="session")
def cnn_task():
    return wb.load("digits-cnn")


@pytest.fixture(scope="session")
def gru_task():
    return wb.load("digits-gru")


def state_bytes(model: torch.nn.Module) -> dict:
    """A byte-exact snapshot of ``model.state_dict()`` to check that nothing modified it."""
    return {k: v.detach().clone().numpy().tobytes() for k, v in model.state_dict().items()}


def random_bert(layers: int) -> nn.Module:
    """A random-weight ``BertModel`` built from a config (seed 0; hidden 64, 4 heads, FFN 128,
    vocabulary 200, 64 positions) with ``layers`` encoder blocks, in eval mode. Skips the test when
    transformers is not installed."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(
        hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=128, vocab_size=200,
        max_position_embeddings=64)).eval()


def random_bert_task(layers: int):
    """`random_bert` loaded as a task. Returns ``(task, calibration)``: the task judges 16 rows of random
    ids (16, 12); ``calibration`` is 96 more rows (96, 12); ids in [0, 200), drawn from seed 1."""
    model = random_bert(layers)
    generator = torch.Generator().manual_seed(1)
    task = wb.load(model, eval_data=torch.randint(0, 200, (16, 12), generator=generator))
    return task, torch.randint(0, 200, (96, 12), generator=generator)


@pytest.fixture
def stand_in_aware_basis(monkeypatch):
    """Replace the activation-aware basis (36 float64 fits for MiniLM) by a cheap stand-in: rank r
    keeps W's first r rows. Returns the list of modes it was called with. The shared decomposition
    cache is emptied before and after, so stand-in results never serve another test."""
    from workbench import svd_cache
    from workbench.kernels import aware as aware_kernels

    calls = []

    def quick_basis(weight, gram_matrix, tokens=None, *, mode="whiten", **_):
        calls.append(mode)
        k = min(weight.shape)
        return aware_kernels.AwareBasis(
            "scale", torch.ones(weight.shape[1], dtype=torch.float64), torch.eye(weight.shape[0], k, dtype=torch.float64),
            torch.ones(k, dtype=torch.float64), weight.detach().double()[:k].clone(), weight.dtype)

    monkeypatch.setattr(aware_kernels, "aware_basis", quick_basis)
    svd_cache.clear()
    yield calls
    svd_cache.clear()


class Tied(nn.Module):
    """An autoencoder-like MLP whose decoder reuses the encoder's weight (own biases)."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.enc = nn.Linear(64, 64, bias=bias)
        self.mid = nn.Linear(64, 32)
        self.out = nn.Linear(32, 64)
        self.dec = nn.Linear(64, 64, bias=bias)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        h = torch.relu(self.enc(x))
        return self.dec(torch.relu(self.out(torch.relu(self.mid(h)))))


@pytest.fixture
def tied():
    torch.manual_seed(0)
    return Tied()


@pytest.fixture
def tied_task(tied):
    return wb.load(tied, eval_data=torch.randn(96, 64, generator=torch.Generator().manual_seed(1)))
