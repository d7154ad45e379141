"""`workbench.plotting.spectra`: the spectrum panels cut values below the floor (and say how many),
the energy curves keep every value, break-even and rank markers are drawn where asked."""
import numpy as np
import pytest

from workbench.plotting.spectra import SPECTRUM_FLOOR, spectra_figure, update_rank_markers

# four directions, two of them round-off (as a layer with two always-zero inputs gives)
VALUES = np.array([2.0, 1.0, 1e-9, 1e-17])


def test_the_spectrum_panel_cuts_values_below_the_floor_and_counts_them_in_the_title():
    artists = spectra_figure({"a": VALUES, "b": np.array([1.0, 0.5])})
    line = artists.spectrum_axes[0].lines[0]
    assert list(line.get_xdata()) == [1, 2]
    assert list(line.get_ydata()) == pytest.approx([1.0, 0.5])
    assert artists.spectrum_axes[0].get_title() == f"a (4 values; 2 < {SPECTRUM_FLOOR:g} not shown)"
    assert artists.spectrum_axes[1].get_title() == "b (2 values)"
    assert artists.spectrum_axes[0].get_ylim()[0] == pytest.approx(0.25)  # half the lowest value shown
    deep = spectra_figure({"c": np.array([1.0, 1e-5, 1e-7])}).spectrum_axes[0]
    assert deep.get_ylim()[0] == pytest.approx(1e-5 / 2) and deep.get_title().endswith("1 < 1e-06 not shown)")
    energy = artists.energy_axes[0].lines[0].get_ydata()  # every value, none cut
    assert len(energy) == 4 and energy[1] == pytest.approx(1.0) and energy[0] == pytest.approx(0.8)


def test_without_a_floor_every_value_is_drawn():
    artists = spectra_figure({"a": VALUES}, floor=None)
    assert len(artists.spectrum_axes[0].lines[0].get_xdata()) == 4
    assert artists.spectrum_axes[0].get_title() == "a (4 values)"


def test_break_even_is_drawn_and_rank_markers_show_only_once_a_rank_is_given():
    artists = spectra_figure({"a": VALUES, "b": np.array([1.0, 0.5])}, break_even={"a": 1})
    top = artists.spectrum_axes[0]
    dotted = [line for line in top.get_lines() if line.get_label() == "break-even rank"]
    assert len(dotted) == 1 and list(dotted[0].get_xdata()) == [1, 1]
    assert [t.get_text() for t in top.get_legend().get_texts()] == ["break-even rank"]
    marker = artists.rank_markers["a"][0]
    assert not marker.get_visible()
    update_rank_markers(artists, {"a": 3})
    assert marker.get_visible() and list(marker.get_xdata()) == [3, 3]
    shown = spectra_figure({"a": VALUES}, ranks={"a": 2})
    assert shown.rank_markers["a"][0].get_visible()
    assert "rank chosen" in [t.get_text() for t in shown.spectrum_axes[0].get_legend().get_texts()]
