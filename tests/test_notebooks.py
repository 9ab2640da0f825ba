"""The notebooks run top to bottom, and are committed without outputs.

Each notebook is executed with nbclient in a kernel started from the current
interpreter (a kernelspec written to a temporary JUPYTER_PATH), so it sees the
same installed optax_mtl as the tests.
"""

import json
import pathlib
import sys

import nbformat
import pytest

nbclient = pytest.importorskip("nbclient")

NOTEBOOKS_DIR = pathlib.Path(__file__).parents[1] / "notebooks"
NOTEBOOKS = ["quickstart.ipynb", "negative_transfer.ipynb"]
KERNEL_NAME = "optax-mtl-tests"


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
  """A kernelspec that runs ipykernel with this interpreter."""
  jupyter_path = tmp_path_factory.mktemp("jupyter")
  spec_dir = jupyter_path / "kernels" / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f",
               "{connection_file}"],
      "display_name": "optax_mtl tests",
      "language": "python",
      "env": {"MPLBACKEND": "Agg", "JAX_PLATFORMS": "cpu"},
  }))
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("JUPYTER_PATH", str(jupyter_path))
    yield KERNEL_NAME


@pytest.mark.parametrize("filename", NOTEBOOKS)
def test_committed_without_outputs(filename):
  notebook = nbformat.read(NOTEBOOKS_DIR / filename, as_version=4)
  nbformat.validate(notebook)
  code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert code_cells
  for cell in code_cells:
    assert cell.outputs == [], cell.source[:80]
    assert cell.execution_count is None, cell.source[:80]


@pytest.mark.parametrize("filename", NOTEBOOKS)
def test_runs_top_to_bottom(filename, kernel_name):
  notebook = nbformat.read(NOTEBOOKS_DIR / filename, as_version=4)
  client = nbclient.NotebookClient(
      notebook, kernel_name=kernel_name, timeout=300,
      resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
  client.execute()  # Raises CellExecutionError on the first failing cell.
  errors = [output for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.outputs if output.output_type == "error"]
  assert not errors
  # The committed file is left untouched.
  committed = nbformat.read(NOTEBOOKS_DIR / filename, as_version=4)
  assert all(cell.get("outputs", []) == [] for cell in committed.cells)
