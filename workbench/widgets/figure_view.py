"""A matplotlib figure shown in a widget: the ipympl canvas when that backend is active, else an
``Output`` that re-displays the figure (``%matplotlib inline``, nbval, headless tests)."""
from __future__ import annotations

import ipywidgets as widgets
import matplotlib
from matplotlib.figure import Figure


def uses_widget_canvas() -> bool:
    backend = matplotlib.get_backend().lower()
    return "ipympl" in backend or backend == "widget"


class FigureView:
    """``figure`` (draw on it) and ``widget`` (put it in a layout); ``draw()`` shows the changes."""

    def __init__(self, figsize: tuple[float, float]):
        if uses_widget_canvas():
            import matplotlib.pyplot as plt

            with plt.ioff():
                self.figure = plt.figure(figsize=figsize)
            self.widget = self.figure.canvas
            self._output = None
        else:
            self.figure = Figure(figsize=figsize)
            self._output = widgets.Output()
            self.widget = self._output

    def draw(self) -> None:
        if self._output is None:
            self.figure.canvas.draw_idle()
            return
        from IPython import get_ipython

        if get_ipython() is not None:
            from IPython.display import display

            with self._output:
                self._output.clear_output(wait=True)
                display(self.figure)
