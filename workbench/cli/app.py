"""``python -m workbench app NOTEBOOK``: serve a notebook as a web app (Voilà) with safe settings.

* bound to 127.0.0.1 unless ``--public`` (then all interfaces);
* a token always required (``--token``, else one is generated and printed with the URL): on
  127.0.0.1 every user of the machine can connect too;
* tracebacks never shown to visitors; notebook templates not chosen by the URL;
* idle kernels culled after ``--idle-timeout`` seconds, even with the page still open;
* at most ``--max-kernels`` visitors at once (`workbench.app_server.CappedKernelManager`): the
  next one gets a "Busy ... try again" page (HTTP 503), not a hung server;
* kernels get ``WORKBENCH_APP=1``: the save bar then goes through the visitor's browser
  (download / upload) and writes nothing on the server.
"""
from __future__ import annotations

import os
import re
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path

from workbench.errors import WorkbenchError

DEFAULT_PORT = 8866
DEFAULT_MAX_KERNELS = 8
DEFAULT_IDLE_TIMEOUT_S = 600
CULL_INTERVAL_S = 60
KERNEL_MANAGER = "workbench.app_server.CappedKernelManager"
_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,128}")


@dataclass(frozen=True)
class Launch:
    """What `run` starts: ``argv`` of Voilà, the ``env`` overrides, the visitor ``url``."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    url: str = ""
    cwd: str = "."


def voila_argv(notebook: str | os.PathLike, port: int = DEFAULT_PORT, public: bool = False, token: str = "",
               max_kernels: int = DEFAULT_MAX_KERNELS, idle_timeout_s: int = DEFAULT_IDLE_TIMEOUT_S,
               open_browser: bool = False, python: str = sys.executable) -> list[str]:
    """The Voilà command line serving ``notebook`` with the safe settings of the module docstring.

    ``port``: TCP port (1..65535); ``token``: 16 to 128 URL-safe characters (required);
    ``max_kernels``: visitors at once (>= 1); ``idle_timeout_s``: seconds of kernel inactivity
    before it is shut down (>= 60). Raises `WorkbenchError` naming the value and the rule.
    """
    path = Path(notebook)
    if path.suffix != ".ipynb" or not path.is_file():
        raise WorkbenchError(f"notebook {str(notebook)!r} must be an existing .ipynb file")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise WorkbenchError(f"port={port!r} must be a whole number from 1 to 65535")
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        raise WorkbenchError("the token must be 16 to 128 letters, digits, '-' or '_' (a web app always needs one)")
    if isinstance(max_kernels, bool) or not isinstance(max_kernels, int) or max_kernels < 1:
        raise WorkbenchError(f"max_kernels={max_kernels!r} must be a whole number >= 1 (visitors at once)")
    if isinstance(idle_timeout_s, bool) or not isinstance(idle_timeout_s, int) or idle_timeout_s < 60:
        raise WorkbenchError(f"idle_timeout={idle_timeout_s!r} must be a whole number of seconds >= 60")
    argv = [python, "-m", "voila", str(path.resolve()),
            f"--port={port}",
            f"--Voila.ip={'0.0.0.0' if public else '127.0.0.1'}",
            f"--Voila.token={token}",
            "--VoilaConfiguration.show_tracebacks=False",
            "--VoilaConfiguration.allow_template_override=NO",
            f"--VoilaConfiguration.multi_kernel_manager_class={KERNEL_MANAGER}",
            f"--CappedKernelManager.max_kernels={max_kernels}",
            f"--MappingKernelManager.cull_idle_timeout={idle_timeout_s}",
            f"--MappingKernelManager.cull_interval={min(CULL_INTERVAL_S, idle_timeout_s)}",
            "--MappingKernelManager.cull_connected=True",
            "--MappingKernelManager.cull_busy=False"]
    if not open_browser:
        argv.append("--no-browser")
    return argv


def launch(args) -> Launch:
    """The `Launch` for parsed ``args`` (a token generated when none is given)."""
    token = args.token or secrets.token_urlsafe(24)
    argv = voila_argv(args.notebook, args.port, args.public, token, args.max_kernels, args.idle_timeout,
                      open_browser=args.browser and not args.public)
    host = "THIS-MACHINE" if args.public else "127.0.0.1"
    return Launch(argv, {"WORKBENCH_APP": "1"}, f"http://{host}:{args.port}/?token={token}",
                  str(Path(args.notebook).resolve().parent))


def run(args) -> int:
    plan = launch(args)
    print(f"serving {args.notebook} at {plan.url}\n  at most {args.max_kernels} visitors at once, idle kernels "
          f"stopped after {args.idle_timeout} s" + (" (listening on all interfaces)" if args.public else ""),
          flush=True)
    if args.dry_run:
        print(" ".join(plan.argv))
        return 0
    os.chdir(plan.cwd)
    # Voilà replaces this process (same pid, signals go straight to it; torch is not kept loaded)
    os.execve(plan.argv[0], plan.argv, {**os.environ, **plan.env})


def register(subparsers) -> None:
    parser = subparsers.add_parser("app", help="serve a notebook as a web app (Voila) with safe settings")
    parser.add_argument("notebook", help="the .ipynb file to serve")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    parser.add_argument("--public", action="store_true",
                        help="listen on all interfaces, not only 127.0.0.1 (share the printed token)")
    parser.add_argument("--token", default="", help="access token (default: a new random one, printed)")
    parser.add_argument("--max-kernels", type=int, default=DEFAULT_MAX_KERNELS,
                        help=f"visitors at once; the next one gets a 'busy' page (default {DEFAULT_MAX_KERNELS})")
    parser.add_argument("--idle-timeout", type=int, default=DEFAULT_IDLE_TIMEOUT_S,
                        help=f"seconds before an idle visitor's kernel is stopped (default {DEFAULT_IDLE_TIMEOUT_S})")
    parser.add_argument("--browser", action="store_true", help="open a browser on the app (not with --public)")
    parser.add_argument("--dry-run", action="store_true", help="print the Voila command line, start nothing")
    parser.set_defaults(func=run)
