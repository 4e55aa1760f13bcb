"""notebooks/quickstart.ipynb: committed without outputs, and runs top to bottom on the CPU."""

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")


def test_committed_notebook_has_no_outputs():
  with open(NOTEBOOK, encoding="utf-8") as f:
    nb = json.load(f)
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert code, "the notebook has no code cells"
  dirty = [i for i, c in enumerate(code) if c["outputs"] or c["execution_count"] is not None]
  assert not dirty, (f"code cells {dirty} have outputs or execution counts: clear all outputs "
                     "before committing (Jupyter/Colab: Edit > Clear all outputs)")
  assert nb["metadata"]["kernelspec"]["name"] == "python3"  # what Colab and Jupyter start


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  nbclient = pytest.importorskip("nbclient")
  nbformat = pytest.importorskip("nbformat")
  # A kernelspec for this interpreter in a temporary Jupyter path: nothing registered globally.
  spec_dir = tmp_path / "jupyter" / "kernels" / "glip-jax-test"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "glip_jax test", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  # As a user's kernel: one CPU device (conftest's 8 fake devices are for the test process).
  flags = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
  monkeypatch.setenv("XLA_FLAGS", flags.strip())
  workdir = tmp_path / "cwd"
  workdir.mkdir()
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name="glip-jax-test", timeout=600,
                                   resources={"metadata": {"path": str(workdir)}})
  client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
  assert "backend 'cpu'" in text
  assert "zero-shot shape top-1 from the reloaded checkpoint" in text
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  # Scenes, masks before training, loss curve, confusion matrix + retrieval, trained attention's
  # masks, FLIP vs GLIP.
  assert len(images) == 6
