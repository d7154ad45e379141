"""The lessons' explorers in a real browser (JupyterLab and Voilà, headless Debian Chromium through
Playwright): once the notebook has run (JupyterLab: "Run All Cells"; Voilà: the app), a slider
moved with the keyboard (02 pruning and its structured-pruning explorer, 03 quantization), a button
pressed (05 recovery, JupyterLab only), or the control of each of the four views of 09 (more techniques: a slider, three dropdowns)
moved must change the explorer's figure (``img.wb-figure``, drawn on the compute thread into an
``ipywidgets.Image``), with no error or stderr output in the page. Servers serve copies of the
notebooks (JupyterLab autosaves outputs) and are started and stopped by `benchmarks/ui_latency.py`."""
import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import ui_latency  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

pytestmark = [
    pytest.mark.browser, pytest.mark.slow,
    pytest.mark.skipif(not Path(ui_latency.CHROMIUM).exists(),
                       reason=f"{ui_latency.CHROMIUM} missing (apt-get install -y chromium)"),
]

FIGURE = ".wb-explorer img.wb-figure"
# every code cell has run: its prompt reads "[n]:" (not "[ ]:" nor "[*]:")
ALL_RUN_JS = """() => { const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')];
  return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent)); }"""
FIGURE_CHANGED_JS = """prev => { const i = document.querySelector('%s');
  return i && i.getAttribute('src') && i.getAttribute('src') !== prev; }""" % FIGURE


def run_all(page, url: str, notebook: str, timeout_ms: int = 400_000) -> str:
    """Open ``notebook`` in a workspace of its own (no other tab restored), run all its cells,
    wait until they ran; returns the figure's src."""
    page.goto(re.sub(r"/lab/tree/[^?]+", f"/lab/workspaces/{notebook[:2]}/tree/{notebook}", url))
    page.wait_for_selector(".jp-Notebook", timeout=timeout_ms)
    page.wait_for_function("() => document.querySelector('#jp-main-statusbar').innerText.includes('Idle')",
                           timeout=timeout_ms)  # the kernel is up
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    page.wait_for_function(ALL_RUN_JS, timeout=timeout_ms)
    page.wait_for_function(FIGURE_CHANGED_JS, arg="", timeout=timeout_ms)
    return page.locator(FIGURE).first.get_attribute("src")


def assert_quiet(page, notebook: str) -> None:
    """No error or stderr output anywhere in the notebook, and the explorer's error line empty."""
    for mime in ("application/vnd.jupyter.stderr", "application/vnd.jupyter.error"):
        outputs = page.locator(f".jp-OutputArea-output[data-mime-type='{mime}']")
        assert outputs.count() == 0, f"{notebook}: {mime}: {outputs.all_inner_texts()}"
    assert page.locator(".wb-explorer-error").first.inner_text().strip() == "", notebook


def test_explorer_figures_follow_their_controls_in_jupyterlab(tmp_path):
    site = tmp_path / "notebooks"  # copies: JupyterLab autosaves outputs into the notebooks it runs
    site.mkdir()
    for notebook in ("02_pruning.ipynb", "03_quantization.ipynb", "05_recovery.ipynb"):
        shutil.copy(NOTEBOOKS / notebook, site / notebook)
    with ui_latency.serve("lab", site / "02_pruning.ipynb") as url, ui_latency.browser_page() as page:
        for notebook in ("02_pruning.ipynb", "03_quantization.ipynb"):
            before = run_all(page, url, notebook)
            page.locator(".wb-explorer .widget-slider .noUi-handle").first.focus()
            page.keyboard.press("ArrowRight")
            page.wait_for_function(FIGURE_CHANGED_JS, arg=before, timeout=60_000)
            assert_quiet(page, notebook)
            page.locator(FIGURE).first.screenshot(path=str(tmp_path / f"{notebook[:2]}.png"))

        before = run_all(page, url, "05_recovery.ipynb")
        page.locator(".wb-explorer button", has_text="Fine-tune").first.click()
        page.wait_for_function("() => document.querySelector('.wb-explorer').innerText.includes('finetune: test')",
                               timeout=60_000)  # the run ended: its curves and its point on the size chart
        assert page.locator(FIGURE).first.get_attribute("src") != before
        assert_quiet(page, "05_recovery.ipynb")
        page.locator(FIGURE).first.screenshot(path=str(tmp_path / "05.png"))


@pytest.mark.parametrize("notebook", ["02_pruning.ipynb", "03_quantization.ipynb"])
def test_explorer_figures_follow_their_controls_in_voila(notebook, tmp_path):
    shutil.copy(NOTEBOOKS / notebook, tmp_path / notebook)
    with ui_latency.serve("voila", tmp_path / notebook) as url, ui_latency.browser_page() as page:
        page.goto(url, timeout=400_000)  # Voilà runs the notebook before it answers
        page.wait_for_function(FIGURE_CHANGED_JS, arg="", timeout=400_000)
        before = page.locator(FIGURE).first.get_attribute("src")
        page.locator(".wb-explorer .widget-slider .noUi-handle").first.focus()
        page.keyboard.press("ArrowRight")
        page.wait_for_function(FIGURE_CHANGED_JS, arg=before, timeout=60_000)
        assert_quiet(page, notebook)


# Lesson 02's structured-pruning explorer (`wb.StructuredExplorer` on digits-resnet): after the cells ran,
# every group slider sits at half; one channel fewer in the first group must redraw its figure (kept
# channels, measured speed-up beside the FLOP ratio): a pruned model built and timed, from the compute thread.
STRUCTURED = ".wb-structured"
STRUCTURED_FIGURE_JS = FIGURE_CHANGED_JS.replace(FIGURE, f"{STRUCTURED} img.wb-figure")


def move_structured_slider(page, notebook: str, wait_ms: int) -> None:
    """Press ArrowLeft on the structured explorer's first slider; its figure must change, quietly."""
    page.wait_for_function(STRUCTURED_FIGURE_JS, arg="", timeout=wait_ms)
    figure = page.locator(f"{STRUCTURED} img.wb-figure").first
    before, table = figure.get_attribute("src"), page.locator(".wb-structured-table").first.inner_text()
    page.locator(f"{STRUCTURED} .widget-slider .noUi-handle").first.focus()
    page.keyboard.press("ArrowLeft")
    page.wait_for_function(STRUCTURED_FIGURE_JS, arg=before, timeout=120_000)
    page.wait_for_function("prev => document.querySelector('.wb-structured-table').innerText !== prev",
                           arg=table, timeout=120_000)
    assert_quiet(page, notebook)
    assert page.locator(f"{STRUCTURED} .wb-explorer-error").first.inner_text().strip() == "", notebook


def test_structured_explorer_figure_follows_its_slider_in_jupyterlab(tmp_path):
    notebook = "02_pruning.ipynb"
    shutil.copy(NOTEBOOKS / notebook, tmp_path / notebook)
    with ui_latency.serve("lab", tmp_path / notebook) as url, ui_latency.browser_page() as page:
        run_all(page, url, notebook, timeout_ms=400_000)
        move_structured_slider(page, notebook, 60_000)
        page.locator(f"{STRUCTURED} img.wb-figure").first.screenshot(path=str(tmp_path / "02-structured.png"))


def test_structured_explorer_figure_follows_its_slider_in_voila(tmp_path):
    notebook = "02_pruning.ipynb"
    shutil.copy(NOTEBOOKS / notebook, tmp_path / notebook)
    with ui_latency.serve("voila", tmp_path / notebook) as url, ui_latency.browser_page() as page:
        page.goto(url, timeout=400_000)  # Voilà runs the notebook before it answers
        move_structured_slider(page, notebook, 400_000)


# Lesson 09: four views (`workbench.widgets.techniques`), each `.wb-explorer` with its own figure. After its
# cells ran, each sits on its last option (the notebook steps through them all), so the slider moves left
# and the dropdowns pick their first option: results are memoised, only the figure is redrawn.
TECHNIQUES = "09_more_techniques.ipynb"
VIEWS = ("L1View", "FoldView", "ExportView", "SweepView")
NTH_FIGURE_JS = """([n, prev]) => { const i = document.querySelectorAll('.wb-explorer img.wb-figure')[n];
  return i && i.getAttribute('src') && i.getAttribute('src') !== prev; }"""


def move_each_technique_view(page, notebook: str) -> None:
    """Move the control of each of the four views; its own figure must change, the others' not."""
    page.wait_for_function("() => [...document.querySelectorAll('.wb-explorer img.wb-figure')]"
                           ".filter(i => i.getAttribute('src')).length === 4", timeout=300_000)
    figures = page.locator(FIGURE)
    assert figures.count() == len(VIEWS), f"{notebook}: {figures.count()} figures, expected one per view"
    for n, name in enumerate(VIEWS):
        before = [figures.nth(i).get_attribute("src") for i in range(len(VIEWS))]
        explorer = page.locator(".wb-explorer").nth(n)
        if name == "L1View":
            explorer.locator(".widget-slider .noUi-handle").first.focus()
            page.keyboard.press("ArrowLeft")
        else:
            explorer.locator(".widget-dropdown select").first.select_option(index=0)
        page.wait_for_function(NTH_FIGURE_JS, arg=[n, before[n]], timeout=120_000)
        others = [i for i in range(len(VIEWS)) if i != n]
        assert [figures.nth(i).get_attribute("src") for i in others] == [before[i] for i in others], (
            f"{notebook}: moving {name} changed another view's figure")
        errors = page.locator(".wb-explorer-error")
        assert all(errors.nth(i).inner_text().strip() == "" for i in range(errors.count())), (
            f"{notebook}, {name}: {errors.all_inner_texts()}")
    assert_quiet(page, notebook)


def test_technique_views_follow_their_controls_in_jupyterlab(tmp_path):
    shutil.copy(NOTEBOOKS / TECHNIQUES, tmp_path / TECHNIQUES)
    with ui_latency.serve("lab", tmp_path / TECHNIQUES) as url, ui_latency.browser_page() as page:
        run_all(page, url, TECHNIQUES, timeout_ms=400_000)
        move_each_technique_view(page, TECHNIQUES)
        page.screenshot(path=str(tmp_path / "09-lab.png"), full_page=True)


def test_technique_views_follow_their_controls_in_voila(tmp_path):
    shutil.copy(NOTEBOOKS / TECHNIQUES, tmp_path / TECHNIQUES)
    with ui_latency.serve("voila", tmp_path / TECHNIQUES) as url, ui_latency.browser_page() as page:
        page.goto(url, timeout=400_000)
        move_each_technique_view(page, TECHNIQUES)


# Lesson 04: the Tucker explorer, then the gate-rank explorer, each with its own figure; lesson 06: the budget
# explorer (a budget slider; the notebook leaves it at 0.06, one step right re-solves to a larger pick).
CONV_RNN, CHOOSING = "04_conv_and_rnn.ipynb", "06_choosing.ipynb"
EXPLORERS = {CONV_RNN: 2, CHOOSING: 1}


def move_first_slider_of_each_explorer(page, notebook: str) -> None:
    """One ArrowRight on the first slider of each explorer of ``notebook``: its own figure must change, the
    others' not, with no error anywhere."""
    count = EXPLORERS[notebook]
    page.wait_for_function("n => [...document.querySelectorAll('.wb-explorer img.wb-figure')]"
                           ".filter(i => i.getAttribute('src')).length === n", arg=count, timeout=300_000)
    figures = page.locator(FIGURE)
    assert figures.count() == count, f"{notebook}: {figures.count()} figures, expected {count}"
    for n in range(count):
        before = [figures.nth(i).get_attribute("src") for i in range(count)]
        page.locator(".wb-explorer").nth(n).locator(".widget-slider .noUi-handle").first.focus()
        page.keyboard.press("ArrowRight")
        page.wait_for_function(NTH_FIGURE_JS, arg=[n, before[n]], timeout=120_000)
        assert [figures.nth(i).get_attribute("src") for i in range(count) if i != n] == [
            before[i] for i in range(count) if i != n], f"{notebook}: explorer {n}'s slider moved another figure"
    errors = page.locator(".wb-explorer-error")
    assert all(errors.nth(i).inner_text().strip() == "" for i in range(errors.count())), errors.all_inner_texts()
    assert_quiet(page, notebook)


def test_conv_rnn_and_budget_explorers_follow_their_sliders_in_jupyterlab(tmp_path):
    for notebook in EXPLORERS:
        shutil.copy(NOTEBOOKS / notebook, tmp_path / notebook)
    with ui_latency.serve("lab", tmp_path / CONV_RNN) as url, ui_latency.browser_page() as page:
        for notebook in EXPLORERS:
            run_all(page, url, notebook, timeout_ms=400_000)
            move_first_slider_of_each_explorer(page, notebook)
            page.screenshot(path=str(tmp_path / f"{notebook[:2]}-lab.png"), full_page=True)


@pytest.mark.parametrize("notebook", list(EXPLORERS))
def test_conv_rnn_and_budget_explorers_follow_their_sliders_in_voila(notebook, tmp_path):
    shutil.copy(NOTEBOOKS / notebook, tmp_path / notebook)
    with ui_latency.serve("voila", tmp_path / notebook) as url, ui_latency.browser_page() as page:
        page.goto(url, timeout=400_000)
        move_first_slider_of_each_explorer(page, notebook)
