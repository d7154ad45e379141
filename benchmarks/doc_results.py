"""Benchmark tables into the documentation: ``docs/results/<page>.md``, between marker comments.

A benchmark prints its tables and hands the same tables to `write_section`. In the page, the text
between ``<!-- begin KEY -->`` and ``<!-- end KEY -->`` is replaced; the hand-written prose around
it stays. A key not yet in the page is appended, under ``title``. The key names the settings the
table was measured with (``allocation budget=0.3 by=params``), so a run with other settings adds
its own section and leaves the published one alone.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


def markdown_table(header: Sequence[object], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table: one line for ``header``, then one line per row (each cell ``str()``-ed)."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row {list(row)!r} has {len(row)} cells; the header has {len(header)}")
        lines.append("| " + " | ".join(map(str, row)) + " |")
    return "\n".join(lines)


def write_section(page: str, key: str, markdown: str, title: str | None = None,
                  results: Path = RESULTS) -> Path:
    """Put ``markdown`` between the ``key`` markers of ``results/<page>.md``; return the page's path.

    Raises ``ValueError`` when the page has the begin marker of ``key`` without its end marker
    (the page is then left as it was).
    """
    path = Path(results) / f"{page}.md"
    begin, end = f"<!-- begin {key} -->", f"<!-- end {key} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else f"# {page}\n"
    if begin in text:
        head, rest = text.split(begin, 1)
        if end not in rest:
            raise ValueError(f"{path} has {begin!r} but no {end!r} after it")
        text = head + block + rest.split(end, 1)[1]
    else:
        heading = f"## {title}\n\n" if title else ""
        text = text.rstrip("\n") + f"\n\n{heading}{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    print(f"table written to {path}")
    return path
