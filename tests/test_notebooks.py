"""The notebooks run top to bottom on a tiny checkpoint, and are committed without outputs.

Each notebook runs in a fresh ipykernel (the `python3` kernel, started with this interpreter),
with its working directory in notebooks/ as Jupyter would have it, and this checkout first on
PYTHONPATH so the kernel imports the code under test rather than another install.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_both_notebooks_exist():
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "seeded_evaluation.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells
    for cell in code_cells:
        assert cell.outputs == [], f"{path.name} cell {cell.id} has outputs"
        assert cell.execution_count is None, f"{path.name} cell {cell.id} has an execution count"
    assert notebook.metadata.kernelspec.name == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXINFER_NOTEBOOK_MODEL", str(tiny_llama))
    monkeypatch.setenv("JAXINFER_NOTEBOOK_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=300,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # raises CellExecutionError, with the traceback, if any cell fails

    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    if path.stem == "quickstart":
        assert "cumulative logprob:" in text
        assert any("image/png" in out.get("data", {}) for out in outputs), "no plot was drawn"
    if path.stem == "seeded_evaluation":
        assert "identical=False" not in text and text.count("identical=True") == 6
        assert "byte-identical: True" in text
        results = (tmp_path / "results" / "seeded_eval.jsonl").read_text().splitlines()
        assert len(results) == 1 + 7  # the header, then one line per request
