"""Griffe extension: read this project's ``name : description`` items as numpydoc intends.

The package's docstrings write numpydoc items on one line, ``task : the model with its data``,
where numpydoc puts a *type* after the colon. Read literally, every description would land in
the reference's "Type" column. Before parsing, this extension rewrites such an item inside a
``Parameters`` / ``Attributes`` / ``Other Parameters`` section to ``name`` followed by the
description indented, which is what numpydoc reads as a description. Items whose text after the
colon is a bare type (``x : int``) are left alone. Only the rendered docs change, not the code.
"""
from __future__ import annotations

import re

from griffe import Extension

ITEM_SECTIONS = ("Parameters", "Attributes", "Other Parameters")
ITEM = re.compile(r"^([\w*][\w*, ]*) : (.+)$")


def is_type(text: str) -> bool:
    """Whether ``text`` reads as a bare type (``int``, ``float | None``, ``dict[str, int]``)."""
    return bool(re.fullmatch(r"[\w.\[\]|, ]+", text)) and " " not in text.replace(" | ", "|").replace(", ", ",")


def rewrite(text: str) -> str:
    """``text`` with every one-line ``name : description`` item of an item section split in two."""
    lines, out, in_section = text.split("\n"), [], False
    for i, line in enumerate(lines):
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if line.strip() and re.fullmatch(r"-{3,}", following.strip()):
            in_section = line.strip() in ITEM_SECTIONS  # a section header
        elif line and not line[0].isspace() and i > 0 and not lines[i - 1].strip() and not ITEM.match(line):
            in_section = False  # a paragraph after the section
        item = ITEM.match(line) if in_section else None
        if item and not is_type(item.group(2).strip()):
            out += [item.group(1), "    " + item.group(2)]
        else:
            out.append(line)
    return "\n".join(out)


class ProjectItems(Extension):
    """Rewrite each object's docstring with `rewrite` once the package is loaded."""

    def on_object(self, *, obj, loader, **kwargs) -> None:
        if obj.docstring is not None and not obj.is_alias:
            obj.docstring.value = rewrite(obj.docstring.value)
