"""Built-in method families; importing this package registers them in `workbench.registry`.

The explicit table of built-ins (Torch-Pruning's ``PrunerBox`` pattern): each module below calls
`register_method` / `register_recipe` for its family; `workbench/__init__` imports this package once.
"""
from workbench.methods import (aware, fusion, gptq, lowrank, nm_sparsity, pruning, quant_embedding, quant_lowrank,
                               quantization, recurrent, tensor)

FAMILIES = {"lowrank": lowrank, "aware": aware, "recurrent": recurrent, "tensor": tensor, "pruning": pruning, "nm_sparsity": nm_sparsity,
            "quantization": quantization, "quant_embedding": quant_embedding, "gptq": gptq,
            "quant_lowrank": quant_lowrank, "fusion": fusion}

__all__ = ["FAMILIES"]
