"""The resume tests' power cut: `python tests/killed_run.py K ARGS...` runs `train.py ARGS...` and kills
itself (SIGKILL, no clean-up) right after the checkpoint of step K is written."""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

save, kill_at = train.save_checkpoint, int(sys.argv[1])


def save_then_die(ckpt_file, state):
    save(ckpt_file, state)
    if state["step"] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


train.save_checkpoint = save_then_die
train.main(sys.argv[2:])
