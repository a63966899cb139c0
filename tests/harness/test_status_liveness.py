"""harness.status: runs matched to a matrix's trials by trial key, and a RUNNING run whose process is gone
shown as stale (pid checked on this machine, heartbeat age elsewhere)."""

from __future__ import annotations

import os
import subprocess
import sys

from harness import schema
from harness.status import PlannedTrial, RunRecord, stale_reason, trial_states

HOST = "node-a"
NOW = 1_000_000.0


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has this id now (pids are not reused this fast)


def _rec(name: str, key: str, status: str, **tags: str) -> RunRecord:
    return RunRecord(
        name, f"run-{key}-{status}", 0, None, {schema.TAG_TRIAL_KEY: key, schema.TAG_STATUS: status, **tags}, {}, 3
    )


def test_stale_when_the_process_is_gone_on_this_machine():
    tags = {schema.TAG_HOST: HOST, schema.TAG_PID: str(_dead_pid()), schema.TAG_HEARTBEAT: str(NOW)}
    assert "is gone" in stale_reason(tags, NOW, HOST)
    alive = {**tags, schema.TAG_PID: str(os.getpid())}
    assert stale_reason(alive, NOW, HOST) == ""


def test_stale_when_the_heartbeat_is_older_than_the_bound_elsewhere():
    """Another machine's pid cannot be checked: the heartbeat decides, at exactly STALE_AFTER_S."""
    beat = {schema.TAG_HOST: "node-b", schema.TAG_PID: "1"}
    bound = schema.STALE_AFTER_S
    assert stale_reason({**beat, schema.TAG_HEARTBEAT: str(NOW - bound)}, NOW, HOST) == ""
    assert stale_reason({**beat, schema.TAG_HEARTBEAT: str(NOW - bound - 1)}, NOW, HOST) == "no heartbeat for 10.0 min"
    assert stale_reason({}, NOW, HOST) == ""  # a run of an older kimi-bench: not judged


def test_rows_follow_the_trial_key_not_the_name():
    records = [  # newest first
        _rec("gpt+adamw tiny s0", "other-lr", schema.FINISHED),
        _rec("gpt+adamw tiny s0", "k0", schema.KILLED),
        _rec("gpt+adamw tiny s0", "k0", schema.FINISHED),
        _rec(
            "gpt+adamw tiny s1",
            "k1",
            schema.RUNNING,
            **{schema.TAG_HOST: os.uname().nodename, schema.TAG_PID: str(_dead_pid())},
        ),
    ]
    planned = [
        PlannedTrial("gpt+adamw tiny s0", frozenset({"k0"})),
        PlannedTrial("gpt+adamw tiny s1", frozenset({"k1"})),
        PlannedTrial("gpt+adamw tiny s2", frozenset({"k2"})),
    ]
    states = trial_states(records, planned)
    assert [(t.name, t.status, t.trial_key) for t in states] == [
        ("gpt+adamw tiny s0", "finished", "k0"),
        ("gpt+adamw tiny s1", "stale", "k1"),
        ("gpt+adamw tiny s2", "pending", ""),
    ]
    assert "is gone" in states[1].note
    # without a matrix: one row per trial key (two trials share a name)
    assert sorted((t.name, t.trial_key) for t in trial_states(records)) == [
        ("gpt+adamw tiny s0", "k0"),
        ("gpt+adamw tiny s0", "other-lr"),
        ("gpt+adamw tiny s1", "k1"),
    ]
