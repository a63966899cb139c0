"""harness.stores.tracking.TrackingLost: a store that gave up (past MLflow's retries) stops a trial in one named
error."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from harness.stores.tracking import TrackingLost, TrialRun


class _FailedOp:
    def wait(self):
        raise RuntimeError("Max retries exceeded with url: http://u:pw@h:5000/api/2.0/mlflow/runs/log-batch")


class _Client:
    def __init__(self):
        self.calls = 0

    def log_batch(self, run_id, metrics=(), tags=(), synchronous=True):
        self.calls += 1
        if not synchronous:
            return _FailedOp()
        raise RuntimeError("Connection refused")


def _run() -> TrialRun:
    return TrialRun(SimpleNamespace(client=_Client(), uri="http://h:5000"), "r1", system_metrics=False)


def test_a_failed_waited_flush_raises_once_and_names_the_store_without_the_password():
    run = _run()
    run.log(1, {"train/loss": 1.0})
    with pytest.raises(TrackingLost) as info:
        run.flush()
    text = str(info.value)
    assert text.startswith(TrackingLost.PREFIX) and "storing metrics" in text and "pw" not in text, text
    assert run._pending == [] and run._buffer == []  # nothing is sent twice on a later flush
    run.flush()  # nothing left: no error, no call
    assert run.tracker.client.calls == 1


def test_tags_and_end_raise_tracking_lost():
    run = _run()
    with pytest.raises(TrackingLost, match="setting tags"):
        run.set_tags({"kb.x": "1"})
    with pytest.raises(TrackingLost):
        run.end("failed")
