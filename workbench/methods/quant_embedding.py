"""``quant_embedding``: embedding tables (and the LM heads tied to them) as row-wise b-bit codes.

A method of its own rather than a layer type of ``quant``: ``quant``'s settings (symmetric or
not, per tensor or per channel, k-means) and its layer types are what widgets and allocators
offer for matrix layers; a table always gets one asymmetric grid per row (2..8 bits, float16
scale, uint8 zero point) and takes only ``bits``. The ``quant`` recipe reaches it with
``include_embeddings=True``; the ``quant_embedding`` recipe plans tables alone.

A tied group (``transformer.wte`` + ``lm_head`` of a GPT-2) is one unit: both names get the same
choice, `workbench.ties.build_shared` calls the builder once and both names hold the same
`QuantEmbedding` (lookup for ids, head for activations), so the codes are stored once.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import nn

from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.inventory import embedding_units, get_submodule
from workbench.kernels import row_quant
from workbench.layers.quant_embedding import QuantEmbedding, check_embedding
from workbench.plan import LayerPlan, Plan
from workbench.registry import LayerContext, Method, check_options, register_method, register_recipe

SETTINGS = ("bits",)


def check_quant_embedding(module: nn.Module, params: Mapping[str, Any], name: str) -> None:
    """Refuse unknown settings, bits outside 2..8, ``max_norm``, a Linear with a bias."""
    check_options(f"method 'quant_embedding' (layer {name!r})", params, SETTINGS)
    row_quant.check_row_bits(params.get("bits"), name)
    check_embedding(module, name)


def build_quant_embedding(module: nn.Module, params: Mapping[str, Any], context: LayerContext) -> nn.Module:
    """`QuantEmbedding` of ``module``'s table (an ``nn.Embedding``, or a tied bias-free head)."""
    check_quant_embedding(module, params, context.name)
    return QuantEmbedding.from_embedding(module, params["bits"], context.name)


def quant_embedding_skeleton(module: nn.Module, params: Mapping[str, Any], context: LayerContext) -> nn.Module:
    """The packed table's structure only (codes and scales to be loaded from a file)."""
    check_quant_embedding(module, params, context.name)
    vocab, dim = module.weight.shape
    padding_idx = module.padding_idx if isinstance(module, nn.Embedding) else None
    return QuantEmbedding(vocab, dim, params["bits"], padding_idx, context.name)


register_method(Method("quant_embedding", build_quant_embedding, (nn.Embedding, nn.Linear),
                       skeleton=quant_embedding_skeleton, check=check_quant_embedding,
                       description="embedding tables (and LM heads tied to them) as row-wise b-bit codes "
                                   "(2..8), a float16 scale and uint8 zero point per row, codes packed once"))


def embedding_entries(model: nn.Module, bits: int, layers: Sequence[str] | None = None
                      ) -> tuple[dict[str, LayerPlan], dict[tuple[str, ...], str]]:
    """``(layers, left_dense)`` of a plan quantizing ``model``'s tables (or those ``layers`` name:
    naming a member of a tied group names the group) to ``bits`` bits."""
    row_quant.check_row_bits(bits)
    units, dense = embedding_units(model)
    if layers is None:
        chosen = [names for names, _ in units]
    else:
        chosen = []
        for name in layers:
            get_submodule(model, name)
            found = next((names for names, _ in units if name in names), None)
            if found is None:
                held = next((reason for names, reason in dense.items() if name in names), None)
                if held is not None:
                    raise WorkbenchError(f"layer {name!r} cannot take quant_embedding: {held}")
                known = ", ".join(n for names, _ in units for n in names) or "(none in this model)"
                raise UnsupportedLayerError(f"layer {name!r} is not an embedding table quant_embedding can take; "
                                            f"it handles: {known}")
            chosen.append(found)
    for names in chosen:  # every table checked before the plan is made
        for name in names:
            check_quant_embedding(get_submodule(model, name), {"bits": bits}, name)
    choice = LayerPlan("quant_embedding", {"bits": bits})
    return {name: choice for names in dict.fromkeys(chosen) for name in names}, dense


def quant_embedding_plan(model: nn.Module, *, bits: int | None = None, layers: Sequence[str] | None = None) -> Plan:
    """Row-wise ``bits``-bit codes (2..8) for every embedding table (or ``layers``), a tied LM head with its table."""
    if bits is None:
        raise WorkbenchError("quant_embedding needs bits (2..8), e.g. bits=8")
    entries, dense = embedding_entries(model, bits, layers)
    if not entries:
        raise WorkbenchError("quant_embedding handles nn.Embedding tables and this model has none it can take"
                             + (f" ({'; '.join(dense.values())})" if dense else ""))
    return Plan(entries, left_dense=dense)


register_recipe("quant_embedding", quant_embedding_plan)
