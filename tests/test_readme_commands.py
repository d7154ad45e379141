"""Every command line and every Python block of README.md runs.

Collected from README.md when this module is imported, in the README's order:

* each ``python -m workbench ...`` line of a ```bash block (``\\`` continuations joined, ``# comments``
  dropped; ``workbench ...``, the console script, counts too) runs as ``sys.executable -m workbench
  ...`` in a fresh working folder: exit status 0, ``--json`` output is strict JSON (no NaN or
  Infinity), an ``--out PATH`` exists afterwards, and every ``.json`` file it wrote is strict JSON;
* each ```python block runs with ``exec`` in its own namespace, in a fresh working folder, with the
  headless Agg backend of matplotlib;
* other shell lines (``make``, ``pip``, ``voila``, scripts) and commands that start a server are
  listed as skipped, with the reason.

All of them share one model cache (``WORKBENCH_CACHE``, a folder of this test session), so each
embedded model trains once. A few commands are shrunk for the test budget by the explicit table
`SUBSTITUTIONS`; the heavy ones are marked ``slow`` (they still run by default).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SHELL_LANGUAGES = {"bash", "sh", "shell", "console", "zsh"}
PYTHON_LANGUAGES = {"python", "py", "python3"}
SHELL_OPERATOR_CHARS = set("();<>|&")  # a token made of these only is a pipe, redirect or chain
COMMAND_TIMEOUT_S = 1200

#: The only changes made to README commands, each with why the full command is not run here:
#: ``(argv starts with, applies if this flag is given (None: always), option set, its value, why)``.
SUBSTITUTIONS: list[tuple[tuple[str, ...], str | None, str, str, str]] = [
    ((), "--blockwise", "--blockwise", "1",
     "block-wise reconstruction of MiniLM's blocks takes minutes on 2 cores; one pass per block runs the same code"),
    (("bench", "latency"), None, "--moves", "5",
     "latency statistics need many moves, the command's working does not: 5 moves"),
]

#: Subcommands that start a server and never return: not run here.
SERVER_SUBCOMMANDS = {"app", "serve", "lab"}
#: Heavy commands (marked slow, still run by default): MiniLM, the full study, every method, training.
SLOW_PATTERNS = (r"\bminilm\b", r"^report\b", r"^pareto\b", r"--finetune\b", r"--epochs\b", r"--blockwise\b")
#: Python blocks using these names are slow too.
SLOW_PYTHON = (r"minilm", r"finetune\(", r"distill_finetune\(", r"qat\(", r"train_student\(",
               r"reconstruct_blocks\(", r"collect_points\(", r"allocate\(", r"search\(")


@dataclass
class Block:
    language: str
    line: int  # 1-based line of the first line inside the fence
    text: str


@dataclass
class Command:
    line: int
    text: str  # as written in the README, continuations joined, comment dropped
    argv: list[str] = field(default_factory=list)  # after "-m workbench", substitutions applied
    env: dict[str, str] = field(default_factory=dict)  # VAR=value prefixes
    skip: str | None = None
    substituted: str | None = None  # the reason, when SUBSTITUTIONS changed it


def fenced_blocks(markdown: str) -> list[Block]:
    """The fenced code blocks of ``markdown`` (``` or ~~~ fences, any indentation), in order."""
    blocks: list[Block] = []
    fence = None
    for number, line in enumerate(markdown.splitlines(), start=1):
        stripped = line.strip()
        if fence is None:
            match = re.match(r"^(`{3,}|~{3,})\s*([\w+-]*)", stripped)
            if match:
                fence, language = match.group(1), match.group(2).lower()
                body: list[str] = []
                start = number + 1
        elif stripped.startswith(fence) and stripped.strip(fence[0]) == "":
            blocks.append(Block(language, start, textwrap.dedent("\n".join(body))))
            fence = None
        else:
            body.append(line)
    return blocks


def shell_lines(block: Block) -> list[tuple[int, str]]:
    """``(line number, command)`` of a shell block: continuations joined, prompts and blanks dropped."""
    lines: list[tuple[int, str]] = []
    pending, first = "", 0
    for offset, raw in enumerate(block.text.splitlines()):
        text = raw.rstrip()
        if not pending:
            first = block.line + offset
            text = re.sub(r"^\s*\$\s+", "", text)  # a "$ " prompt
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        line = (pending + text).strip()
        pending = ""
        if line and not line.startswith("#"):
            lines.append((first, line))
    return lines


def set_option(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag``'s value set to ``value`` (appended when ``flag`` is absent)."""
    if flag in argv:
        at = argv.index(flag)
        return argv[:at + 1] + [value] + argv[at + 2:]
    return [*argv, flag, value]


def substitute(argv: list[str]) -> tuple[list[str], str | None]:
    """``argv`` after the first `SUBSTITUTIONS` entry that applies, and that entry's reason."""
    for prefix, given, flag, value, why in SUBSTITUTIONS:
        if tuple(argv[:len(prefix)]) == prefix and (given is None or given in argv):
            return set_option(argv, flag, value), why
    return argv, None


def is_operator(token: str) -> bool:
    return bool(token) and set(token) <= SHELL_OPERATOR_CHARS


def parse_command(line: int, text: str) -> Command:
    """A README shell line as a `Command` to run, or one with ``skip`` saying why it is not run."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    tokens = list(lexer)
    shown = shlex.join(tokens)
    command = Command(line, shown)
    while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):
        name, _, value = tokens.pop(0).partition("=")
        command.env[name] = value
    if not tokens:
        command.skip = "no command on this line"
        return command
    program = Path(tokens[0]).name
    if program in ("python", "python3") and tokens[1:3] == ["-m", "workbench"]:
        rest = tokens[3:]
    elif program == "workbench":
        rest = tokens[1:]
    else:
        servers = {"make lab": "make lab starts JupyterLab (a server)", "voila": "voila starts a server",
                   "jupyter": "jupyter starts a server"}
        reason = next((why for start, why in servers.items() if shown.startswith(start) or program == start), None)
        command.skip = reason or f"not a `python -m workbench` command ({program} lines are not run by this test)"
        return command
    if any(is_operator(token) for token in rest):
        command.argv = rest  # test_readme_command_runs fails on it, naming the operator
        return command
    if rest and rest[0] in SERVER_SUBCOMMANDS:
        command.skip = f"`workbench {rest[0]}` starts a server"
        return command
    command.argv, command.substituted = substitute(rest)
    return command


def collect(markdown: str) -> tuple[list[Command], list[Block]]:
    commands: list[Command] = []
    python: list[Block] = []
    for block in fenced_blocks(markdown):
        if block.language in SHELL_LANGUAGES:
            commands += [parse_command(line, text) for line, text in shell_lines(block)]
        elif block.language in PYTHON_LANGUAGES:
            python.append(block)
    return commands, python


COMMANDS, PYTHON_BLOCKS = collect(README.read_text(encoding="utf-8"))


def _command_id(command: Command) -> str:
    words = shlex.join(command.argv) if command.argv else command.text
    return f"L{command.line} {words}"[:100]


def _python_id(block: Block) -> str:
    code = [l for l in block.text.splitlines() if l.strip() and not l.lstrip().startswith(("#", "import ", "from "))]
    return f"L{block.line} {code[0].split('#')[0].strip() if code else 'imports'}"[:80]


def _command_param(command: Command):
    marks = []
    if command.skip:
        marks.append(pytest.mark.skip(reason=command.skip))
    elif any(re.search(p, shlex.join(command.argv)) for p in SLOW_PATTERNS):
        marks.append(pytest.mark.slow)
    return pytest.param(command, id=_command_id(command), marks=marks)


def _python_param(block: Block):
    slow = any(re.search(p, block.text) for p in SLOW_PYTHON)
    return pytest.param(block, id=_python_id(block), marks=[pytest.mark.slow] if slow else [])


def strict_loads(text: str):
    """``json.loads`` refusing NaN, Infinity and -Infinity (not JSON, though Python writes them)."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One model cache for every README item of the session: each embedded model trains once."""
    return tmp_path_factory.mktemp("workbench-cache")


def test_readme_runs_a_pareto_sweep_and_a_quantization_sensitivity():
    """The two commands a newcomer meets first in the selection tools stay among the README's commands."""
    ran = [c.argv for c in COMMANDS if not c.skip]
    assert ran, f"no `python -m workbench` command found in {README}"
    assert any(argv[:1] == ["pareto"] for argv in ran), "README has no `python -m workbench pareto` command"
    assert any(argv[:1] == ["sensitivity"] and "--method" in argv and argv[argv.index("--method") + 1:][:1] == ["quant"]
               for argv in ran), "README has no `python -m workbench sensitivity ... --method quant` command"
    assert PYTHON_BLOCKS, f"no ```python block found in {README}"


def test_the_collector_reads_fences_continuations_and_comments():
    markdown = textwrap.dedent("""\
        text
        ```bash
        make lab     # a server
        $ python -m workbench models --json   # comment
        OMP_NUM_THREADS=1 python -m workbench compress digits-mlp \\
            --method svd --ratio 0.5
        .venv/bin/python -m workbench app
        pip install x
        ```
        ```python
        x = 1
        ```
        """)
    commands, python = collect(markdown)
    assert [(c.line, c.argv, c.skip is None) for c in commands] == [
        (3, [], False), (4, ["models", "--json"], True),
        (5, ["compress", "digits-mlp", "--method", "svd", "--ratio", "0.5"], True), (7, [], False), (8, [], False)]
    assert commands[0].skip.startswith("make lab starts") and "server" in commands[3].skip
    assert commands[2].env == {"OMP_NUM_THREADS": "1"}
    assert [(b.line, b.text.strip()) for b in python] == [(11, "x = 1")]
    shrunk = parse_command(1, "python -m workbench bench latency minilm --json")
    assert shrunk.argv == ["bench", "latency", "minilm", "--json", "--moves", "5"] and shrunk.substituted
    shrunk = parse_command(1, "python -m workbench compress minilm --blockwise 8 --json")
    assert shrunk.argv == ["compress", "minilm", "--blockwise", "1", "--json"]


@pytest.mark.parametrize("command", [_command_param(c) for c in COMMANDS])
def test_readme_command_runs(command: Command, tmp_path, shared_cache):
    bad = [token for token in command.argv if is_operator(token)]
    assert not bad, f"README line {command.line} chains shell operators {bad}: {command.text!r}; give one command per line"
    env = {**os.environ, "WORKBENCH_CACHE": str(shared_cache), "MPLBACKEND": "Agg", **command.env}
    done = subprocess.run([sys.executable, "-m", "workbench", *command.argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    where = f"README line {command.line}: {command.text}" + (f" (run as: {shlex.join(command.argv)}; {command.substituted})"
                                                           if command.substituted else "")
    assert done.returncode == 0, f"{where}\nexit {done.returncode}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, f"{where}\n{done.stderr[-3000:]}"
    if "--json" in command.argv:
        data = strict_loads(done.stdout)  # one strict JSON document on stdout; progress goes to stderr
        assert isinstance(data, dict) and data, f"{where}: empty JSON"
    if "--out" in command.argv:
        out = tmp_path / command.argv[command.argv.index("--out") + 1]
        assert out.exists(), f"{where}: --out {out} was not written"
    for written in tmp_path.rglob("*.json"):  # files the command wrote (pareto.json, results.json, ...)
        try:
            strict_loads(written.read_text())
        except ValueError as exc:
            pytest.fail(f"{where}: {written.relative_to(tmp_path)} is not strict JSON: {exc}")


@pytest.mark.parametrize("block", [_python_param(b) for b in PYTHON_BLOCKS])
def test_readme_python_block_runs(block: Block, tmp_path, shared_cache, monkeypatch):
    import matplotlib

    monkeypatch.setenv("WORKBENCH_CACHE", str(shared_cache))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    code = compile(block.text, f"{README.name}:{block.line}", "exec")
    namespace = {"__name__": "__readme__"}
    try:
        exec(code, namespace)  # noqa: S102 - the README's own examples
    finally:
        import matplotlib.pyplot as plt

        plt.close("all")
