"""``python -m workbench app`` in headless Chromium (127.0.0.1, a free port, a token, at most one
kernel): a visitor's save bar refuses paths, saves through a download link and restores the slider
from an upload, with nothing written on the server; a second visitor gets the busy page."""
import base64
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import ui_latency  # noqa: E402

pytestmark = [
    pytest.mark.browser, pytest.mark.slow,
    pytest.mark.skipif(not Path(ui_latency.CHROMIUM).exists(),
                       reason=f"{ui_latency.CHROMIUM} missing (apt-get install -y chromium)"),
]

APP_CODE = '''\
import ipywidgets as w
from workbench.plan import LayerPlan, Plan
from workbench.widgets.persistence import SaveLoadBar


class Host(w.VBox):
    def __init__(self):
        self.rank = w.IntSlider(value=0, min=0, max=16, description="fc1")
        self.rank.add_class("wb-test-rank")
        super().__init__([self.rank])

    @property
    def plan(self):
        return Plan({"fc1": LayerPlan("svd", {"rank": self.rank.value})} if self.rank.value else {})

    def set_plan(self, plan):
        choice = plan.layers.get("fc1")
        self.rank.value = choice["rank"] if choice else 0


host = Host()
w.VBox([host, SaveLoadBar(host, "mine.json")])
'''


def write_notebook(path: Path) -> None:
    import nbformat

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(APP_CODE)]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)


def test_app_keeps_files_in_the_browser_and_turns_away_visitors_past_the_limit(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    write_notebook(site / "app.ipynb")
    port, token = ui_latency.free_port(), "browser-test-token-0123"
    home = tempfile.mkdtemp(prefix="wb-app-", dir=tmp_path)
    env = {**os.environ, "HOME": home, "JUPYTER_PLATFORM_DIRS": "1", "JUPYTER_RUNTIME_DIR": f"{home}/runtime",
           "JUPYTER_CONFIG_DIR": f"{home}/config", "IPYTHONDIR": f"{home}/ipython", "MPLCONFIGDIR": f"{home}/mpl",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ui_latency.REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "workbench", "app", str(site / "app.ipynb"), f"--port={port}",
               f"--token={token}", "--max-kernels=1"]
    url = f"http://127.0.0.1:{port}/?token={token}"
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ui_latency.wait_for_port(port, server)
        with ui_latency.browser_page() as page:
            page.goto(url, timeout=180_000)  # Voilà runs the notebook before it answers
            page.wait_for_selector(".wb-save-load .widget-upload", timeout=180_000)
            handle = page.locator(".wb-test-rank .noUi-handle")
            handle.focus()
            for _ in range(3):
                page.keyboard.press("ArrowRight")
            page.wait_for_function("() => document.querySelector('.wb-test-rank .widget-readout').innerText === '3'",
                                   timeout=20_000)  # the slider shows 3 before the configuration is saved
            name = page.locator(".wb-save-load input[type=text]")
            save = page.get_by_role("button", name="Save this configuration")
            status = page.locator(".wb-save-load .widget-html").last
            for typed in ["../x.json", str(tmp_path / "abs.json")]:
                name.fill(typed)
                name.press("Enter")
                save.click()
                page.wait_for_function("t => document.body.innerText.includes(t)", arg="is a path", timeout=20_000)
                assert "not saved" in status.inner_text()
            name.fill("mine.json")
            name.press("Enter")
            save.click()
            link = page.wait_for_selector("a.wb-config-download", timeout=20_000)
            assert link.get_attribute("download") == "mine.json"
            content = base64.b64decode(re.sub("^data:application/json;base64,", "", link.get_attribute("href")))
            assert b'"rank": 3' in content

            handle.focus()
            page.keyboard.press("Home")
            page.wait_for_function("() => document.querySelector('.wb-test-rank .widget-readout').innerText === '0'")
            with page.expect_file_chooser() as chooser:  # the upload button opens the visitor's file dialog
                page.locator(".wb-save-load .widget-upload").click()
            chooser.value.set_files([{"name": "mine.json", "mimeType": "application/json", "buffer": content}])
            page.wait_for_function("() => document.querySelector('.wb-test-rank .widget-readout').innerText === '3'",
                                   timeout=20_000)
            page.wait_for_function("t => document.body.innerText.includes(t)",  # the status follows the slider
                                   arg="loaded 1 layer setting(s) from mine.json", timeout=20_000)

            second = page.context.browser.new_context().new_page()  # another visitor, own cookies
            response = second.goto(url)
            assert response.status == 503
            assert "Busy" in second.locator("h1").inner_text() and "try again" in second.locator("h1").inner_text()
            assert "Traceback" not in second.content()
        assert sorted(p.name for p in site.iterdir()) == ["app.ipynb"]  # nothing written beside the notebook
        assert not (tmp_path / "x.json").exists() and not (tmp_path / "abs.json").exists()
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait()
