"""Shared fixtures. The embedded models train once per machine and are cached on disk."""
import pytest
import torch

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
