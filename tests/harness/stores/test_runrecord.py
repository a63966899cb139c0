"""The portable run record: a matrix written with no MLflow importable, then replayed into MLflow (once)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from harness.errors import UserError
from harness.stores.runrecord import IMPORT_TAG, RECORD_TAG, RecordTracker, import_record, load_state
from tests.helpers import REPO, child_env, write_matrix

# The trial loop in a child where `import mlflow` fails (the GPU image has no MLflow); it runs the matrix
# twice: the second run must find the finished trials in the record and skip them.
NO_MLFLOW_RUN = textwrap.dedent("""
    import sys
    class NoMlflow:
        def find_spec(self, name, path=None, target=None):
            if name == "mlflow" or name.startswith("mlflow."):
                raise ImportError("mlflow is blocked in this test")
    sys.meta_path.insert(0, NoMlflow())
    from cli import app
    for _ in range(2):
        try:
            app(sys.argv[1:], prog_name="kimi-bench")
        except SystemExit as e:
            assert not e.code, e.code
    print("MODULES", " ".join(sorted({m.split(".")[0] for m in sys.modules})))
""")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("record")
    matrix = write_matrix(tmp / "m.toml", "rec", variants=("gpt", "kimi"), train={"steps": 6, "eval_interval": 3})
    record = tmp / "rec"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            NO_MLFLOW_RUN,
            "run",
            "--matrix",
            str(matrix),
            "--tracking-uri",
            f"record:{record}",
            "--out",
            str(tmp / "runs"),
            "--cache-dir",
            str(tmp / "cache"),
        ],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, record, proc.stdout


@pytest.mark.slow
def test_trial_loop_writes_a_record_without_mlflow_and_a_rerun_skips(recorded):
    _, record, stdout = recorded
    modules = stdout.split("MODULES", 1)[1].split()
    assert "mlflow" not in modules
    state = load_state(record)
    trials = [r for r in state.runs.values() if r.tags.get("kb.kind") == "trial"]
    parents = [r for r in state.runs.values() if r.tags.get("kb.kind") == "matrix"]
    assert len(trials) == 2 and len(parents) == 2  # the rerun opened a matrix run and skipped both trials
    assert stdout.count("already finished") == 2
    for run in trials:
        assert run.tags["kb.status"] == "finished" and run.status == "FINISHED"
        assert run.tags["mlflow.parentRunId"] == parents[0].run_id
        assert [s for k, _, _, s in run.history if k == "val/loss"] == [0, 3, 6]
        assert run.params["train.steps"] == "6" and "model.dim" in run.params
        assert any(p.endswith("config.json") for p, _ in run.artifacts)
        assert (record / run.artifacts[0][0]).is_file()


@pytest.mark.slow
def test_import_replays_the_record_into_mlflow_once(recorded):
    import mlflow

    tmp, record, _ = recorded
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    first = import_record(record, uri)
    state = load_state(record)
    assert len(first.added) == len(state.runs) and not first.skipped
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("rec")
    runs = {r.data.tags[RECORD_TAG]: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == set(state.runs)
    for rid, rec in state.runs.items():
        got = runs[rid]
        assert got.info.status == rec.status and got.data.tags[IMPORT_TAG] == "complete"
        assert got.data.params == rec.params
        assert got.info.start_time == rec.start_ms
        for key in ("train/loss", "val/loss"):
            history = [(m.step, m.value, m.timestamp) for m in client.get_metric_history(got.info.run_id, key)]
            assert sorted(history) == sorted((s, v, ts) for k, v, ts, s in rec.history if k == key)
        if rec.tags.get("kb.kind") == "trial":
            parent = rec.tags["mlflow.parentRunId"]
            assert got.data.tags["mlflow.parentRunId"] == runs[parent].info.run_id  # mapped to the new id
            names = {a.path for a in client.list_artifacts(got.info.run_id)}
            assert "config.json" in names and "loss_curve.png" in names
    # each invocation's MLflow UI view (harness.stores.views): its speed runs (gpt, kimi: two shapes) and both trials,
    # the rerun's the two it skipped
    import json

    from harness.stores.views import TAG_PREFIX, view_key

    tags = client.get_experiment(exp.experiment_id).tags
    for parent in (r for r in state.runs.values() if r.tags.get("kb.kind") == "matrix"):
        new_parent = runs[parent.run_id].info.run_id
        view = json.loads(json.loads(tags[TAG_PREFIX + view_key(new_parent)])["state"])["searchFilter"]
        shown = client.search_runs([exp.experiment_id], filter_string=view)
        assert sorted(r.data.tags.get("kb.kind") for r in shown) == ["matrix", "speed", "speed", "trial", "trial"], view
    second = import_record(record, uri)
    assert not second.added and len(second.skipped) == len(state.runs)
    assert len(client.search_runs([exp.experiment_id])) == len(state.runs)
    # the report path reads it as any MLflow experiment
    from reports.collect import collect

    collected = collect(uri, "rec")
    assert len(collected.matrix_runs) == 2


def _tiny_record(folder):
    tracker = RecordTracker(f"record:{folder}")
    exp = tracker.ensure_experiment("unit")
    assert tracker.ensure_experiment("unit") == exp
    parent = tracker.start_parent(exp, "unit", "kimi-bench run", {"kb.git_commit": "abc"})
    run = tracker.start_trial(exp, parent, "t0", {"kb.trial_key": "k0"}, {"a": 1, "b": "x"})
    run.log(1, {"train/loss": 2.5})
    run.log(2, {"train/loss": 2.25, "skip": None})
    run.end("finished")
    tracker.end_parent(parent, "finished")
    return tracker, exp, run


def test_torn_last_line_is_skipped_and_find_trial_reads_the_record(tmp_path):
    tracker, exp, run = _tiny_record(tmp_path)
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write(json.dumps({"ev": "tags", "run_id": run.run_id, "tags": {"kb.status": "failed"}})[:-5])  # torn
    state = load_state(tmp_path)
    got = state.runs[run.run_id]
    assert got.tags["kb.status"] == "finished" and got.params == {"a": "1", "b": "x"}
    assert [(k, v, s) for k, v, _, s in got.history] == [("train/loss", 2.5, 1), ("train/loss", 2.25, 2)]
    found = tracker.find_trial(exp, "k0")
    assert found.info.run_id == run.run_id and found.data.tags["kb.status"] == "finished"
    assert tracker.find_trial(exp, "nope") is None
    assert [m.value for m in tracker.client.get_metric_history(run.run_id, "train/loss")] == [2.5, 2.25]


def test_a_half_imported_run_is_redone_and_a_killed_run_imports_as_killed(tmp_path):
    import mlflow

    folder = tmp_path / "rec"
    tracker, exp, _ = _tiny_record(folder)
    killed = tracker.start_trial(exp, None, "t1", {"kb.trial_key": "k1"}, {"a": 2})
    killed.log(1, {"train/loss": 3.0})
    killed.flush()  # then the process dies: no end()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    import_record(folder, uri)
    client = mlflow.MlflowClient(uri)
    exp_id = client.get_experiment_by_name("unit").experiment_id
    by_record = {r.data.tags[RECORD_TAG]: r for r in client.search_runs([exp_id])}
    dead = by_record[killed.run_id]
    assert dead.info.status == "KILLED" and dead.data.tags["kb.status"] == "killed"
    client.set_tag(dead.info.run_id, IMPORT_TAG, "partial")  # as if an import had died inside this run
    again = import_record(folder, uri)
    assert again.redone == ["t1"] and len(again.skipped) == 2
    live = client.search_runs([exp_id], filter_string=f"tags.`{RECORD_TAG}` = '{killed.run_id}'")
    assert len(live) == 1 and live[0].info.run_id != dead.info.run_id


def test_bad_record_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="no events.jsonl"):
        import_record(tmp_path, f"sqlite:///{tmp_path / 'x.db'}")
    _tiny_record(tmp_path / "r")
    with pytest.raises(UserError, match="needs an MLflow store"):
        import_record(tmp_path / "r", f"record:{tmp_path / 'r2'}")
    with pytest.raises(UserError, match="needs a folder"):
        RecordTracker("record:")


# ------------------------------------------------------------------------------ the issue-13 run, rehearsed


def test_derive_keeps_the_matrix_and_sets_one_seed(tmp_path):
    import tomllib

    from harness.measure import paper_h200

    src = REPO / "experiments" / "paper-h200.toml"
    paper_h200.derive(src, tmp_path / "s1.toml", seed=1, rehearse=False, corpus=None)
    original, derived = tomllib.loads(src.read_text()), tomllib.loads((tmp_path / "s1.toml").read_text())
    assert derived["matrix"].pop("seeds") == [1] and original["matrix"].pop("seeds") == [0, 1]
    assert derived == original  # same trials (keys) as the full matrix, one seed of them
    from harness.spec.matrix import load_matrix

    assert load_matrix(tmp_path / "s1.toml").spec.match.align == 64


@pytest.mark.slow
def test_rehearsal_runs_the_device_path_on_cpu_then_imports_and_reports(tmp_path):
    """paper-h200-run.sh --rehearse: size on the device's code path, run seed by seed into a record, pack it,
    import it twice into a temp sqlite MLflow (the second adds nothing), write the report."""
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(REPO / "reports/results/paper-h200-run.sh"), "--rehearse"],
        cwd=REPO,
        env=child_env({"OUT": str(out), "PY": sys.executable}),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the preflight (a bf16 train + decode step per arm) ran before the sizing, the first timed work
    assert proc.stdout.index("preflight ok: 4 arms") < proc.stdout.index("sizing the budget")
    assert "preflight: MoE dispatch: grouped_mm" in proc.stdout
    size = json.loads((out / "size.json").read_text())
    assert (
        size["steps"] >= 4
        and size["steps"] % 4 == 0
        and set(size["arms"]) == {"gpt+adamw", "gpt+muon", "kimi+adamw", "kimi+muon"}
    )
    # 8 trials + 2 matrix runs (one invocation per seed) + 4 speed runs (2 model shapes per invocation)
    assert "imported 14 runs" in proc.stdout and "imported 0 runs, skipped 14" in proc.stdout
    report = (out / "report.md").read_text()
    assert report.startswith("# kimi-bench report: paper-h200")
    import tarfile

    with tarfile.open(out / "record.tgz") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    trials = [r for r in load_state(tmp_path / "unpacked" / "record").runs.values() if r.tags["kb.kind"] == "trial"]
    assert len(trials) == 8 and {r.tags["kb.status"] for r in trials} == {"finished"}
    assert {r.params["train.steps"] for r in trials} == {str(size["steps"])}
    assert all(r.tags["kb.git_commit"] not in ("", "unknown") for r in trials)
