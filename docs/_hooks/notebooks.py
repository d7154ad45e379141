"""MkDocs hook: the repository's ``notebooks/*.ipynb`` become files of the site.

The lessons page links ``notebooks/01_quickstart.ipynb`` and so on; with the notebooks added to
the site's files, ``mkdocs build --strict`` checks those links and the site serves the notebooks
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
