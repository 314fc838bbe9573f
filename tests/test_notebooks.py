"""The notebooks in notebooks/ run: each executes top to bottom in a fresh kernel (nbclient) on
small configs in under 2 minutes, and is stored in git with its outputs stripped.

The kernel imports this checkout's jaxtrain (PYTHONPATH), works in a temporary directory (runs
and prepared data land there, never in the repo) and sees one CPU device, as a user's laptop does.
"""

import glob
import os
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
NAMES = [os.path.basename(p) for p in NOTEBOOKS]
BUDGET_S = 120


def test_the_promised_notebooks_exist():
  assert {"quickstart.ipynb", "muon.ipynb", "checkpoint_eval.ipynb",
          "hardware_compare.ipynb"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_with_outputs_stripped(name):
  nb = nbformat.read(os.path.join(REPO, "notebooks", name), as_version=4)
  dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
           and (c.outputs or c.execution_count is not None)]
  assert not dirty, (f"notebooks/{name}: cells {dirty} hold outputs; strip them before committing "
                     "(jupyter nbconvert --clear-output --inplace notebooks/*.ipynb)")
  assert "widgets" not in nb.metadata, f"notebooks/{name}: widget state is an output too"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  """One directory for all notebooks, so the corpus is prepared once, not once per notebook."""
  return tmp_path_factory.mktemp("notebooks")


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes_in_a_fresh_kernel_within_budget(name, workspace, monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # conftest's 8 fake devices are not a user's
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  monkeypatch.setenv("JAXTRAIN_DATA_DIR", str(workspace / "data"))
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  nb = nbformat.read(os.path.join(REPO, "notebooks", name), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=BUDGET_S, kernel_name="python3",
                                   resources={"metadata": {"path": str(workspace)}})
  start = time.time()
  client.execute()
  elapsed = time.time() - start
  print(f"{name}: {elapsed:.1f}s")
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors, errors
  said = [o.text for c in nb.cells if c.cell_type == "code" for o in c.outputs
          if o.output_type == "stream" and o.text.startswith("jaxtrain from ")]
  assert said and said[0].split()[-1] == REPO, f"the kernel imported another jaxtrain: {said}"
  assert elapsed < BUDGET_S, f"notebooks/{name} took {elapsed:.0f}s; keep it under {BUDGET_S}s"
