"""torchrun: two processes on this CPU (gloo) give the one-process init and training, up to the order of
float sums, and write each output once."""
import json
import os
import subprocess
import sys

import pytest
import torch

import lora_da
from conftest import ROOT

ARGS = ["--init", "da", "--steps", "6", "--batch-size", "8", "--init-samples", "32", "--stats-batch-size", "8",
        "--eval-limit", "32", "--train-limit", "300", "--eval-interval", "3", "--log-interval", "2"]


def launch(*args, ranks=1, script="train.py"):
    """One process as `python train.py`, or `ranks` processes under torchrun, one thread each (2 cores)."""
    prefix = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node", str(ranks)]
    return subprocess.run(prefix + [script, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("dist")
    out = {}
    for ranks in (1, 2):
        r = launch(*ARGS, "--data-dir", str(data), "--out-dir", str(d / f"r{ranks}"), ranks=ranks)
        assert r.returncode == 0, r.stderr[-3000:]
        out[ranks] = (d / f"r{ranks}", r.stdout)
    return out


def test_two_processes_give_the_one_process_init(runs):
    # the statistics are sums over samples: split over two processes and all-reduced, they differ from one
    # process's only in the order of the fp32 additions (measured: B A to 7.6e-6 relative, A0 to 0.004°)
    one = torch.load(runs[1][0] / "init_adapter.pt", weights_only=True)["lora"]
    two = torch.load(runs[2][0] / "init_adapter.pt", weights_only=True)["lora"]
    assert set(one) == set(two) and len(one) == 35
    for n in one:
        BA1, BA2 = one[n]["B"] @ one[n]["A"], two[n]["B"] @ two[n]["A"]
        assert (BA1 - BA2).norm() <= 1e-4 * BA1.norm(), n
        assert lora_da.principal_angle(one[n]["A"], two[n]["A"]) < 0.1, n


def test_two_processes_train_and_evaluate_as_one(runs):
    a, b = (json.loads((runs[k][0] / "metrics.json").read_text()) for k in (1, 2))
    # each step: every process backpropagates its half of the same global batch; the gradients are summed
    assert b["history"]["step"] == a["history"]["step"]
    assert max(abs(x - y) for x, y in zip(a["history"]["loss"], b["history"]["loss"])) < 1e-5
    for key in ("zero_shot", "step0", "final"):  # evaluation split over the processes, its sums all-reduced
        assert b[key]["accuracy"] == a[key]["accuracy"] and abs(b[key]["loss"] - a[key]["loss"]) < 1e-5
    assert b["train_tokens"] == a["train_tokens"]  # every token counted once


def test_only_one_process_logs_and_writes(runs):
    out, stdout = runs[2]
    assert stdout.count("final: accuracy") == 1 and stdout.count("zero-shot:") == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in runs[1][0].iterdir())
    assert not list(out.glob("*.tmp")) and not (out / ".lock").exists()


def test_a_killed_two_process_run_resumes_to_the_same_end(runs, tmp_path, data):
    out = tmp_path / "cut"
    cut = launch("3", *ARGS, "--data-dir", str(data), "--out-dir", str(out), ranks=2, script="tests/killed_run.py")
    assert cut.returncode != 0 and torch.load(out / "ckpt.pt", weights_only=True)["step"] == 3
    r = launch(*ARGS, "--data-dir", str(data), "--out-dir", str(out), "--resume", ranks=2)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    a = json.loads((runs[2][0] / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert a["history"] == b["history"] and a["final"] == b["final"]


@pytest.mark.parametrize("method", ["eva", "corda"])
def test_two_processes_give_the_one_process_activation_based_init(method, tmp_path, data):
    """EVA and CorDA sum their input statistics (C, the first and second moments) across processes as LoRA-DA
    sums G, Z, Y: a moment left unreduced moves EVA's A by tens of degrees (74-89° measured when the first
    moment was not reduced)."""
    args = ["--init", method, "--init-only", "--init-samples", "32", "--stats-batch-size", "8", "--train-limit", "300",
            "--eval-limit", "32", "--data-dir", str(data)]
    A = {}
    for ranks in (1, 2):
        r = launch(*args, "--out-dir", str(tmp_path / f"r{ranks}"), ranks=ranks)
        assert r.returncode == 0, r.stderr[-3000:]
        A[ranks] = torch.load(tmp_path / f"r{ranks}" / "init_adapter.pt", weights_only=True)["lora"]
    assert set(A[1]) == set(A[2]) and len(A[1]) == 35
    worst = max(lora_da.principal_angle(A[1][n]["A"], A[2][n]["A"]) for n in A[1])
    assert worst < 0.5, worst  # float order only (fp64 sums)
