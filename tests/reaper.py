"""No test leaves a process behind, even when the test run itself is stopped.

Tests start real processes (CLI children, `mlflow server`, tuning workers, Ray's daemons), several in their own
session so a test can kill their whole group. A test's `finally` kills them, but SIGTERM to pytest (a CI time
limit, `timeout`) ends pytest without running any `finally`, and a child in its own session outlives it. Two
guards, both bounded by the run's own lifetime:

- this plugin (loaded by tests/conftest.py): on SIGTERM / SIGHUP, and when the session ends, pytest kills every
  descendant it has, whatever session or process group each is in (psutil walks the parent links), then dies
  of the signal as it would have;
- `die_with_parent`, the `preexec_fn` of the processes the tests start: Linux's PR_SET_PDEATHSIG kills the child
  when pytest dies even by SIGKILL, which no handler sees.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import threading

import psutil

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)

# Resolved here, before any fork: a preexec_fn runs between fork and exec, where loading a library can deadlock.
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent() -> None:
    """`preexec_fn` for subprocess.Popen: the child gets SIGKILL when the process that started it dies (Linux;
    a no-op elsewhere). If that process already died between fork and here, the child exits at once."""
    if _LIBC is None:
        return
    parent = os.getppid()
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # reparented before the request took effect: the parent is gone
        os._exit(1)


def kill_descendants(timeout: float = 10.0) -> list[int]:
    """SIGKILL every live descendant of this process (children first listed, all killed before any wait);
    returns their pids. Killing by psutil.Process checks each pid's start time, so a reused pid is never hit."""
    procs = psutil.Process().children(recursive=True)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            p.kill()
    psutil.wait_procs(procs, timeout=timeout)
    return [p.pid for p in procs]


def _stop(signum, frame) -> None:
    kill_descendants()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)  # end as the signal would have ended pytest (exit status 128 + signum)


def pytest_configure(config) -> None:
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, _stop)


def pytest_unconfigure(config) -> None:
    # The run is over (also after Ctrl-C): whatever a test left running goes with it. In an xdist controller
    # the workers are descendants too; by now they have finished, and their own unconfigure ran first.
    kill_descendants()
