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


@pytest.fixture
def clean_decomposition_cache():
    """Empty the shared decomposition cache before and after a test that stubs a decomposition,
    so stand-in results never serve another test."""
    from workbench import svd_cache

    svd_cache.clear()
    yield
    svd_cache.clear()
