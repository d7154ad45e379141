"""Incremental evaluation of plans: what a slider move costs is a slice and a partial forward.

`Engine(task)` answers ``evaluate(plan) -> {"metric", "params", "bytes", "flops", ...}`` with the
same numbers as ``task.evaluate(workbench.apply(task.model, plan))`` but without redoing work:

* **Factors.** The SVD of each layer is computed once (`FactorCache`): a full SVD, or
  ``torch.svd_lowrank`` for large layers when only the top ``upto`` singular triplets are asked
  for. A rank-r layer is then a slice of the cached factors. A randomized SVD is only valid up to
  the rank it was computed for; asking for more recomputes a full SVD (``report()["svd_recomputes"]``).
* **Activations.** The model is cut into top-level *stages* (`workbench.stages.model_stages`: the children of an
  ``nn.Sequential``, a model's own ``compression_stages()`` method, or a function registered with
  `register_stages`; else cut automatically at a list of blocks, `workbench.auto_stages`, or in
  the model's `torch.fx` graph, `workbench.graph_stages`; models
  that cannot be cut are one stage = full evaluation, ``report()["stages_found"]`` says why). The input entering each
  stage is cached per *prefix* (the plan choices of all earlier stages), so changing one layer
  re-runs the network from that layer's stage onward. The cache is an LRU bounded by
  ``max_cache_bytes``; past the bound entries are evicted and evaluation falls back to earlier
  stages (at worst the full forward). ``report()`` says how much memory it uses.
* **Batches.** The evaluation inputs are cut into batches of ``batch_size``, or into the index
  groups of the model's ``evaluation_batches(inputs) -> [LongTensor]`` where it defines one (MiniLM:
  sentences of similar length together, so each batch carries little padding); outputs are put
  back in the task's order before the metric. ``subset=n`` judges plans on ``task.subset(n)``
  (n evenly spaced evaluation samples), for models whose full evaluation is too slow for a slider.
* **Preview.** ``preview(layer, rank)`` needs no forward pass: the relative Frobenius error of the
  truncated weight (from the spectrum) and the relative error of the layer's output on its cached
  evaluation inputs, both O(1) per call after a one-off precomputation.

The engine knows no method by name. A method with a ``view`` (the ``svd`` rank: slices of the
cached factors) is evaluated through it; any other choice is built once through the registry (the
module ``apply`` would build) and memoised; plans with whole-model ``steps`` are evaluated fully.
Every entry is checked by `workbench.compress.check_layer_choice`, the validator ``apply`` uses.

Modules: `core` (`Engine`), `factors` (`FactorCache`), `activations` (`ActivationCache`),
`preview` (output errors of every rank), `sizing` (params / bytes / FLOPs of a layer choice),
`batching` (evaluation batches, NHWC).

Sizes: ``params`` as `workbench.measure.count_params`; ``bytes`` is the *tensor payload* of the
state dict (sum of ``numel * element_size`` of every state-dict tensor), an estimate that leaves
out the container overhead of a written file. The exact size of a really written file is
`workbench.measure.saved_bytes` (``bytes_file`` when ``evaluate(plan, file_bytes=True)``).
``flops``: FLOPs of one sample's forward pass (``torch.utils.flop_counter``), the original's
count plus each changed layer's difference, counted once per choice on that layer's own input.
"""
from workbench.engine.activations import ActivationCache
from workbench.engine.core import BYTES_METHOD, DEFAULT_CACHE_BYTES, Engine
from workbench.engine.factors import FactorCache
from workbench.engine.sizing import layer_flops

__all__ = ["ActivationCache", "BYTES_METHOD", "DEFAULT_CACHE_BYTES", "Engine", "FactorCache", "layer_flops"]
