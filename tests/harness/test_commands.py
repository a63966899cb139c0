"""harness/commands.py: the commands as library calls: option checks in one line, the dry run, params, list, and
a 2-step `run` end to end."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from rich.console import Console

from harness import commands
from harness.commands import RunOptions
from harness.errors import UserError
from tests.helpers import write_matrix


def console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=220, color_system=None, force_terminal=False), buf


@pytest.mark.parametrize(
    "options,message",
    [
        ({"device": "tpu"}, "--device: unknown device 'tpu'; use cpu, cuda, cuda:N or auto"),
        ({"steps": 0}, "--steps: must be >= 1, got 0"),
        ({"nproc": 0}, "--nproc: must be >= 1, got 0"),
        ({"ray_address": "auto"}, "--ray-address: only with --executor ray"),
    ],
)
def test_bad_run_options_are_one_line_before_anything_runs(tmp_path, options, message):
    matrix = write_matrix(tmp_path / "m.toml", "cmd-bad")
    out, _ = console()
    with pytest.raises(UserError) as e:
        commands.run(RunOptions(matrix=matrix, dry_run=True, **options), out)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_steps_replaces_every_budget_of_the_file():
    assert commands._train_overrides(RunOptions(matrix=Path("m"), steps=3)) == {
        "device": None,
        "steps": 3,
        "tokens": None,
        "seconds": None,
    }
    assert commands._train_overrides(RunOptions(matrix=Path("m"), device="cpu")) == {"device": "cpu"}


def test_out_dir_must_be_creatable(tmp_path):
    commands.check_out_dir(tmp_path / "new" / "deeper")  # a missing folder under a writable one is fine
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=r"^--out: cannot create .* is not a writable folder"):
        commands.check_out_dir(blocker / "runs")


def test_tracking_check_is_offline_for_sqlite_and_names_a_missing_folder(tmp_path):
    commands.check_tracking(f"sqlite:///{tmp_path}/mlflow.db")
    assert not (tmp_path / "mlflow.db").exists()  # a dry run creates no store
    commands.check_tracking(f"record:{tmp_path}/rec")
    with pytest.raises(UserError, match=r"^--tracking-uri: folder .*nowhere does not exist"):
        commands.check_tracking(f"sqlite:///{tmp_path}/nowhere/mlflow.db")


@pytest.mark.slow  # seconds: sizes every trial
def test_dry_run_prints_every_trial_and_trains_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    matrix = write_matrix(tmp_path / "m.toml", "cmd-dry", variants=("gpt", "kimi"), seeds=(0, 1))
    out, buf = console()
    code = commands.run(
        RunOptions(matrix=matrix, dry_run=True, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", out=tmp_path / "runs"),
        out,
    )
    text = buf.getvalue()
    assert code == 0 and "cmd-dry: 4 trials (dry run, nothing trained)" in text
    for name in ("gpt+adamw tiny s0", "gpt+adamw tiny s1", "kimi+adamw tiny s0", "kimi+adamw tiny s1"):
        assert name in text
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_params_needs_a_matrix_or_a_preset_and_counts_each_variant():
    out, buf = console()
    commands.params(None, [], "tiny", 256, None, None, out)
    text = buf.getvalue()
    rows = {line.split()[1]: line.split("│")[1:-1] for line in text.splitlines() if "+adamw" in line}
    cells = {arm: [c.strip() for c in row] for arm, row in rows.items()}
    # gpt: 120,576 (test_registry's hand count), all active; KV: 2 layers x (k + v) x 64 dims x 2 bytes = 512
    assert cells["gpt+adamw"][3:5] == ["120,576", "120,576"] and cells["gpt+adamw"][7] == "512"
    # kimi: 162,432 total, 2 of 4 routed experts (3*64*64 each) idle per token -> 137,856 active;
    # KV: the latent (32) + the shared rope key (8) per layer x 2 layers x 2 bytes = 160
    assert cells["kimi+adamw"][3:5] == ["162,432", "137,856"] and cells["kimi+adamw"][7] == "160"
    assert set(cells) == {"gpt+adamw", "gpt-mla+adamw", "gpt-moe+adamw", "kimi+adamw"}
    with pytest.raises(UserError, match=r"^--matrix / --preset: give --matrix FILE or --preset NAME"):
        commands.params(None, [], None, 256, None, None, out)
    with pytest.raises(UserError, match=r"^--set: needs --matrix"):
        commands.params(None, ["train.steps=3"], "tiny", 256, None, None, out)
    with pytest.raises(UserError, match=r"^--preset: unknown name 'tinny'"):
        commands.params(None, [], "tinny", 256, None, None, out)


def test_list_shows_variants_optimizers_and_every_preset():
    out, buf = console()
    out.print(commands.registry_table())
    text = buf.getvalue()
    assert "gpt, gpt-mla, gpt-moe, kimi" in text and "adamw, muon, muonclip" in text
    assert "preset tiny" in text and "n_layer=2 dim=64 n_heads=4 block=64 experts=4x64 top2 vocab=tokenizer" in text
    assert "preset paper" in text and "vocab=50257" in text


def test_tune_workers_need_ray():
    out, _ = console()
    with pytest.raises(UserError, match=r"^--n-workers: only with --executor ray"):
        commands.tune(Path("unused.toml"), [], out, n_workers=2)


@pytest.mark.slow
def test_a_two_step_run_trains_logs_and_prints_the_hints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    matrix = write_matrix(tmp_path / "m.toml", "cmd-run", train={"steps": 2, "eval_interval": 1, "log_interval": 1})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out, buf = console()
    code = commands.run(
        RunOptions(matrix=matrix, tracking_uri=uri, out=tmp_path / "runs", cache_dir=str(tmp_path / "cache")), out
    )
    text = buf.getvalue()
    assert code == 0, text
    assert "finished gpt+adamw tiny s0 at step 2" in text
    assert "report: kimi-bench report --experiment cmd-run" in text and "status: " in text
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cmd-run")
    trials = client.search_runs([exp.experiment_id], "tags.`kb.kind` = 'trial'")
    assert len(trials) == 1 and trials[0].data.tags["kb.status"] == "finished"
    assert sorted(m.step for m in client.get_metric_history(trials[0].info.run_id, "val/loss")) == [0, 1, 2]
    assert os.listdir(tmp_path / "runs" / "cmd-run")  # the trial's folder
