"""harness/executors/ (matrix_run, local) and harness/trial/runs.py: trial folders, tags and the parent run's
params; the summary table; a 2-step matrix through run_matrix, whose rerun skips the finished trial."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from harness import schema
from harness.errors import UserError
from harness.executors import run_matrix
from harness.executors.matrix_run import (
    MatrixOutcome,
    check_trials,
    matrix_params,
    print_interrupted,
    summary_table,
    trial_list,
)
from harness.spec.matrix import load_matrix
from harness.trial.loop import TrialResult
from harness.trial.runs import trial_dir_name, trial_tags
from tests.helpers import write_matrix


@pytest.fixture
def matrix(tmp_path):
    path = write_matrix(
        tmp_path / "m.toml",
        "runner",
        variants=("gpt", "kimi"),
        seeds=(0, 1),
        train={"steps": 2, "eval_interval": 1, "log_interval": 1},
    )
    return load_matrix(path)


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=250, color_system=None), buf


def test_an_interrupt_prints_the_exact_resume_command_without_its_secrets(monkeypatch):
    # the --set overrides are part of every trial key: a resume line without them would train other trials
    argv = ["kimi-bench", "run", "--matrix", "m.toml", "--set", "train.steps=5", "--executor", "ray"]
    monkeypatch.setattr("sys.argv", [*argv, "--tracking-uri", "postgresql://alice:s3cret@db:5432/mlflow"])
    console, buf = _console()
    print_interrupted(console, "running trials are cancelled")
    first, resume = buf.getvalue().splitlines()
    assert first.startswith("interrupted (") and "running trials are cancelled. Resume with the same command:" in first
    assert resume == " ".join(argv) + " --tracking-uri postgresql://db:5432/mlflow"


def test_trial_folder_names_are_readable_and_unique_by_key(matrix):
    spec = matrix.expand(256)[0]
    key = spec.key("h")
    assert trial_dir_name(spec, key) == f"gpt+adamw-tiny-s0-{key[:8]}"
    import dataclasses

    assert trial_dir_name(dataclasses.replace(spec, data_seed=3), key) == f"gpt+adamw-tiny-s0-d3-{key[:8]}"


def test_trial_list_and_tags_carry_each_trials_identity(matrix):
    trials = matrix.expand(256)
    listed = trial_list(trials, "h")
    assert [t["name"] for t in listed] == [t.name for t in trials] and len(listed) == 4
    assert len({t["trial_key"] for t in listed}) == 4  # seeds and variants give distinct keys
    assert listed[0]["folder"] == trial_dir_name(trials[0], listed[0]["trial_key"])
    tags = trial_tags(trials[-1], "k")
    assert tags[schema.TAG_TRIAL_KEY] == "k" and tags[schema.TAG_ARM] == trials[-1].arm
    assert tags[schema.TAG_SEED] == str(trials[-1].seed) and tags[schema.TAG_EXPERIMENT] == "runner"
    assert schema.TAG_TUNED_FROM not in tags


def test_matrix_params_flatten_the_file_sections(matrix):
    params = matrix_params(matrix)
    assert params["name"] == "runner" and params["train.steps"] == 2 and params["matrix.seeds"] == [0, 1]
    assert params["matrix.variants"] == ["gpt", "kimi"] and params["data.tokenizer"] == "byte"


def test_a_matrix_without_trials_is_one_line():
    with pytest.raises(UserError, match=r"^matrix: expands to no trials"):
        check_trials([])


def test_summary_table_shows_results_skips_and_state_megabytes(matrix):
    trials = matrix.expand(256)[:2]
    metrics = {
        schema.PARAMS_TOTAL: 120576.0,
        schema.PARAMS_ACTIVE: 120576.0,
        schema.VAL_PPL_FINAL: 12.3456,
        schema.MEM_PARAM: 1_000_000.0,
        schema.MEM_GRAD: 2_000_000.0,
        schema.MEM_OPTIM: 500_000.0,
    }
    done = TrialResult(status=schema.FINISHED, trial_key="k", step=2, error=None, metrics=metrics)
    out, buf = _console()
    out.print(summary_table(MatrixOutcome("1", None, [(trials[0], done), (trials[1], None)])))
    lines = [ln for ln in buf.getvalue().splitlines() if "tiny s" in ln]
    first = [c.strip() for c in lines[0].split("│")[1:-1]]
    # params with thousands separators, ppl to 3 decimals, missing keys "-", state MB = (1 + 2 + 0.5) MB
    assert first == [trials[0].name, "finished", "2", "120,576", "120,576", "12.346", "-", "-", "3.50"]
    assert "skipped (done)" in lines[1]


@pytest.mark.slow
def test_run_matrix_trains_logs_and_a_rerun_skips(matrix, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from harness.data.bar import prepare_data

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    small = load_matrix(
        write_matrix(tmp_path / "one.toml", "runner-one", train={"steps": 2, "eval_interval": 1, "log_interval": 1})
    )
    out, buf = _console()
    data = prepare_data(small.data_fields(), str(tmp_path / "cache"), out)
    trials = small.expand(data.vocab_size)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = run_matrix(small, trials, data, uri, tmp_path / "runs", out)
    ((spec, result),) = first.results
    assert result.status == schema.FINISHED and result.step == 2 and not first.interrupted
    key = spec.key(data.data_hash)
    folder = tmp_path / "runs" / "runner-one" / trial_dir_name(spec, key)
    assert (folder / "model.pt").is_file() and not (folder / "trial_state.pt").exists()  # state dropped at the end

    client = MlflowClient(uri)
    parent = client.get_run(first.parent_run_id)
    assert parent.data.tags[schema.KIND] == schema.KIND_MATRIX and parent.info.status == "FINISHED"
    assert parent.data.tags[schema.TAG_N_TRIALS] == "1" and parent.data.params["train.steps"] == "2"
    run = client.search_runs([first.experiment_id], f"tags.`{schema.TAG_TRIAL_KEY}` = '{key}'")[0]
    assert run.data.tags["mlflow.parentRunId"] == first.parent_run_id
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, schema.VAL_LOSS)) == [0, 1, 2]
    assert run.data.tags[schema.TAG_DATA_HASH] == data.data_hash

    again = run_matrix(small, trials, data, uri, tmp_path / "runs", out)
    assert again.results == [(spec, None)]  # the finished trial is skipped, not retrained
    assert "already finished" in buf.getvalue()
    assert len(client.search_runs([first.experiment_id], f"tags.`{schema.KIND}` = '{schema.KIND_TRIAL}'")) == 1
    assert Path(folder).is_dir()
