"""The lessons' explorers in a real browser (JupyterLab and Voilà, headless Debian Chromium through
Playwright): once the notebook has run (JupyterLab: "Run All Cells"; Voilà: the app), a slider
moved with the keyboard (02 pruning, 03 quantization) or a button pressed (05 recovery, JupyterLab
only) must change the explorer's figure (``img.wb-figure``, drawn on the compute thread into an
``ipywidgets.Image``), with no error or stderr output in the page. Servers serve copies of the
notebooks (JupyterLab autosaves outputs) and are started and stopped by `benchmarks/ui_latency.py`."""
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


def run_all(page, url: str, notebook: str, timeout_ms: int = 180_000) -> str:
    """Open ``notebook`` in a workspace of its own (no other tab restored), run all its cells,
    wait until they ran; returns the figure's src."""
    page.goto(url.replace("/lab/tree/02_pruning.ipynb", f"/lab/workspaces/{notebook[:2]}/tree/{notebook}"))
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
        page.goto(url)
        page.wait_for_function(FIGURE_CHANGED_JS, arg="", timeout=180_000)
        before = page.locator(FIGURE).first.get_attribute("src")
        page.locator(".wb-explorer .widget-slider .noUi-handle").first.focus()
        page.keyboard.press("ArrowRight")
        page.wait_for_function(FIGURE_CHANGED_JS, arg=before, timeout=60_000)
        assert_quiet(page, notebook)
