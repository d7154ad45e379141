"""Training view of `GroupQuantLinear`: the layer's own grid at the start, exact re-packing, same bytes."""
import pytest
import torch

import workbench as wb
from conftest import random_bert_task, state_bytes
from workbench.kernels.gptq import gptq_quantize, rtn_quantize
from workbench.layers.grouped import GroupQuantLinear
from workbench.recovery import views
from workbench.recovery.blockwise import reconstruct_blocks
from workbench.recovery.group_lsq import GroupFakeQuantLayer
from workbench.registry import get_recipe


def _packed(bits: int, group_size: int | None, asymmetric: bool, awq: bool, seed: int = 0) -> GroupQuantLinear:
    """A GPTQ-quantized random (24, 32) layer; with ``awq`` an input scale in [0.5, 2] is stored."""
    generator = torch.Generator().manual_seed(seed)
    weight, bias = torch.randn(24, 32, generator=generator), torch.randn(24, generator=generator)
    x = torch.randn(200, 32, generator=generator)
    input_scale = (2.0 ** (2 * torch.rand(32, generator=generator) - 1)).half() if awq else None
    scaled = weight if input_scale is None else weight * input_scale.float()
    codes, scale, zero = gptq_quantize(scaled, x.T @ x, bits, group_size, asymmetric=asymmetric)
    return GroupQuantLinear.from_codes(codes, scale.half(), zero, bias, bits, asymmetric, input_scale=input_scale)


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


SETTINGS = [(4, None, True, False), (3, 8, True, True), (2, 16, False, False), (8, 4, True, True)]


@pytest.mark.parametrize("bits,group_size,asymmetric,awq", SETTINGS)
def test_view_starts_at_the_layer_and_an_untouched_view_repacks_to_the_same_storage(bits, group_size, asymmetric, awq):
    packed = _packed(bits, group_size, asymmetric, awq)
    before = state_bytes(packed)
    view = views.trainable(torch.nn.Sequential(packed))[0]
    assert isinstance(view, GroupFakeQuantLayer) and state_bytes(packed) == before
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(view(x), packed(x), rtol=0, atol=1e-6)
    again = view.repack()
    assert isinstance(again, GroupQuantLinear)
    assert (again.bits, again.group_size, again.asymmetric) == (packed.bits, packed.group_size, packed.asymmetric)
    assert state_bytes(again) == before


@pytest.mark.parametrize("bits,group_size,asymmetric,awq", SETTINGS)
@pytest.mark.parametrize("learn_scale", [False, True])
def test_after_a_step_the_repacked_layer_computes_what_the_view_did_in_the_same_bytes(
        bits, group_size, asymmetric, awq, learn_scale):
    packed = _packed(bits, group_size, asymmetric, awq, seed=1)
    view = GroupFakeQuantLayer(packed, learn_scale=learn_scale)
    generator = torch.Generator().manual_seed(4)
    x, target = torch.randn(64, 32, generator=generator), torch.randn(64, 24, generator=generator)
    optimizer = torch.optim.Adam([p for p in view.parameters() if p.requires_grad], lr=0.3)
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(view(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert (view.scale.grad is not None) == learn_scale
    again = view.repack()
    with torch.no_grad():
        assert torch.equal(again(x), view(x))
    assert _bytes(again) == _bytes(packed)
    assert not torch.equal(again.codes(), packed.codes())  # the step moved weights across grid points
    codes = again.codes()
    assert int(codes.max()) < 2 ** bits and torch.equal(again.zero_point, packed.zero_point)
    if awq:
        assert torch.equal(again.input_scale, packed.input_scale)
    if not learn_scale:
        assert torch.equal(again.scale, packed.scale)


def test_round_to_nearest_codes_are_a_fixed_point_of_the_view():
    """Weights already on the grid stay there: the codes of RTN re-derive from the dequantized weight."""
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    codes, scale, zero = rtn_quantize(weight, 3, 16)
    packed = GroupQuantLinear.from_codes(codes, scale.half(), zero, None, 3)
    assert torch.equal(GroupFakeQuantLayer(packed).repack().codes(), packed.codes())


@pytest.mark.parametrize("learn_scales", [False, True])
def test_gptq_bert_is_tuned_block_by_block_and_stays_group_quantized(learn_scales):
    task, calibration = random_bert_task(layers=2)
    layers = [n for n, m in task.model.named_modules() if isinstance(m, torch.nn.Linear) and "encoder" in n]
    plan = get_recipe("gptq")(task.model, bits=3, group_size=32, layers=layers)
    compressed = wb.apply(task.model, plan, calibration_inputs=calibration)
    compressed_before = state_bytes(compressed)
    result = reconstruct_blocks(compressed, task.model, calibration, epochs=3, lr=1e-3, learn_scales=learn_scales,
                                progress=False)
    assert state_bytes(compressed) == compressed_before
    blocks = [s for s in result.stages if s["stage"].startswith("encoder.layer.")]
    assert len(blocks) == 2 and all(s["parameters"] > 0 for s in blocks)
    assert all(s["best_loss"] < s["start_loss"] and s["best_epoch"] > 0 for s in blocks)
    for name in layers:
        before, tuned = compressed.get_submodule(name), result.model.get_submodule(name)
        assert isinstance(tuned, GroupQuantLinear) and (tuned.bits, tuned.group_size) == (3, 32)
        assert _bytes(tuned) == _bytes(before) and torch.equal(tuned.zero_point, before.zero_point)
        assert torch.equal(tuned.scale, before.scale) != learn_scales  # steps move only when learned
    assert any(not torch.equal(result.model.get_submodule(n).codes(), compressed.get_submodule(n).codes())
               for n in layers)
    assert all(p.requires_grad for p in result.model.parameters())
