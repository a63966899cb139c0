"""Stores that go away mid-run. Within MLflow's client retry budget nothing is lost: an MLflow server
SIGKILLed and restarted on the same port 10 s later, or the PostgreSQL under it restarted, and every train/loss
step is stored exactly once. Past the budget the trial stops with one line naming the store (never hangs,
never half-logs) and the next `run` resumes it from its checkpoint, steps 1..N each once.

docs/ray.md ("When a store goes away") states the retry settings and the bound these tests use.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import postgres
from tests.helpers import (
    BIN,
    child_env,
    duplicate_steps,
    error_lines,
    finish,
    free_port,
    kill_group,
    metric_steps,
    popen_cli,
    run_cli,
    trial_runs,
    wait_http,
    write_matrix,
)

pytestmark = pytest.mark.slow

STEPS = 200
TRAIN = {"steps": STEPS, "eval_interval": 100, "log_interval": 10, "checkpoint_interval": 10}


def _serve(backend: str, port: int, work: Path, tag: str) -> subprocess.Popen:
    log = work / f"server-{tag}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                backend,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--artifacts-destination",
                str(work / "artifacts"),
            ],
            cwd=work,
            env=child_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    wait_http(f"http://127.0.0.1:{port}/health", 150, proc, log)
    return proc


def _wait(condition: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def _checkpointed(out: Path, name: str) -> Callable[[], bool]:
    return lambda: bool(list(out.glob(f"{name}/*/trial_state.pt")))


def _every_step_once(url: str, name: str, n_trials: int) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(url)
    runs = trial_runs(client, name)
    assert len(runs) == n_trials and {r.data.tags["kb.status"] for r in runs} == {"finished"}, [
        (r.info.run_name, r.data.tags.get("kb.status")) for r in runs
    ]
    for r in runs:
        assert metric_steps(client, r.info.run_id, "train/loss") == list(range(1, STEPS + 1)), r.info.run_name
        assert duplicate_steps(client, r) == {}, r.info.run_name
    return runs


def test_a_server_killed_and_restarted_on_the_same_port_costs_nothing(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    backend = f"sqlite:///{tmp_path / 'server.db'}"
    matrix = write_matrix(tmp_path / "m.toml", "restart", optimizers=("adamw", "muon"), train=TRAIN)
    server = _serve(backend, port, tmp_path, "1")
    log = tmp_path / "run.log"
    proc = popen_cli(
        [
            "run",
            "--matrix",
            str(matrix),
            "--tracking-uri",
            url,
            "--out",
            str(tmp_path / "runs"),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        cwd=tmp_path,
        log=log,
    )
    try:
        _wait(_checkpointed(tmp_path / "runs", "restart"), 300, "checkpoint", proc, log)
        kill_group(server)  # SIGKILL, mid-trial
        time.sleep(10)
        server = _serve(backend, port, tmp_path, "2")
        assert finish(proc, 600) == 0, log.read_text()[-3000:]
        _every_step_once(url, "restart", 2)
    finally:
        kill_group(proc)
        kill_group(server)


@pytest.mark.skipif(not postgres.available(), reason="PostgreSQL (initdb, pg_ctl) not installed")
def test_postgresql_restarted_under_the_server_costs_nothing(tmp_path):
    with postgres.postgres_server("mlflow") as pg:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        matrix = write_matrix(tmp_path / "m.toml", "pg-restart", train=TRAIN)
        server = _serve(pg.url("mlflow"), port, tmp_path, "pg")
        log = tmp_path / "run.log"
        proc = popen_cli(
            [
                "run",
                "--matrix",
                str(matrix),
                "--tracking-uri",
                url,
                "--out",
                str(tmp_path / "runs"),
                "--cache-dir",
                str(tmp_path / "cache"),
            ],
            cwd=tmp_path,
            log=log,
        )
        try:
            _wait(_checkpointed(tmp_path / "runs", "pg-restart"), 300, "checkpoint", proc, log)
            pg.stop("fast")  # every connection of the server's pool dies
            time.sleep(5)
            pg.start()
            assert finish(proc, 600) == 0, log.read_text()[-3000:]
            _every_step_once(url, "pg-restart", 1)
        finally:
            kill_group(proc)
            kill_group(server)


# a small retry budget (MLflow's defaults allow about 4 minutes): 2 retries, 1 s backoff factor, 5 s timeout
SHORT_BUDGET = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}
OUTAGE_BOUND_S = 60  # the run must have stopped this long after the server died


def test_an_outage_past_the_retry_budget_stops_the_trial_and_the_next_run_resumes_it(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    backend = f"sqlite:///{tmp_path / 'server.db'}"
    matrix = write_matrix(tmp_path / "m.toml", "outage", train=TRAIN)
    args = [
        "run",
        "--matrix",
        str(matrix),
        "--tracking-uri",
        url,
        "--out",
        str(tmp_path / "runs"),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    server = _serve(backend, port, tmp_path, "1")
    log = tmp_path / "run.log"
    proc = popen_cli(args, cwd=tmp_path, env=child_env(SHORT_BUDGET), log=log)
    try:
        _wait(_checkpointed(tmp_path / "runs", "outage"), 300, "checkpoint", proc, log)
        kill_group(server)
        t0 = time.monotonic()
        rc = finish(proc, OUTAGE_BOUND_S + 60)
        took = time.monotonic() - t0
        text = log.read_text()
        assert rc == 2 and took < OUTAGE_BOUND_S, (rc, took, text[-3000:])
        assert "Traceback" not in text, text[-3000:]
        [line] = [ln for ln in error_lines(text) if ln.startswith("kimi-bench: error:")]
        assert "tracking store unreachable" in line and "gpt+adamw tiny s0" in line and "resumes" in line, line
        assert list((tmp_path / "runs").glob("outage/*/trial_state.pt")), "the checkpoint is gone"

        server = _serve(backend, port, tmp_path, "2")
        again = run_cli(args, cwd=tmp_path, timeout=600)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        [run] = _every_step_once(url, "outage", 1)
        assert int(run.data.tags["kb.resumed_from_step"]) > 0
    finally:
        kill_group(proc)
        kill_group(server, signal.SIGKILL)
