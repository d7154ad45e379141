"""The quickstart in a real browser: JupyterLab (run all cells) and Voilà (app mode), headless
Debian Chromium through Playwright. A rank slider moved with the keyboard must change the
accuracy / size readouts and the chart image, with no error shown. Servers are started on
127.0.0.1 with a random port and token and stopped by the test (benchmarks/ui_latency.py)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import ui_latency  # noqa: E402

pytestmark = [
    pytest.mark.browser, pytest.mark.slow,
    pytest.mark.skipif(not Path(ui_latency.CHROMIUM).exists(),
                       reason=f"{ui_latency.CHROMIUM} missing (.ci/run installs it: apt-get install -y chromium)"),
]


@pytest.mark.parametrize("kind", ["lab", "voila"])
def test_slider_moves_update_readouts_and_plot(kind, tmp_path):
    with ui_latency.serve(kind) as url, ui_latency.browser_page() as page:
        ui_latency.open_dashboard(page, kind, url)
        page.evaluate(ui_latency.WATCH_JS)
        first = ui_latency.readouts(page)
        assert "accuracy" in first["accuracy"] and "KiB" in first["size"]

        timing = ui_latency.press_and_wait(page, "ArrowLeft", handle_index=1)  # fc2: 256 -> 255
        after_one = ui_latency.readouts(page)
        assert after_one["size"] != first["size"] and after_one["image"] != first["image"]
        assert timing["readout_ms"] > 0

        ui_latency.press_and_wait(page, "Home", handle_index=0)  # fc1 to rank 1: accuracy drops
        page.wait_for_function(
            "prev => document.querySelector('.wb-readout-accuracy').textContent !== prev",
            arg=after_one["accuracy"], timeout=90_000)
        last = ui_latency.readouts(page)
        assert last["accuracy"] != after_one["accuracy"] and last["image"] != after_one["image"]

        assert last["error"].strip() == ""
        assert page.locator("[data-mime-type='application/vnd.jupyter.error']").count() == 0
        assert "Traceback" not in page.locator("body").inner_text()
        page.screenshot(path=str(tmp_path / f"{kind}.png"))
