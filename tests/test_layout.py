"""The rooms of the project: each module's imports of the others form no circle, LoRA-DA's own file imports
nothing of the project, and the peers import LoRA-DA, never the reverse (README's file table)."""
import ast

import pytest

from conftest import ROOT

MODULES = sorted(p.stem for p in ROOT.glob("*.py"))


def project_imports(name):
    """The project modules a top-level module imports, anywhere in its source (top or inside a function)."""
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(MODULES) - {name}


def find_cycle(graph):
    """A list of modules that import each other in a circle, or None (depth-first search)."""
    state = {}

    def visit(n, path):
        state[n] = "open"
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                return path[path.index(m):] + [m]
            if m not in state and (cyc := visit(m, path + [m])):
                return cyc
        state[n] = "done"
        return None
    for n in sorted(graph):
        if n not in state and (cyc := visit(n, [n])):
            return cyc
    return None


def test_the_cycle_finder_sees_a_circle_and_accepts_a_chain():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_among_the_project_modules():
    graph = {m: project_imports(m) for m in MODULES}
    assert len(graph) >= 10 and graph["train"]  # the parser found the modules and their imports
    assert find_cycle(graph) is None, find_cycle(graph)


@pytest.mark.parametrize("module,allowed", [("lora_da", set()), ("llama", set()), ("synthetic", {"lora_da"}),
                                            ("peers", {"lora_da"}), ("checkpoints", {"llama"})])
def test_the_core_files_import_only_what_their_job_needs(module, allowed):
    assert project_imports(module) <= allowed, project_imports(module)
