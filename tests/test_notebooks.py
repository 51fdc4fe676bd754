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
def test_every_notebook_is_committed_executed_top_to_bottom_with_its_plots(path):
    """A reader browsing the repository sees the outputs: every code cell ran, in order, in one kernel, and
    every plot the notebook draws is there as an image."""
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    assert [c.get("execution_count") for c in cells] == list(range(1, len(cells) + 1)), \
        f"{path.name}: execute it top to bottom and commit it with its outputs (jupyter nbconvert --execute --inplace)"
    for i, c in enumerate(cells):
        assert not any(o.get("output_type") == "error" for o in c["outputs"]), f"{path.name} cell {i} has an error"
        if "plt.show()" in "".join(c["source"]):
            assert any("image/png" in o.get("data", {}) for o in c["outputs"]), f"{path.name} cell {i}: plot missing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom_in_fast_mode(path, monkeypatch, tmp_path):
    import matplotlib.pyplot as plt
    monkeypatch.setenv("LORA_DA_FAST", "1")
    monkeypatch.setenv("LORA_DA_OUT", str(tmp_path))
    monkeypatch.chdir(path.parent)  # as Jupyter would
    nb = json.loads(path.read_text())
    ns = {"__name__": "__main__"}
    for i, cell in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
        code = "".join(cell["source"])
        try:
            exec(compile(code, f"{path.name}[code cell {i}]", "exec"), ns)
        finally:
            plt.close("all")
