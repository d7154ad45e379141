"""``python -m workbench app``: the Voilà command line it builds (nothing started), and the kernel
cap of `workbench.app_server.CappedKernelManager` (kernel starts stubbed)."""
import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.cli import build_parser
from workbench.cli.app import launch, voila_argv
from workbench.errors import WorkbenchError

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "01_quickstart.ipynb"
TOKEN = "t" * 20


def options(argv: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)


def test_local_app_is_safe_by_default():
    args = build_parser().parse_args(["app", str(NOTEBOOK)])
    plan = launch(args)
    opts = options(plan.argv)
    assert plan.argv[1:4] == ["-m", "voila", str(NOTEBOOK)]
    assert opts["Voila.ip"] == "127.0.0.1" and opts["port"] == "8866"
    token = opts["Voila.token"]
    assert len(token) >= 16 and plan.url == f"http://127.0.0.1:8866/?token={token}"
    assert launch(args).url != plan.url  # a fresh random token each time
    assert opts["VoilaConfiguration.show_tracebacks"] == "False"
    assert opts["VoilaConfiguration.multi_kernel_manager_class"] == "workbench.app_server.CappedKernelManager"
    assert opts["CappedKernelManager.max_kernels"] == "8"
    assert opts["MappingKernelManager.cull_idle_timeout"] == "600"
    assert opts["MappingKernelManager.cull_interval"] == "60"
    assert opts["MappingKernelManager.cull_connected"] == "True"
    assert "--no-browser" in plan.argv and plan.env == {"WORKBENCH_APP": "1"}
    assert plan.cwd == str(NOTEBOOK.parent)


def test_public_app_listens_everywhere_with_the_given_token_and_limits():
    args = build_parser().parse_args(["app", str(NOTEBOOK), "--public", "--port", "9001", "--token", TOKEN,
                                      "--max-kernels", "3", "--idle-timeout", "120", "--browser"])
    plan = launch(args)
    opts = options(plan.argv)
    assert opts["Voila.ip"] == "0.0.0.0" and opts["Voila.token"] == TOKEN and opts["port"] == "9001"
    assert opts["CappedKernelManager.max_kernels"] == "3" and opts["MappingKernelManager.cull_idle_timeout"] == "120"
    assert "--no-browser" in plan.argv  # never a browser on a shared server
    assert plan.url.endswith(f":9001/?token={TOKEN}")


@pytest.mark.parametrize("change, match", [
    ({"notebook": "missing.ipynb"}, "existing .ipynb"), ({"notebook": __file__}, "existing .ipynb"),
    ({"port": 0}, "port=0"), ({"port": 70000}, "port=70000"), ({"token": ""}, "token"),
    ({"token": "short"}, "token"), ({"token": "x" * 20 + "&a=b"}, "token"),
    ({"max_kernels": 0}, "max_kernels=0"), ({"idle_timeout_s": 5}, "idle_timeout=5"),
])
def test_bad_arguments_are_refused(change, match):
    kwargs = {"notebook": NOTEBOOK, "token": TOKEN, **change}
    with pytest.raises(WorkbenchError, match=match):
        voila_argv(**kwargs)


def test_dry_run_prints_the_command_and_starts_nothing():
    out = subprocess.run([sys.executable, "-m", "workbench", "app", str(NOTEBOOK), "--dry-run", "--token", TOKEN],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert f"http://127.0.0.1:8866/?token={TOKEN}" in out and "-m voila" in out
    bad = subprocess.run([sys.executable, "-m", "workbench", "app", "nope.ipynb", "--dry-run"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "existing .ipynb" in bad.stderr


def test_kernel_manager_admits_at_most_max_kernels(monkeypatch):
    from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager

    from workbench.app_server import CappedKernelManager, KernelLimitReached

    async def fake_start(self, *args, kernel_id=None, **kwargs):
        await asyncio.sleep(0.01)  # simultaneous visits interleave here
        kernel_id = kernel_id or f"k{len(self._kernels)}"
        self._kernels[kernel_id] = object()
        return kernel_id

    monkeypatch.setattr(AsyncMappingKernelManager, "start_kernel", fake_start)
    manager = CappedKernelManager(max_kernels=2)

    async def visits(n):
        return await asyncio.gather(*(manager.start_kernel() for _ in range(n)), return_exceptions=True)

    results = asyncio.run(visits(3))
    refused = [r for r in results if isinstance(r, KernelLimitReached)]
    assert len(refused) == 1 and refused[0].status_code == 503 and "Busy: all 2 sessions" in refused[0].reason
    assert sorted(manager.list_kernel_ids()) == ["k0", "k1"]
    assert asyncio.run(manager.start_kernel(kernel_id="k0")) == "k0"  # an existing kernel takes no place
    del manager._kernels["k0"]  # a visitor left (or was culled): a place is free again
    assert asyncio.run(manager.start_kernel()) in manager.list_kernel_ids()
