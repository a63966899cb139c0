"""harness/stores/views.py: the MLflow UI saved view of a matrix invocation, and the link to it."""

import json

import pytest

from harness import schema, status
from harness.stores import views


def test_view_url_opens_the_saved_view_in_the_charts_of_the_training_view():
    assert views.view_url("http://h:5000/", "7", "kb-abc") == (
        "http://h:5000/#/experiments/7/runs?workflowType=machine_learning&compareRunsMode=CHART"
        "&viewStateShareKey=kb-abc"
    )
    assert views.view_url("http://h:5000", "7") == "http://h:5000/#/experiments/7/runs?workflowType=machine_learning"


def test_view_state_groups_by_arm_and_leads_with_the_loss_curves():
    state = views.view_state("tags.x = '1'")
    assert state["groupBy"] == {
        "aggregateFunction": "average",
        "groupByKeys": [{"mode": "tag", "groupByData": schema.TAG_ARM}],
    }
    assert state["selectedColumns"] == [
        "metrics.`val/loss_final`",
        "metrics.`val/bpb_final`",
        "metrics.`params/total`",
        "metrics.`params/active`",
        "metrics.`train/tokens_per_s`",
    ]
    assert state["runsHiddenMode"] == "SHOW_ALL" and state["isAccordionReordered"] is True
    first_two = state["compareRunCharts"][:2]
    assert [(c["type"], c["metricKey"]) for c in first_two] == [("LINE", "train/loss"), ("LINE", "val/loss")]
    assert {c["metricSectionId"] for c in state["compareRunCharts"]} == {state["compareRunSections"][0]["uuid"]}


class _Client:
    def __init__(self):
        self.tags = {}

    def set_experiment_tag(self, experiment_id, key, value):
        self.tags[key] = value


def _filter(client, parent="p1"):
    envelope = json.loads(client.tags[views.TAG_PREFIX + "kb-" + parent])
    assert envelope["name"] == "m" and isinstance(envelope["createdAt"], int)
    return json.loads(envelope["state"])["searchFilter"]


def test_save_view_is_live_then_lists_the_ids_while_they_fit_mlflows_tag_limit():
    client = _Client()
    views.save_view(client, "1", "p1", "m")
    assert _filter(client) == "tags.`kb.matrix_run` = 'p1'"
    views.save_view(client, "1", "p1", "m", ["a" * 32, "b" * 32])
    assert _filter(client) == f"attributes.run_id IN ('{'a' * 32}', '{'b' * 32}')"
    # each id costs 36 characters ("'<32>', "): 600 ids are 21,600 > 20,000, so the view stays live
    views.save_view(client, "1", "p1", "m", [f"{i:032x}" for i in range(600)])
    assert _filter(client) == "tags.`kb.matrix_run` = 'p1'"
    assert len(client.tags[views.TAG_PREFIX + "kb-p1"]) <= views.MAX_TAG_CHARS


def test_newest_view_key_skips_foreign_and_broken_tags():
    tags = {
        views.TAG_PREFIX + "kb-old": json.dumps({"name": "a", "createdAt": 1, "state": "{}"}),
        views.TAG_PREFIX + "kb-new": json.dumps({"name": "b", "createdAt": 2, "state": "{}"}),
        views.TAG_PREFIX + "kb-bad": "not json",
        views.TAG_PREFIX + "someone-else": json.dumps({"name": "c", "createdAt": 3, "state": "{}"}),
        "mlflow.note.content": "x",
    }
    assert views.newest_view_key(tags) == "kb-new"
    assert views.newest_view_key({}) is None


@pytest.mark.slow
def test_an_invocation_view_lists_its_own_and_reused_runs_in_a_real_store(tmp_path):
    """start_parent writes the live view, start_trial / join_matrix tag the runs, end_parent freezes the ids;
    MLflow's own search accepts the stored filter; `status` reads the view back through sqlite3."""
    from harness.stores.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri)
    exp = tracker.ensure_experiment("e")
    old_parent = tracker.start_parent(exp, "e", "kimi-bench run", {})
    reused = tracker.start_trial(
        exp, old_parent, "gpt+adamw tiny s0", {schema.TAG_ARM: "gpt+adamw"}, {}, system_metrics=False
    )
    reused.end(schema.FINISHED)
    tracker.end_parent(old_parent, schema.FINISHED)

    parent = tracker.start_parent(exp, "e", "kimi-bench run", {})
    tracker.join_matrix(reused.run_id, parent)  # skipped as finished: still one of this invocation's trials
    new = tracker.start_trial(exp, parent, "gpt+muon tiny s0", {schema.TAG_ARM: "gpt+muon"}, {}, system_metrics=False)
    live = json.loads(
        json.loads(tracker.client.get_experiment(exp).tags[views.TAG_PREFIX + views.view_key(parent)])["state"]
    )["searchFilter"]
    found = {r.info.run_id for r in tracker.client.search_runs([exp], filter_string=live)}
    assert found == {parent, reused.run_id, new.run_id}  # a run started mid-matrix is in the view at once
    new.end(schema.FINISHED)
    tracker.end_parent(parent, schema.FINISHED)

    tags = tracker.client.get_experiment(exp).tags
    frozen = json.loads(json.loads(tags[views.TAG_PREFIX + views.view_key(parent)])["state"])["searchFilter"]
    assert frozen.startswith("attributes.run_id IN (")
    assert {r.info.run_id for r in tracker.client.search_runs([exp], filter_string=frozen)} == found
    # the older invocation's view kept its own runs although the reused run now names the newer parent
    old = json.loads(json.loads(tags[views.TAG_PREFIX + views.view_key(old_parent)])["state"])["searchFilter"]
    assert {r.info.run_id for r in tracker.client.search_runs([exp], filter_string=old)} == {old_parent, reused.run_id}
    link = views.view_url("http://127.0.0.1:5000", exp, views.view_key(parent))
    assert status.browse_lines_for("e", uri)[-1] == f"runs: {link}"


@pytest.mark.slow
def test_the_view_round_trips_through_a_tracking_server(tmp_path):
    """On `mlflow server` the view is the same experiment tag, written through the REST API; `status` finds it
    with its standard-library REST reader and prints that server's link."""
    from harness.stores.tracking import Tracker
    from tests.helpers import mlflow_server

    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path, artifacts=tmp_path / "art") as url:
        tracker = Tracker(url)
        exp = tracker.ensure_experiment("e")
        parent = tracker.start_parent(exp, "e", "kimi-bench run", {})
        trial = tracker.start_trial(
            exp, parent, "gpt+adamw tiny s0", {schema.TAG_ARM: "gpt+adamw"}, {}, system_metrics=False
        )
        trial.end(schema.FINISHED)
        tracker.end_parent(parent, schema.FINISHED)
        assert status.browse_lines_for("e", url) == [f"runs: {views.view_url(url, exp, views.view_key(parent))}"]
        state = json.loads(
            json.loads(tracker.client.get_experiment(exp).tags[views.TAG_PREFIX + views.view_key(parent)])["state"]
        )
        found = tracker.client.search_runs([exp], filter_string=state["searchFilter"])
        assert {r.info.run_id for r in found} == {parent, trial.run_id}
