"""`Engine`: incremental evaluation of plans (see the package docstring)."""
from __future__ import annotations

import copy
import functools
import gc
import time
from collections import OrderedDict

import torch
from torch import nn

from workbench.compress import apply, build_tied_group, check_layer_choice, tied_choices
from workbench.device import model_device, to_device
from workbench.engine.activations import ActivationCache
from workbench.engine.batching import evaluation_batches, runs_channels_last
from workbench.engine.factors import FactorCache
from workbench.engine.preview import output_error_tails
from workbench.engine.sizing import layer_flops, rank_settings, state_bytes
from workbench.errors import WorkbenchError
from workbench.hooks import collect_layer_inputs, feed_layers
from workbench.inventory import LayerInfo, get_submodule, matrix_layers, set_submodule
from workbench.kernels import svd as svd_kernels
from workbench.measure import count_flops, count_params, saved_bytes
from workbench.plan import LayerPlan, Plan
from workbench.registry import LayerContext, Method, get_method
from workbench.results import Evaluation, Preview
from workbench.auto_stages import find_stages
from workbench.ties import tied_module_groups

DEFAULT_CACHE_BYTES = 256 * 2**20
BYTES_METHOD = ("state-dict tensor payload: sum of numel * element_size over the state dict, each tied tensor once "
                "(file container overhead excluded; workbench.measure.saved_bytes writes the real file)")


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
    calibration_samples : how many of ``task.calibration_inputs`` data-aware methods are fitted on
        (the same default as `Task.calibration_inputs`, so results equal ``apply``'s).
    """

    def __init__(self, task, max_cache_bytes: int = DEFAULT_CACHE_BYTES, batch_size: int = 4096,
                 randomized_min_dim: int = 1024, preview: bool = True, subset: int | None = None,
                 freeze_gc: bool = True, calibration_samples: int = 512):
        task = task.subset(subset)
        self.calibration_samples = calibration_samples
        self.task = task
        self.original = task.model
        self.batch_size = batch_size
        self.layers = {info.name: info for info in matrix_layers(self.original)}
        self.tied_groups = tied_module_groups(self.original)
        self.factors = FactorCache(self.original, randomized_min_dim=randomized_min_dim)
        self.cache = ActivationCache(max_cache_bytes)
        self.working = copy.deepcopy(self.original).eval()  # on the original's device, as every copy
        self.device = model_device(self.working)
        self.channels_last = any(isinstance(m, nn.Conv2d) for m in self.working.modules()) and self.device.type == "cpu"
        if self.channels_last:  # oneDNN's CPU convolutions and pooling run faster in NHWC
            self.channels_last = runs_channels_last(self.working, task.example_input)
        self.stages, self.stages_found = find_stages(self.working, task.example_input)
        self._stage_index: dict[str, int] = {}
        self._installed: dict[str, LayerPlan] = {}
        self._originals: dict[str, nn.Module] = {}
        self._built: OrderedDict[tuple[str, LayerPlan], nn.Module] = OrderedDict()
        self._layer_sizes: dict[tuple[str, LayerPlan | None], tuple[int, int, int]] = {}
        self._tied_built: OrderedDict[tuple[tuple[str, ...], LayerPlan], dict[str, nn.Module]] = OrderedDict()
        self._group_sizes: dict[tuple[tuple[str, ...], LayerPlan], tuple[int, int, int]] = {}
        self._calibration: dict[str, torch.Tensor] = {}
        self._example_inputs: dict[str, torch.Tensor] | None = None
        self.stats = {"evaluations": 0, "full_evaluations": 0, "stages_run": 0, "stages_skipped": 0}
        batches, order = evaluation_batches(self.original, task.eval_inputs, batch_size)
        # moved to the model's device once, here: a slider move then copies no data
        self._batches, self._order = to_device(batches, self.device), to_device(order, self.device)
        self.base = {"params": count_params(self.original), "bytes": state_bytes(self.original),
                     "flops": count_flops(self.original, task.example_input)}
        self._preview: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if preview and self.layers:
            inputs = collect_layer_inputs(self.original, list(self.layers), task.eval_inputs)
            self._preview = output_error_tails(self.original, inputs, self.factors)
        # the original's stage inputs, cached once (any later plan starts from the ones it shares)
        self.base["metric"] = self.evaluate(Plan({}))["metric"]
        if freeze_gc:
            gc.collect()
            gc.freeze()

    # ------------------------------------------------------------------ public
    def evaluate(self, plan: Plan, file_bytes: bool = False) -> Evaluation:
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
            model = self.build(plan)
            result = {"metric": self.task.evaluate(model), "params": count_params(model),
                      "bytes": state_bytes(model), "flops": count_flops(model, self.task.example_input),
                      "from_stage": 0, "stages_run": len(self.stages), "full": True}
            self.stats["full_evaluations"] += 1
        else:
            groups = self._install(plan)  # validates every entry before anything runs
            first, outputs = self._forward(plan)
            tied = {name for group, _ in groups for name in group}
            sizes = [self._layer_size(name, choice) for name, choice in plan.layers.items() if name not in tied]
            sizes += [self._group_size(group, choice) for group, choice in groups]
            targets = self.task.eval_targets  # judged where the data are, as `Task.outputs` does
            result = {"metric": self.task.metric(to_device(outputs, targets.device), targets),
                      "params": self.base["params"] + sum(s[0] for s in sizes),
                      "bytes": self.base["bytes"] + sum(s[1] for s in sizes),
                      "flops": self.base["flops"] + sum(s[2] for s in sizes),
                      "from_stage": first, "stages_run": len(self.stages) - first, "full": first == 0}
        result["bytes_method"] = BYTES_METHOD
        if file_bytes:
            result["bytes_file"] = saved_bytes(self.build(plan))
        result["compute_ms"] = (time.perf_counter() - start) * 1e3
        return Evaluation(result)

    def build(self, plan: Plan) -> nn.Module:
        """The compressed model as `workbench.apply` builds it (a new, independent model)."""
        return apply(self.original, plan, calibration_inputs=self.task.calibration_inputs(self.calibration_samples))

    def model(self, plan: Plan) -> nn.Module:
        """The engine's working model holding ``plan``'s layers (cheap views where a method has
        one), for outputs beyond the task's metric (embeddings, a demo input). It is shared and
        changed by the next call: do not keep, train or export it (`build` makes a real model)."""
        if not isinstance(plan, Plan):
            raise WorkbenchError(f"model needs a workbench.Plan, got {type(plan).__name__}")
        if plan.steps:
            return self.build(plan)
        self._install(plan)
        return self.working

    def preview(self, layer: str, rank: int) -> Preview:
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
        result = Preview({"layer": layer, "rank": rank, "weight_error": weight_error, "output_error": None})
        if layer in self._preview:
            tail, total = self._preview[layer]
            if rank < len(tail):
                result["output_error"] = float(tail[rank].clamp_min(0).sqrt() / total.sqrt())
            else:
                result["output_error"] = 0.0
        return result

    def report(self) -> dict:
        """Memory and work counters: activation cache bytes used / bound, factor bytes, hits; the
        stages' labels and ``stages_found``: how they were found (declared, cut automatically at a
        list of blocks or in the torch.fx graph, or one stage with the reasons)."""
        return {"cache_bytes": self.cache.bytes_used, "cache_limit_bytes": self.cache.max_bytes,
                "cache_entries": len(self.cache), "cache_evictions": self.cache.evictions,
                "factor_bytes": self.factors.nbytes(), "svd_recomputes": self.factors.recomputes,
                "stages": [s.label for s in self.stages], "stages_found": self.stages_found, **self.stats}

    def stage_of(self, layer: str) -> int:
        """Index of the stage that owns ``layer`` (0 when no stage does: full evaluation)."""
        if layer not in self._stage_index:
            self._stage_index[layer] = next((i for i, stage in enumerate(self.stages) if stage.owns(layer)), 0)
        return self._stage_index[layer]

    def layer_info(self, layer: str) -> LayerInfo:
        """The `workbench.inventory.LayerInfo` of matrix layer ``layer`` (kind, matrix shape
        ``(out, in*kh*kw)``, parameter count); an unknown name raises a `WorkbenchError` listing the layers."""
        return self._info(layer)

    def layer_size(self, layer: str, choice: LayerPlan | None) -> tuple[int, int, int]:
        """``(params, bytes, flops)`` that ``choice`` at ``layer`` adds to the model (negative: saves);
        ``choice=None``: the original layer's own sizes. ``params``: parameter count; ``bytes``: state-dict
        tensor payload (`BYTES_METHOD`); ``flops``: FLOPs of one sample's forward pass on that layer's
        input. Memoised; a plan's sizes are the model's plus the sum of its (untied) layers' (as `evaluate`)."""
        return self._layer_size(layer, choice)

    def built_layer(self, layer: str, choice: LayerPlan) -> nn.Module:
        """The real module `workbench.apply` builds for ``choice`` at ``layer``, in eval mode; never a
        cheap view (svd's rank slices), so that it is the module `layer_size` sizes. Memoised (LRU) for
        methods without a view; do not modify it."""
        if get_method(choice.method).view is not None:
            return self._build(layer, choice).eval()
        return self._module_for(layer, choice)

    def calibration_inputs(self, layer: str) -> torch.Tensor:
        """The inputs entering ``layer`` for the task's first ``calibration_samples`` calibration samples
        (Linear: ``(tokens, in)``; conv: ``(N, C, H, W)``), as data-aware methods are fitted on; kept."""
        return self._calibration_inputs(layer)

    def collect_calibration(self, layers: list[str]) -> None:
        """Collect the calibration inputs (`calibration_inputs`) of every layer of ``layers`` not yet
        held, in one forward pass of the original model."""
        missing = [name for name in dict.fromkeys(layers) if name not in self._calibration]
        if missing:
            self._collect_calibration(missing)

    # ------------------------------------------------------------------ internals
    def _info(self, layer: str):
        if layer not in self.layers:
            known = ", ".join(self.layers) or "(none)"
            raise WorkbenchError(f"unknown layer {layer!r}; layers with a weight matrix: {known}")
        return self.layers[layer]

    def _context(self, name: str, method: Method) -> LayerContext:
        """What a builder of ``method`` gets for layer ``name`` here: the cached factors for a
        factorized method, the calibration inputs for a data-aware one, the memory layout."""
        return LayerContext(name, self._calibration_inputs(name) if method.needs_inputs else None,
                            factors=functools.partial(self.factors.factors, name) if method.factorized else None,
                            channels_last=self.channels_last)

    def _module_for(self, name: str, choice: LayerPlan) -> nn.Module:
        """The module evaluated for ``choice`` at ``name``: the method's cheap ``view`` where it has
        one for these settings (a rank slider: slices of the cached factors), else what the method
        builds (memoised, LRU)."""
        key = (name, choice)
        hit = self._built.get(key)
        if hit is not None:
            self._built.move_to_end(key)
            return hit
        original = get_submodule(self.original, name)
        method = check_layer_choice(original, name, choice)
        if method.view is not None:
            view = method.view(original, choice.params, self._context(name, method))
            if view is not None:
                return view
        module = self._build(name, choice, method).eval()
        self._built[key] = module
        while len(self._built) > 512:
            self._built.popitem(last=False)
        return module

    def _build(self, name: str, choice: LayerPlan, method: Method | None = None) -> nn.Module:
        """The real layer `workbench.apply` builds for ``choice`` (from the cached factors if any)."""
        original = get_submodule(self.original, name)
        method = method or check_layer_choice(original, name, choice)
        return method.build(original, choice.params, self._context(name, method))

    def _calibration_inputs(self, name: str) -> torch.Tensor:
        if name not in self._calibration:
            self._collect_calibration([name])
        return self._calibration[name]

    def _collect_calibration(self, names: list[str]) -> None:
        """The calibration inputs of every layer of ``names``, in one forward pass (kept)."""
        inputs = self.task.calibration_inputs(self.calibration_samples)
        self._calibration.update(collect_layer_inputs(self.original, names, inputs))

    def _tied_modules(self, group: tuple[str, ...], choice: LayerPlan) -> dict[str, nn.Module]:
        """``{name: module}`` of a tied group compressed with ``choice``, built as `apply` builds
        it (`workbench.compress.build_tied_group`: one module for the whole group, no cheap view,
        so that the metric is bit-identical to ``apply``'s); memoised, LRU."""
        key = (group, choice)
        hit = self._tied_built.get(key)
        if hit is not None:
            self._tied_built.move_to_end(key)
            return hit
        members = {name: get_submodule(self.original, name) for name in group}
        method = [check_layer_choice(module, name, choice) for name, module in members.items()][0]
        inputs: dict[str, torch.Tensor] = {}
        if method.needs_inputs:
            missing = [name for name in group if name not in self._calibration]
            if missing:
                self._collect_calibration(missing)
            inputs = {name: self._calibration[name] for name in group}
        modules = build_tied_group(members, method, choice, inputs)
        for module in modules.values():
            module.eval()
        self._tied_built[key] = modules
        while len(self._tied_built) > 64:
            self._tied_built.popitem(last=False)
        return modules

    def _group_size(self, group: tuple[str, ...], choice: LayerPlan) -> tuple[int, int, int]:
        """``(params, bytes, flops)`` of a tied group under ``choice`` minus those of its original
        members, the shared tensors counted once on both sides (FLOPs: one run per member)."""
        key = (group, choice)
        if key not in self._group_sizes:
            def sizes(modules: dict[str, nn.Module]) -> tuple[int, int, int]:
                holder = nn.ModuleList(list(modules.values()))  # one module object listed twice counts once
                return (count_params(holder), state_bytes(holder),
                        sum(layer_flops(module, self._example_input(name)) for name, module in modules.items()))
            new = sizes(self._tied_modules(group, choice))
            old = sizes({name: get_submodule(self.original, name) for name in group})
            self._group_sizes[key] = tuple(a - b for a, b in zip(new, old))
        return self._group_sizes[key]

    def _install(self, plan: Plan) -> list[tuple[tuple[str, ...], LayerPlan]]:
        """Make ``self.working`` hold ``plan``'s modules (built first, so a bad entry changes nothing).

        Returns the tied groups the plan compresses (`workbench.compress.tied_choices`, whose tie
        rule is checked first), each with its choice.
        """
        groups = tied_choices(self.original, plan, self.tied_groups)
        tied = {name for group, _ in groups for name in group}
        data_aware = [name for name, choice in plan.layers.items() if name not in self._calibration
                      and (name, choice) not in self._built and name in self.layers and name not in tied
                      and get_method(choice.method).needs_inputs]
        if len(data_aware) > 1:
            self._collect_calibration(data_aware)
        wanted: dict[str, nn.Module] = {}
        for group, choice in groups:
            if all(self._installed.get(name) == choice for name in group):
                wanted.update((name, self.working.get_submodule(name)) for name in group)
            else:
                wanted.update(self._tied_modules(group, choice))
        wanted.update((name, self.working.get_submodule(name) if self._installed.get(name) == choice
                       else self._module_for(name, choice)) for name, choice in plan.layers.items() if name not in tied)
        for name in list(self._installed):
            if name not in wanted:
                set_submodule(self.working, name, self._originals.pop(name))
                del self._installed[name]
        for name, module in wanted.items():
            if name not in self._originals:
                self._originals[name] = self.working.get_submodule(name)
            set_submodule(self.working, name, module)
            self._installed[name] = plan.layers[name]
        return groups

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
        x = [self.task.select(batch) for batch in x]  # the judged tensor of any output (Task.output)
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
        ranks = rank_settings(choice)
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
            elif get_method(choice.method).view is not None:
                module = self._build(name, choice)  # the view holds no real layer to size
            else:
                module = self._module_for(name, choice)
            sizes = (count_params(module), state_bytes(module), layer_flops(module, self._example_input(name)))
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
            feed_layers(self.original, wanted, self.task.example_input,
                        lambda n, module, x: captured.setdefault(n, x))
            self._example_inputs = captured
        return self._example_inputs[name]
