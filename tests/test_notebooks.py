"""The notebooks run top to bottom (nbclient, a real kernel): the quickstart trains a short demo run into a
fresh workdir and loads it; the second converts it to the HF layout and evaluates it with jclip-eval, which
must reproduce the trainer's final R@1."""

import os
import re

import nbformat
from nbclient import NotebookClient

from jclip_jax.data import synthetic

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


def execute(name: str) -> str:
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}}).execute()
    return "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)


def test_notebooks_execute(tmp_path, monkeypatch):
    data = tmp_path / "synthetic"
    synthetic.write_synthetic(data, num_train=256, num_eval=32, num_text_pairs=128, num_triplets=16, image_size=32)
    monkeypatch.setenv("JCLIP_SYNTHETIC", str(data))
    monkeypatch.setenv("JCLIP_WORKDIR", str(tmp_path / "workdir"))
    monkeypatch.setenv("JCLIP_HF_DIR", str(tmp_path / "hf"))
    monkeypatch.setenv("JCLIP_NOTEBOOK_STEPS", "6")
    out = execute("quickstart.ipynb")
    assert "latest checkpoint: step 6" in out and "image->text R@1 on these six" in out
    out = execute("convert_and_evaluate.ipynb")
    pairs = re.findall(r"(\w+_r1): jclip-eval ([0-9.]+), trainer ([0-9.]+)", out)
    assert len(pairs) == 2 and all(a == b for _, a, b in pairs), out
    assert os.path.exists(tmp_path / "hf" / "sweep.png") and "mean_per_class_recall" in out
