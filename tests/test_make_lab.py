"""`make lab` starts JupyterLab headless (CI, containers, root): it answers HTTP on the port it was given.

The Makefile is run as is, with the interpreter running these tests as its venv; ``-o <stamp>`` keeps make
from reinstalling the venv when pyproject.toml is newer than the stamp (the install is not what is tested).
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)
STAMP = VENV / ".installed"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def _make_command(*args: str) -> list[str]:
    return ["make", "-C", str(ROOT), "-o", str(STAMP), f"VENV={VENV}", *args]


def _make(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(_make_command(*args), env=env, capture_output=True, text=True, check=True, timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lab_flags_follow_ci_and_root():
    """The recipe passes --no-browser under CI and --allow-root exactly when run as root."""
    env = {**os.environ, "CI": "true"}
    dry = _make("-n", "lab", "LAB_ARGS=--port=1234", env=env).stdout
    (line,) = [line for line in dry.splitlines() if "jupyter lab" in line]
    assert "--no-browser" in line.split() and "--port=1234" in line.split()
    assert ("--allow-root" in line.split()) == (os.getuid() == 0), line
    screen = {**os.environ, "DISPLAY": ":0"}
    screen.pop("CI", None)
    (line,) = [line for line in _make("-n", "lab", env=screen).stdout.splitlines() if "jupyter lab" in line]
    assert "--no-browser" not in line.split(), f"a desktop session should get a browser: {line}"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop_group(process: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM the whole process group (make, jupyter and anything it started); SIGKILL what outlives ``grace``."""
    pgid = process.pid  # start_new_session: the group id is make's pid
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _group_alive(pgid):
        process.poll()  # reap make so that it does not keep the group alive as a zombie
        time.sleep(0.2)
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)
    process.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_make_lab_serves_http_headless(tmp_path):
    port, token = _free_port(), "workbench-test-token"
    env = {**os.environ, "CI": "true", "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    env.pop("DISPLAY", None)
    log_path = tmp_path / "lab.log"
    status = None
    with log_path.open("w") as log:
        lab = subprocess.Popen(
            _make_command("lab", f"LAB_ARGS=--port={port} --ip=127.0.0.1 --IdentityProvider.token={token} "
                                 "--ServerApp.port_retries=0"),
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and lab.poll() is None:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/api/status",
                                                 headers={"Authorization": f"token {token}"})
                try:
                    with urllib.request.urlopen(request, timeout=5) as response:
                        status = (response.status, json.loads(response.read()))
                        break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    time.sleep(1)
        finally:
            _stop_group(lab)
    output = log_path.read_text()
    assert status is not None, (f"make lab did not answer on port {port} within 90 s "
                                f"(exit {lab.returncode}):\n{output[-3000:]}")
    code, body = status
    assert code == 200 and "started" in body, body
    (recipe,) = [line for line in output.splitlines() if "-m jupyter lab" in line]
    assert "--no-browser" in recipe.split(), recipe
    assert not _group_alive(lab.pid), "processes of make lab outlived the test"
    with pytest.raises(OSError):  # nothing listens on the port any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
