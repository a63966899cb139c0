"""Crash soak: SIGKILL `kimi-bench run` at 10 seeded random moments, rerun it each time, then let it finish.

A kill may land anywhere: imports, data preparation, the first creation of the sqlite store, MLflow logging,
an eval, a checkpoint write, inference, artifacts. Afterwards the store must hold exactly one finished run
per trial key (every rerun resumed the same run), each step metric at each step exactly once, loadable
weights-only checkpoints and no leftover temporary files.

Why exactly once (not merely "monotone, no duplicates"): a resumed trial restarts from its last checkpoint
and skips logging every step up to the last one MLflow already holds (TrialRun.min_step), so each step is
logged by exactly one attempt; a gap would be a lost step, a duplicate a double log: both are bugs.
"""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    REPO,
    duplicate_steps,
    finish,
    kill_group,
    metric_steps,
    popen_cli,
    trial_runs,
    write_matrix,
)

pytestmark = pytest.mark.slow

SEED = 8
KILLS = 10
DELAY_S = (3.0, 24.0)  # seconds after start: from imports to well into the second trial
STEPS = 40
EXPERIMENT = "soak"
TRAIN = {"steps": STEPS, "checkpoint_interval": 5, "eval_interval": 10, "log_interval": 5}


def _snapshot(client, out: Path) -> dict:
    """What one kill left behind: per trial, checkpoint step, last logged step, status; temp files."""
    snap = {"tmp_files": sorted(str(p.relative_to(out)) for p in out.rglob("*.tmp")) if out.exists() else []}
    try:
        exp = client.get_experiment_by_name(EXPERIMENT)
    except Exception as e:  # a store broken by a kill is itself a finding
        return {**snap, "store_error": f"{type(e).__name__}: {str(e)[:200]}"}
    if exp is None:
        return {**snap, "trials": {}}
    trials = {}
    for r in trial_runs(client, EXPERIMENT):
        ckpt = out / EXPERIMENT / r.data.tags["kb.trial_key"] / "trial_state.pt"
        step = torch.load(ckpt, weights_only=True)["train_state"]["step"] if ckpt.is_file() else None
        logged = metric_steps(client, r.info.run_id, "train/loss")
        trials[r.info.run_name] = {"ckpt_step": step, "logged_to": max(logged, default=0),
                                   "status": r.data.tags.get("kb.status")}
    return {**snap, "trials": trials}


def test_sigkill_soak(tmp_path):
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    matrix = write_matrix(tmp_path / "soak.toml", EXPERIMENT, variants=("gpt", "kimi"), train=TRAIN)
    db, out = tmp_path / "mlflow.db", tmp_path / "runs"
    args = ["run", "--matrix", str(matrix), "--tracking-uri", f"sqlite:///{db}", "--out", str(out),
            "--cache-dir", str(tmp_path / "cache")]
    rng = random.Random(SEED)
    delays = [round(rng.uniform(*DELAY_S), 1) for _ in range(KILLS)]
    client = MlflowClient(f"sqlite:///{db}")
    events, t_start = [], time.monotonic()

    for i, delay in enumerate(delays):
        proc = popen_cli(args, cwd=tmp_path, log=tmp_path / f"attempt-{i}.log")
        try:
            proc.wait(timeout=delay)
            events.append({"attempt": i, "delay_s": delay, "killed": False, "rc": proc.returncode})
        except subprocess.TimeoutExpired:
            kill_group(proc)
            events.append({"attempt": i, "delay_s": delay, "killed": True, **_snapshot(client, out)})

    final = popen_cli(args, cwd=tmp_path, log=tmp_path / "final.log")
    rc = finish(final, 400)
    elapsed = time.monotonic() - t_start
    assert rc == 0, (tmp_path / "final.log").read_text()[-4000:]

    # the store: sound, one run per trial key, resumed rather than duplicated
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    runs = trial_runs(client, EXPERIMENT)
    per_key = Counter(r.data.tags["kb.trial_key"] for r in runs)
    exp_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    parents = client.search_runs([exp_id], filter_string="tags.`kb.kind` = 'matrix'",
                                 run_view_type=ViewType.ALL)
    dups = {r.info.run_name: duplicate_steps(client, r) for r in runs}
    figures = {
        "kills": sum(e["killed"] for e in events), "reruns": len(events) + 1, "delays_s": delays,
        "trial_runs_found": len(runs), "trial_keys": len(per_key),
        "runs_per_key": sorted(per_key.values()),
        "duplicate_steps": {k: v for k, v in dups.items() if v},
        "parent_runs": len(parents),
        "parents_left_running": sum(p.info.status == "RUNNING" for p in parents),
        "tmp_files_seen_after_kills": sum(len(e.get("tmp_files", [])) for e in events),
        "total_s": round(elapsed, 1), "events": events,
    }
    report = json.dumps(figures, indent=1, default=str)
    (tmp_path / "soak-figures.json").write_text(report)
    artifacts = REPO / "tests" / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "soak-figures.json").write_text(report)
    print(f"\nsoak figures:\n{report}")

    assert len(per_key) == 2 and all(n == 1 for n in per_key.values()), figures
    for r in runs:
        where = r.info.run_name
        assert r.info.status == "FINISHED" and r.data.tags["kb.status"] == "finished", where
        assert r.data.params.get("train.steps") == str(STEPS), (where, "params missing on the resumed run")
        assert metric_steps(client, r.info.run_id, "train/loss") == list(range(1, STEPS + 1)), where
        assert metric_steps(client, r.info.run_id, "val/loss") == [0, 10, 20, 30, 40], where
        names = Counter(a.path for a in client.list_artifacts(r.info.run_id))
        assert names["config.json"] == 1 and names["loss_curve.png"] == 1, (where, names)
        if r.data.tags["kb.variant"] == "kimi":
            assert names["moe_load.csv"] == 1, (where, names)
    assert not figures["duplicate_steps"], figures["duplicate_steps"]
    assert sum(p.info.status == "FINISHED" for p in parents) >= 1

    # the files: weights-only loadable, finished state at the last step, no temp file a loader could take
    states = sorted(out.rglob("trial_state.pt"))
    models = sorted(out.rglob("model.pt"))
    assert len(states) == 2 and len(models) == 2, (states, models)
    for path in states:
        assert torch.load(path, weights_only=True)["train_state"]["step"] == STEPS, path
    for path in models:
        assert "model" in torch.load(path, weights_only=True), path
    assert list(out.rglob("*.tmp")) == [], list(out.rglob("*.tmp"))
