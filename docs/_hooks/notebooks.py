"""MkDocs hook: the repository's ``notebooks/*.ipynb`` become files of the site.

Pages link the notebooks as GitHub resolves them from ``docs/``: ``../notebooks/01_quickstart.ipynb``.
The hook adds every notebook to the site's files as ``notebooks/<name>.ipynb`` and rewrites those
links to point there, so ``mkdocs build --strict`` checks them and the site serves the notebooks
for download. Nothing is executed or converted.
"""
from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def on_files(files, config):
    """Add every ``notebooks/*.ipynb`` as ``notebooks/<name>.ipynb`` of the site."""
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        files.append(File(f"notebooks/{path.name}", src_dir=str(NOTEBOOKS.parent), dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    return files


def on_page_markdown(markdown, page, config, files):
    """``](../notebooks/`` (one level above ``docs/``) -> ``](notebooks/`` inside the site."""
    depth = page.file.src_uri.count("/")
    return markdown.replace("](" + "../" * (depth + 1) + "notebooks/", "](" + "../" * depth + "notebooks/")
