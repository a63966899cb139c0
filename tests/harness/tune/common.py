"""Helpers of the harness/tune tests: tiny matrices, a tune call with the test store, MLflow look-ups."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.tracking import MlflowClient

from harness.tune import TuneConfig, TuneOutcome, run_tune

REPO = Path(__file__).resolve().parents[3]
ARMS_2 = '[{ variant = "gpt", optimizer = "adamw" }, { variant = "kimi", optimizer = "muon" }]'
ARM_GPT = '[{ variant = "gpt", optimizer = "adamw" }]'


def write_matrix(env, tmp_path: Path, name: str, arms: str = ARMS_2, extra: str = "", steps: int = 6) -> Path:
    """A tiny matrix; its MLflow experiment is created here so artifacts land under tmp_path."""
    path = tmp_path / f"{name}.toml"
    path.write_text(f"""
name = "{name}"
[data]
corpus = "text:{env["corpus"]}"
tokenizer = "byte"
[train]
steps = {steps}
micro_batch_size = 2
eval_interval = 3
eval_tokens = 256
log_interval = 3
infer_batch_sizes = [1]
infer_new_tokens = 2
[matrix]
presets = ["tiny"]
arms = {arms}
seeds = [0]
[model]
block_size = 32
n_layer = 1
{extra}
""")
    MlflowClient(env["uri"]).create_experiment(name, artifact_location=(tmp_path / "art").as_uri())
    return path


def tune_here(env, tmp_path, matrix, **kw) -> TuneOutcome:
    kw.setdefault("storage", f"sqlite:///{tmp_path}/optuna.db")
    return run_tune(
        TuneConfig(
            matrix, tracking_uri=env["uri"], cache_dir=env["cache"], out=tmp_path / "runs", system_metrics=False, **kw
        )
    )


def runs_of(env, experiment: str, kind: str) -> list:
    client = MlflowClient(env["uri"])
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`kb.kind` = '{kind}'", max_results=1000)


def artifact_json(env, run_id: str, name: str):
    client = MlflowClient(env["uri"])
    return json.loads(Path(client.download_artifacts(run_id, name)).read_text())
