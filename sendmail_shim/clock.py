"""The time the sending budgets and account pauses are decided by (budgets.py, ledger.py, the
queue run's due check).

`now()` is `time.time()`, and `wait_until()` sleeps. TEST ONLY: when SENDMAIL_SHIM_TEST_CLOCK
names a file, that file holds an offset in seconds added to the real time, and `wait_until` moves
the offset forward instead of sleeping; the test relay reads the same file. So a test lets a day pass
in an instant, as `queue.crash_point` lets it kill the process at a named step.
"""

import fcntl
import os
import time

TEST_CLOCK = "SENDMAIL_SHIM_TEST_CLOCK"


def now() -> float:
    path = os.environ.get(TEST_CLOCK)
    return time.time() + (offset(path) if path else 0.0)


def wait_until(when: float) -> None:
    """Return at `when` (at once when it has passed)."""
    path = os.environ.get(TEST_CLOCK)
    if path:
        advance(path, to=when)
    elif when > time.time():
        time.sleep(when - time.time())


def advance(path: str, by: float = 0.0, to: float | None = None) -> float:
    """Move the test clock in `path` forward by `by` seconds, or until it reads `to` (never
    back: workers waiting for the same moment move it once); the new offset."""
    with open(path, "a+") as stream:
        fcntl.flock(stream, fcntl.LOCK_EX)
        stream.seek(0)
        moved = float(stream.read().strip() or 0) + by
        if to is not None:
            moved = max(moved, to - time.time())
        stream.seek(0)
        stream.truncate()
        stream.write(repr(moved))
        return moved


def offset(path: str) -> float:
    """The test clock's offset in `path` (0 before it moved)."""
    try:
        with open(path) as stream:
            fcntl.flock(stream, fcntl.LOCK_SH)
            return float(stream.read().strip() or 0)
    except FileNotFoundError:
        return 0.0
