"""Static pages of the lessons, for readers without a kernel: executes every notebook and writes one
docs page per lesson. Run: .venv/bin/python notebooks/render_pages.py [NN_name.ipynb ...]

Each notebook runs top to bottom in a fresh kernel (nbclient; OMP_NUM_THREADS=1, PYTHONHASHSEED=0,
and the random, numpy and torch seeds fixed to 0 before the first cell, inline figures at 80 dpi).
``docs/lessons/<name>.md`` gets its markdown cells, its code, text outputs as code blocks and
every image output as ``docs/lessons/<name>/<cell>-<n>.png`` (explorers display their current
figure as ``image/png`` beside the live widget: `workbench.widgets.figure_view.StaticFigure`).
The page list in ``docs/lessons.md`` and the ``mkdocs.yml`` nav are rewritten between their
``render_pages`` markers. A page's old images are removed first, so running it again gives the
same files (measured numbers, such as latencies, change from run to run). The notebooks
themselves are not modified.
"""
from __future__ import annotations

import argparse
import base64
import io
import os
import re
import shutil
import sys
import time
from pathlib import Path
from urllib.parse import unquote

import nbformat
import PIL.Image
from markdown.extensions.toc import slugify
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
PAGES = ROOT / "docs" / "lessons"
INDEX = ROOT / "docs" / "lessons.md"
MKDOCS = ROOT / "mkdocs.yml"
WIDGET = "application/vnd.jupyter.widget-view+json"
SETUP = """import random, numpy, torch, matplotlib
random.seed(0); numpy.random.seed(0); torch.manual_seed(0)
matplotlib.rcParams["figure.dpi"] = 80"""
WIDGET_SCALE = 0.8  # explorers draw at 100 dpi: their PNGs are scaled to 80 dpi
BEGIN, END = "<!-- render_pages: begin -->", "<!-- render_pages: end -->"
NAV_BEGIN, NAV_END = "# render_pages: begin", "# render_pages: end"


def lessons() -> list[Path]:
    """Every lesson notebook, ``notebooks/NN_*.ipynb``, in order."""
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def execute(path: Path, timeout: int = 900) -> nbformat.NotebookNode:
    """``path`` executed in a fresh kernel (cwd ``notebooks/``), the seed cell removed again."""
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(SETUP))
    os.environ.update(OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    notebook.cells.pop(0)
    return notebook


def title(notebook) -> str:
    """The first ``# heading`` of the notebook."""
    for cell in notebook.cells:
        found = re.search(r"^# (.+)$", cell.source, re.M) if cell.cell_type == "markdown" else None
        if found:
            return found.group(1).strip()
    raise ValueError("notebook without a '# title' markdown heading")


def _plain(heading: str) -> str:
    """A markdown heading as rendered text (links, emphasis and code marks dropped)."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[*`_]", "", heading).strip()


def anchors(notebook) -> dict[str, str]:
    """``{Jupyter anchor: MkDocs anchor}`` of every heading: ``#1.-A-residual-CNN`` ->
    ``#1-a-residual-cnn`` (Python-Markdown's toc slug, ``_1``, ``_2`` for repeats)."""
    out, seen = {}, {}
    for cell in notebook.cells:
        if cell.cell_type != "markdown":
            continue
        for heading in re.findall(r"^#{1,6} (.+)$", cell.source, re.M):
            text = _plain(heading)
            slug = slugify(text, "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.setdefault(text.replace(" ", "-"), slug if n == 0 else f"{slug}_{n}")
    return out


def markdown_of(source: str, links: dict[str, str]) -> str:
    """A markdown cell as the page writes it: links re-pointed from ``notebooks/`` to ``docs/lessons/``."""
    source = source.replace("](../docs/", "](../").replace("](../notebooks/", "](../../notebooks/")
    source = re.sub(r"\]\((\d\d_[\w-]+)\.ipynb", r"](\1.md", source)
    return re.sub(r"\]\(#((?:[^()]|\([^()]*\))+)\)",  # a target may hold (balanced) parentheses
                  lambda m: f"](#{links.get(unquote(m.group(1)), m.group(1))})", source)


def fence(text: str, language: str = "text") -> str:
    ticks = "```" if "```" not in text else "````"
    return f"{ticks}{language}\n{text.rstrip()}\n{ticks}"


def png(data: str, scale: float) -> bytes:
    """Base64 PNG -> smaller PNG bytes: scaled, quantised to a 256-colour palette, optimised."""
    image = PIL.Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
    if scale != 1.0:
        image = image.resize((round(image.width * scale), round(image.height * scale)), PIL.Image.LANCZOS)
    buffer = io.BytesIO()
    image.quantize(256).save(buffer, format="png", optimize=True)
    return buffer.getvalue()


def outputs_of(cell, stem: str, index: int, images: Path) -> list[str]:
    """Markdown for a code cell's outputs; PNGs written to ``images``."""
    parts, count = [], 0
    for output in cell.get("outputs", []):
        kind = output.output_type
        if kind == "stream":
            parts.append(fence(output.text))
        elif kind == "error":
            parts.append(fence("\n".join(re.sub(r"\x1b\[[0-9;]*m", "", line) for line in output.traceback)))
        elif kind in ("display_data", "execute_result"):
            data = output.data
            if "image/png" in data:
                count += 1
                name = f"{index:02d}-{count}.png"
                images.mkdir(parents=True, exist_ok=True)
                (images / name).write_bytes(png(data["image/png"], WIDGET_SCALE if WIDGET in data else 1.0))
                parts.append(f"![output of cell {index}]({stem}/{name})")
            elif WIDGET in data and re.match(r"\w+\(", data.get("text/plain", "")):  # Name(children=...)
                name = re.match(r"\w+", data["text/plain"]).group(0)
                parts.append(f"*(a live `{name}`: run the notebook to use its controls)*")
            elif WIDGET in data:
                continue  # a progress bar: its display data is its first state (0%), drop it
            elif "<table" in data.get("text/html", ""):  # a DataFrame or Styler: its table, not its repr
                html = "\n".join(line for line in data["text/html"].splitlines() if line.strip())
                parts.append(f'<div class="wb-table">\n{html}\n</div>')
            elif "text/plain" in data:
                parts.append(fence(data["text/plain"]))
    return parts


def page(path: Path, notebook) -> str:
    """Write ``docs/lessons/<stem>.md`` and its images for the executed ``notebook``; returns its title."""
    stem = path.stem
    images = PAGES / stem
    shutil.rmtree(images, ignore_errors=True)
    links = anchors(notebook)
    blocks = []
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "markdown":
            blocks.append(markdown_of(cell.source, links))
            if index == 0:
                blocks.append(f"!!! note \"A static page\"\n    Generated from [`notebooks/{path.name}`]"
                              f"(../../notebooks/{path.name}) by `notebooks/render_pages.py`: the outputs of "
                              "one run, with each explorer's figure as it was first shown. Run the notebook "
                              "(`make lab`) to move the controls.")
        elif cell.cell_type == "code":
            blocks.append(fence(cell.source, "python"))
            blocks.extend(outputs_of(cell, stem, index, images))
    (PAGES / f"{stem}.md").write_text("\n\n".join(blocks) + "\n")
    return title(notebook)


def replace_between(text: str, begin: str, end: str, body: str) -> str:
    start, stop = text.index(begin) + len(begin), text.index(end)
    return text[:start] + body + text[stop:]


def index(titles: dict[str, str]) -> None:
    """The page list in ``docs/lessons.md`` and the lessons' nav in ``mkdocs.yml``."""
    rows = "".join(f"- [{t}](lessons/{stem}.md)\n" for stem, t in titles.items())
    INDEX.write_text(replace_between(INDEX.read_text(), BEGIN, END, "\n" + rows))
    nav = "".join(f"      - \"{t.replace(chr(34), chr(39))}\": lessons/{stem}.md\n" for stem, t in titles.items())
    MKDOCS.write_text(replace_between(MKDOCS.read_text(), NAV_BEGIN + "\n", "      " + NAV_END, nav))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", help="file names in notebooks/ (default: every lesson)")
    chosen = parser.parse_args(argv).notebooks
    paths = [NOTEBOOKS / Path(name).name for name in chosen] or lessons()
    PAGES.mkdir(parents=True, exist_ok=True)
    if not chosen:  # pages of notebooks that are gone
        for stale in set(PAGES.glob("*.md")) - {PAGES / f"{p.stem}.md" for p in paths}:
            stale.unlink()
            shutil.rmtree(PAGES / stale.stem, ignore_errors=True)
    for path in paths:
        start = time.perf_counter()
        page(path, execute(path))
        print(f"{path.name}: docs/lessons/{path.stem}.md ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    titles = {p.stem: title(nbformat.read(p, as_version=4)) for p in lessons()
              if (PAGES / f"{p.stem}.md").exists()}
    index(titles)


if __name__ == "__main__":
    main()
