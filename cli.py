"""
What every command line of the project shares (train.py, sample.py, studies/*.py): numeric flags checked over
their whole range when they are parsed, and one error boundary around each program.

Why a range on every number: a value can pass a sign check and still not survive fp32 or int64 (γ = 1e300
overflows, a seed of 1e20 does not fit a generator, a rate of 1e-45 moves no weight). Each flag says the range
in which its arithmetic stays meaningful, and the parser refuses the rest in one line, before anything runs.
tests/test_cli.py probes every numeric flag of every parser with zero, negatives, tiny, huge, nan, inf and
non-numbers, and fails for a flag that declares no range: a new flag is covered when it is added.
"""
import argparse
import math
import os
import signal
import sys
import traceback

REPORT = "this is a bug: please report it with the command line and this message (LORA_DA_TRACEBACK=1 shows where)"


class Number:
    """An argparse `type` for a number in [lo, hi]: int or float, finite, in range; `what` says the range in
    words where it means more than its bounds ("0: off"). tests/test_cli.py reads lo and hi back."""

    def __init__(self, kind, lo, hi, what=None):
        self.kind, self.lo, self.hi = kind, lo, hi
        self.what = what or f"in [{lo:g}, {hi:g}]"
        self.__name__ = kind.__name__  # argparse names the type in its own messages ("invalid int value")

    def __call__(self, text):
        try:
            value = self.kind(text)
        except (TypeError, ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"must be {self.what}, got {text!r} (not "
                                             f"{'an integer' if self.kind is int else 'a number'})")
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number ({self.what}), got {text}")
        if not self.lo <= value <= self.hi:
            raise argparse.ArgumentTypeError(f"must be {self.what}, got {text}")
        return value

    def __repr__(self):
        return f"Number({self.kind.__name__}, {self.lo}, {self.hi})"


def names(text, allowed, flag, *, empty_ok=False):
    """A comma list of names from `allowed`: stripped; unknown, duplicated or (unless empty_ok) no names at all
    refused in one line that lists the allowed ones. Names are case-sensitive (they name code: modules,
    methods, cells), so a mixed-case name is unknown and the message shows the right spelling."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad:
        hint = {t: a for t in bad for a in allowed if a.lower() == t.lower()}
        raise ValueError(f"{flag} {text!r}: unknown {bad}" + (f" (did you mean {list(hint.values())}?)" if hint else "")
                         + f"; choose from {', '.join(allowed)}")
    if len(set(items)) != len(items):
        raise ValueError(f"{flag} {text!r} names {sorted({t for t in items if items.count(t) > 1})} twice")
    if not items and not empty_ok:
        raise ValueError(f"{flag} {text!r} names nothing; choose from {', '.join(allowed)}")
    return items


class Terminated(BaseException):
    """SIGTERM, raised where the process is, as KeyboardInterrupt is for SIGINT."""


def _interrupt(signum, frame):
    """The first Ctrl-C (or SIGTERM) raises where the program is, so it ends through its own clean-up; a second
    one while that clean-up runs ends the process at once, in one line. Nothing written is lost: every file is
    written to a temporary name and renamed (checkpoints.atomic_write), so a hard exit leaves the last complete
    checkpoint in place."""
    if _interrupt.seen:
        os.write(2, b"interrupted again: exiting now (the last complete checkpoint is kept)\n")
        os._exit(130 if signum == signal.SIGINT else 143)
    _interrupt.seen = True
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


_interrupt.seen = False


def boundary(main, on_interrupt=None):
    """Run main() as a command line: expected errors (ValueError, OSError: a setting or a file the user can fix)
    end in one line and exit 2; out of memory in one line that says what to lower; anything else in one line
    that names where it happened and asks for a report, exit 1; Ctrl-C and SIGTERM in one line (on_interrupt()
    says what was kept), exit 130 / 143. argparse's own exits pass through."""
    signal.signal(signal.SIGINT, _interrupt)  # even where a shell started us ignoring SIGINT
    signal.signal(signal.SIGTERM, _interrupt)
    _interrupt.seen = False
    try:
        return main()
    except (KeyboardInterrupt, Terminated) as e:
        term = isinstance(e, Terminated)
        try:
            kept = on_interrupt() if on_interrupt else ""
        except Exception as inner:  # what was kept could not be read: say so, still in one line
            kept = f"(could not read the last checkpoint: {inner})"
        print(f"interrupted ({'SIGTERM' if term else 'SIGINT'})" + (f": {kept}" if kept else ""), file=sys.stderr)
        sys.exit(143 if term else 130)
    except (ValueError, OSError) as e:  # tasks.UsageError, lora_da.SettingError, checkpoints.CheckpointError
        print(f"error: {e}".replace("\n", " "), file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":  # torch's is a RuntimeError
            print(f"error: out of memory ({' '.join(str(e).split())[:160] or type(e).__name__}); lower --batch-size, "
                  f"--stats-batch-size or --layers-per-pass (--dry-run shows the plan)", file=sys.stderr)
            sys.exit(2)
        if os.environ.get("LORA_DA_TRACEBACK"):
            raise
        where = traceback.extract_tb(e.__traceback__)[-1]
        here = f"{os.path.relpath(where.filename)}:{where.lineno}" if where else "?"
        message = " ".join(str(e).split())[:300]
        print(f"internal error: {type(e).__name__}: {message} (at {here}); {REPORT}", file=sys.stderr)
        sys.exit(1)
