"""tests/reaper.py: a test run stopped by SIGTERM leaves no process behind.

Each case starts pytest in a subprocess, waits until the processes under test exist, SIGTERMs pytest alone
(its pid, not its group: the worst case, what a supervisor that knows only pytest does), and checks that no
descendant survives it by more than a few seconds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import REPO, child_env
from tests.reaper import die_with_parent

pytestmark = pytest.mark.slow  # each case starts a pytest

# A test that starts a child in its own session (out of pytest's process group), which starts a grandchild,
# records both pids, then waits far longer than any test run.
SPAWNING_TEST = """
import subprocess, sys, time
from pathlib import Path

def test_spawns_and_waits():
    grandchild = "[sys.executable, '-c', 'import time; time.sleep(600)']"
    code = f"import subprocess, sys, time; subprocess.Popen({grandchild}); time.sleep(600)"
    child = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    time.sleep(1.0)
    import psutil
    pids = [child.pid] + [p.pid for p in psutil.Process(child.pid).children()]
    Path("pids.txt").write_text(" ".join(map(str, pids)))
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _survivors(pids, within: float) -> list[int]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


def _wait_for(predicate, timeout: float, proc: subprocess.Popen, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"pytest exited ({proc.returncode}) before {what}: {proc.stdout.read()[-3000:]}")
        found = predicate()
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"no {what} within {timeout}s")


def _start_pytest(args: list[str], cwd: Path) -> subprocess.Popen:
    # its own session: this test's cleanup can reach whatever a failed case leaves, without touching our run
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        env=child_env({"PYTHONPATH": str(REPO)}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )


def _cleanup(proc: subprocess.Popen, pids) -> None:
    for pid in [proc.pid, *pids]:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
    proc.wait(timeout=30)


@pytest.mark.parametrize("with_reaper", [True, False])
def test_sigterm_to_pytest_kills_a_child_in_its_own_session(tmp_path, with_reaper):
    """With the plugin nothing survives; without it (the control) the child and grandchild do: the check can fail."""
    (tmp_path / "test_spawn.py").write_text(SPAWNING_TEST)
    plugin = ["-p", "tests.reaper"] if with_reaper else []
    proc = _start_pytest([*plugin, "--rootdir", str(tmp_path), "test_spawn.py"], tmp_path)
    pids_file = tmp_path / "pids.txt"
    pids: list[int] = []
    try:
        text = _wait_for(lambda: pids_file.exists() and pids_file.read_text(), 120, proc, "pids.txt")
        pids = [int(p) for p in text.split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM
        left = _survivors(pids, within=5.0)
        assert left == ([] if with_reaper else pids), (left, pids)
    finally:
        _cleanup(proc, pids)


def test_sigterm_mid_killed_worker_test_leaves_no_worker(tmp_path):
    """The real case: pytest on test_workers' killed-worker test (its worker trains in its own session),
    SIGTERMed while the worker runs."""
    target = "tests/harness/tune/test_workers.py::test_killed_worker_trial_fails_and_its_run_is_killed[sqlite]"
    proc = _start_pytest([target], REPO)
    pids: list[int] = []

    def running_worker():
        try:
            tree = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return None
        return [p for p in tree if "run_worker" in " ".join(p.cmdline())]

    try:
        _wait_for(running_worker, 240, proc, "tuning worker")
        pids = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM
        assert _survivors(pids, within=5.0) == []
    finally:
        _cleanup(proc, pids)
