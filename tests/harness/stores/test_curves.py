"""The curves artifact: thinning keeps first, last and every eval step; a real trial's artifact holds exactly the
values it logged (also across a kill and resume); a report reads it instead of the metric history and gets the
same curves as from the history."""

import json

import pytest

from harness import schema
from harness.data import DataConfig, prepare
from harness.stores.curves import CURVE_KEYS, curves_payload, read_curves, thin, write_curves
from harness.trial.loop import run_trial
from tests.harness.trial.test_loop import FakeRun, make_spec


def test_thin_keeps_first_last_and_eval_steps_by_hand():
    pts = [(s, float(s) / 10) for s in range(1, 101)]  # steps 1..100
    kept = thin(pts, 11, keep_steps=[33, 67])
    # stride ceil(100 / 10) = 10: indices 0, 10, ..., 90 -> steps 1, 11, ..., 91; plus the last (100) and 33, 67
    assert [s for s, _ in kept] == [1, 11, 21, 31, 33, 41, 51, 61, 67, 71, 81, 91, 100]
    assert all(v == s / 10 for s, v in kept)
    assert thin(pts[:11], 11) == pts[:11]  # short enough: every point


def test_payload_keeps_every_eval_and_lines_up_the_train_keys_on_them():
    steps = range(1, 2001)
    history = {
        schema.TRAIN_LOSS: [(s, 1.0 / s) for s in steps],
        schema.TRAIN_TOKENS: [(s, 64.0 * s) for s in steps],
        schema.VAL_LOSS: [(s, 2.0 / (s + 1)) for s in [0, *range(250, 2001, 250)]],
    }
    doc = curves_payload(history, n=100)
    evals = doc["keys"][schema.VAL_LOSS]["step"]
    assert evals == [0, 250, 500, 750, 1000, 1250, 1500, 1750, 2000]
    for key in (schema.TRAIN_LOSS, schema.TRAIN_TOKENS):
        got = doc["keys"][key]["step"]
        assert got[0] == 1 and got[-1] == 2000 and len(got) <= 100 + len(evals)
        assert set(evals[1:]) <= set(got)  # tokens at every eval: compute-to-target exact
    assert doc["keys"][schema.TRAIN_TOKENS]["value"] == [64.0 * s for s in doc["keys"][schema.TRAIN_TOKENS]["step"]]


def test_round_trip_and_unknown_format(tmp_path):
    history = {schema.TRAIN_LOSS: [(1, 3.25), (2, 3.0)], schema.VAL_LOSS: [(0, 4.5), (2, 3.1)]}
    path = write_curves(tmp_path / "c.json", history, n=50)
    assert read_curves(path) == (50, history)
    path.write_text(json.dumps({"format": 99, "points": 1, "keys": {}}))
    with pytest.raises(ValueError, match="format 99"):
        read_curves(path)


class ArtifactRun(FakeRun):
    """FakeRun that keeps the text of each logged artifact."""

    def __init__(self):
        super().__init__()
        self.artifacts = {}

    def log_artifact(self, path, artifact_path=None):
        self.artifacts[path.name] = path.read_text() if path.suffix == ".json" else None


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "text.txt"
    corpus.write_text(" ".join(["alpha", "beta", "gamma", "kimi", "muon"] * 4000))
    return prepare(DataConfig(corpus=f"text:{corpus}", tokenizer="byte", cache_dir=tmp_path_factory.mktemp("c")))


def _logged(run: FakeRun, key: str) -> list[tuple[int, float]]:
    return [(step, m[key]) for step, m, final in run.metrics if key in m and not final]


@pytest.mark.slow
def test_a_trial_logs_its_curves_as_it_logged_them(data, tmp_path):
    run = ArtifactRun()
    result = run_trial(make_spec("gpt", "adamw", steps=6), data, tmp_path, run=run, resume=False)
    assert result.status == "finished", result.error
    assert run.tags[schema.TAG_CURVES] == schema.ARTIFACT_CURVES
    _, curves = read_curves(tmp_path / schema.ARTIFACT_CURVES)
    assert set(curves) == set(CURVE_KEYS)
    for key in CURVE_KEYS:
        assert curves[key] == _logged(run, key), key
    assert [s for s, _ in curves[schema.VAL_LOSS]] == [0, 3, 6]


@pytest.mark.slow
def test_killed_then_resumed_trial_has_every_step_once(data, tmp_path):
    spec = make_spec("kimi", "muon", steps=6, checkpoint_interval=3)

    def kill_after_the_checkpoint(step, total, info):
        if step >= 5:
            raise KeyboardInterrupt

    killed = ArtifactRun()
    with pytest.raises(KeyboardInterrupt):
        run_trial(spec, data, tmp_path, run=killed, progress=kill_after_the_checkpoint, resume=False)
    _, partial = read_curves(tmp_path / schema.ARTIFACT_CURVES)  # a killed run has its curves too
    assert [s for s, _ in partial[schema.TRAIN_LOSS]] == [1, 2, 3, 4, 5]

    resumed = ArtifactRun()
    result = run_trial(spec, data, tmp_path, run=resumed, resume=True)
    assert result.status == "finished", result.error
    _, curves = read_curves(tmp_path / schema.ARTIFACT_CURVES)
    assert [s for s, _ in curves[schema.TRAIN_LOSS]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in curves[schema.VAL_LOSS]] == [0, 3, 6]
    # steps 1..3 come from the checkpoint, 4..6 from the resumed process: the same as each logged them
    assert curves[schema.TRAIN_LOSS][:3] == _logged(killed, schema.TRAIN_LOSS)[:3]
    assert curves[schema.TRAIN_LOSS][3:] == _logged(resumed, schema.TRAIN_LOSS)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["sqlite", "server"])
def test_a_report_reads_the_artifact_and_gets_the_history(data, tmp_path, monkeypatch, where):
    """Two real trials logged to MLflow (a sqlite store, or a real `mlflow server` proxying artifacts): the report's
    curves come from the artifacts (the history is not asked) and equal the curves read from the history."""
    from contextlib import nullcontext

    from harness.stores.tracking import Tracker
    from harness.trial.runs import trial_tags
    from reports import collect as collect_mod
    from reports.markdown import HISTORY_KEYS
    from tests.helpers import mlflow_server

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with mlflow_server(db, tmp_path) if where == "server" else nullcontext(db) as uri:
        tracker = Tracker(uri)
        exp = tracker.ensure_experiment("curves")
        for optimizer in ("adamw", "muon"):
            spec = make_spec("gpt", optimizer, steps=8)
            run = tracker.start_trial(
                exp,
                None,
                spec.name,
                trial_tags(spec, spec.key(data.data_hash)),
                spec.flat_params(),
                system_metrics=False,
            )
            assert run_trial(spec, data, tmp_path / optimizer, run=run, resume=False).status == "finished"

        c = collect_mod.collect(uri, "curves")
        assert c.runs.curves_artifact.eq(schema.ARTIFACT_CURVES).all()
        asked, real = [], collect_mod._interval_history
        monkeypatch.setattr(
            collect_mod,
            "_interval_history",
            lambda client, key, ids, *a: asked.append((key, list(ids))) or real(client, key, ids, *a),
        )
        stored = c.curves(HISTORY_KEYS)
        assert not [(key, ids) for key, ids in asked if ids], asked  # every key of every run from its artifact
        c.runs["curves_artifact"] = None  # as for a run logged without the artifact
        read = c.curves(HISTORY_KEYS)
        assert [ids for key, ids in asked if ids]  # now the history was read

    cols = ["run_id", "arm", "seed", "key", "step", "value"]
    # the history has the final value of train/tokens a second time at the last step: the same value
    read = read[cols].drop_duplicates().reset_index(drop=True)
    assert stored[cols].reset_index(drop=True).equals(read)
    assert sorted(stored.key.unique()) == sorted(HISTORY_KEYS)
    assert len(stored[stored.key.eq(schema.TRAIN_LOSS)]) == 2 * 8
