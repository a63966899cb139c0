"""SIGTERM (what SLURM, Kubernetes and `timeout` send) is handled like Ctrl-C: the trial in flight ends
KILLED in MLflow with kb.status killed, its checkpoint stays, the process exits promptly saying what it
stopped, and the same command resumes the trial from that checkpoint."""

from __future__ import annotations

import os
import signal
import time

import pytest

from harness import signals
from tests.helpers import finish, kill_group, metric_steps, popen_cli, run_cli, trial_runs, write_matrix


def test_the_handler_raises_a_keyboard_interrupt_named_after_the_signal():
    old = signal.getsignal(signal.SIGTERM)
    try:
        signals.terminate_like_ctrl_c()
        with pytest.raises(KeyboardInterrupt) as info:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode; never reached
        assert isinstance(info.value, signals.Terminated)
        assert signals.interrupt_name() == "SIGTERM"
    finally:
        signal.signal(signal.SIGTERM, old)
        signals._received.clear()
    assert signals.interrupt_name() == "Ctrl-C"


@pytest.mark.slow
def test_sigterm_on_run_marks_the_trial_killed_keeps_its_checkpoint_and_resumes(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    steps = 400
    matrix = write_matrix(
        tmp_path / "m.toml", "sigterm", train={"steps": steps, "checkpoint_interval": 5, "eval_interval": 200}
    )
    args = [
        "run",
        "--matrix",
        str(matrix),
        "--tracking-uri",
        uri,
        "--out",
        str(tmp_path / "runs"),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    log = tmp_path / "run.log"
    proc = popen_cli(args, cwd=tmp_path, log=log)
    try:
        deadline = time.monotonic() + 240
        while not list((tmp_path / "runs").glob("sigterm/*/trial_state.pt")):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        os.kill(proc.pid, signal.SIGTERM)  # the process this test started, by its id
        t0 = time.monotonic()
        rc = finish(proc, 60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            kill_group(proc)
    text = log.read_text()
    assert rc == 130, text[-3000:]
    assert took < 30, f"exited {took:.0f} s after SIGTERM"
    assert "interrupted (SIGTERM)" in text and "gpt+adamw tiny s0 stopped and marked killed" in text, text[-3000:]
    client = MlflowClient(uri)
    [run] = trial_runs(client, "sigterm")
    assert (run.info.status, run.data.tags["kb.status"]) == ("KILLED", "killed"), run.data.tags
    assert run.data.tags["kb.error"] == "interrupted (SIGTERM)"
    killed_at = max(metric_steps(client, run.info.run_id, "train/loss"))
    assert 0 < killed_at < steps
    assert list((tmp_path / "runs").glob("sigterm/*/trial_state.pt")), "the checkpoint was deleted"

    again = run_cli(args, cwd=tmp_path, timeout=400)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    [run] = trial_runs(client, "sigterm")
    assert run.data.tags["kb.status"] == "finished" and int(run.data.tags["kb.resumed_from_step"]) > 0
    assert metric_steps(client, run.info.run_id, "train/loss") == list(range(1, steps + 1))  # none lost or doubled
