"""kimi-bench against real tracking stores: an `mlflow server` shared by two matrices at once, and several
processes opening one fresh sqlite file at once.

Each check reads back through MlflowClient what the CLI children logged: every run, every step of the step
metrics exactly once, the artifacts exactly once.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import (
    child_env,
    duplicate_steps,
    finish,
    metric_steps,
    mlflow_server,
    popen_cli,
    run_cli,
    trial_runs,
    write_matrix,
)

pytestmark = pytest.mark.slow

STEPS = 12
EVAL_INTERVAL = 10
VAL_STEPS = [0, 10, 12]  # the untrained model, every eval_interval, and the last step
STEP_KEYS = ("train/loss", "grad/norm", "train/lr", "train/elapsed_s")
FINAL_KEYS = ("val/loss_final", "val/ppl_final", "params/total", "ckpt/bytes", "val/bpb_final")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One token cache for the module: the corpus slice is tokenized once, by whichever child comes first."""
    return tmp_path_factory.mktemp("cache")


def _check_experiment(client, name: str, n_trials: int, steps: int = STEPS, val_steps=None) -> list:
    """One finished parent; n_trials finished children, complete duplicate-free histories, artifacts once."""
    from mlflow.entities import ViewType

    exp = client.get_experiment_by_name(name)
    assert exp is not None, f"experiment {name!r} missing"
    parents = client.search_runs(
        [exp.experiment_id], filter_string="tags.`kb.kind` = 'matrix'", run_view_type=ViewType.ALL
    )
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", [p.info for p in parents]
    trials = trial_runs(client, name)
    assert len(trials) == n_trials, [r.info.run_name for r in trials]
    keys = Counter(r.data.tags["kb.trial_key"] for r in trials)
    assert all(n == 1 for n in keys.values()), keys
    for r in trials:
        rid, where = r.info.run_id, f"{name}/{r.info.run_name}"
        assert r.info.status == "FINISHED" and r.data.tags["kb.status"] == "finished", where
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id, where
        assert r.data.params["train.steps"] == str(steps), where
        for key in STEP_KEYS:
            assert metric_steps(client, rid, key) == list(range(1, steps + 1)), (where, key)
        assert metric_steps(client, rid, "val/loss") == (val_steps or VAL_STEPS), where
        for key in FINAL_KEYS:
            assert metric_steps(client, rid, key) == [steps], (where, key)
        assert sorted(set(metric_steps(client, rid, "train/tokens"))) == list(range(1, steps + 1)), where
        assert duplicate_steps(client, r) == {}, where
        names = Counter(a.path for a in client.list_artifacts(rid))
        assert names["config.json"] == 1 and names["loss_curve.png"] == 1, (where, names)
        config = Path(client.download_artifacts(rid, "config.json"))
        assert f'"train.steps": {steps}' in config.read_text(), where
    return trials


def test_two_matrices_at_once_against_one_server(tmp_path, cache_dir):
    """--tracking-uri in one process, MLFLOW_TRACKING_URI in the other, both at the same time."""
    from mlflow import MlflowClient

    a = write_matrix(tmp_path / "a.toml", "server-a", train={"steps": STEPS, "eval_interval": EVAL_INTERVAL})
    b = write_matrix(
        tmp_path / "b.toml",
        "server-b",
        optimizers=("adamw", "muon"),
        train={"steps": STEPS, "eval_interval": EVAL_INTERVAL},
    )
    common = ["--cache-dir", str(cache_dir)]
    backend = f"sqlite:///{tmp_path / 'server.db'}"
    with mlflow_server(backend, tmp_path, artifacts=tmp_path / "artifacts") as url:
        pa = popen_cli(
            ["run", "--matrix", str(a), "--tracking-uri", url, "--out", str(tmp_path / "ra"), *common],
            cwd=tmp_path,
            log=tmp_path / "a.log",
        )
        pb = popen_cli(
            ["run", "--matrix", str(b), "--out", str(tmp_path / "rb"), *common],
            cwd=tmp_path,
            env=child_env({"MLFLOW_TRACKING_URI": url}),
            log=tmp_path / "b.log",
        )
        rc_a, rc_b = finish(pa, 400), finish(pb, 400)
        logs = (tmp_path / "a.log").read_text()[-3000:] + (tmp_path / "b.log").read_text()[-3000:]
        assert (rc_a, rc_b) == (0, 0), logs
        client = MlflowClient(url)
        _check_experiment(client, "server-a", 1)
        trials = _check_experiment(client, "server-b", 2)
        # the artifacts went through the server's artifact root, not a local ./mlruns
        uris = [r.info.artifact_uri for r in trials]
        assert all(str(tmp_path / "artifacts") in u for u in uris), uris
    assert not (tmp_path / "mlflow.db").exists(), "a child fell back to the default sqlite store"


def test_concurrent_processes_create_one_fresh_sqlite_store(tmp_path, cache_dir):
    """3 processes start together on a store that does not exist yet: all succeed, the file stays sound.
    Two of them share an experiment (seeds split across processes), so they also race to create it."""
    from mlflow import MlflowClient

    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    uri = f"sqlite:///{db}"
    train = {"steps": 6, "eval_interval": 3}
    matrices = [
        write_matrix(tmp_path / "s0.toml", "fresh-shared", seeds=(0,), train=train),
        write_matrix(tmp_path / "s1.toml", "fresh-shared", seeds=(1,), train=train),
        write_matrix(tmp_path / "other.toml", "fresh-other", train=train),
    ]
    procs = [
        popen_cli(
            [
                "run",
                "--matrix",
                str(m),
                "--tracking-uri",
                uri,
                "--out",
                str(tmp_path / "runs"),
                "--cache-dir",
                str(cache_dir),
            ],
            cwd=tmp_path,
            log=tmp_path / f"{m.stem}.log",
        )
        for m in matrices
    ]
    codes = [finish(p, 400) for p in procs]
    logs = "\n".join(f"--- {m.stem}\n{(tmp_path / f'{m.stem}.log').read_text()[-2500:]}" for m in matrices)
    assert codes == [0, 0, 0], logs

    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("SELECT count(*) FROM alembic_version").fetchone()[0] == 1
    client = MlflowClient(uri)
    names = sorted(e.name for e in client.search_experiments())
    assert names.count("fresh-shared") == 1 and names.count("fresh-other") == 1, names
    shared = trial_runs(client, "fresh-shared")
    assert sorted(r.data.tags["kb.seed"] for r in shared) == ["0", "1"]
    assert len(trial_runs(client, "fresh-other")) == 1
    for r in [*shared, *trial_runs(client, "fresh-other")]:
        assert r.data.tags["kb.status"] == "finished"
        assert metric_steps(client, r.info.run_id, "train/loss") == list(range(1, 7))
    # a later process opens the store like any other
    again = run_cli(["status", "--experiment", "fresh-shared", "--tracking-uri", uri], cwd=tmp_path, timeout=120)
    assert again.returncode == 0 and "finished" in again.stdout, again.stdout + again.stderr
