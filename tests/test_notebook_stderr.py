"""`notebooks/conftest.py` fails an nbval cell that writes to stderr (a print to ``sys.stderr`` or a
warning) and lets the others pass. A probe notebook runs under nbval in a temporary folder holding
a copy of that conftest, in a pytest subprocess (its own kernel)."""
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

CONFTEST = Path(__file__).resolve().parents[1] / "notebooks" / "conftest.py"


@pytest.mark.slow
def test_a_cell_writing_to_stderr_fails_under_nbval(tmp_path):
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    cells = [new_code_cell("print('to stdout')"),
             new_code_cell("import sys; sys.stderr.write('deliberate stderr\\n')"),
             new_code_cell("import warnings; warnings.warn('deliberate warning')"),
             new_code_cell("1 + 1")]
    notebook = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                  "language": "python"}})
    nbformat.write(notebook, tmp_path / "probe.ipynb")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                          "--color=no", "-rf", "probe.ipynb"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=240)
    report = run.stdout + run.stderr
    assert run.returncode == 1, report
    assert "2 failed, 2 passed" in report, report
    assert "FAILED probe.ipynb::Cell 1" in report and "FAILED probe.ipynb::Cell 2" in report, report
    assert "deliberate stderr" in report and "UserWarning: deliberate warning" in report, report
