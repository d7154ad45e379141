"""Training views of the quantized low-rank layers: start at the layer, re-pack exactly, same bytes."""
import pytest
import torch
from torch import nn

from conftest import state_bytes
from workbench.layers.quant_lowrank import LowRankResidualLinear, QuantLowRankLinear
from workbench.recovery import views
from workbench.recovery.quant_lowrank_views import LowRankResidualView, QuantLowRankView

BUILDS = {
    "svd_quant per row": (lambda lin: QuantLowRankLinear.from_linear(lin, rank=6, bits=4), QuantLowRankView),
    "svd_quant per tensor": (lambda lin: QuantLowRankLinear.from_linear(lin, rank=6, bits=3, per_channel=False),
                             QuantLowRankView),
    "svd_residual": (lambda lin: LowRankResidualLinear.from_linear(lin, rank=4, bits=3), LowRankResidualView),
}


def _linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(32, 24)


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


@pytest.mark.parametrize("kind", BUILDS)
def test_view_starts_at_the_layer_and_an_untouched_view_repacks_to_the_same_storage(kind):
    build, view_type = BUILDS[kind]
    packed = build(_linear())
    before = state_bytes(packed)
    view = views.trainable(nn.Sequential(packed))[0]
    assert isinstance(view, view_type) and state_bytes(packed) == before
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(view(x), packed(x), rtol=1e-5, atol=1e-5)
    again = view.repack()
    assert type(again) is type(packed) and state_bytes(again) == before


@pytest.mark.parametrize("kind", BUILDS)
def test_after_steps_the_repacked_layer_computes_what_the_view_did_in_the_same_bytes(kind):
    build, view_type = BUILDS[kind]
    packed = build(_linear(1))
    view = view_type(packed)
    generator = torch.Generator().manual_seed(4)
    x, target = torch.randn(64, 32, generator=generator), torch.randn(64, 24, generator=generator)
    optimizer = torch.optim.Adam([p for p in view.parameters() if p.requires_grad], lr=0.05)
    for _ in range(5):
        loss = nn.functional.mse_loss(view(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    again = view.repack()
    with torch.no_grad():
        torch.testing.assert_close(again(x), view(x), rtol=1e-5, atol=1e-5)
        assert (again(x) - packed(x)).abs().max() > 1e-3  # the steps changed the layer
    assert _bytes(again) == _bytes(packed)
    packed_names = [n for n in packed.state_dict() if "packed" in n]
    assert any(not torch.equal(again.state_dict()[n], packed.state_dict()[n]) for n in packed_names)
    for name, value in packed.state_dict().items():
        if "scale" in name:
            assert torch.equal(again.state_dict()[name], value)  # steps stay as built
