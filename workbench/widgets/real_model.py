"""`RealModelExplorer`: MiniLM at a chosen kept ratio, plain vs activation-aware SVD, live fidelity,
and a two-sentence similarity demo (original vs compressed). Compute (`compute`) is separate from
the view (`render`), so the widget is testable headless by calling ``update()``.

Everything expensive is computed once, and only when first needed: the plain SVD of each layer
(shared with `workbench.spectra`, so the heatmap's SVDs are reused), the calibration ``X^T X`` of
each layer and the activation-aware decomposition of each layer the first time an aware mode is
picked. A ratio move then only slices factors and runs the evaluation subset."""
from __future__ import annotations

import copy

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import torch

from workbench.errors import WorkbenchError
from workbench.inventory import matrix_layers, set_submodule
from workbench.kernels import aware as aware_kernels, svd as svd_kernels
from workbench.layers.lowrank import LowRankLinear
from workbench.plan import LayerPlan, Plan
from workbench.plotting.heatmaps import draw_rank_heatmap
from workbench.select.aware_budget import layer_grams
from workbench.spectra import layer_svd, model_spectra
from workbench.widgets.persistence import SaveLoadBar, check_plan_shape
from workbench.zoo import minilm


def effective_rank_table(model) -> tuple[np.ndarray, list[str], list[str]]:
    """``(values (blocks, types), block labels, type labels)`` of each encoder Linear's effective rank."""
    spectra = model_spectra(model)
    blocks = sorted({minilm.block_of(s.name) for s in spectra})
    values = np.zeros((len(blocks), len(minilm.LAYER_TYPES)))
    for s in spectra:
        values[minilm.block_of(s.name), minilm.LAYER_TYPES.index(minilm.layer_type(s.name))] = s.effective_rank
    return values, [f"block {b}" for b in blocks], list(minilm.LAYER_TYPES)


class RealModelExplorer(widgets.VBox):
    """Ratio slider + mode buttons -> compressed MiniLM -> fidelity readout and similarity demo.

    ``calibration_sequences``: how many calibration rows (of 32 tokens) feed the layers' ``X^T X``
    (computed when an aware mode is first picked); ``eval_sentences``: evenly spaced evaluation
    sentences (every topic) for the live metric; ``mode``: the starting mode ("plain" starts in
    about a second once the spectra are cached; an aware mode first computes 36 decompositions).
    """

    def __init__(self, task, calibration_sequences: int = 96, eval_sentences: int = 32, mode: str = "plain"):
        if mode not in ("plain", *aware_kernels.AWARE_MODES):
            raise WorkbenchError(f"mode={mode!r} is not a mode; use plain, {', '.join(aware_kernels.AWARE_MODES)}")
        self.task = task
        self.names = [info.name for info in matrix_layers(task.model)]
        self.eval_inputs = task.subset(eval_sentences).eval_inputs
        with torch.no_grad():
            self.reference = task.model(self.eval_inputs)
        self._decompositions: dict = {}
        self._calibration = task.calibration_inputs()[:calibration_sequences]
        self._grams: dict[str, tuple[torch.Tensor, int]] | None = None
        self.ratio = widgets.FloatSlider(value=0.8, min=0.3, max=0.95, step=0.05, description="kept ratio",
                                         continuous_update=False)
        self.mode = widgets.ToggleButtons(options=["plain", "whiten", "scale"], value=mode)
        self.readout = widgets.HTML()
        self.first = widgets.Text(value="The ship sailed into the storm.", description="sentence 1")
        self.second = widgets.Text(value="A boat was caught in bad weather at sea.", description="sentence 2")
        self.similarity = widgets.HTML()
        self.compressed = task.model
        self._holding = False
        self.persistence = SaveLoadBar(self, "real-model-configuration.json")  # save / load (issue 9)
        super().__init__([widgets.HBox([self.ratio, self.mode]), self.readout,
                          self.first, self.second, self.similarity, self.persistence])
        for control in (self.ratio, self.mode):
            control.observe(lambda _: self.update(), names="value")
        for text in (self.first, self.second):
            text.observe(lambda _: self.render_similarity(), names="value")
        self.update()

    def compute(self, ratio: float, mode: str):
        """A compressed copy of the model (every encoder Linear at ``ratio``) and its scores."""
        model = copy.deepcopy(self.task.model)
        for name in self.names:
            linear = self.task.model.get_submodule(name)
            rank = svd_kernels.rank_for_ratio(tuple(linear.weight.shape), ratio)
            if mode == "plain":
                factors = layer_svd(linear).factors(rank)  # SVD cached per weight; moves slice it
            else:
                if (name, mode) not in self._decompositions:  # once per layer and mode; moves slice it
                    if self._grams is None:
                        self._grams = layer_grams(self.task.model, self.names, self._calibration)
                    gram, tokens = self._grams[name]
                    self._decompositions[(name, mode)] = aware_kernels.aware_decomposition(
                        linear.weight, gram, tokens, mode)
                u, sig, bt = self._decompositions[(name, mode)]
                root = sig[:rank].sqrt()
                factors = ((u[:, :rank] * root).float(), (root[:, None] * bt[:rank]).float())
            set_submodule(model, name, LowRankLinear.from_linear(linear, rank, factors=factors, name=name))
        with torch.no_grad():
            out = model.eval()(self.eval_inputs)
        return model, {"mean_cosine": minilm.mean_cosine(out, self.reference),
                       "neighbour_agreement": minilm.neighbour_agreement(out, self.reference)}

    # ------------------------------------------------------------------ save / load
    def plan_for(self, ratio: float, mode: str) -> Plan:
        """Every encoder Linear at the rank keeping ``ratio`` of its weights: "svd" (plain) or
        "svd_aware" with ``aware=mode``."""
        choices = {}
        for name in self.names:
            rank = svd_kernels.rank_for_ratio(tuple(self.task.model.get_submodule(name).weight.shape), ratio)
            choices[name] = (LayerPlan("svd", {"rank": rank}) if mode == "plain"
                             else LayerPlan("svd_aware", {"rank": rank, "aware": mode}))
        return Plan(choices)

    @property
    def plan(self) -> Plan:
        """The plan the slider and mode show (the protocol of `workbench.widgets.persistence`)."""
        return self.plan_for(self.ratio.value, self.mode.value)

    def set_plan(self, plan: Plan) -> None:
        """Move the slider and mode to the setting whose `plan_for` is ``plan``, then recompute once;
        `WorkbenchError` (controls untouched) if no slider position gives it."""
        methods = {choice.method for choice in plan.layers.values()}
        method = methods.pop() if len(methods) == 1 else "svd"
        check_plan_shape(plan, "MiniLM explorer", self.names, method,
                         ("rank", "aware") if method == "svd_aware" else ("rank",))
        mode = plan.layers[self.names[0]].get("aware", "whiten") if method == "svd_aware" and plan.layers else "plain"
        steps = int(round((self.ratio.max - self.ratio.min) / self.ratio.step))
        ratios = [round(self.ratio.min + i * self.ratio.step, 10) for i in range(steps + 1)]
        ratio = next((r for r in ratios if mode in self.mode.options and self.plan_for(r, mode) == plan), None)
        if ratio is None:
            raise WorkbenchError(f"the MiniLM explorer shows one kept ratio ({self.ratio.min}..{self.ratio.max}, "
                                 f"step {self.ratio.step}) and mode ({', '.join(self.mode.options)}) for all "
                                 f"{len(self.names)} encoder Linears; this plan ({len(plan.layers)} layer(s), "
                                 f"method {method!r}) is not one of those settings")
        self._holding = True
        try:
            self.ratio.value, self.mode.value = ratio, mode
        finally:
            self._holding = False
        self.update()

    def update(self) -> dict:
        if self._holding:  # set_plan moves both controls, then computes once
            return getattr(self, "state", {})
        try:
            self.compressed, self.state = self.compute(self.ratio.value, self.mode.value)
        except WorkbenchError as exc:
            self.readout.value = f"<b>cannot compress:</b> {exc}"
            return {}
        self.readout.value = (f"{self.mode.value} SVD at {self.ratio.value:.0%} of each layer's weights: "
                              f"mean cosine {self.state['mean_cosine']:.4f}, "
                              f"nearest-neighbour agreement {self.state['neighbour_agreement']:.0%}")
        self.render_similarity()
        return self.state

    def similarities(self) -> tuple[float, float]:
        """Cosine similarity of the two sentences: (original model, compressed model)."""
        texts = [self.first.value or " ", self.second.value or " "]
        original = minilm.embed(self.task.model, texts)
        compressed = minilm.embed(self.compressed, texts)
        return float(original[0] @ original[1]), float(compressed[0] @ compressed[1])

    def render_similarity(self) -> None:
        original, compressed = self.similarities()
        self.similarity.value = f"similarity: original {original:.3f}, compressed {compressed:.3f}"


def rank_heatmap(model, ax=None):
    """Draw MiniLM's effective ranks by block and layer type; returns the figure."""
    values, rows, cols = effective_rank_table(model)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3))
    draw_rank_heatmap(ax, values, rows, cols, title="effective rank of each encoder Linear")
    return ax.figure
