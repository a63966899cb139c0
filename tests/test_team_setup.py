"""The team setup of docs/ray.md, for real: PostgreSQL 15 on 127.0.0.1, an MLflow server on it (artifacts in a
temp folder), a matrix through that server with two trials at once (the Ray executor, two slots), a tune
study with two Ray workers sharing an Optuna PostgreSQL storage, then `report` and `status`; everything read
back matches what was logged. Also: a PostgreSQL URL naming a database that does not exist is one line.

docs/ray.md ("Tested team setup") lists the commands this test runs.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from tests import postgres
from tests.helpers import (
    assert_one_line_error,
    child_env,
    duplicate_steps,
    metric_steps,
    mlflow_server,
    run_cli,
    trial_runs,
    write_matrix,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not postgres.available(), reason="PostgreSQL (initdb, pg_ctl) not installed"),
]

STEPS = 8
TRAIN = {"steps": STEPS, "eval_interval": 4, "log_interval": 2, "checkpoint_interval": 4}


def _ok(proc) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture()
def ray_tmp():
    """A short folder for Ray's sessions (its unix socket paths are capped at 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="kbray-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_mlflow_and_optuna_on_postgresql_with_ray(tmp_path, ray_tmp):
    import optuna
    from mlflow import MlflowClient

    from harness.tune.study import RUN_ATTR

    with (
        postgres.postgres_server("mlflow", "optuna") as pg,
        mlflow_server(pg.url("mlflow"), tmp_path, artifacts=tmp_path / "artifacts") as url,
    ):
        env = child_env({"RAY_TMPDIR": str(ray_tmp)})
        common = ["--tracking-uri", url, "--cache-dir", str(tmp_path / "cache")]
        matrix = write_matrix(tmp_path / "team.toml", "team", optimizers=("adamw", "muon"), train=TRAIN)

        # the matrix: two trials at once on a local Ray cluster of two CPU slots
        t0 = time.monotonic()
        out = _ok(
            run_cli(
                ["run", "--matrix", str(matrix), "--executor", "ray", "--out", str(tmp_path / "runs"), *common],
                cwd=tmp_path,
                timeout=400,
                env=env,
            )
        )
        matrix_s = time.monotonic() - t0
        client = MlflowClient(url)
        runs = trial_runs(client, "team")
        assert len(runs) == 2 and {r.data.tags["kb.status"] for r in runs} == {"finished"}, out[-2000:]
        spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
        assert spans[1][0] < spans[0][1], f"the two trials did not overlap: {spans}"
        for r in runs:
            assert metric_steps(client, r.info.run_id, "train/loss") == list(range(1, STEPS + 1))
            assert duplicate_steps(client, r) == {}
            assert str(tmp_path / "artifacts") in r.info.artifact_uri

        # the study: two Optuna workers as Ray tasks on one PostgreSQL storage
        tune_m = write_matrix(tmp_path / "tune.toml", "team-tune", train={**TRAIN, "eval_interval": 4})
        _ok(
            run_cli(
                [
                    "tune",
                    "--matrix",
                    str(tune_m),
                    "--executor",
                    "ray",
                    "--n-workers",
                    "2",
                    "--n-trials",
                    "4",
                    "--storage",
                    pg.url("optuna"),
                    "--pruner",
                    "none",
                    "--out",
                    str(tmp_path / "tune-runs"),
                    *common,
                ],
                cwd=tmp_path,
                timeout=500,
                env=env,
            )
        )
        study = optuna.load_study(study_name="team-tune/gpt+adamw", storage=pg.url("optuna"))
        trials = study.get_trials()
        assert Counter(t.state.name for t in trials) == {"COMPLETE": 4}
        tune_runs = client.search_runs(
            [client.get_experiment_by_name("team-tune").experiment_id], "tags.`kb.kind` = 'tune-trial'"
        )
        assert len(tune_runs) == 4 and {r.data.tags["kb.status"] for r in tune_runs} == {"finished"}
        by_run = {r.info.run_id: r for r in tune_runs}
        assert {t.user_attrs[RUN_ATTR] for t in trials} == set(by_run)  # one run per Optuna trial, no orphan
        for t in trials:  # the objective Optuna holds is the run's final val loss, trial by trial
            assert by_run[t.user_attrs[RUN_ATTR]].data.metrics["val/loss_final"] == pytest.approx(t.value, rel=1e-6)

        # report and status read back what was logged
        _ok(
            run_cli(
                ["report", "--experiment", "team", "--tracking-uri", url, "--out", str(tmp_path / "rep")],
                cwd=tmp_path,
                timeout=300,
                env=env,
            )
        )
        report = (tmp_path / "rep" / "report.md").read_text()
        assert "gpt+adamw" in report and "gpt+muon" in report
        status = _ok(
            run_cli(["status", "--matrix", str(matrix), "--tracking-uri", url], cwd=tmp_path, timeout=120, env=env)
        )
        assert "team: 2 trials (2 finished)" in status, status
        for r in runs:
            assert r.data.tags["kb.trial_key"] in status
    print(f"team setup: matrix of 2 trials on Ray in {matrix_s:.0f} s")
    assert not Path(tmp_path / "mlflow.db").exists(), "a command fell back to the default sqlite store"


def test_a_wrong_database_name_is_one_line_within_30_s_and_creates_nothing(tmp_path):
    matrix = write_matrix(tmp_path / "m.toml", "bad-db")
    with postgres.postgres_server("mlflow") as pg:
        wrong = pg.url("no_such_db").replace("kb@", "kb:Pg-S3cret-x@")
        t0 = time.monotonic()
        bad = run_cli(
            [
                "run",
                "--matrix",
                str(matrix),
                "--tracking-uri",
                wrong,
                "--out",
                str(tmp_path / "bad"),
                "--cache-dir",
                str(tmp_path / "cache"),
            ],
            cwd=tmp_path,
            timeout=120,
        )
        took = time.monotonic() - t0
    line = assert_one_line_error(bad, "no_such_db", "cannot connect to the database")
    assert "Pg-S3cret-x" not in bad.stdout + bad.stderr, line
    assert took < 30, f"{took:.0f} s"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.toml"], "something was written"
