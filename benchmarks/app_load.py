"""Simultaneous visitors of ``python -m workbench app`` on the quickstart (issue 20, part 3).

Run: ``.venv/bin/python benchmarks/app_load.py [--visitors 1 4 8] [--moves 10]``.
For each N, starts the app (127.0.0.1, a random port and token, ``--max-kernels N``), opens N
headless Chromium contexts at once (one visitor each, own cookies and kernel), waits for every
dashboard, then every visitor but the first (alone: the first) presses ArrowLeft on a rank slider ``--moves`` times,
all at the same time. Prints JSON per N:

* ``server_mib``: resident memory of Voilà and its kernels (MiB) with N visitors loaded, and
  ``mib_per_visitor`` = (that - the idle server) / N;
* ``readout_p50_ms`` / ``readout_p95_ms``: key press to size readout changed, all visitors' moves;
* ``isolated``: the first visitor, who never moves, still shows its first readout (one visitor's
  sliders never move another's readouts);
* ``past_limit``: HTTP status and heading seen by visitor N+1 (the busy page).

Then ``admitted_on_24_gib``: visitors a 24 GiB machine holds by memory, beside the default cap.
Bounded: at most 8 visitors, each page 180 s to load, each move 90 s. Needs /usr/bin/chromium.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
from playwright.async_api import async_playwright

from ui_latency import CHROMIUM, CHROMIUM_ARGS, NOTEBOOK, REPO, SLIDER_HANDLE, WATCH_JS, free_port, wait_for_port

DEFAULT_CAP = 8
MAX_VISITORS = 8


def tree_mib(pid: int) -> float:
    """Resident memory (MiB) of process ``pid`` and all its descendants."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


async def open_visitor(browser, url: str):
    context = await browser.new_context(viewport={"width": 1400, "height": 1000})
    page = await context.new_page()
    await page.goto(url, wait_until="commit", timeout=180_000)
    await page.wait_for_selector(SLIDER_HANDLE, timeout=180_000)
    await page.wait_for_function("() => { const s = document.querySelector('.wb-readout-size');"
                                 " return s && s.textContent.includes('KiB'); }", timeout=180_000)
    await page.evaluate(WATCH_JS)
    return page


async def move(page, times: int) -> list[float]:
    samples = []
    for _ in range(times):
        await page.evaluate("() => { window.__wb.keys = []; window.__wb.size = []; window.__wb.img = []; }")
        await page.locator(SLIDER_HANDLE).nth(1).focus()
        await page.keyboard.press("ArrowLeft")
        await page.wait_for_function("() => window.__wb.size.length > 0", timeout=90_000)
        marks = await page.evaluate("() => window.__wb")
        samples.append(marks["size"][-1] - marks["keys"][0])
    return samples


async def visit(url: str, n: int, moves: int, server_pid: int, idle_mib: float) -> dict:
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            pages = await asyncio.gather(*(open_visitor(browser, url) for _ in range(n)))
            loaded_mib = tree_mib(server_pid)
            still = await pages[0].locator(".wb-readout-size").text_content()
            movers = pages[1:] or pages  # the first visitor watches; alone, it moves
            runs = await asyncio.gather(*(move(page, moves) for page in movers))
            samples = [s for run in runs for s in run]
            isolated = await pages[0].locator(".wb-readout-size").text_content() == still if n > 1 else None
            extra = await (await browser.new_context()).new_page()
            response = await extra.goto(url, wait_until="commit", timeout=60_000)
            heading = await extra.locator("h1").first.text_content() if response.status != 200 else ""
        finally:
            await browser.close()
    q95 = statistics.quantiles(samples, n=100, method="inclusive")[94] if len(samples) > 1 else None
    return {"visitors": n, "server_mib": round(loaded_mib), "mib_per_visitor": round((loaded_mib - idle_mib) / n),
            "moves": len(samples), "readout_p50_ms": round(statistics.median(samples)) if samples else None,
            "readout_p95_ms": round(q95) if q95 is not None else None, "isolated": isolated,
            "past_limit": {"status": response.status, "heading": heading.strip()}}


def measure(n: int, moves: int) -> dict:
    port, token = free_port(), secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="wb-app-load-") as home:
        cache = os.environ.get("WORKBENCH_CACHE") or str(Path.home() / ".cache" / "compression-workbench")
        env = {**os.environ, "HOME": home, "WORKBENCH_CACHE": cache, "JUPYTER_PLATFORM_DIRS": "1", "MPLCONFIGDIR": f"{home}/mpl",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, "-m", "workbench", "app", str(NOTEBOOK), f"--port={port}", f"--token={token}",
                   f"--max-kernels={n}"]
        with open(Path(home) / "server.log", "w") as log:
            server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_port(port, server)
            idle = tree_mib(server.pid)
            result = asyncio.run(visit(f"http://127.0.0.1:{port}/?token={token}", n, moves, server.pid, idle))
            result["idle_server_mib"] = round(idle)
            return result
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)
                server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--visitors", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--moves", type=int, default=10)
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        sys.exit(f"{CHROMIUM} is missing: apt-get install -y chromium")
    if any(not 1 <= n <= MAX_VISITORS for n in args.visitors):
        sys.exit(f"--visitors must be from 1 to {MAX_VISITORS}")
    results = []
    for n in args.visitors:
        results.append(measure(n, args.moves))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    per_visitor = max(r["mib_per_visitor"] for r in results)
    by_memory = int((24 * 1024 - max(r["idle_server_mib"] for r in results)) * 0.8 // max(per_visitor, 1))
    summary = {"runs": results, "admitted_on_24_gib": {
        "by_memory_80_percent": by_memory, "default_cap": DEFAULT_CAP, "admitted": min(by_memory, DEFAULT_CAP),
        "why": f"{per_visitor} MiB per visitor; the cap of {DEFAULT_CAP} (2 cores: latency) binds before memory"
        if by_memory >= DEFAULT_CAP else f"{per_visitor} MiB per visitor: memory binds before the cap"}}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
