"""studies/bench.py: the three forms of a training step compute the same losses (bench.py asserts it) and are timed."""
import os
import subprocess
import sys

from conftest import ROOT


def test_bench_times_before_groups_and_now_and_finds_them_computing_the_same_numbers(data):
    r = subprocess.run([sys.executable, "studies/bench.py", "--model", "stories260K", "--threads", "1", "--rounds", "1",
                        "--batches", "1", "--top", "3"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "LORA_DA_DATA": str(data)})
    assert r.returncode == 0, r.stderr[-2000:]
    for row in ("training step, before", "training step, groups", "training step, now", "evaluation, now",
                "LoRA-DA init, fast paths", "where a step's time goes, now"):
        assert row in r.stdout, row
