"""Every code cell of every notebook runs, in order, in fast mode, without Jupyter; any error fails."""
import json

import matplotlib
import pytest

from conftest import ROOT

matplotlib.use("Agg")  # plt.show() is then a no-op
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_every_notebook_is_numbered_and_listed_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert NOTEBOOKS, "no notebooks found"
    for path in NOTEBOOKS:
        assert path.name[:3].rstrip("_").isdigit(), f"{path.name}: notebooks are named NN_topic.ipynb"
        assert f"notebooks/{path.name}" in readme, f"README.md does not list {path.name}"


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
