"""Key press to readout change, in a real browser: JupyterLab and Voilà serving the quickstart.

Run: ``.venv/bin/python benchmarks/ui_latency.py [--moves 20] [--server lab|voila|both]``.
Prints JSON ``{server: {"readout_p50_ms", "readout_p95_ms", "figure_p50_ms", "figure_p95_ms"}}``:
from the ``keydown`` event on a rank slider's handle to the size readout's text changing, and to
the chart image changing (the whole update), both timed in the page (``performance.now()``).

The helpers (`serve`, `open_dashboard`, `press_and_wait`) are also used by
``tests/test_browser.py``. Servers listen on 127.0.0.1 with a random port and token, use a
temporary HOME / runtime dir, and are stopped on exit. Needs /usr/bin/chromium (Debian package).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from doc_results import markdown_table, write_section

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "01_quickstart.ipynb"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
SLIDER_HANDLE = ".wb-dashboard .widget-slider .noUi-handle"

# Records key presses and changes of the size readout / chart image with page timestamps.
WATCH_JS = """() => {
  const size = document.querySelector('.wb-readout-size');
  const img = document.querySelector('img.wb-dashboard-plot');
  window.__wb = {keys: [], size: [], img: []};
  document.addEventListener('keydown', () => window.__wb.keys.push(performance.now()), true);
  new MutationObserver(() => window.__wb.size.push(performance.now()))
    .observe(size, {subtree: true, childList: true, characterData: true});
  new MutationObserver(() => window.__wb.img.push(performance.now()))
    .observe(img, {attributes: true, attributeFilter: ['src']});
}"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with status {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise TimeoutError(f"server did not listen on port {port} within {timeout:.0f} s")


@contextlib.contextmanager
def serve(kind: str, notebook: Path = NOTEBOOK):
    """Start JupyterLab (``kind="lab"``) or Voilà (``"voila"``) on the notebook; yield its URL."""
    port, token = free_port(), secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="wb-browser-") as home:
        env = {**os.environ, "HOME": home, "JUPYTER_PLATFORM_DIRS": "1",
               "JUPYTER_RUNTIME_DIR": str(Path(home) / "runtime"), "JUPYTER_CONFIG_DIR": str(Path(home) / "config"),
               "IPYTHONDIR": str(Path(home) / "ipython"), "MPLCONFIGDIR": str(Path(home) / "mpl"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        if kind == "lab":
            command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
                       f"--port={port}", f"--IdentityProvider.token={token}",
                       f"--ServerApp.root_dir={notebook.parent}", "--LabApp.news_url=", "--ServerApp.open_browser=False"]
            url = f"http://127.0.0.1:{port}/lab/tree/{notebook.name}?token={token}"
        elif kind == "voila":
            command = [sys.executable, "-m", "voila", str(notebook), "--no-browser", f"--port={port}",
                       "--Voila.ip=127.0.0.1", f"--token={token}"]
            url = f"http://127.0.0.1:{port}/?token={token}"
        else:
            raise ValueError(f"kind={kind!r} must be 'lab' or 'voila'")
        log = open(Path(home) / "server.log", "w")
        process = subprocess.Popen(command, cwd=notebook.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, process)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


@contextlib.contextmanager
def browser_page():
    from playwright.sync_api import sync_playwright  # noqa: PLC0415 - test extra, only for the browser timings

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            yield page
        finally:
            browser.close()


def open_dashboard(page, kind: str, url: str, timeout_ms: int = 180_000) -> None:
    """Load the page; in JupyterLab run all cells. Returns once the dashboard's sliders are shown."""
    page.goto(url, timeout=timeout_ms)  # Voilà runs the notebook before it answers
    if kind == "lab":
        page.wait_for_selector(".jp-Notebook", timeout=timeout_ms)
        with contextlib.suppress(Exception):  # kernel chooser: only when the notebook names no kernel
            page.locator(".jp-Dialog .jp-mod-accept").click(timeout=3000)
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator, .jp-Toolbar-kernelStatus", timeout=timeout_ms)
        page.locator(".jp-Notebook").first.click()
        page.keyboard.press("Escape")
        page.keyboard.press("Control+Shift+C")
        page.keyboard.type("Run All Cells")
        page.keyboard.press("Enter")
    page.wait_for_selector(SLIDER_HANDLE, timeout=timeout_ms)
    page.wait_for_function(
        "() => { const s = document.querySelector('.wb-readout-size');"
        " const i = document.querySelector('img.wb-dashboard-plot');"
        " return s && s.textContent.includes('KiB') && i && i.getAttribute('src'); }", timeout=timeout_ms)


def readouts(page) -> dict:
    return page.evaluate("""() => ({
      size: document.querySelector('.wb-readout-size').textContent,
      accuracy: document.querySelector('.wb-readout-accuracy').textContent,
      image: document.querySelector('img.wb-dashboard-plot').getAttribute('src'),
      error: document.querySelector('.wb-dashboard-error').textContent})""")


def press_and_wait(page, key: str, handle_index: int = 1, timeout_ms: int = 90_000) -> dict:
    """Press ``key`` on a slider handle; wait until the size readout and the image have changed.

    Returns ``{"readout_ms", "figure_ms"}`` measured in the page from the keydown event.
    """
    page.evaluate("() => { window.__wb.keys = []; window.__wb.size = []; window.__wb.img = []; }")
    page.locator(SLIDER_HANDLE).nth(handle_index).focus()
    page.keyboard.press(key)
    page.wait_for_function("() => window.__wb.size.length > 0 && window.__wb.img.length > 0", timeout=timeout_ms)
    page.wait_for_timeout(30)  # let the last mutation of this update land
    marks = page.evaluate("() => window.__wb")
    start = marks["keys"][0]
    return {"readout_ms": marks["size"][-1] - start, "figure_ms": marks["img"][-1] - start}


def measure(kind: str, moves: int = 20, screenshot: Path | None = None) -> dict:
    with serve(kind) as url, browser_page() as page:
        open_dashboard(page, kind, url)
        page.evaluate(WATCH_JS)
        press_and_wait(page, "ArrowLeft")  # warm-up (first slice of this layer)
        samples = [press_and_wait(page, "ArrowLeft") for _ in range(moves)]
        if screenshot is not None:
            page.screenshot(path=str(screenshot), full_page=True)
    readout = [s["readout_ms"] for s in samples]
    figure = [s["figure_ms"] for s in samples]
    q = lambda values, p: statistics.quantiles(values, n=100, method="inclusive")[p - 1]  # noqa: E731
    return {"moves": moves, "readout_p50_ms": statistics.median(readout), "readout_p95_ms": q(readout, 95),
            "figure_p50_ms": statistics.median(figure), "figure_p95_ms": q(figure, 95)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moves", type=int, default=20)
    parser.add_argument("--server", choices=["lab", "voila", "both"], default="both")
    parser.add_argument("--screenshot-dir", type=Path)
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        sys.exit(f"{CHROMIUM} is missing: apt-get install -y chromium")
    kinds = ["lab", "voila"] if args.server == "both" else [args.server]
    result = {}
    for kind in kinds:
        shot = args.screenshot_dir / f"{kind}.png" if args.screenshot_dir else None
        result[kind] = measure(kind, args.moves, shot)
    print(json.dumps(result, indent=2))
    rows = [[server, f"{r['readout_p50_ms']:.0f} / {r['readout_p95_ms']:.0f} ms",
             f"{r['figure_p50_ms']:.0f} / {r['figure_p95_ms']:.0f} ms"] for server, r in result.items()]
    write_section("latency", f"ui_latency.py --moves {args.moves} --server {args.server}",
                  f"{args.moves} key presses on a rank slider of `notebooks/01_quickstart.ipynb`, headless Chromium\n\n"
                  + markdown_table(["server", "key press to readout p50 / p95", "key press to chart p50 / p95"], rows),
                  title=f"In the browser: benchmarks/ui_latency.py --moves {args.moves} --server {args.server}")


if __name__ == "__main__":
    main()
