"""studies/shapes7b.py, the 7B path's measurement and GPU check, run on CPU with a tiny model of the same
layout so that it cannot rot: every stage runs, the plan is parsed, the GPU check skips without CUDA."""
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


def shapes7b(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "studies/shapes7b.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=600)


def test_the_gpu_check_runs_every_stage_on_a_tiny_model_and_compares_it_with_the_plan():
    r = shapes7b("--gpu-check", "--tiny", "--threads", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    angle = re.search(r"principal angle median ([\d.]+)°, max ([\d.]+)°", r.stdout)
    assert angle and float(angle.group(2)) < 1.0  # cpu against cpu (or cuda): the same init to solver precision
    rows = re.findall(r"^\| (statistics|solve|training) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", r.stdout, re.M)
    assert [x[0] for x in rows] == ["statistics", "solve", "training"]
    assert all(float(plan) > 0 and float(measured) > 0 for _, plan, measured, _ in rows)
    assert "peak, solve" in r.stdout and "--dry-run's output" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real check instead")
def test_the_gpu_check_skips_cleanly_without_cuda():
    r = shapes7b("--gpu-check")
    assert r.returncode == 0 and "gpu check skipped: no CUDA device" in r.stdout
