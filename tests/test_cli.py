"""Every flag of every command line over its whole range, as one table: each parser's flags are read from the
parser itself, so a flag added tomorrow is probed tomorrow (and a numeric flag without a declared range, or a
flag this table cannot classify, fails the test). Then the one error boundary: expected errors, unexpected
ones, out of memory and a second Ctrl-C each end in one line."""
import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import cli
import sample
import train
from conftest import ROOT
from studies import bench, experiments, prompts, shapes7b

# each command line: how its whole check is called (parser and the checks after it), and the arguments a
# probe needs besides the probed flag
COMMANDS = {"train.py": (train.get_args, ["--dry-run"]), "sample.py": (sample.parse_args, []),
            "studies/experiments.py": (experiments.parse_args, ["baselines"]),
            "studies/bench.py": (bench.parser().parse_args, []), "studies/prompts.py": (prompts.parser().parse_args, []),
            "studies/shapes7b.py": (shapes7b.parser().parse_args, [])}
PARSERS = {"train.py": train.parser(), "sample.py": sample.parser(), "studies/experiments.py": experiments.parser(),
           "studies/bench.py": bench.parser(), "studies/prompts.py": prompts.parser(),
           "studies/shapes7b.py": shapes7b.parser()}
# the string flags, by what they hold: comma lists of names (probed with unknown, empty, duplicated and
# mixed-case names), paths (an empty one is refused: "" is not "not given"), and free text or a device
LISTS = {("train.py", "--init"): "lora,da", ("train.py", "--targets"): "wq,wk",
         ("studies/experiments.py", "--only"): "lora,da"}
PATHS = {("train.py", f) for f in ("--checkpoint", "--tokenizer", "--data-dir", "--out-dir", "--export-peft",
                                   "--init-data")} | {("sample.py", "--checkpoint"), ("sample.py", "--tokenizer"),
                                                      ("studies/experiments.py", "--out")}
TEXT = {("sample.py", "--prompt"), ("sample.py", "--chat"), ("sample.py", "--device"), ("train.py", "--device"),
        ("studies/shapes7b.py", "--data-dir")}  # checked where they are used (a device by resolve_device)


def flags(parser):
    """(flag, action) for every option that takes a value."""
    return [(a.option_strings[-1] if a.option_strings[-1].startswith("--") else a.option_strings[0], a)
            for a in parser._actions if a.option_strings and a.nargs != 0 and not isinstance(a, argparse._HelpAction)]


def outcome(command, argv, capsys):
    """("ok", args) or ("refused", the stderr lines); anything else (a traceback) fails the test."""
    parse, extra = COMMANDS[command]
    try:
        return "ok", parse(extra + argv)
    except SystemExit as e:
        err = capsys.readouterr().err.strip().splitlines()
        assert e.code == 2, (command, argv, e.code, err)
        assert err and "Traceback" not in "\n".join(err), (command, argv, err)
        assert ": error: " in err[-1] and len([line for line in err if ": error: " in line]) == 1, err
        return "refused", err


def numeric_probes(kind, lo, hi):
    """Zero, negatives, tiny, huge, nan, inf, non-numbers, and each bound and just past it."""
    probes = ["0", "-1", "1e-45", "1e300", "nan", "inf", "-inf", "abc", "", "1.5", "1" + "0" * 30]
    probes += [repr(lo), repr(hi)]
    probes += [repr(lo - 1), repr(hi + 1)] if kind is int else [repr(lo - max(abs(lo), 1e-300) * 1e-3 - 1e-300),
                                                                 repr(hi * (1 + 1e-3))]
    return probes


def in_range(kind, lo, hi, text):
    """Written again here, not read from cli.Number: the value the flag means, or None."""
    try:
        v = int(text) if kind is int else float(text)
    except ValueError:
        return None
    return v if (not isinstance(v, float) or math.isfinite(v)) and lo <= v <= hi else None


CASES = [(command, flag) for command, p in PARSERS.items() for flag, _ in flags(p)]


@pytest.mark.parametrize("command,flag", CASES, ids=[f"{c} {f}" for c, f in CASES])
def test_every_flag_over_its_whole_range(command, flag, capsys, data, monkeypatch):
    monkeypatch.setenv("LORA_DA_DATA", str(data))
    action = dict(flags(PARSERS[command]))[flag]
    kind = action.type
    if kind in (int, float):
        pytest.fail(f"{command} {flag} is a number without a declared range: give it type=cli.Number(...)")
    if isinstance(kind, cli.Number):
        for text in numeric_probes(kind.kind, kind.lo, kind.hi):
            want = in_range(kind.kind, kind.lo, kind.hi, text)
            got, res = outcome(command, [flag, text] if not text.startswith("-") else [f"{flag}={text}"], capsys)
            assert (got == "ok") == (want is not None), (command, flag, text, got, res)
            if got == "ok" and action.dest in vars(res) and action.nargs is None and not isinstance(
                    action, argparse._AppendAction):
                assert getattr(res, action.dest) == want
            if got == "refused":
                assert f"argument {flag}" in res[-1] or flag in res[-1], res
    elif action.choices is not None:
        good = sorted(map(str, action.choices))[0]
        assert outcome(command, [flag, good], capsys)[0] == "ok"
        for text in ("nonsense", "", f"{good},{good}", good.upper() if good.upper() != good else good.lower()):
            assert outcome(command, [flag, text], capsys)[0] == "refused", (command, flag, text)
    elif (command, flag) in LISTS:
        good = LISTS[command, flag]
        assert outcome(command, [flag, good], capsys)[0] == "ok"
        first = good.split(",")[0]
        for text in ("nonsense", "", ",", f"{first},{first}", good.upper(), f"{good},nonsense"):
            got, err = outcome(command, [flag, text], capsys)
            assert got == "refused" and flag in err[-1], (command, flag, text, err)
        got, res = outcome(command, [flag, " " + good.replace(",", " , ") + " "], capsys)  # spaces are not names
        assert got == "ok"
    elif (command, flag) in PATHS:
        for text in ("", "  "):
            got, err = outcome(command, [flag, text], capsys)
            assert got == "refused" and "is empty" in err[-1], (command, flag, err)
    else:
        assert (command, flag) in TEXT, f"{command} {flag}: unclassified flag; add it to a table of this test"


def test_the_probe_table_itself_sees_a_flag_without_a_range():
    """The coverage check above can fail: a parser with a plain int flag is caught by it."""
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int)
    p.add_argument("--m", type=cli.Number(int, 0, 5))
    types = {f: a.type for f, a in flags(p)}
    assert types["--n"] is int and isinstance(types["--m"], cli.Number)
    assert in_range(int, 0, 5, "6") is None and in_range(float, 0.0, 1.0, "nan") is None


EDGES = [("--lr", "1e20"), ("--gamma", "1e-6"), ("--gamma", "1e9"), ("--lora-alpha", "1e9"), ("--lora-alpha", "1e-6"),
         ("--lr", "1e3"), ("--lr", "1e-12"), ("--beta", "1e9"), ("--alpha", "1e9"), ("--damping", "1e9"),
         ("--damping", "1e-30"), ("--relative-damping", "1e9"), ("--seed", str(2 ** 31 - 1)), ("--N", str(10 ** 9)),
         ("--init ga --ga-gamma", "1e-6"), ("--init one --one-gamma", "1e-6"), ("--init ga --ga-gamma", "1e9"),
         ("--init eva --eva-rho", "1e3"), ("--warmup", "0.99999"), ("--grad-clip", "1e12")]


@pytest.mark.parametrize("flag,value", EDGES, ids=[f"{f} {v}" for f, v in EDGES])
def test_a_setting_at_the_edge_of_its_range_trains_finite_or_is_refused_in_one_line(flag, value, data, tmp_path,
                                                                                     monkeypatch):
    """The accepted extremes of the scale-like settings: the run ends with finite numbers, or refuses in one
    line (a ValueError the boundary prints) naming a setting — never a traceback, never a NaN loss."""
    monkeypatch.setenv("LORA_DA_DATA", str(data))
    argv = (flag.split() + [value] + ["--train-limit", "40", "--eval-limit", "8", "--steps", "3", "--batch-size", "4",
                                      "--init-samples", "4", "--stats-batch-size", "4", "--eval-interval", "0",
                                      "--no-zero-shot", "--out-dir", str(tmp_path / "out")])
    cfg = train.get_args(argv)
    try:
        train.main_of(cfg)
    except ValueError as e:  # an expected refusal: it must say what to change
        assert "\n" not in str(e) and ("--" in str(e) or "damping" in str(e)), str(e)
        return
    metrics = (tmp_path / "out" / "metrics.json").read_text()
    final = json.loads(metrics)["final"]
    assert math.isfinite(final["loss"]) and 0 <= final["accuracy"] <= 1, final


# --- the error boundary ------------------------------------------------------------------------------

def run_boundary(body, tmp_path, env=None):
    """A tiny program that runs `body` inside cli.boundary, as every command line does."""
    prog = tmp_path / "prog.py"
    prog.write_text(f"import sys, time\nsys.path.insert(0, {str(ROOT)!r})\nimport cli\n\n"
                    f"def main():\n" + "".join(f"    {line}\n" for line in body.splitlines()) +
                    "\ncli.boundary(main, on_interrupt=lambda: 'kept: nothing')\n")
    return subprocess.Popen([sys.executable, str(prog)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


@pytest.mark.parametrize("body,code,fragment", [
    ("raise ValueError('--x must be 1, got 2')", 2, "error: --x must be 1, got 2"),
    ("open('/nonexistent/file')", 2, "No such file or directory"),
    ("{}['missing']", 1, "internal error: KeyError: 'missing' (at "),
    ("raise TypeError('bad type')", 1, "internal error: TypeError: bad type"),
    ("import math\nmath.exp(1e6)", 1, "internal error: OverflowError"),
    ("raise RuntimeError('multi\\nline')", 1, "internal error: RuntimeError: multi line"),
    ("raise MemoryError()", 2, "error: out of memory"),
    ("import torch\nraise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2 GiB')", 2,
     "error: out of memory (CUDA out of memory"),
])
def test_every_error_ends_in_one_line_with_what_to_do(body, code, fragment, tmp_path):
    p = run_boundary(body, tmp_path)
    out, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert fragment in err, err
    if code == 1:
        assert "please report it" in err and "prog.py:" in err


def test_an_unexpected_error_shows_its_traceback_when_asked(tmp_path):
    p = run_boundary("{}['missing']", tmp_path, env={"LORA_DA_TRACEBACK": "1"})
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "Traceback" in err and "KeyError" in err


@pytest.mark.parametrize("gap", [0.0, 0.05])
def test_a_second_ctrl_c_during_the_clean_up_ends_at_once_in_one_line(gap, tmp_path):
    """The first SIGINT starts the clean-up (here a slow one); the second, a moment later, ends the process
    at once: exit 130, one line each, no traceback."""
    body = "try:\n    print('ready', flush=True)\n    time.sleep(60)\nfinally:\n    time.sleep(30)"
    p = run_boundary(body, tmp_path)
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGINT)
    time.sleep(gap)
    p.send_signal(signal.SIGINT)
    t = time.perf_counter()
    _, err = p.communicate(timeout=20)
    assert time.perf_counter() - t < 10 and p.returncode == 130, err
    assert "Traceback" not in err and "interrupted again" in err, err


def test_one_ctrl_c_ends_through_the_clean_up_and_says_what_was_kept(tmp_path):
    p = run_boundary("try:\n    print('ready', flush=True)\n    time.sleep(60)\nfinally:\n    print('cleaned', flush=True)",
                     tmp_path)
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=20)
    assert p.returncode == 130 and "cleaned" in out and err.strip() == "interrupted (SIGINT): kept: nothing", err
