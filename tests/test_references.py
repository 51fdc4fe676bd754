"""theory.md and the code cite each other; these tests keep the citations from drifting.

Claim 1: every "§n" and "Eq. n" cited in a .py file or a notebook exists in theory.md.
Claim 2: every function, class attribute and test that theory.md names exists in the code."""
import importlib
import inspect
import json
import re

import pytest

from conftest import ROOT

THEORY = (ROOT / "theory.md").read_text()
SOURCES = (sorted(ROOT.glob("*.py")) + sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "studies").glob("*.py"))
           + sorted((ROOT / "notebooks").glob("*.ipynb")))


def text_of(path):
    if path.suffix == ".ipynb":
        return "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"])
    return path.read_text()


def theory_sections():
    return {int(n) for n in re.findall(r"^## (\d+)\.", THEORY, re.M)}


def theory_equations():
    """Equations theory.md defines: a label "(n)" ending a display line, or a bold "(Eq. n)" paragraph head."""
    labels = re.findall(r"\((\d+)\)\s*$", THEORY, re.M)
    heads = re.findall(r"\*\*[^*]*\(Eq\. (\d+)\)\.?\*\*", THEORY)
    return {int(n) for n in labels + heads}


def expand(first, last, more=""):
    """'5', '8' -> 5..8; plus any ', 9, 11' that follows."""
    nums = set(range(int(first), int(last or first) + 1))
    return nums | {int(n) for n in re.findall(r"\d+", more or "")}


def citations(text):
    secs, eqs = set(), set()
    for m in re.finditer(r"§(\d+)(?:\s*[-–]\s*§?(\d+))?", text):
        secs |= expand(m.group(1), m.group(2))
    for m in re.finditer(r"Eqs?\. (\d+)(?:\s*[-–]\s*(\d+))?((?:,\s*\d+(?![\d.]))*)", text):
        eqs |= expand(m.group(1), m.group(2), m.group(3))
    return secs, eqs


def test_theory_md_defines_its_sections_and_equations():
    assert theory_sections() == set(range(1, 14))
    assert set(range(1, 21)) <= theory_equations()


DOCS = [ROOT / "theory.md", ROOT / "README.md", ROOT / "GUIDE.md", ROOT / "FINDINGS.md", ROOT / "tests" / "README.md"]


@pytest.mark.parametrize("path", SOURCES + DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_section_and_equation_cited_exists_in_theory_md(path):
    secs, eqs = citations(text_of(path))
    assert not secs - theory_sections(), f"{path.name} cites sections {sorted(secs - theory_sections())}"
    assert not eqs - theory_equations(), f"{path.name} cites equations {sorted(eqs - theory_equations())}"


def test_the_citation_parser_sees_ranges_and_lists():
    # the check above is only as good as the parser: ranges and lists must expand, or drift goes unseen
    assert citations("theory.md §1-2 and §9; Eqs. 6-8, (Eq. 11); Eqs. 5, 7, 9") == ({1, 2, 9}, {5, 6, 7, 8, 9, 11})


def named_in_theory():
    """Backticked names in theory.md that are code: tests, lower_snake functions, and dotted Class.attr paths."""
    names = set(re.findall(r"`([A-Za-z_][\w.]*)`", THEORY))
    tests = {n for n in names if n.startswith("test_")}
    funcs = {n for n in names if re.fullmatch(r"[a-z]+(_[a-z]+)+", n) and len(n) >= 6} - tests
    dotted = {n for n in names if "." in n and not n.endswith(".py")}
    return tests, funcs, dotted


MODULES = ("lora_da", "peers", "synthetic", "llama", "checkpoints", "tasks", "train", "memory", "plots", "sample")


def resolve(name):
    """A module-level name, or Module.Class.attr / Class.attr where attr is a class attribute, a dataclass
    field, or assigned as self.attr in the class's source."""
    parts = name.split(".")
    if parts[0] in MODULES:
        owner, parts = importlib.import_module(parts[0]), parts[1:]
    else:
        owner = next((getattr(importlib.import_module(m), parts[0]) for m in MODULES
                      if hasattr(importlib.import_module(m), parts[0])), None)
        parts = parts[1:]
        if owner is None:
            return False
    for p in parts:
        if hasattr(owner, p):
            owner = getattr(owner, p)
        elif inspect.isclass(owner) and (p in getattr(owner, "__annotations__", {})
                                         or f"self.{p} " in inspect.getsource(owner)
                                         or f"self.{p}," in inspect.getsource(owner)):
            return True  # an instance attribute: nothing further to resolve statically
        else:
            return False
    return True


def test_every_function_and_test_theory_md_names_exists():
    tests, funcs, dotted = named_in_theory()
    assert len(tests) > 10 and len(funcs) > 8  # the extraction found the names, not nothing
    defined_tests = {m for p in (ROOT / "tests").glob("test_*.py") for m in re.findall(r"^def (test_\w+)", p.read_text(), re.M)}
    assert not tests - defined_tests, f"theory.md names missing tests: {sorted(tests - defined_tests)}"
    missing = sorted(n for n in funcs | dotted if not resolve(n))
    assert not missing, f"theory.md names code that does not exist: {missing}"


def test_the_resolver_rejects_what_does_not_exist():
    assert resolve("kfac_statistics") and resolve("synthetic.LinearGaussian.lora_errors")
    assert resolve("DAConfig.N") and resolve("LoRALinear.scaling")
    assert not resolve("n_samples") and not resolve("DAConfig.n_samples") and not resolve("synthetic.nothing_here")
