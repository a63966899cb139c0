"""harness/stores/tracking.py on a real sqlite store: experiments, buffered metric logging, resume and trial lookup."""

from __future__ import annotations

import time

import pytest

from harness import schema
from harness.errors import UserError
from harness.stores.tracking import Tracker, runs_page_url, source_tags


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    """One migrated store for the module (creating one costs seconds); each test uses its own experiment."""
    return Tracker(f"sqlite:///{tmp_path_factory.mktemp('tracking')}/mlflow.db")


def _history(tracker, run_id, key):
    return [(m.step, m.value) for m in sorted(tracker.client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.mark.slow  # the store migration takes seconds
def test_experiment_is_created_once_and_restored_when_deleted(tracker):
    first = tracker.ensure_experiment("exp-once", description="what it is for")
    assert tracker.ensure_experiment("exp-once") == first
    exp = tracker.client.get_experiment(first)
    assert exp.tags[schema.TAG_NOTE] == "what it is for"
    assert exp.tags[schema.TAG_EXPERIMENT_KIND] == schema.EXPERIMENT_KIND_TRAINING
    tracker.client.delete_experiment(first)
    assert tracker.ensure_experiment("exp-once", description="new words") == first
    exp = tracker.client.get_experiment(first)
    assert exp.lifecycle_stage == "active" and exp.tags[schema.TAG_NOTE] == "new words"


@pytest.mark.slow  # the store migration takes seconds
def test_an_experiment_created_by_another_worker_in_between_is_joined(tracker, monkeypatch):
    """Two Optuna workers on Ray both found no experiment and both created it; the second's create raised
    RESOURCE_ALREADY_EXISTS, the worker died, and its share of the study's trials was never run (the team
    setup test saw 2 of 4 trials). The loser of that race must join the winner's experiment."""
    theirs = tracker.client.create_experiment("exp-race")  # the other worker, between our get and our create
    real_get = tracker.client.get_experiment_by_name
    looks = []

    def get(name):  # our first look still saw nothing
        looks.append(name)
        return None if len(looks) == 1 else real_get(name)

    monkeypatch.setattr(tracker.client, "get_experiment_by_name", get)
    assert tracker.ensure_experiment("exp-race") == theirs and len(looks) == 2


@pytest.mark.slow  # the store migration takes seconds
def test_buffered_metrics_reach_the_store_only_when_flushed(tracker):
    exp = tracker.ensure_experiment("exp-buffer")
    run = tracker.start_trial(exp, None, "t", {}, {"optim.lr": 3e-4}, system_metrics=False)
    run.flush_every, run.flush_seconds = 1000, 3600.0  # neither trigger fires: the buffer holds everything
    for step in range(4):
        run.log(step, {"train/loss": 4.0 - step, "skipped": None})
    assert _history(tracker, run.run_id, "train/loss") == []  # nothing sent yet
    assert len(run._buffer) == 4  # None values are not buffered
    run.end(schema.FINISHED)
    assert _history(tracker, run.run_id, "train/loss") == [(0, 4.0), (1, 3.0), (2, 2.0), (3, 1.0)]
    stored = tracker.client.get_run(run.run_id)
    assert stored.data.tags[schema.TAG_STATUS] == schema.FINISHED and stored.info.status == "FINISHED"
    assert stored.data.params["optim.lr"] == "0.0003" and "skipped" not in stored.data.metrics
    assert run.log_seconds > 0


@pytest.mark.slow  # the store migration takes seconds
def test_a_full_buffer_flushes_itself(tracker):
    exp = tracker.ensure_experiment("exp-full")
    run = tracker.start_trial(exp, None, "t", {}, {}, system_metrics=False)
    run.flush_every, run.flush_seconds = 3, 3600.0
    run.log(0, {"a": 1.0, "b": 2.0})
    assert len(run._buffer) == 2
    run.log(1, {"a": 3.0})  # the third value: handed to MLflow's async queue
    assert run._buffer == [] and len(run._pending) == 1
    run.flush()  # waits for the queue
    assert _history(tracker, run.run_id, "a") == [(0, 1.0), (1, 3.0)]
    run.end(schema.FINISHED)


@pytest.mark.slow  # the store migration takes seconds
def test_a_resumed_run_skips_the_steps_it_had_and_logs_only_missing_params(tracker):
    exp = tracker.ensure_experiment("exp-resume")
    run = tracker.start_trial(exp, None, "t", {schema.TAG_TRIAL_KEY: "k-resume"}, {"seed": 0}, system_metrics=False)
    for step in range(3):
        run.log(step, {"train/loss": float(10 - step)})
    run.end(schema.KILLED)
    assert tracker.client.get_run(run.run_id).info.status == "KILLED"

    found = tracker.find_trial(exp, "k-resume")
    assert found.info.run_id == run.run_id
    # same params again plus one new: MLflow refuses to change a logged param, so only the new one is sent
    again = tracker.start_trial(
        exp, None, "t", {}, {"seed": 0, "resumed_at": 2}, resume_run_id=run.run_id, system_metrics=False
    )
    again.min_step = 2
    for step in range(1, 5):  # steps 1 and 2 were logged by the killed run
        again.log(step, {"train/loss": float(100 + step)})
    again.log(2, {"train/loss_final": 7.0}, final=True)  # a final value is logged whatever its step
    again.end(schema.FINISHED)
    assert _history(tracker, run.run_id, "train/loss") == [(0, 10.0), (1, 9.0), (2, 8.0), (3, 103.0), (4, 104.0)]
    assert _history(tracker, run.run_id, "train/loss_final") == [(2, 7.0)]
    stored = tracker.client.get_run(run.run_id)
    assert stored.data.params == {"seed": "0", "resumed_at": "2"}
    assert stored.data.tags[schema.TAG_STATUS] == schema.FINISHED and stored.info.status == "FINISHED"


@pytest.mark.slow  # the store migration takes seconds
def test_find_trial_prefers_an_ended_run_then_the_newest(tracker):
    exp = tracker.ensure_experiment("exp-find")
    tags = {schema.TAG_TRIAL_KEY: "k-find"}
    finished = tracker.start_trial(exp, None, "a", tags, {}, system_metrics=False)
    finished.end(schema.FINISHED)
    time.sleep(0.01)  # start times in ms: keep the order unambiguous
    newer = tracker.start_trial(exp, None, "b", tags, {}, system_metrics=False)  # still running
    assert tracker.find_trial(exp, "k-find").info.run_id == finished.run_id
    other = {schema.TAG_TRIAL_KEY: "k-find-2"}
    old = tracker.start_trial(exp, None, "c", other, {}, system_metrics=False)
    old.end(schema.KILLED)
    time.sleep(0.01)
    new = tracker.start_trial(exp, None, "d", other, {}, system_metrics=False)
    assert tracker.find_trial(exp, "k-find-2").info.run_id == new.run_id  # none ended: the newest
    assert tracker.find_trial(exp, "no-such-key") is None
    assert {r.info.run_id for r in tracker.trials(exp)} == {finished.run_id, newer.run_id, old.run_id, new.run_id}


@pytest.mark.slow  # the store migration takes seconds
def test_parent_run_carries_the_matrix_and_children_point_at_it(tracker):
    exp = tracker.ensure_experiment("exp-parent")
    parent = tracker.start_parent(exp, "m", "kimi-bench run --matrix m.toml", {"kb.extra": "x"}, description="d")
    tracker.log_matrix(parent, "name = 'm'\n", {f"p{i:03d}": i for i in range(150)}, [{"key": "abc"}])
    child = tracker.start_trial(exp, parent, "t", {}, {}, system_metrics=False)
    child.end(schema.FINISHED)
    tracker.end_parent(parent, schema.FINISHED)
    run = tracker.client.get_run(parent)
    assert run.data.tags[schema.KIND] == schema.KIND_MATRIX and run.data.tags[schema.TAG_NOTE] == "d"
    assert run.info.run_name == "matrix m" and len(run.data.params) == 150  # past MLflow's 100-param batch
    assert run.info.status == "FINISHED"
    artifacts = {a.path for a in tracker.client.list_artifacts(parent)}
    assert artifacts == {"matrix.toml", "trials.json"}
    assert tracker.client.get_run(child.run_id).data.tags[schema.TAG_PARENT] == parent


def test_a_store_in_a_missing_folder_is_one_clear_error(tmp_path):
    with pytest.raises(UserError) as e:
        Tracker(f"sqlite:///{tmp_path}/nowhere/mlflow.db")
    assert str(e.value).startswith("--tracking-uri: folder ") and "does not exist" in str(e.value)


def test_links_and_source_tags():
    assert (
        runs_page_url("http://127.0.0.1:5000/", "7")
        == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    )
    tags = source_tags("abc123-dirty")
    assert tags[schema.TAG_SOURCE_GIT] == "abc123" and tags[schema.TAG_SOURCE_NAME] == "kimi-bench"
    assert schema.TAG_SOURCE_GIT not in source_tags("unknown")
