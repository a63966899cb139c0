import math

import pytest
from mlflow.tracking import MlflowClient

from harness.errors import UserError
from reports import collect as collect_mod
from reports.collect import FINAL_METRICS, collect, strip_credentials
from tests.reports.conftest import COMMAND, GIT, STEPS


@pytest.mark.slow
def test_one_row_per_trial_with_the_right_columns(collected, store):
    runs = collected.runs
    assert len(runs) == 7  # 2 arms x 3 seeds + 1 diverged; killed duplicate and tune runs dropped
    assert list(zip(runs.arm, runs.seed, strict=True)) == [("gpt+adamw", s) for s in (0, 1, 2, 3)] + [
        ("kimi+muon", s) for s in (0, 1, 2)
    ]
    for col in [
        "run_id",
        "arm",
        "variant",
        "optimizer",
        "preset",
        "seed",
        "status",
        "trial_key",
        "start_time",
        "git_commit",
        "device",
        "torch_version",
        "data_hash",
        "tuned_from",
        "parent_run_id",
        *FINAL_METRICS,
        "param.model.n_layer",
        "param.optim.lr",
        "param.train.steps",
    ]:
        assert col in runs, col
    assert set(runs.status) == {"finished", "diverged"}
    assert runs.seed.dtype.name == "Int64"
    assert (runs.parent_run_id == store.parent_id).all()
    assert (runs.git_commit == GIT).all()
    assert set(runs["param.train.steps"]) == {str(STEPS)}


def test_final_metric_values_equal_mlflow(collected, store):
    client = MlflowClient(store.uri)
    for r in collected.runs.itertuples():
        logged = client.get_run(r.run_id).data.metrics
        row = collected.runs.loc[collected.runs.run_id == r.run_id].iloc[0]
        for key in FINAL_METRICS:
            if key in store.finals[r.run_id]:
                assert row[key] == logged[key] == store.finals[r.run_id][key]
            elif key not in logged:
                assert math.isnan(row[key])


def test_duplicate_trial_key_keeps_the_finished_run(collected, store):
    assert collected.n_dropped == 1
    assert collected.dropped.run_id.tolist() == [store.runs[("kimi+muon", 1, "killed")]]
    kept = collected.runs.query("arm == 'kimi+muon' and seed == 1")
    assert kept.run_id.tolist() == [store.runs[("kimi+muon", 1, "finished")]]
    assert kept.status.tolist() == ["finished"]


def test_history_returns_the_logged_steps(collected, store):
    h = collected.history(["train/loss", "val/loss"])
    assert list(h.columns) == ["run_id", "arm", "seed", "key", "step", "value", "timestamp"]
    client = MlflowClient(store.uri)
    for rid, steps in store.steps.items():
        if rid not in set(collected.runs.run_id):
            continue
        got = h[(h.run_id == rid) & (h.key == "train/loss")]
        assert got.step.tolist() == steps["train/loss"]
        assert got.value.tolist() == [
            m.value for m in sorted(client.get_metric_history(rid, "train/loss"), key=lambda m: m.step)
        ]
    fin = store.runs[("gpt+adamw", 0, "finished")]
    assert h[(h.run_id == fin) & (h.key == "val/loss")].step.tolist() == [0, 5, 10, 15, 19]
    div = store.runs[("gpt+adamw", 3, "diverged")]
    assert h[(h.run_id == div) & (h.key == "train/loss")].step.max() == 12


def test_history_fallback_matches_bulk(collected, monkeypatch):
    bulk = collected.history("grad/norm")
    monkeypatch.setattr(collect_mod, "_bulk_history", lambda *a: None)  # as on a REST tracking server
    per_run = collected.history("grad/norm")
    assert bulk.equals(per_run)
    assert len(bulk) == 6 * STEPS + 13


def test_moe_load_artifacts(collected, store):
    m = collected.moe_load
    assert sorted(m.run_id.unique()) == sorted(store.runs[("kimi+muon", s, "finished")] for s in (0, 1, 2))
    assert set(m.arm) == {"kimi+muon"}
    assert list(m.columns) == ["run_id", "arm", "seed", "step", "layer", "expert", "load"]
    sums = m.groupby(["run_id", "step", "layer"]).load.sum()
    assert sums.between(0.9999, 1.0001).all()


def test_matrix_run_and_tuning_provenance(collected, store):
    assert collected.matrix_runs.run_id.tolist() == [store.parent_id]
    assert collected.matrix_runs.command.tolist() == [COMMAND]
    assert collected.tuning.values.tolist() == [["kimi+muon", "study=kimi-tune trial=7"]]
    assert collected.experiment_id == store.experiment_id


@pytest.mark.parametrize(
    "uri, clean",
    [
        ("http://user:pa55@mlflow.example.com:5000", "http://mlflow.example.com:5000"),
        ("postgresql://kb:secret@db:5432/mlflow?sslmode=require", "postgresql://db:5432/mlflow?sslmode=require"),
        ("https://token@host/path@x", "https://host/path@x"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        ("http://host:5000", "http://host:5000"),
    ],
)
def test_strip_credentials(uri, clean):
    assert strip_credentials(uri) == clean


def test_missing_experiment_is_a_one_line_user_error(store):
    with pytest.raises(UserError) as e:
        collect(store.uri, "no-such-experiment")
    msg = str(e.value)
    assert "\n" not in msg
    assert "no-such-experiment" in msg and "another-experiment, paper-test" in msg


def test_missing_sqlite_file_is_a_user_error_and_creates_nothing(tmp_path):
    db = tmp_path / "nope.db"
    with pytest.raises(UserError, match="no MLflow database"):
        collect(f"sqlite:///{db}", "x")
    assert not db.exists()
