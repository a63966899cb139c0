"""SIGTERM handled like Ctrl-C.

SLURM, Kubernetes, `timeout` and most schedulers stop a job with SIGTERM (then SIGKILL after a grace period).
Python's default for SIGTERM is to die on the spot, which leaves the trial in flight RUNNING in MLflow for
ever. Raising KeyboardInterrupt from the handler sends it down the Ctrl-C path instead: the trial's run is
marked killed (kb.status killed, MLflow status KILLED), its last checkpoint is kept, the process exits 130
with a line saying what was stopped, and the same command resumes it.
"""

from __future__ import annotations

import contextlib
import signal

_received: list[str] = []  # the name of the signal that interrupted this process, if any


class Terminated(KeyboardInterrupt):
    """A KeyboardInterrupt raised by a SIGTERM (every `except KeyboardInterrupt` handles it as Ctrl-C)."""


def _raise_interrupt(signum: int, frame) -> None:
    _received.append(signal.Signals(signum).name)
    raise Terminated(signal.Signals(signum).name)


def terminate_like_ctrl_c() -> None:
    """Install the handler (main thread only; a no-op elsewhere, e.g. inside a Ray worker thread)."""
    with contextlib.suppress(ValueError):  # not the main thread of the main interpreter
        signal.signal(signal.SIGTERM, _raise_interrupt)


def interrupt_name() -> str:
    """How this process was interrupted, for the line it prints: 'SIGTERM' or 'Ctrl-C'."""
    return _received[-1] if _received else "Ctrl-C"
