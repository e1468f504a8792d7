"""Every notebook in notebooks/ runs top to bottom (short settings)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.subproc import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_notebooks_are_found():
    assert len(NOTEBOOKS) >= 2


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, monkeypatch):
    monkeypatch.setenv("CUSTOMFIT_NOTEBOOK_QUICK", "1")  # one epoch each
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    notebook = nbformat.read(path, as_version=4)
    # A cell that raises fails the test with the cell's traceback.
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    assert all(cell.get("outputs") for cell in notebook.cells
               if cell.cell_type == "code" and "plt.show()" in cell.source)
