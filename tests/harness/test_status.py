"""`kimi-bench status` on a tracking server: the stdlib REST reader returns what MLflow's client returns, takes
the last logged step from the search answer, and imports no MLflow."""

import subprocess
import sys

import pytest

from harness import schema
from harness.status import _client_records, _rest_records, _RestUnsupported, trial_states
from tests.helpers import REPO, child_env, mlflow_server

pytestmark = pytest.mark.slow


def _fill(client) -> str:
    from mlflow.entities import Metric

    exp = client.create_experiment("st")
    done = client.create_run(
        exp,
        run_name="gpt+adamw tiny s0",
        tags={
            schema.KIND: schema.KIND_TRIAL,
            schema.TAG_STATUS: schema.FINISHED,
            schema.TAG_FINAL_STEP: "10",
            schema.TAG_TRIAL_KEY: "k0",
        },
    )
    client.log_batch(
        done.info.run_id,
        metrics=[Metric(schema.TRAIN_LOSS, 5.0 - s / 10, 1000 + s, s) for s in range(1, 11)]
        + [Metric(schema.VAL_PPL_FINAL, 12.5, 2000, 10)],
    )
    client.set_terminated(done.info.run_id, "FINISHED")
    running = client.create_run(
        exp,
        run_name="kimi+muon tiny s0",
        tags={schema.KIND: schema.KIND_TRIAL, schema.TAG_STATUS: schema.RUNNING, schema.TAG_TRIAL_KEY: "k1"},
    )
    client.log_batch(
        running.info.run_id,
        metrics=[Metric(schema.TRAIN_LOSS, 4.0, 1000 + s, s) for s in range(1, 8)]
        + [Metric(schema.VAL_LOSS, 4.5, 1000, 0), Metric(schema.VAL_LOSS, 4.2, 1005, 5)],
    )
    client.create_run(exp, run_name="speed gpt", tags={schema.KIND: schema.KIND_SPEED})  # not a trial
    return exp


def test_rest_reader_equals_the_client_and_imports_no_mlflow(tmp_path):
    from mlflow import MlflowClient

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id = _fill(MlflowClient(db))
    with mlflow_server(db, tmp_path) as url:
        rest = _rest_records(url, "st")
        client = _client_records(MlflowClient(url), exp_id)
        assert _rest_records(url, "no-such-experiment") is None
        probe = (
            "import sys; from harness.status import status_table; from rich.console import Console; "
            f"Console(width=200).print(status_table('st', None, {url!r})); "
            "assert 'mlflow' not in sys.modules, 'mlflow imported'"
        )
        shown = subprocess.run(
            [sys.executable, "-c", probe], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=60
        )
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "gpt+adamw tiny s0" in shown.stdout and "kimi+muon tiny s0" in shown.stdout
    key = lambda r: r.run_id  # noqa: E731
    assert [r.name for r in sorted(rest, key=key)] == [r.name for r in sorted(client, key=key)]
    for a, b in zip(sorted(rest, key=key), sorted(client, key=key), strict=True):
        assert (a.run_id, a.start_ms, a.end_ms, a.metrics) == (b.run_id, b.start_ms, b.end_ms, b.metrics)
        assert a.tags == b.tags
    by_name = {r.name: r for r in rest}
    assert by_name["kimi+muon tiny s0"].last_step == 7  # from the search answer's latest metrics
    states = {t.name: t for t in trial_states(rest)}
    assert states["gpt+adamw tiny s0"].step == "10" and states["kimi+muon tiny s0"].step == "7"
    assert states["gpt+adamw tiny s0"].val_ppl == 12.5


def test_rest_reader_leaves_credentials_in_the_uri_to_mlflow():
    with pytest.raises(_RestUnsupported):
        _rest_records("http://user:secret@127.0.0.1:1", "st")
