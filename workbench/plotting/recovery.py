"""Figures of recovery runs: training curves that grow epoch by epoch, and an accuracy-vs-size chart.

Functions take plain numbers/lists and return or update matplotlib artists (no torch here).
Updates change artist data in place (``set_data``) and never rebuild the figure.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from matplotlib.axes import Axes
from matplotlib.lines import Line2D


@dataclass
class CurveArtists:
    """Lines of one run: training loss and validation loss (left axes), validation metric (right)."""

    ax_loss: Axes
    ax_metric: Axes
    loss: Line2D
    val_loss: Line2D
    metric: Line2D


def draw_curves(ax_loss: Axes, ax_metric: Axes, metric_name: str = "accuracy", color: str | None = None,
                label: str | None = None, legend: bool = True) -> CurveArtists:
    """Empty loss and metric curves on two axes; fill them with `update_curves`.

    One run alone: default colours and labels. Several runs on the same axes: give each its
    ``color`` and ``label`` (the run's name); its training loss is solid, its validation loss
    dashed, its metric solid, all in that colour, and the legends name the runs."""
    named = label is not None
    (loss,) = ax_loss.plot([], [], "-o", ms=3, color=color,
                           label=f"{label}: training" if named else "training loss")
    (val_loss,) = ax_loss.plot([], [], "--", color=color if named else None,
                               label=f"{label}: validation" if named else "validation loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss (cross-entropy)" if named else "loss")
    (metric,) = ax_metric.plot([], [], "-o", ms=3, color=color or "C2",
                               label=label if named else f"validation {metric_name}")
    ax_metric.set_xlabel("epoch")
    ax_metric.set_ylabel(f"validation {metric_name}")
    if legend:
        ax_loss.legend(loc="upper right", fontsize="small")
        ax_metric.legend(loc="lower right", fontsize="small")
    return CurveArtists(ax_loss, ax_metric, loss, val_loss, metric)


def update_curves(artists: CurveArtists, epochs: Sequence[float], loss: Sequence[float],
                  val_loss: Sequence[float], metric: Sequence[float]) -> None:
    """Set the curves to the given per-epoch values (all sequences of equal length) and rescale."""
    artists.loss.set_data(list(epochs), list(loss))
    artists.val_loss.set_data(list(epochs), list(val_loss))
    artists.metric.set_data(list(epochs), list(metric))
    for ax in (artists.ax_loss, artists.ax_metric):
        ax.relim()
        ax.autoscale_view()


@dataclass
class SizeChartArtists:
    """Accuracy-vs-size chart: the uncompressed point, compressed points, recovered points."""

    ax: Axes
    baseline: Line2D
    compressed: Line2D
    recovered: Line2D
    arrows: list = field(default_factory=list)


def draw_size_chart(ax: Axes, baseline_size: float, baseline_metric: float,
                    metric_name: str = "accuracy", size_name: str = "parameters") -> SizeChartArtists:
    """The uncompressed model as one star; compressed/recovered results are added by `add_result`."""
    (baseline,) = ax.plot([baseline_size], [baseline_metric], "*", ms=14, color="k", label="uncompressed")
    (compressed,) = ax.plot([], [], "o", color="C3", label="compressed")
    (recovered,) = ax.plot([], [], "o", color="C2", label="recovered")
    ax.set_xscale("log")
    ax.set_xlabel(size_name)
    ax.set_ylabel(metric_name)
    ax.legend(loc="lower right", fontsize="small")
    return SizeChartArtists(ax, baseline, compressed, recovered)


def add_result(artists: SizeChartArtists, size: float, before: float, after: float, label: str = "") -> None:
    """Add one compressed point (``before``) and its recovered point (``after``) at ``size``,
    joined by an arrow; existing artists get new data, nothing is redrawn from scratch."""
    for line, value in ((artists.compressed, before), (artists.recovered, after)):
        xs, ys = (list(v) for v in line.get_data())
        line.set_data(xs + [size], ys + [value])
    arrow = artists.ax.annotate(label, xy=(size, after), xytext=(size, before), fontsize="small",
                                arrowprops={"arrowstyle": "->", "color": "0.4"})
    artists.arrows.append(arrow)
    artists.ax.relim()
    artists.ax.autoscale_view()


def draw_blockwise_losses(ax: Axes, stages: Sequence[dict]) -> None:
    """Held-out MSE of each tuned stage before and after block-wise reconstruction (log scale).

    ``stages``: `workbench.recovery.blockwise.BlockwiseResult.stages` (rows without ``best_loss``,
    stages with nothing to tune, are left out).
    """
    rows = [s for s in stages if "best_loss" in s]
    x = list(range(len(rows)))
    ax.bar([i - 0.2 for i in x], [s["start_loss"] for s in rows], width=0.4, label="compressed")
    ax.bar([i + 0.2 for i in x], [s["best_loss"] for s in rows], width=0.4, label="after block-wise tuning")
    ax.set_xticks(x, [s["stage"].rsplit(".", 1)[-1] for s in rows])
    ax.set_yscale("log")
    ax.set_xlabel("stage (encoder block)")
    ax.set_ylabel("held-out MSE to the original")
    ax.legend(fontsize="small")
