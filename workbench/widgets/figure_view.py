"""The one figure host of every explorer: a matplotlib figure shown in a widget.

Under ``%matplotlib widget`` (ipympl) the widget is the figure's own canvas. Otherwise it is an
``ipywidgets.Image`` whose PNG bytes (drawn on the Agg canvas) are replaced in place by
``draw()``. The Image path is the one that works when the drawing happens on a compute thread (an
explorer's `workbench.widgets.throttle.Coalescer` worker) in JupyterLab, Voilà and nbval alike: a
widget value reaches the page from any thread, while an ``Output`` widget's ``display`` from a
background thread does not. It is also what headless tests read (``view.widget.value``).

`StaticFigure` gives a widget hosting a ``view`` a static fallback: its display data carries the
figure as ``image/png`` beside the live widget view, so a notebook saved with outputs shows the
figure where no kernel runs (GitHub, nbviewer, the docs' lesson pages); JupyterLab and Voilà
still prefer the widget view.
"""
from __future__ import annotations

import base64
import io
from typing import Sequence

import ipywidgets as widgets
import matplotlib
import PIL.Image
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def uses_widget_canvas() -> bool:
    """True under the ipympl backend (``%matplotlib widget``)."""
    backend = matplotlib.get_backend().lower()
    return "ipympl" in backend or backend.endswith("widget")


class FigureImage:
    """``figure`` (draw on it) and ``widget`` (put it in a layout); ``draw()`` shows the changes.

    ``draw()`` redraws the whole figure. ``draw(moving)`` blits: the first call draws the figure
    without the ``moving`` artists and keeps that background; later calls only restore it and draw
    the moving artists over it (``invalidate()`` forces a full draw again, e.g. after the axes
    limits changed). Either way the PNG is encoded once per call (``compress_level=1``: fast).

    Parameters
    ----------
    figsize : ``(width, height)`` in inches; the Image is ``figsize * dpi`` pixels.
    dpi : dots per inch of the Agg canvas.
    """

    def __init__(self, figsize: tuple[float, float], dpi: int = 100):
        self.interactive = uses_widget_canvas()
        self._background = None
        if self.interactive:
            import matplotlib.pyplot as plt  # noqa: PLC0415 (pyplot makes the ipympl canvas; not imported otherwise)

            with plt.ioff():
                self.figure = plt.figure(figsize=figsize, dpi=dpi)
            self.widget = self.figure.canvas
        else:
            self.figure = Figure(figsize=figsize, dpi=dpi)
            FigureCanvasAgg(self.figure)
            width, height = (int(v * dpi) for v in figsize)
            self.widget = widgets.Image(format="png", layout={"width": f"{width}px", "height": f"{height}px"})
        self.widget.add_class("wb-figure")  # what browser tests look for: img.wb-figure

    def png(self) -> bytes:
        """The figure as last shown, PNG bytes (b"" before the first ``draw``). The Image path
        returns the bytes already sent (no redraw: safe while a worker thread draws); under
        ipympl the figure is rendered once."""
        if not self.interactive:
            return bytes(self.widget.value or b"")
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png")
        return buffer.getvalue()

    def invalidate(self) -> None:
        """Forget the kept background: the next ``draw(moving)`` draws everything."""
        self._background = None

    def draw(self, moving: Sequence = ()) -> None:
        canvas = self.figure.canvas
        if self.interactive:
            canvas.draw_idle()
            return
        if not moving:
            self._background = None
            canvas.draw()
        else:
            if self._background is None:
                for artist in moving:
                    artist.set_animated(True)
                canvas.draw()
                self._background = canvas.copy_from_bbox(self.figure.bbox)
            else:
                canvas.restore_region(self._background)
            for artist in moving:
                self.figure.draw_artist(artist)
        width, height = canvas.get_width_height()
        image = PIL.Image.frombuffer("RGBA", (width, height), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
        buffer = io.BytesIO()
        image.save(buffer, format="png", compress_level=1)
        self.widget.value = buffer.getvalue()


class StaticFigure:
    """Mixin (before the widget class) for a widget with a ``view`` (`FigureImage` or None): its
    display data adds the current figure as ``image/png`` (base64) to the widget's own bundle
    (``text/plain`` and the ``application/vnd.jupyter.widget-view+json`` view, which live
    front ends render first)."""

    def _repr_mimebundle_(self, **kwargs):
        bundle = super()._repr_mimebundle_(**kwargs)
        view = getattr(self, "view", None)
        png = view.png() if view is not None else b""
        if bundle is not None and png:
            bundle["image/png"] = base64.b64encode(png).decode("ascii")
        return bundle
