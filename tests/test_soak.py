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
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, duplicate_steps, finish, kill_group, metric_steps, popen_cli, trial_runs, write_matrix

pytestmark = pytest.mark.slow

SEED = 8
KILLS = 10
STEPS = 40
EXPERIMENT = "soak"
TRAIN = {"steps": STEPS, "checkpoint_interval": 5, "eval_interval": 10, "log_interval": 5}
POLL_S = 0.05


def next_plan(rng: random.Random, attempt: int, matrix_done: bool) -> dict:
    """A seeded kill moment. The first attempt dies 0-1 s after the sqlite file appears (MLflow is creating
    and migrating its schema). Then, while there is work left: 30% count from the process start (imports, data
    preparation, tracker setup, resume lookup), 70% from the first checkpoint write of their attempt plus
    0-1 s (training steps, evals, MLflow flushes, the next checkpoint write, inference, artifacts). Anchoring
    on events keeps the kills inside the work on a fast or a busy machine alike, where fixed delays mostly
    land in start-up or after the end. Once the matrix is done, reruns are killed in their start-up/skip."""
    if attempt == 0:
        return {"anchor": "store", "offset_s": round(rng.uniform(0, 1.0), 2)}
    if matrix_done or rng.random() < 0.3:
        return {"anchor": "start", "offset_s": round(rng.uniform(0.5, 5.0), 2)}
    return {"anchor": "checkpoint", "offset_s": round(rng.uniform(0, 1.0), 2)}


def _checkpoint_mtimes(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in out.rglob("trial_state.pt")} if out.exists() else {}


def run_and_kill(args: list[str], cwd: Path, out: Path, db: Path, plan: dict, log: Path) -> dict:
    """Start the CLI, SIGKILL its process group at the planned moment; report when (or that it finished)."""
    proc = popen_cli(args, cwd=cwd, log=log)
    t0 = time.monotonic()
    deadline = t0 + plan["offset_s"] if plan["anchor"] == "start" else None
    seen = _checkpoint_mtimes(out)
    while True:
        if proc.poll() is not None:
            return {"killed": False, "rc": proc.returncode, "after_s": round(time.monotonic() - t0, 1)}
        now = time.monotonic()
        if deadline is None:
            if plan["anchor"] == "store":  # the store's file (or a temporary one being built), not its lock
                fired = any(not p.name.endswith(".lock") for p in db.parent.glob(db.name + "*"))
            else:
                current = _checkpoint_mtimes(out)
                fired = any(seen.get(p) != m for p, m in current.items())
            if fired:
                deadline = now + plan["offset_s"]
        if deadline is not None and now >= deadline:
            kill_group(proc)
            return {"killed": True, "after_s": round(now - t0, 1)}
        if now - t0 > 300:
            kill_group(proc)
            raise AssertionError(f"attempt ran 300 s without reaching its kill point: {log.read_text()[-2000:]}")
        time.sleep(POLL_S)


def _snapshot(db: Path, out: Path) -> dict:
    """What a kill left: per trial, checkpoint step, last logged train/loss step, kb.status; temp files.
    Read-only sqlite (no MlflowClient: opening a half-created store through MLflow would repair it)."""
    snap: dict = {"tmp_files": sorted(str(p.relative_to(out)) for p in out.rglob("*.tmp")) if out.exists() else []}
    if not db.exists():
        return {**snap, "store": "absent"}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            rows = con.execute(
                "SELECT r.run_uuid, r.name, k.value, s.value FROM runs r "
                "JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'kb.kind' AND t.value = 'trial' "
                "JOIN tags k ON k.run_uuid = r.run_uuid AND k.key = 'kb.trial_key' "
                "LEFT JOIN tags s ON s.run_uuid = r.run_uuid AND s.key = 'kb.status'"
            ).fetchall()
            trials = {}
            for run_id, name, key, status in rows:
                logged = con.execute(
                    "SELECT max(step) FROM metrics WHERE run_uuid = ? AND key = 'train/loss'", (run_id,)
                ).fetchone()[0]
                ckpt = next((out / EXPERIMENT).glob(f"*-{key[:8]}"), out) / "trial_state.pt"  # cli: folder names
                step = torch.load(ckpt, weights_only=True)["train_state"]["step"] if ckpt.is_file() else None
                trials[name] = {"ckpt_step": step, "logged_to": logged, "status": status}
    except sqlite3.Error as e:  # no tables yet (killed before or while the store was created), or a hot
        # journal: killed inside a transaction, which the next writer rolls back (read-only cannot)
        hot = "readonly" in str(e)
        return {**snap, "store": "hot journal (killed mid-transaction)" if hot else f"{type(e).__name__}: {e}"}
    return {**snap, "store": "ok", "trials": trials}


def _save_figures(tmp_path: Path, figures: dict) -> None:
    """The soak's figures: printed, and saved to tmp and tests/artifacts/soak-figures.json (gitignored)."""
    report = json.dumps(figures, indent=1, default=str)
    (tmp_path / "soak-figures.json").write_text(report)
    artifacts = REPO / "tests" / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "soak-figures.json").write_text(report)
    print(f"\nsoak figures:\n{report}")


def test_sigkill_soak(tmp_path):
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    matrix = write_matrix(tmp_path / "soak.toml", EXPERIMENT, variants=("gpt", "kimi"), train=TRAIN)
    db, out = tmp_path / "mlflow.db", tmp_path / "runs"
    args = [
        "run",
        "--matrix",
        str(matrix),
        "--tracking-uri",
        f"sqlite:///{db}",
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--keep-state",
    ]  # cli: the soak checks the final state
    rng, events, t_start = random.Random(SEED), [], time.monotonic()
    while sum(e["killed"] for e in events) < KILLS and len(events) < KILLS + 6:
        i, done = len(events), any(not e["killed"] and e["rc"] == 0 for e in events)
        plan = next_plan(rng, i, done)
        outcome = run_and_kill(args, tmp_path, out, db, plan, tmp_path / f"attempt-{i}.log")
        events.append({"attempt": i, **plan, **outcome, **(_snapshot(db, out) if outcome["killed"] else {})})

    final = popen_cli(args, cwd=tmp_path, log=tmp_path / "final.log")
    rc = finish(final, 400)
    elapsed = time.monotonic() - t_start
    if rc != 0:
        _save_figures(tmp_path, {"kills": sum(e["killed"] for e in events), "final_rc": rc, "events": events})
        lines = (tmp_path / "final.log").read_text().splitlines()
        last_error = ([ln for ln in lines if "Error" in ln or "error:" in ln] or lines or [""])[-1][:300]
        pytest.fail(f"the final rerun failed (rc {rc}) after {len(events)} attempts: {last_error}")
    client = MlflowClient(f"sqlite:///{db}")

    # the store: sound, one run per trial key, resumed rather than duplicated
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    runs = trial_runs(client, EXPERIMENT)
    per_key = Counter(r.data.tags["kb.trial_key"] for r in runs)
    exp_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    parents = client.search_runs([exp_id], filter_string="tags.`kb.kind` = 'matrix'", run_view_type=ViewType.ALL)
    dups = {r.info.run_name: duplicate_steps(client, r) for r in runs}
    figures = {
        "kills": sum(e["killed"] for e in events),
        "reruns": len(events),
        "completed_reruns_before_the_final": sum(not e["killed"] for e in events),
        "kills_in_startup_or_skip": sum(e["killed"] and e["anchor"] == "start" for e in events),
        "kills_after_a_checkpoint": sum(e["killed"] and e["anchor"] == "checkpoint" for e in events),
        "killed_during_checkpoint_write": sum(bool(e.get("tmp_files")) for e in events),
        "killed_before_store_ready": sum(
            e.get("store") == "absent" or "no such table" in e.get("store", "") for e in events if e["killed"]
        ),
        "killed_mid_sqlite_transaction": sum(e.get("store", "").startswith("hot journal") for e in events),
        "trial_runs_found": len(runs),
        "trial_keys": len(per_key),
        "runs_per_key": sorted(per_key.values()),
        "duplicate_steps": {k: v for k, v in dups.items() if v},
        "parent_runs": len(parents),
        "parents_left_running": sum(p.info.status == "RUNNING" for p in parents),
        "total_s": round(elapsed, 1),
        "events": events,
    }
    _save_figures(tmp_path, figures)

    assert figures["kills"] == KILLS, figures
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


def test_resume_of_a_run_killed_right_after_it_was_created(tmp_path):
    """Deterministic versions of two kill windows the soak hits only by chance: killed between create_run and
    the params (the run has tags, no params), and after the step-0 eval was flushed but before any train/loss
    (val/loss has step 0, no checkpoint exists). The rerun must resume that run, fill in its params and not
    log val/loss at step 0 a second time."""
    from mlflow import MlflowClient
    from rich.console import Console

    from harness.data.bar import prepare_data
    from harness.spec.matrix import load_matrix
    from harness.trial.runs import trial_tags

    matrix = write_matrix(tmp_path / "m.toml", "resume-window", train={"steps": 6, "eval_interval": 3})
    cache, db = tmp_path / "cache", tmp_path / "mlflow.db"
    spec = load_matrix(matrix)
    data = prepare_data(spec.data_fields(), str(cache), Console(quiet=True))
    trial = spec.expand(data.vocab_size)[0]
    key = trial.key(data.data_hash)
    client = MlflowClient(f"sqlite:///{db}")
    exp_id = client.create_experiment("resume-window")
    run_id = client.create_run(
        exp_id, run_name=trial.name, tags={"kb.kind": "trial", **trial_tags(trial, key)}
    ).info.run_id
    client.log_metric(run_id, "val/loss", 5.5, step=0)  # the step-0 eval reached MLflow, then the kill

    proc = popen_cli(
        [
            "run",
            "--matrix",
            str(matrix),
            "--tracking-uri",
            f"sqlite:///{db}",
            "--out",
            str(tmp_path / "runs"),
            "--cache-dir",
            str(cache),
        ],
        cwd=tmp_path,
        log=tmp_path / "run.log",
    )
    assert finish(proc, 300) == 0, (tmp_path / "run.log").read_text()[-3000:]
    runs = trial_runs(client, "resume-window")
    assert [r.info.run_id for r in runs] == [run_id], "the rerun did not resume the killed run"
    run = runs[0]
    problems = []
    if run.data.params.get("train.steps") != "6":
        problems.append(f"params missing on the resumed run: {sorted(run.data.params)[:5]}")
    if metric_steps(client, run_id, "val/loss") != [0, 3, 6]:
        problems.append(f"val/loss steps {metric_steps(client, run_id, 'val/loss')} (want [0, 3, 6])")
    if metric_steps(client, run_id, "train/loss") != list(range(1, 7)):
        problems.append(f"train/loss steps {metric_steps(client, run_id, 'train/loss')}")
    assert not problems, problems
