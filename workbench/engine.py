"""Incremental evaluation of plans: what a slider move costs is a slice and a partial forward.

`Engine(task)` answers ``evaluate(plan) -> {"metric", "params", "bytes", "flops", ...}`` with the
same numbers as ``task.evaluate(workbench.apply(task.model, plan))`` but without redoing work:

* **Factors.** The SVD of each layer is computed once (`FactorCache`): a full SVD, or
  ``torch.svd_lowrank`` for large layers when only the top ``upto`` singular triplets are asked
  for. A rank-r layer is then a slice of the cached factors. A randomized SVD is only valid up to
  the rank it was computed for; asking for more recomputes a full SVD (``report()["svd_recomputes"]``).
* **Activations.** The model is cut into top-level *stages* (`model_stages`: the children of an
  ``nn.Sequential``, a model's own ``compression_stages()`` method, or a function registered with
  `register_stages`; unknown models are one stage = full evaluation). The input entering each
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

Layers with a method other than ``svd`` are built once per choice through the registry (the
module ``apply`` would build) and memoised; plans with whole-model ``steps`` are evaluated fully.

Sizes: ``params`` as `workbench.measure.count_params`; ``bytes`` is the *tensor payload* of the
state dict (sum of ``numel * element_size`` of every state-dict tensor), an estimate that leaves
out the container overhead of a written file. The exact size of a really written file is
`workbench.measure.saved_bytes` (``bytes_file`` when ``evaluate(plan, file_bytes=True)``).
``flops``: FLOPs of one sample's forward pass (``torch.utils.flop_counter``), the original's
count plus each changed layer's difference, counted once per choice on that layer's own input.
"""
from __future__ import annotations

import copy
import gc
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from workbench.compress import apply, collect_layer_inputs
from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.inventory import get_submodule, matrix_layers, set_submodule, weight_matrix
from workbench.kernels import svd as svd_kernels
from workbench.layers.lowrank import LowRankConv2d, LowRankLinear
from workbench.measure import count_flops, count_params, saved_bytes
from workbench.plan import LayerPlan, Plan
from workbench.registry import LayerContext, get_method

DEFAULT_CACHE_BYTES = 256 * 2**20
BYTES_METHOD = ("state-dict tensor payload: sum of numel * element_size over the state dict "
                "(file container overhead excluded; workbench.measure.saved_bytes writes the real file)")


# --------------------------------------------------------------------------- stages
@dataclass(frozen=True)
class Stage:
    """One top-level piece of a model's forward pass.

    ``name``: qualified name of the submodule it runs ("" for the whole model); the layers it owns
    are that module and everything below it. ``call(module, x) -> y`` runs it (default
    ``module(x)``). ``then``: names of parameter-free modules (activations, pooling, reshapes) run
    on the result inside the same stage, so their outputs need no cache entry of their own. The
    forward pass of the model must equal running its stages in order.
    """

    name: str
    call: Callable[[nn.Module, Any], Any] | None = None
    then: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """``name`` joined with ``then`` by ``+`` (``"fc1+act1"``)."""
        return "+".join((self.name, *self.then))

    def run(self, model: nn.Module, x: Any) -> Any:
        module = model.get_submodule(self.name) if self.name else model
        x = module(x) if self.call is None else self.call(module, x)
        for name in self.then:
            x = model.get_submodule(name)(x)
        return x

    def owns(self, layer: str) -> bool:
        return self.name == "" or any(layer == n or layer.startswith(n + ".") for n in (self.name, *self.then))


_STAGE_PROVIDERS: dict[type, Callable[[nn.Module], list]] = {}


def register_stages(model_type: type, provider: Callable[[nn.Module], list]) -> None:
    """Declare how models of ``model_type`` split into stages.

    ``provider(model)`` returns an ordered list of `Stage` or ``(name, module)`` pairs (the module
    must be ``model.get_submodule(name)``, called as ``module(x)``). A model may instead define a
    ``compression_stages(self)`` method returning the same list.
    """
    _STAGE_PROVIDERS[model_type] = provider


def _as_stage(model: nn.Module, entry: Stage | tuple[str, nn.Module]) -> Stage:
    if isinstance(entry, Stage):
        return entry
    name, module = entry
    if model.get_submodule(name) is not module:
        raise WorkbenchError(f"stage {name!r} does not name its module inside the model")
    return Stage(name)


def model_stages(model: nn.Module) -> list[Stage]:
    """Ordered stages of ``model``; ``[Stage("")]`` (the whole model) when it declares none."""
    declared = getattr(model, "compression_stages", None)
    if callable(declared):
        entries = declared()
    elif type(model) in _STAGE_PROVIDERS:
        entries = _STAGE_PROVIDERS[type(model)](model)
    elif isinstance(model, nn.Sequential):
        entries = _sequential_stages(model)
    else:
        return [Stage("")]
    return [_as_stage(model, entry) for entry in entries]


def _sequential_stages(model: nn.Sequential) -> list[Stage]:
    """One stage per child that holds parameters, each with the parameter-free children after it."""
    stages: list[Stage] = []
    for name, child in model.named_children():
        if stages and next(child.parameters(), None) is None and next(child.buffers(), None) is None:
            stages[-1] = Stage(stages[-1].name, stages[-1].call, (*stages[-1].then, name))
        else:
            stages.append(Stage(name))
    return stages


def _row_reader_stages(model: nn.Module) -> list[Stage]:
    # RowReader.forward: out, _ = rnn(rows(x)); head(out[:, -1])
    return [Stage("rows"), Stage("rnn", lambda rnn, x: rnn(x)[0][:, -1]), Stage("head")]


def _register_builtin_stages() -> None:
    from workbench.zoo.digits import RowReader

    register_stages(RowReader, _row_reader_stages)


_register_builtin_stages()


# --------------------------------------------------------------------------- factors
@dataclass
class _Factors:
    u: torch.Tensor        # (m, k)
    s: torch.Tensor        # (k,)
    vh: torch.Tensor       # (k, n)
    valid_rank: int        # ranks 1..valid_rank may be sliced
    weight_sq: float       # ||W||_F^2 (exact, also when the SVD is partial)
    randomized: bool


class FactorCache:
    """SVD factors of each layer's weight matrix, computed once.

    ``randomized_min_dim``: layers with ``min(m, n) >= randomized_min_dim`` use
    ``torch.svd_lowrank(q=upto + oversample)`` when an ``upto`` rank is given and is at most a
    quarter of ``min(m, n)``; everything else gets the full SVD (`workbench.kernels.svd.svd`, the
    one `workbench.apply` uses, so the factors are identical).
    """

    def __init__(self, model: nn.Module, randomized_min_dim: int = 1024, oversample: int = 10,
                 niter: int = 4, seed: int = 0):
        self.model = model
        self.randomized_min_dim, self.oversample, self.niter, self.seed = randomized_min_dim, oversample, niter, seed
        self._factors: dict[str, _Factors] = {}
        self._split: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.recomputes = 0

    def get(self, name: str, upto: int | None = None) -> _Factors:
        """Factors of layer ``name`` valid at least up to rank ``upto`` (default: all ranks)."""
        cached = self._factors.get(name)
        if cached is not None and (upto is None and not cached.randomized or
                                   upto is not None and upto <= cached.valid_rank):
            return cached
        if cached is not None:
            self.recomputes += 1
        w = weight_matrix(get_submodule(self.model, name))
        m, n = w.shape
        k = min(m, n)
        weight_sq = float(w.double().pow(2).sum())
        if upto is not None and k >= self.randomized_min_dim and upto + self.oversample <= k // 4:
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(self.seed)
            try:
                u, s, v = torch.svd_lowrank(w.double(), q=upto + self.oversample, niter=self.niter)
            finally:
                torch.random.set_rng_state(generator_state)
            result = _Factors(u.to(w.dtype), s.to(w.dtype), v.T.to(w.dtype), upto, weight_sq, True)
        else:
            full = svd_kernels.svd(w)
            result = _Factors(full.u, full.s, full.vh, k, weight_sq, False)
        self._factors[name] = result
        self._split.pop(name, None)
        return result

    def factors(self, name: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a: (m, rank), b: (rank, n))`` as `workbench.kernels.svd.SVD.factors` splits them.

        Views of ``u * sqrt(s)`` and ``sqrt(s) * vh``, multiplied out once per layer: element by
        element the same numbers as splitting at each rank, without the work.
        """
        f = self.get(name, upto=rank)
        if name not in self._split:
            root = f.s.sqrt()
            self._split[name] = (f.u * root, root[:, None] * f.vh)
        a, b = self._split[name]
        return a[:, :rank], b[:rank]

    def nbytes(self) -> int:
        tensors = [t for f in self._factors.values() for t in (f.u, f.s, f.vh)]
        tensors += [t for pair in self._split.values() for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors)


class _SlicedLowRank(nn.Module):
    """Evaluation view of an ``svd`` choice: ``second(first(x))`` exactly as `LowRankLinear` /
    `LowRankConv2d` compute it, on the cached factors, without building their modules.

    ``first: (r, n)`` (conv: ``(r, in, kh, kw)``), ``second: (m, r)`` (conv: ``(out, r, 1, 1)``).
    For a Linear both are views of the cached factors, no copy: ``first`` a block of rows, and
    ``second`` the first ``r`` columns, a row-major matrix with a longer row stride, which BLAS
    multiplies by the same kernel as the real layer's contiguous weight (outputs bit-identical;
    `tests/test_engine.py` checks). Only the engine's working copy holds these; what is built for
    export comes from `workbench.apply`.
    """

    def __init__(self, original: nn.Module, a: torch.Tensor, b: torch.Tensor, channels_last: bool = False):
        super().__init__()
        self.conv = original if isinstance(original, nn.Conv2d) else None
        if self.conv is None:
            self.first, self.second = b, a
        else:
            w = original.weight
            layout = torch.channels_last if channels_last else torch.contiguous_format
            self.first = b.reshape(len(b), *w.shape[1:]).contiguous(memory_format=layout)
            self.second = a.reshape(w.shape[0], a.shape[1], 1, 1).contiguous(memory_format=layout)
        self.bias = None if original.bias is None else original.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.linear(F.linear(x, self.first), self.second, self.bias)
        c = self.conv
        return F.conv2d(F.conv2d(x, self.first, None, c.stride, c.padding, c.dilation), self.second, self.bias)


# --------------------------------------------------------------------------- activation cache
class ActivationCache:
    """LRU of stage inputs keyed by ``(stage index, prefix signature)``, bounded in bytes."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise WorkbenchError(f"max_cache_bytes={max_bytes} must be >= 0")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        self.bytes_used = 0
        self.evictions = 0

    @staticmethod
    def size_of(value: Any) -> int:
        return sum(t.numel() * t.element_size() for t in tree_leaves(value) if isinstance(t, torch.Tensor))

    def get(self, key: tuple) -> Any | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        self._entries.move_to_end(key)
        return hit[0]

    def put(self, key: tuple, value: Any) -> None:
        size = self.size_of(value)
        if size > self.max_bytes:
            return
        if key in self._entries:
            self.bytes_used -= self._entries.pop(key)[1]
        while self._entries and self.bytes_used + size > self.max_bytes:
            _, (_, old) = self._entries.popitem(last=False)
            self.bytes_used -= old
            self.evictions += 1
        self._entries[key] = (value, size)
        self.bytes_used += size

    def __len__(self) -> int:
        return len(self._entries)


# --------------------------------------------------------------------------- engine
def _state_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


class Engine:
    """Incremental evaluator of plans on a `workbench.Task`; the task's model is never modified.

    Parameters
    ----------
    task : the model with its evaluation data and metric.
    max_cache_bytes : bound on the activation cache in bytes (0 disables it: full evaluation).
    batch_size : evaluation batch (same default as `Task.outputs`, so results are identical).
    randomized_min_dim : see `FactorCache`.
    preview : precompute what ``preview`` needs (one pass collecting each layer's inputs).
    freeze_gc : call ``gc.freeze()`` once set up, so that Python's cyclic garbage collector no
        longer scans the objects alive now (the model, the engine's caches, imported libraries).
        With transformers loaded that is ~0.5M objects, a 140 ms full collection that would
        otherwise land on random slider moves. Objects created later are collected as usual.
    subset : judge plans on ``task.subset(subset)`` (that many evenly spaced evaluation samples;
        None: all). ``self.task`` is then the subset task.
    """

    def __init__(self, task, max_cache_bytes: int = DEFAULT_CACHE_BYTES, batch_size: int = 4096,
                 randomized_min_dim: int = 1024, preview: bool = True, subset: int | None = None,
                 freeze_gc: bool = True):
        task = task.subset(subset)
        self.task = task
        self.original = task.model
        self.batch_size = batch_size
        self.layers = {info.name: info for info in matrix_layers(self.original)}
        self.factors = FactorCache(self.original, randomized_min_dim=randomized_min_dim)
        self.cache = ActivationCache(max_cache_bytes)
        self.working = copy.deepcopy(self.original).eval()
        self.channels_last = any(isinstance(m, nn.Conv2d) for m in self.working.modules())
        if self.channels_last:  # oneDNN's CPU convolutions and pooling run faster in NHWC
            self.channels_last = _runs_channels_last(self.working, task.example_input)
        self.stages = model_stages(self.working)
        self._stage_index: dict[str, int] = {}
        self._svd_checked: dict[str, nn.Module] = {}
        self._installed: dict[str, LayerPlan] = {}
        self._originals: dict[str, nn.Module] = {}
        self._built: OrderedDict[tuple[str, LayerPlan], nn.Module] = OrderedDict()
        self._layer_sizes: dict[tuple[str, LayerPlan | None], tuple[int, int, int]] = {}
        self._calibration: dict[str, torch.Tensor] = {}
        self._example_inputs: dict[str, torch.Tensor] | None = None
        self.stats = {"evaluations": 0, "full_evaluations": 0, "stages_run": 0, "stages_skipped": 0}
        self._batches, self._order = _evaluation_batches(self.original, task.eval_inputs, batch_size)
        self.base = {"params": count_params(self.original), "bytes": _state_bytes(self.original),
                     "flops": count_flops(self.original, task.example_input)}
        self._preview: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if preview and self.layers:
            self._prepare_preview()
        # the original's stage inputs, cached once (any later plan starts from the ones it shares)
        self.base["metric"] = self.evaluate(Plan({}))["metric"]
        if freeze_gc:
            gc.collect()
            gc.freeze()

    # ------------------------------------------------------------------ public
    def evaluate(self, plan: Plan, file_bytes: bool = False) -> dict:
        """Metric and sizes of ``plan`` applied to the task's model.

        Returns ``{"metric", "params", "bytes", "bytes_method", "flops", "from_stage",
        "stages_run", "full", "compute_ms"}`` (+ ``"bytes_file"`` when ``file_bytes``: the size of
        the state dict really written by `workbench.measure.saved_bytes`, which builds the model).
        """
        if not isinstance(plan, Plan):
            raise WorkbenchError(f"evaluate needs a workbench.Plan, got {type(plan).__name__}")
        start = time.perf_counter()
        self.stats["evaluations"] += 1
        if plan.steps:
            model = apply(self.original, plan, calibration_inputs=self.task.calibration_inputs())
            result = {"metric": self.task.evaluate(model), "params": count_params(model),
                      "bytes": _state_bytes(model), "flops": count_flops(model, self.task.example_input),
                      "from_stage": 0, "stages_run": len(self.stages), "full": True}
            self.stats["full_evaluations"] += 1
        else:
            self._install(plan)  # validates every entry before anything runs
            first, outputs = self._forward(plan)
            sizes = [self._layer_size(name, choice) for name, choice in plan.layers.items()]
            result = {"metric": self.task.metric(outputs, self.task.eval_targets),
                      "params": self.base["params"] + sum(s[0] for s in sizes),
                      "bytes": self.base["bytes"] + sum(s[1] for s in sizes),
                      "flops": self.base["flops"] + sum(s[2] for s in sizes),
                      "from_stage": first, "stages_run": len(self.stages) - first, "full": first == 0}
        result["bytes_method"] = BYTES_METHOD
        if file_bytes:
            result["bytes_file"] = saved_bytes(self.build(plan))
        result["compute_ms"] = (time.perf_counter() - start) * 1e3
        return result

    def build(self, plan: Plan) -> nn.Module:
        """The compressed model as `workbench.apply` builds it (a new, independent model)."""
        return apply(self.original, plan, calibration_inputs=self.task.calibration_inputs())

    def preview(self, layer: str, rank: int) -> dict:
        """Errors of layer ``layer`` truncated at ``rank``, without a forward pass.

        ``weight_error``: ``||W - W_r||_F / ||W||_F`` (Eckart–Young, from the singular values).
        ``output_error``: ``||X (W - W_r)^T||_F / ||X W^T||_F`` on the layer's cached evaluation
        inputs ``X`` (conv: unfolded patches). Both are fractions in [0, 1].
        """
        info = self._info(layer)
        svd_kernels.check_rank(rank, info.shape, layer)
        f = self.factors.get(layer, upto=rank)
        kept_sq = float(f.s[:rank].double().pow(2).sum())
        weight_error = max(f.weight_sq - kept_sq, 0.0) ** 0.5 / max(f.weight_sq, 1e-300) ** 0.5
        result = {"layer": layer, "rank": rank, "weight_error": weight_error, "output_error": None}
        if layer in self._preview:
            tail, total = self._preview[layer]
            if rank < len(tail):
                result["output_error"] = float(tail[rank].clamp_min(0).sqrt() / total.sqrt())
            else:
                result["output_error"] = 0.0
        return result

    def report(self) -> dict:
        """Memory and work counters: activation cache bytes used / bound, factor bytes, hits."""
        return {"cache_bytes": self.cache.bytes_used, "cache_limit_bytes": self.cache.max_bytes,
                "cache_entries": len(self.cache), "cache_evictions": self.cache.evictions,
                "factor_bytes": self.factors.nbytes(), "svd_recomputes": self.factors.recomputes,
                "stages": [s.label for s in self.stages], **self.stats}

    def stage_of(self, layer: str) -> int:
        """Index of the stage that owns ``layer`` (0 when no stage does: full evaluation)."""
        if layer not in self._stage_index:
            self._stage_index[layer] = next((i for i, stage in enumerate(self.stages) if stage.owns(layer)), 0)
        return self._stage_index[layer]

    # ------------------------------------------------------------------ internals
    def _info(self, layer: str):
        if layer not in self.layers:
            known = ", ".join(self.layers) or "(none)"
            raise WorkbenchError(f"unknown layer {layer!r}; layers with a weight matrix: {known}")
        return self.layers[layer]

    def _module_for(self, name: str, choice: LayerPlan) -> nn.Module:
        """The module evaluated for ``choice`` at ``name``: a `_SlicedLowRank` view for a plain rank,
        else what the registry builds (memoised, LRU)."""
        if _is_plain_svd(choice):
            return self._svd_view(name, choice["rank"])
        key = (name, choice)
        hit = self._built.get(key)
        if hit is not None:
            self._built.move_to_end(key)
            return hit
        original = self._checked_original(name, choice)
        inputs = self._calibration_inputs(name) if get_method(choice.method).needs_inputs else None
        module = get_method(choice.method).build(original, choice.params, LayerContext(name, inputs))
        module.eval()
        self._built[key] = module
        while len(self._built) > 512:
            self._built.popitem(last=False)
        return module

    def _checked_original(self, name: str, choice: LayerPlan) -> nn.Module:
        """The original layer ``name``, after checking that ``choice``'s method can compress it."""
        original = get_submodule(self.original, name)
        method = get_method(choice.method)
        if method.kind != "layer":
            raise WorkbenchError(f"{choice.method!r} is a whole-model step; put it in plan.steps")
        if not isinstance(original, method.layer_types):
            allowed = ", ".join(t.__name__ for t in method.layer_types)
            raise UnsupportedLayerError(f"method {choice.method!r} cannot compress layer {name!r} of type "
                                        f"{type(original).__name__}; it handles: {allowed}")
        if isinstance(original, nn.Conv2d) and original.groups != 1 and choice.method == "svd":
            raise UnsupportedLayerError(
                f"layer {name!r} is a grouped conv (groups={original.groups}); SVD needs groups=1")
        return original

    def _svd_view(self, name: str, rank: int) -> nn.Module:
        if name not in self._svd_checked:
            self._svd_checked[name] = self._checked_original(name, LayerPlan("svd", {"rank": rank}))
        original = self._svd_checked[name]
        svd_kernels.check_rank(rank, self._info(name).shape, name)
        a, b = self.factors.factors(name, rank)
        if isinstance(original, nn.Conv2d) and original.padding_mode != "zeros":
            return LowRankConv2d.from_conv(original, rank, factors=(a, b), name=name).eval()
        return _SlicedLowRank(original, a, b, self.channels_last)

    def _svd_layer(self, name: str, rank: int) -> nn.Module:
        """The real layer `workbench.apply` builds for rank ``rank`` (for exact sizes)."""
        original = get_submodule(self.original, name)
        factors = self.factors.factors(name, rank)
        if isinstance(original, nn.Linear):
            return LowRankLinear.from_linear(original, rank, factors=factors, name=name)
        return LowRankConv2d.from_conv(original, rank, factors=factors, name=name)

    def _calibration_inputs(self, name: str) -> torch.Tensor:
        if name not in self._calibration:
            self._calibration.update(collect_layer_inputs(self.original, [name], self.task.calibration_inputs()))
        return self._calibration[name]

    def _install(self, plan: Plan) -> None:
        """Make ``self.working`` hold ``plan``'s modules (built first, so a bad entry changes nothing)."""
        wanted = {name: self.working.get_submodule(name) if self._installed.get(name) == choice
                  else self._module_for(name, choice) for name, choice in plan.layers.items()}
        for name in list(self._installed):
            if name not in wanted:
                set_submodule(self.working, name, self._originals.pop(name))
                del self._installed[name]
        for name, module in wanted.items():
            if name not in self._originals:
                self._originals[name] = self.working.get_submodule(name)
            set_submodule(self.working, name, module)
            self._installed[name] = plan.layers[name]

    def _signatures(self, plan: Plan) -> list[tuple]:
        """``[signature of stage i]``: the plan choices of the layers owned by stages before i."""
        entries = sorted((self.stage_of(name), name, choice) for name, choice in plan.layers.items())
        signatures, taken = [], 0
        for index in range(len(self.stages)):
            while taken < len(entries) and entries[taken][0] < index:
                taken += 1
            signatures.append(tuple((name, choice) for _, name, choice in entries[:taken]))
        return signatures

    @torch.no_grad()
    def _forward(self, plan: Plan) -> tuple[int, torch.Tensor]:
        start, x = 0, self._batches
        signatures = self._signatures(plan)
        for index in range(len(self.stages) - 1, 0, -1):
            hit = self.cache.get((index, signatures[index]))
            if hit is not None:
                start, x = index, hit
                break
        if start == 0:
            self.stats["full_evaluations"] += 1
        self.stats["stages_skipped"] += start
        for index in range(start, len(self.stages)):
            if index > start:
                self.cache.put((index, signatures[index]), x)
            x = [self.stages[index].run(self.working, batch) for batch in x]
            self.stats["stages_run"] += 1
        out = torch.cat(x) if len(x) > 1 else x[0]
        if self._order is not None:  # batches grouped by the model: back to the task's order
            out = torch.empty_like(out).index_copy_(0, self._order, out)
        return start, out

    def _layer_size(self, name: str, choice: LayerPlan | None) -> tuple[int, int, int]:
        """``(params, bytes, flops)`` of ``choice`` minus those of the original layer (None: itself).

        For a method with ``rank_params`` (each size is ``c0 + sum_p c_p * rank_p`` for ranks >= 2),
        a choice is sized exactly from the builds with its large ranks at 2 and with one of them at
        3, so a new slider value costs no build and no FLOP count.
        """
        key = (name, choice)
        if key in self._layer_sizes:
            return self._layer_sizes[key]
        ranks = _rank_settings(choice)
        if any(value > 3 for value in ranks.values()):
            # ranks 1 and 2 stay exact (an einsum over a rank of 1 is a plain product, no matmul)
            low = {p: v if v <= 3 else 2 for p, v in ranks.items()}
            base = self._layer_size(name, choice.with_params(**low))
            sizes = base
            for param, value in ranks.items():
                if value > 3:
                    step = self._layer_size(name, choice.with_params(**{**low, param: 3}))
                    sizes = tuple(total + (three - two) * (value - 2) for total, two, three in zip(sizes, base, step))
        else:
            if choice is None:
                module = get_submodule(self.original, name)
            elif _is_plain_svd(choice):
                module = self._svd_layer(name, choice["rank"])
            else:
                module = self._module_for(name, choice)
            sizes = (count_params(module), _state_bytes(module), layer_flops(module, self._example_input(name)))
            if choice is not None:
                sizes = tuple(new - old for new, old in zip(sizes, self._layer_size(name, None)))
        self._layer_sizes[key] = sizes
        return sizes

    def _example_input(self, name: str) -> torch.Tensor:
        """Input entering layer ``name`` for the task's one-sample example (as in ``measure``).

        The first call captures the inputs of every matrix layer (and ``name``) in one forward pass.
        """
        if self._example_inputs is None or name not in self._example_inputs:
            captured: dict[str, torch.Tensor] = {} if self._example_inputs is None else self._example_inputs
            wanted = [n for n in dict.fromkeys([*self.layers, name]) if n not in captured]
            handles = [get_submodule(self.original, n).register_forward_pre_hook(
                lambda mod, args, _n=n: captured.setdefault(_n, args[0])) for n in wanted]
            try:
                with torch.no_grad():
                    self.original(self.task.example_input)
            finally:
                for handle in handles:
                    handle.remove()
            self._example_inputs = captured
        return self._example_inputs[name]

    @torch.no_grad()
    def _prepare_preview(self) -> None:
        """For each matrix layer, ``tail[r] = ||X (W - W_r)^T||_F^2`` for every rank r, and ``||X W^T||^2``.

        With ``W = U S V^T``, ``||X (W - W_r)^T||_F^2 = sum_{j >= r} s_j^2 ||X v_j||^2`` (U has
        orthonormal columns), so one product ``X V`` per layer gives every rank's error.
        """
        names = list(self.layers)
        inputs = collect_layer_inputs(self.original, names, self.task.eval_inputs)
        for name in names:
            module = get_submodule(self.original, name)
            x = inputs.pop(name).double()
            f = self.factors.get(name)
            if isinstance(module, nn.Conv2d):
                # patches projected on each right singular vector = a conv with the v_j as kernels
                def project(kernels: torch.Tensor) -> torch.Tensor:
                    return F.conv2d(x, kernels.reshape(-1, *module.weight.shape[1:]), None, module.stride,
                                    module.padding, module.dilation)
                col_sq = project(f.vh.double()).pow(2).sum((0, 2, 3))          # (k,) ||X v_j||^2
                total = project(weight_matrix(module).double()).pow(2).sum()
            else:
                col_sq = (x @ f.vh.double().T).pow(2).sum(0)                   # (k,) ||X v_j||^2
                total = (x @ weight_matrix(module).double().T).pow(2).sum()
            weighted = f.s.double().pow(2) * col_sq                            # (k,)
            tail = weighted.flip(0).cumsum(0).flip(0)                          # tail[r] = sum_{j>=r}
            total = total.clamp_min(1e-300)
            self._preview[name] = (tail, total)


@torch.no_grad()
def _runs_channels_last(model: nn.Module, example: Any) -> bool:
    """Convert ``model`` (the engine's own copy) to NHWC weights if it still runs that way; a
    forward that needs contiguous NCHW activations (``x.view(n, -1)`` after a conv) keeps NCHW."""
    model.to(memory_format=torch.channels_last)
    try:
        model(example)
        return True
    except RuntimeError:
        model.to(memory_format=torch.contiguous_format)
        return False


def _is_plain_svd(choice: LayerPlan) -> bool:
    return choice.method == "svd" and set(choice.params) == {"rank"}


def _rank_settings(choice: LayerPlan | None) -> dict[str, int]:
    """``{setting: rank}`` of ``choice``'s integer rank settings (its method's ``rank_params``)."""
    if choice is None:
        return {}
    names = get_method(choice.method).rank_params
    return {p: v for p, v in choice.params.items() if p in names and isinstance(v, int) and not isinstance(v, bool)}


def _evaluation_batches(model: nn.Module, inputs: torch.Tensor,
                        batch_size: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """``(batches, order)``: the model's ``evaluation_batches`` index groups when it declares them
    (``order``: the concatenated indices), else contiguous slices of ``batch_size`` (``order`` None)."""
    grouping = getattr(model, "evaluation_batches", None)
    if not callable(grouping):
        return [inputs[i:i + batch_size] for i in range(0, len(inputs), batch_size)], None
    groups = [torch.as_tensor(g, dtype=torch.long) for g in grouping(inputs)]
    order = torch.cat(groups) if groups else torch.zeros(0, dtype=torch.long)
    if not torch.equal(order.sort().values, torch.arange(len(inputs))):
        raise WorkbenchError(f"{type(model).__name__}.evaluation_batches must list each of the "
                             f"{len(inputs)} evaluation samples exactly once")
    return [inputs[g] for g in groups], order


@torch.no_grad()
def layer_flops(module: nn.Module, example: Any) -> int:
    """FLOPs of ``module(example)`` as ``torch.utils.flop_counter`` counts them.

    Modules whose weighted leaves are all ``nn.Linear`` / ungrouped-or-grouped ``nn.Conv2d`` (dense
    and low-rank layers) are counted by formula from one hooked run (``2 * tokens * in * out``;
    ``2 * numel(output) * in/groups * kh * kw``), which is what the counter reports for them but
    ~20x cheaper; anything else goes through `workbench.measure.count_flops`.
    """
    leaves = [m for m in module.modules() if next(m.parameters(recurse=False), None) is not None]
    if not leaves or any(type(m) not in (nn.Linear, nn.Conv2d) for m in leaves):
        return count_flops(module, example)
    total = 0

    def hook(mod, args, out):
        nonlocal total
        if isinstance(mod, nn.Linear):
            total += 2 * (args[0].numel() // mod.in_features) * mod.in_features * mod.out_features
        else:
            total += 2 * out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]

    handles = [leaf.register_forward_hook(hook) for leaf in leaves]
    try:
        module(example)
    finally:
        for handle in handles:
            handle.remove()
    return total
