"""No password is ever written anywhere: MLflow's basic-auth server on 127.0.0.1, the documented
`--tracking-uri http://user:PASSWORD@host:port` form, a matrix on the local and the Ray executor, a report and
a status; then every file under the work folder (console logs, trial folders, MLflow's store and artifacts,
the server's log, Ray's session logs) is searched for the password: it must appear nowhere.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import BIN, assert_one_line_error, child_env, free_port, kill_group, run_cli, wait_http, write_matrix

pytestmark = pytest.mark.slow

USER = "kbuser"
PASSWORD = "Kb-leak-S3cret-7f3a9c"  # long enough for MLflow's password rule
TINY = {"steps": 6, "eval_interval": 3, "log_interval": 2, "checkpoint_interval": 3}


@pytest.fixture()
def work() -> Iterator[Path]:
    """A short folder (Ray's unix sockets live under its temp dir and their paths are capped at 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="kbleak-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture()
def auth_server(work: Path) -> Iterator[str]:
    """`mlflow server --app-name basic-auth`: admin `kbuser` whose password comes from the environment (an ini
    holding it would itself be a file with the password in it)."""
    ini = work / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{work / 'auth.db'}\nadmin_username = {USER}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    port = free_port()
    log = work / "server.log"
    env = child_env(
        {
            "MLFLOW_AUTH_CONFIG_PATH": str(ini),
            "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "kb-test-csrf-key",
        }
    )
    args = [
        str(BIN / "mlflow"),
        "server",
        "--app-name",
        "basic-auth",
        "--backend-store-uri",
        f"sqlite:///{work / 'mlflow.db'}",
        "--artifacts-destination",
        str(work / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 150, proc, log)
        yield f"127.0.0.1:{port}"
    finally:
        kill_group(proc, signal.SIGTERM)
        if proc.poll() is None:
            kill_group(proc)


def _cli(args: list[str], work: Path, log_name: str, timeout: float = 400, **env: str):
    proc = run_cli(args, cwd=work, timeout=timeout, env=child_env({"RAY_TMPDIR": str(work / "ray"), **env}))
    (work / log_name).write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    return proc


def _files_holding(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and not path.is_socket():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            hits += [f"{path.relative_to(root)}: {n!r}" for n in needles if n in data]
    return hits


def test_no_password_anywhere_after_run_ray_report_status(work, auth_server):
    from mlflow import MlflowClient

    uri = f"http://{USER}:{urllib.parse.quote(PASSWORD)}@{auth_server}"
    clean = f"http://{auth_server}"
    common = ["--tracking-uri", uri, "--cache-dir", str(work / "cache")]
    local = write_matrix(work / "local.toml", "leak-local", train=TINY)
    ray_m = write_matrix(work / "ray.toml", "leak-ray", optimizers=("adamw", "muon"), train=TINY)

    t0 = time.monotonic()
    bad = _cli(
        ["status", "--matrix", str(local), "--tracking-uri", f"http://{USER}:wrong-pass@{auth_server}"],
        work,
        "bad-password.log",
        timeout=60,
    )
    line = assert_one_line_error(bad, clean)
    assert time.monotonic() - t0 < 30 and "wrong-pass" not in line, line

    runs = _cli(["run", "--matrix", str(local), "--out", str(work / "runs"), *common], work, "run-local.log")
    assert runs.returncode == 0, runs.stdout[-3000:] + runs.stderr[-3000:]
    assert "View run" in runs.stdout + runs.stderr + (work / "runs/leak-local/mlflow.log").read_text(), (
        "MLflow printed no run link: the check below would prove nothing about them"
    )
    rays = _cli(
        ["run", "--matrix", str(ray_m), "--executor", "ray", "--out", str(work / "runs"), *common], work, "run-ray.log"
    )
    assert rays.returncode == 0, rays.stdout[-3000:] + rays.stderr[-3000:]
    rep = _cli(
        ["report", "--experiment", "leak-local", "--out", str(work / "rep"), "--log", "--tracking-uri", uri],
        work,
        "report.log",
    )
    assert rep.returncode == 0, rep.stdout[-3000:] + rep.stderr[-3000:]
    assert clean in (work / "rep/report.md").read_text()  # the reproducibility block names the server
    st = _cli(["status", "--matrix", str(ray_m), "--tracking-uri", uri], work, "status.log", timeout=120)
    assert st.returncode == 0 and "2 finished" in st.stdout, st.stdout[-3000:] + st.stderr[-3000:]

    os.environ.update({"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": PASSWORD})
    try:
        client = MlflowClient(clean)
        for name, n in (("leak-local", 1), ("leak-ray", 2)):
            exp = client.get_experiment_by_name(name)
            trials = client.search_runs([exp.experiment_id], "tags.`kb.kind` = 'trial'")
            assert [r.data.tags["kb.status"] for r in trials] == ["finished"] * n, name
    finally:
        for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(k, None)

    ray_logs = list((work / "ray").rglob("*.log")) + list((work / "ray").rglob("*.out"))
    assert ray_logs, "Ray wrote no session logs under the work folder: the search would miss them"
    assert list((work / "artifacts").rglob("report.md")), "the report was not logged as an artifact"
    needles = [
        PASSWORD.encode(),
        urllib.parse.quote(PASSWORD).encode(),
        base64.b64encode(f"{USER}:{PASSWORD}".encode()),
    ]
    assert _files_holding(work, needles) == []
