import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# as CI: 2 cores (or $OMP_NUM_THREADS, to run beside other jobs without oversubscribing the cores)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1)))


def data_dir() -> Path:
    """The real data: $LORA_DA_DATA, else ../shared/data beside the repo (see ../shared/data/README.md)."""
    for d in (os.environ.get("LORA_DA_DATA"), ROOT / "data", ROOT.parent / "shared" / "data"):
        if d and (Path(d) / "stories260K" / "stories260K.bin").is_file():
            return Path(d)
    pytest.fail("real data not found: put ../shared/data beside the repo or set LORA_DA_DATA "
                "(python train.py --download fetches it)")


@pytest.fixture(scope="session")
def data():
    return data_dir()


@pytest.fixture(scope="session")
def stories(data):
    import checkpoints
    return checkpoints.load_checkpoint(data / "stories260K" / "stories260K.bin")


@pytest.fixture(scope="session")
def tokenizer(data):
    import llama
    return llama.Tokenizer(data / "stories260K" / "tok512.model")
