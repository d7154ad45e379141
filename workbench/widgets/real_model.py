"""`RealModelExplorer`: MiniLM at a chosen kept ratio, plain vs activation-aware SVD, live fidelity,
and a two-sentence similarity demo (original vs compressed).

It follows the explorer contract (`workbench.widgets.explorer.Explorer`): settings ``{"ratio",
"mode", "first", "second"}`` -> a `Plan` (every encoder Linear at the rank keeping ``ratio`` of its
weights: ``svd``, or ``svd_aware`` with ``aware=mode``) -> the `Engine`'s model for that plan ->
fidelity on the evaluation sentences and the two sentences' similarity (`compute`, off the UI
thread through the coalescer) -> readouts and the figure, each layer's rank by block and type
(`render`). `compressed` is the real model `workbench.apply` builds for the plan shown (what the
library and the CLI build).

What is expensive is done once: ``svd`` is a view of slices of each weight's cached SVD; an aware
mode fits each layer's activation-aware basis once (its calibration inputs collected once), and
every other ratio slices it; the fidelity of a plan is remembered, so a setting seen before is
recalled at once.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import ipywidgets as widgets
import numpy as np
import torch
from torch import nn

from workbench.engine import Engine
from workbench.errors import WorkbenchError
from workbench.inventory import matrix_layers
from workbench.kernels import aware as aware_kernels, svd as svd_kernels
from workbench.plan import LayerPlan, Plan
from workbench.plotting.heatmaps import draw_rank_heatmap, update_rank_heatmap
from workbench.spectra import model_spectra
from workbench.widgets.explorer import Explorer
from workbench.widgets.persistence import check_plan_shape
from workbench.zoo import minilm

MODES = ("plain", *aware_kernels.AWARE_MODES)
_MODELS_KEPT = 3        # compressed models kept (a sentence edit after moving back needs no rebuild)
_SIMILARITY_MEMO = 64


def layer_grid(values: Mapping[str, float]) -> tuple[np.ndarray, list[str], list[str]]:
    """``{encoder Linear name: value}`` as ``(grid (blocks, types), block labels, type labels)``
    (`workbench.zoo.minilm.LAYER_TYPES` order; a layer not named stays 0)."""
    blocks = sorted({minilm.block_of(name) for name in values})
    grid = np.zeros((len(blocks), len(minilm.LAYER_TYPES)))
    for name, value in values.items():
        grid[blocks.index(minilm.block_of(name)), minilm.LAYER_TYPES.index(minilm.layer_type(name))] = value
    return grid, [f"block {b}" for b in blocks], list(minilm.LAYER_TYPES)


def effective_rank_table(model) -> tuple[np.ndarray, list[str], list[str]]:
    """``(values (blocks, types), block labels, type labels)`` of each encoder Linear's effective rank."""
    return layer_grid({s.name: s.effective_rank for s in model_spectra(model)})


def _check_mode(mode) -> str:
    if mode not in MODES:
        raise WorkbenchError(f"mode={mode!r} is not a mode; use {', '.join(MODES)}")
    return mode


class RealModelExplorer(Explorer):
    """Ratio slider + mode buttons -> compressed MiniLM -> fidelity readout and similarity demo.

    ``calibration_sequences``: how many calibration rows (of 32 tokens) the aware modes fit each
    layer's inputs on; ``eval_sentences``: evenly spaced evaluation sentences (every topic) for the
    live metric; ``mode``: the starting mode ("plain" starts in about a second once the spectra are
    cached); ``synchronous``: compute in the caller's thread (tests, scripts).
    """

    config_path = "real-model-configuration.json"

    def __init__(self, task, calibration_sequences: int = 96, eval_sentences: int = 32, mode: str = "plain",
                 synchronous: bool = False):
        _check_mode(mode)
        super().__init__(task, synchronous=synchronous, figsize=(6.4, 3.2), dpi=80)
        self.names = [info.name for info in matrix_layers(task.model)]
        self.shapes = {name: tuple(task.model.get_submodule(name).weight.shape) for name in self.names}
        self.engine = Engine(task, subset=eval_sentences, preview=False, calibration_samples=calibration_sequences)
        self.eval_inputs = self.engine.task.eval_inputs
        with torch.no_grad():
            self.reference = task.model(self.eval_inputs)
        self._scores: dict[Plan, dict] = {}
        self._similarity: OrderedDict[tuple, float] = OrderedDict()
        self._models: OrderedDict[Plan, nn.Module] = OrderedDict()
        self.ratio = widgets.FloatSlider(value=0.8, min=0.3, max=0.95, step=0.05, description="kept ratio",
                                         continuous_update=False)
        self.mode = widgets.ToggleButtons(options=list(MODES), value=mode)
        self.readout = widgets.HTML()
        self.first = widgets.Text(value="The ship sailed into the storm.", description="sentence 1")
        self.second = widgets.Text(value="A boat was caught in bad weather at sea.", description="sentence 2")
        self.similarity = widgets.HTML()
        self.controls.update(ratio=self.ratio, mode=self.mode, first=self.first, second=self.second)
        grid, blocks, types = layer_grid(self.ranks_for(self.ratio.value))
        self.full_rank = max(min(shape) for shape in self.shapes.values())
        self.heatmap = draw_rank_heatmap(self.view.figure.subplots(), grid, blocks, types,
                                         title=self._title(self.ratio.value), vmin=0, vmax=self.full_rank)
        self.view.figure.tight_layout()
        self.compose([widgets.HBox([self.ratio, self.mode]), self.readout, self.first, self.second,
                      self.similarity])
        self.watch()
        self.refresh()

    # ------------------------------------------------------------------ settings and plans
    def ranks_for(self, ratio: float) -> dict[str, int]:
        """``{encoder Linear: the rank keeping ``ratio`` of its weights}`` (`svd_kernels.rank_for_ratio`)."""
        return {name: svd_kernels.rank_for_ratio(self.shapes[name], ratio) for name in self.names}

    def _title(self, ratio: float) -> str:
        return f"rank of each encoder Linear at {ratio:.0%} of its weights (colour scale 0..{self.full_rank})"

    def plan_for(self, settings: dict) -> Plan:
        """Every encoder Linear at the rank keeping ``ratio`` of its weights: "svd" (plain) or
        "svd_aware" with ``aware=mode``."""
        mode = _check_mode(settings["mode"])
        return Plan({name: LayerPlan("svd", {"rank": rank}) if mode == "plain"
                     else LayerPlan("svd_aware", {"rank": rank, "aware": mode})
                     for name, rank in self.ranks_for(settings["ratio"]).items()})

    def settings_for(self, plan: Plan) -> dict:
        """The slider and mode whose `plan_for` is ``plan``; `WorkbenchError` if no position gives it."""
        methods = {choice.method for choice in plan.layers.values()}
        method = methods.pop() if len(methods) == 1 else "svd"
        check_plan_shape(plan, "MiniLM explorer", self.names, method,
                         ("rank", "aware") if method == "svd_aware" else ("rank",))
        mode = plan.layers[self.names[0]].get("aware", "whiten") if method == "svd_aware" and plan.layers else "plain"
        steps = int(round((self.ratio.max - self.ratio.min) / self.ratio.step))
        ratios = [round(self.ratio.min + i * self.ratio.step, 10) for i in range(steps + 1)]
        ratio = next((r for r in ratios if mode in self.mode.options
                      and self.plan_for({"ratio": r, "mode": mode}) == plan), None)
        if ratio is None:
            raise WorkbenchError(f"the MiniLM explorer shows one kept ratio ({self.ratio.min}..{self.ratio.max}, "
                                 f"step {self.ratio.step}) and mode ({', '.join(self.mode.options)}) for all "
                                 f"{len(self.names)} encoder Linears; this plan ({len(plan.layers)} layer(s), "
                                 f"method {method!r}) is not one of those settings")
        return {"ratio": ratio, "mode": mode}

    # ------------------------------------------------------------------ compute
    def model_for(self, plan: Plan) -> nn.Module:
        """The real model `workbench.apply` builds for ``plan`` (`Engine.build`, on the explorer's
        calibration sequences); the last few built are kept."""
        model = self._models.get(plan)
        if model is None:
            model = self._models[plan] = self.engine.build(plan)
            while len(self._models) > _MODELS_KEPT:
                self._models.popitem(last=False)
        else:
            self._models.move_to_end(plan)
        return model

    @property
    def compressed(self) -> nn.Module:
        """The compressed model the readouts show."""
        return self.model_for(self.plan_for(self.state)) if self.state else self.task.model

    def _similarity_of(self, plan: Plan | None, texts: tuple[str, str]) -> float:
        """Cosine similarity of the two sentences under ``plan``'s model (None: the original)."""
        key = (plan, texts)
        if key not in self._similarity:
            e = minilm.embed(self.task.model if plan is None else self.engine.model(plan), list(texts))
            self._similarity[key] = float(e[0] @ e[1])
            while len(self._similarity) > _SIMILARITY_MEMO:
                self._similarity.popitem(last=False)
        return self._similarity[key]

    def compute(self, settings: dict) -> dict:
        """``{"ratio", "mode", "mean_cosine", "neighbour_agreement", "similarity": {"original",
        "compressed"}}``: fidelity of the plan's model on the evaluation sentences (against the
        original's embeddings) and the cosine similarity of the two sentences under both models."""
        plan = self.plan_for(settings)
        if plan not in self._scores:
            with torch.no_grad():
                out = self.engine.model(plan)(self.eval_inputs)
            self._scores[plan] = {"mean_cosine": minilm.mean_cosine(out, self.reference),
                                  "neighbour_agreement": minilm.neighbour_agreement(out, self.reference)}
        texts = (settings["first"] or " ", settings["second"] or " ")
        return {"ratio": settings["ratio"], "mode": settings["mode"], **self._scores[plan],
                "similarity": {"original": self._similarity_of(None, texts),
                               "compressed": self._similarity_of(plan, texts)}}

    def similarities(self) -> tuple[float, float]:
        """Cosine similarity of the two sentences shown: (original model, compressed model)."""
        return self.state["similarity"]["original"], self.state["similarity"]["compressed"]

    # ------------------------------------------------------------------ render
    def render(self, state: dict) -> None:
        self.readout.value = (f"{state['mode']} SVD at {state['ratio']:.0%} of each layer's weights: "
                              f"mean cosine {state['mean_cosine']:.4f}, "
                              f"nearest-neighbour agreement {state['neighbour_agreement']:.0%}")
        self.similarity.value = (f"similarity: original {state['similarity']['original']:.3f}, "
                                 f"compressed {state['similarity']['compressed']:.3f}")
        update_rank_heatmap(self.heatmap, layer_grid(self.ranks_for(state["ratio"]))[0], self._title(state["ratio"]))
        self.draw()


def rank_heatmap(model, ax=None):
    """Draw MiniLM's effective ranks by block and layer type; returns the figure."""
    values, rows, cols = effective_rank_table(model)
    if ax is None:
        import matplotlib.pyplot as plt  # noqa: PLC0415 (pyplot only for a figure of its own, in notebooks)

        _, ax = plt.subplots(figsize=(6, 3))
    draw_rank_heatmap(ax, values, rows, cols, title="effective rank of each encoder Linear")
    return ax.figure
