"""Executes notebooks/fgrpo_demo.ipynb end to end on CPU with the small setting."""

import os

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "fgrpo_demo.ipynb")


def test_notebook_is_committed_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None


def test_notebook_runs_end_to_end(tmp_path, monkeypatch):
  monkeypatch.setenv("FGRPO_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("FGRPO_NOTEBOOK_WORKDIR", str(tmp_path / "runs"))
  monkeypatch.setenv("FGRPO_REPO", REPO)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": os.path.join(REPO, "notebooks")}})
  client.execute()  # raises CellExecutionError on any failing cell
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs)
  assert "backend: cpu" in text
  assert "fgrpo {" in text and "grpo {" in text and "oracle {" in text
  assert "slate   :" in text and "ranking :" in text
  assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
