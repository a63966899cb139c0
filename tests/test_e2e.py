"""The user's path end to end: `kimi-bench run` a tiny matrix into sqlite, rerun (skips), `report`."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
METRICS = (
    "train/loss",
    "val/loss",
    "val/ppl",
    "val/bpb",
    "train/tokens_per_s",
    "grad/norm",
    "grad/norm_median",
    "grad/norm_p99_over_median",
    "grad/norm_cv",
    "grad/norm_spikes",
    "params/total",
    "params/active",
    "ckpt/bytes",
    "mem/param_bytes",
    "mem/grad_bytes",
    "mem/optim_state_bytes",
    "val/ppl_final",
)
# one speed run per model shape (gpt, kimi) of each invocation; inference speed is measured once per shape
SPEED_METRICS = (
    "speed/prefill_tokens_per_s",
    "speed/ttft_s",
    "speed/decode_tokens_per_s_b1",
    "speed/kv_bytes_per_token",
    *(
        f"speed/{o}/{k}"
        for o in ("adamw", "muon")
        for k in ("step_s", "fwd_bwd_s", "optim_s", "train_tokens_per_s", "peak_bytes")
    ),
)

MATRIX = """
name = "e2e"
description = "e2e: the user's path, tiny"
[data]
corpus = "text:{corpus}"
tokenizer = "byte"
[train]
steps = 8
micro_batch_size = 4
eval_interval = 4
eval_tokens = 2048
log_interval = 2
infer_batch_sizes = [1]
infer_new_tokens = 4
[matrix]
presets = ["tiny"]
variants = ["gpt", "kimi"]
optimizers = ["adamw", "muon"]
seeds = [0]
[model]
block_size = 32
"""


def kimi_bench(*args, cwd):
    env = {**os.environ, "COLUMNS": "200", "KIMI_BENCH_CACHE": str(Path(cwd) / "cache")}
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_run_rerun_report_numbers_equal_mlflow(tmp_path):
    from mlflow import MlflowClient

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"def f{i % 97}(x): return x * {i % 13}" for i in range(4000)))
    (tmp_path / "m.toml").write_text(MATRIX.format(corpus=corpus))
    first = kimi_bench("run", "--matrix", "m.toml", cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("e2e")
    trials = client.search_runs([exp.experiment_id], "tags.`kb.kind` = 'trial'")
    assert len(trials) == 4
    for run in trials:
        assert run.info.status == "FINISHED" and run.data.tags["kb.status"] == "finished"
        for key in METRICS:
            assert key in run.data.metrics, (run.info.run_name, key)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert steps == list(range(1, 9))
        assert math.isclose(
            run.data.metrics["val/ppl_final"], math.exp(run.data.metrics["val/loss_final"]), rel_tol=1e-9
        )
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.json", "loss_curve.png"} <= artifacts
        assert not [k for k in run.data.metrics if k.startswith("infer/")], run.info.run_name
        assert "mem/peak_bytes" not in run.data.metrics  # CPU: from the speed runs, not process RSS
    speed = client.search_runs([exp.experiment_id], "tags.`kb.kind` = 'speed'")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`kb.kind` = 'matrix'")
    assert sorted(r.data.tags["kb.variant"] for r in speed) == ["gpt", "kimi"]
    shapes = {r.data.tags["kb.shape"] for r in trials}
    for run in speed:
        assert run.data.tags["kb.shape"] in shapes and run.data.tags["kb.optimizers"] == "adamw,muon"
        assert run.data.tags["kb.parent_run"] == parent.info.run_id == run.data.tags["mlflow.parentRunId"]
        for key in SPEED_METRICS:
            assert key in run.data.metrics, (run.info.run_name, key)
            if not key.endswith(("peak_bytes", "kv_bytes_per_token")):
                assert run.data.metrics[f"{key}_n"] >= 1 and run.data.metrics[f"{key}_iqr"] >= 0, key

    _check_parent_run_and_files(client, exp, trials, first, tmp_path)

    second = kimi_bench("run", "--matrix", "m.toml", cwd=tmp_path)  # everything finished: all skipped
    assert second.returncode == 0 and second.stdout.count("already finished") == 4, second.stdout
    assert len(client.search_runs([exp.experiment_id], "tags.`kb.kind` = 'trial'")) == 4
    assert len(client.search_runs([exp.experiment_id], "tags.`kb.kind` = 'speed'")) == 4  # measured again

    rep = kimi_bench("report", "--experiment", "e2e", cwd=tmp_path)
    assert rep.returncode == 0, rep.stderr[-3000:]
    out = tmp_path / "reports/out/e2e"
    assert (out / "report.md").is_file() and list(out.rglob("*.png"))
    rows = list(csv.DictReader((out / "summary.csv").open()))
    by_arm = {r.data.tags["kb.arm"]: r.data.metrics for r in trials}
    assert {row["arm"] for row in rows} == set(by_arm)
    for row in rows:  # one seed per arm: the report's mean is exactly the MLflow value
        for metric in ("val/ppl_final", "params/total", "train/tokens_per_s", "ckpt/bytes"):
            assert float(row[f"{metric}:mean"]) == pytest.approx(by_arm[row["arm"]][metric], rel=1e-12), metric


def _check_parent_run_and_files(client, exp, trials, proc, tmp_path: Path) -> None:
    """What a run leaves behind: descriptions, source tags, the matrix and its trials on the parent run,
    readable trial folders without the optimizer state, MLflow's log lines in a file, hints that paste."""
    import json

    assert exp.tags.get("mlflow.note.content") == "e2e: the user's path, tiny"
    (parent,) = client.search_runs([exp.experiment_id], "tags.`kb.kind` = 'matrix'")
    tags = parent.data.tags
    assert tags["mlflow.note.content"] == "e2e: the user's path, tiny"
    assert tags["mlflow.source.name"] == "kimi-bench" and len(tags["mlflow.source.git.commit"]) == 40
    assert parent.data.params["train.steps"] == "8" and parent.data.params["matrix.seeds"] == "[0]"
    root = Path(client.download_artifacts(parent.info.run_id, "", str(tmp_path / "parent-artifacts")))
    assert (root / "matrix.toml").read_text() == (tmp_path / "m.toml").read_text()
    listed = json.loads((root / "trials.json").read_text())
    assert sorted(t["trial_key"] for t in listed) == sorted(r.data.tags["kb.trial_key"] for r in trials)
    for run in trials:
        assert run.data.tags["mlflow.source.git.commit"] == tags["mlflow.source.git.commit"]
        key, arm = run.data.tags["kb.trial_key"], run.data.tags["kb.arm"]
        folder = tmp_path / "runs" / "e2e" / f"{arm}-tiny-s0-{key[:8]}"
        assert (folder / "model.pt").is_file(), sorted(p.name for p in (tmp_path / "runs" / "e2e").iterdir())
        assert not (folder / "trial_state.pt").exists(), "the optimizer state stays after the trial finished"
    log = tmp_path / "runs" / "e2e" / "mlflow.log"
    assert " INFO " in log.read_text(), "MLflow's log lines are kept in the out dir"
    assert " INFO mlflow" not in proc.stdout + proc.stderr, "MLflow's INFO lines interleave with the bars"
    lines = proc.stdout.strip().splitlines()
    assert "report: kimi-bench report --experiment e2e" in proc.stdout
    assert lines[-1] == (
        f"runs: http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs?workflowType="
        f"machine_learning&compareRunsMode=CHART&viewStateShareKey=kb-{parent.info.run_id}"
    )


@pytest.mark.slow
def test_diverging_arm_is_isolated_and_reported(tmp_path):
    """One arm blows up (lr 1e6, no clipping): it ends `diverged` with its step; the other arm finishes."""
    from mlflow import MlflowClient

    from tests.helpers import matrix_text, run_cli, trial_runs

    text = matrix_text(
        "diverge",
        optimizers=("adamw", "muon"),
        train={"grad_clip": 0.0, "log_interval": 1},
        optim={"adamw": {"lr": 1e6, "weight_decay": 0.0}},
    )
    (tmp_path / "m.toml").write_text(text)
    proc = run_cli(["run", "--matrix", "m.toml"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = {
        r.data.tags["kb.arm"]: r for r in trial_runs(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"), "diverge")
    }
    assert runs["gpt+adamw"].data.tags["kb.status"] == "diverged" and runs["gpt+adamw"].info.status == "FAILED"
    assert runs["gpt+adamw"].data.metrics["train/diverged_step"] >= 1
    assert runs["gpt+muon"].data.tags["kb.status"] == "finished" and runs["gpt+muon"].info.status == "FINISHED"
    assert "diverged" in proc.stdout


@pytest.mark.slow
def test_run_with_nproc_2_trains_one_trial_with_ddp(tmp_path):
    """`kimi-bench run --nproc 2` relaunches under torchrun (gloo on CPU): one run, logged once by rank 0."""
    from mlflow import MlflowClient

    from tests.helpers import child_env, matrix_text, run_cli, trial_runs

    (tmp_path / "m.toml").write_text(matrix_text("ddp", variants=("kimi",), optimizers=("muonclip",)))
    proc = run_cli(["run", "--matrix", "m.toml", "--nproc", "2"], cwd=tmp_path, env=child_env({"OMP_NUM_THREADS": "1"}))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("finished kimi+muonclip") == 1  # rank 1 trains silently
    (run,) = trial_runs(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"), "ddp")
    assert run.data.tags["kb.status"] == "finished"
    assert run.data.params["train.micro_batch_size"] == "4"
