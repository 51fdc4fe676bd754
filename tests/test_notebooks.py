"""Every code cell of every notebook runs, in order, in fast mode, without Jupyter; any error fails."""
import json

import matplotlib
import pytest

from conftest import ROOT

matplotlib.use("Agg")  # plt.show() is then a no-op
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_two_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01_bias_variance_on_linear_models.ipynb", "02_lora_da_on_a_tiny_llama.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom_in_fast_mode(path, monkeypatch, tmp_path):
    import matplotlib.pyplot as plt
    monkeypatch.setenv("LORA_DA_FAST", "1")
    monkeypatch.setenv("LORA_DA_OUT", str(tmp_path))
    monkeypatch.chdir(path.parent)  # as Jupyter would
    nb = json.loads(path.read_text())
    assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), "commit notebooks without outputs"
    ns = {"__name__": "__main__"}
    for i, cell in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
        code = "".join(cell["source"])
        try:
            exec(compile(code, f"{path.name}[code cell {i}]", "exec"), ns)
        finally:
            plt.close("all")
