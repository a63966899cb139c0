"""The CLI as a researcher uses it: --set overrides, the offline dry-run over every shipped matrix, help and
usage errors, status with pending trials, run-folder names. Fast: in-process, nothing trains."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, assert_one_line_error, write_matrix
from tests.test_cli_errors import kb

SHIPPED = sorted((REPO / "experiments").glob("*.toml"))


# --------------------------------------------------------------------------- --set
def test_set_changes_the_trial_and_its_key(tmp_path):
    from harness.spec.matrix import load_matrix

    m = write_matrix(tmp_path / "m.toml", "sets")
    base = load_matrix(m).expand(256)[0]
    changed = load_matrix(m, ["train.steps=5", "optim.adamw.lr=3e-4"]).expand(256)[0]
    assert (base.train.steps, changed.train.steps) == (20, 5)
    assert changed.optim.lr == pytest.approx(3e-4) and base.optim.lr != changed.optim.lr
    assert base.key("d") != changed.key("d")
    # a budget given with --set replaces the file's budget (as --steps does)
    t = write_matrix(tmp_path / "t.toml", "sets", train={"steps": None, "tokens": 10_000})
    assert load_matrix(t, ["train.steps=3"]).expand(256)[0].train.total_steps(32) == 3


@pytest.mark.parametrize(
    ("item", "words"),
    [
        ("train.stpes=5", ["--set train.stpes:", "did you mean 'steps'"]),
        ("train.steps=abc", ["--set train.steps:", "integer", "'abc'"]),
        ("train.steps=-2", ["--set train.steps:", "greater than 0"]),
        ("optim.adamw.lrr=1e-3", ["--set optim.adamw.lrr:", "did you mean 'lr'"]),
        ("trian.steps=5", ["--set trian:", "did you mean 'train'"]),
        ("train.steps", ["--set train.steps", "section.key=value"]),
    ],
)
def test_bad_set_is_one_line(tmp_path, capsys, item, words):
    m = write_matrix(tmp_path / "m.toml", "sets")
    for command in (["run", "--matrix", str(m), "--dry-run"], ["params", "--matrix", str(m)]):
        proc = kb([*command, "--set", item], capsys)
        assert_one_line_error(proc, *words)


# --------------------------------------------------------------------------- offline dry-run
@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test (the dry-run must be offline)."""

    def refuse(self, address, *args, **kwargs):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access to {address} during an offline command")
        return real_connect(self, address, *args, **kwargs)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("matrix", SHIPPED, ids=[p.stem for p in SHIPPED])
@pytest.mark.slow
def test_dry_run_and_params_offline_on_every_shipped_matrix(tmp_path, capsys, monkeypatch, no_network, matrix):
    from harness.plan import vocab_size_for
    from harness.spec.matrix import load_matrix

    monkeypatch.chdir(tmp_path)
    spec = load_matrix(matrix)
    n = len(spec.expand(vocab_size_for(spec.data_fields(), str(tmp_path / "cache"))[0]))
    for command in (
        [
            "run",
            "--matrix",
            str(matrix),
            "--dry-run",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
        ],
        ["params", "--matrix", str(matrix), "--cache-dir", str(tmp_path / "cache")],
    ):
        proc = kb(command, capsys)
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        assert "tokens" in out and "train FLOPs" in out and "optimizer state" in out, out
        per_trial = out.split("total:")[0]  # a [tune] section prints its studies' table after the total
        rows = [ln for ln in per_trial.splitlines() if "FLOP" in ln and ln.startswith("│")]
        assert len(rows) == n, out  # one cost row per trial
        assert f"total: {n} trials" in " ".join(out.split()), out
    assert not (tmp_path / "mlflow.db").exists()


def test_dry_run_numbers_follow_from_the_spec(tmp_path):
    """Tokens = steps x batch x block; FLOPs = flops_per_token x tokens; AdamW state = 2 fp32 per param."""
    import torch

    from arch.counting import count_params, flops_per_token
    from harness.plan import DeviceRate, trial_cost
    from harness.spec.matrix import load_matrix
    from harness.spec.registry import build_model

    m = write_matrix(tmp_path / "m.toml", "cost", optimizers=("adamw", "muon"))
    adamw, muon = load_matrix(m).expand(256)
    rate = DeviceRate("test", 1e9, "1 GFLOP/s")
    cost = trial_cost(adamw, rate)
    with torch.device("meta"):
        model = build_model(adamw.variant, adamw.dims)
    tokens = 20 * 4 * adamw.dims.block_size
    assert cost.tokens == tokens
    assert cost.train_flops == flops_per_token(model, adamw.dims.block_size) * tokens
    assert cost.optimizer_bytes == 8 * count_params(model).total
    assert cost.seconds == pytest.approx(cost.train_flops / 1e9)
    muon_cost = trial_cost(muon, rate)
    assert 4 * count_params(model).total < muon_cost.optimizer_bytes < cost.optimizer_bytes


def test_dry_run_on_cuda_states_mfu_and_gpu_hours(tmp_path, capsys):
    m = write_matrix(tmp_path / "m.toml", "cuda")
    proc = kb(
        [
            "run",
            "--matrix",
            str(m),
            "--dry-run",
            "--device",
            "cuda",
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
        ],
        capsys,
    )
    assert proc.returncode == 0, proc.stderr
    flat = " ".join(proc.stdout.split())
    assert "GPU-hours" in flat and "MFU" in flat and "TFLOP/s bf16 peak" in flat, proc.stdout


# --------------------------------------------------------------------------- help and usage errors
def test_help_version_and_usage_errors(capsys):
    top = kb(["-h"], capsys)
    assert top.returncode == 0 and "bench " in top.stdout and "bench-infer" in top.stdout
    assert kb(["--version"], capsys).stdout.startswith("kimi-bench ")
    run_help = kb(["run", "--help"], capsys).stdout
    assert "--dry-run " in run_help and "--dry-run <bool>" not in run_help and "--set" in run_help
    assert "[data]" in kb(["data", "prepare", "--help"], capsys).stdout
    assert "default: a newline" in " ".join(kb(["generate", "--help"], capsys).stdout.split())
    assert_one_line_error(kb(["run", "--bogus"], capsys), "--bogus")
    assert_one_line_error(kb(["run", "--matrix", "x.toml", "--steps", "many"], capsys), "--steps:")
    assert_one_line_error(kb(["run"], capsys), "--matrix: missing")
    assert_one_line_error(kb(["run", "--matrix", "x.toml", "--dry-run", "true"], capsys), "true")


# --------------------------------------------------------------------------- run folders and status
def test_trial_folder_name_is_readable_and_keyed(tmp_path):
    from harness.spec.matrix import load_matrix
    from harness.trial.runs import trial_dir_name

    spec = load_matrix(
        write_matrix(tmp_path / "m.toml", "dirs", variants=("kimi",), optimizers=("muon",), seeds=(3,))
    ).expand(256)[0]
    key = spec.key("data")
    assert trial_dir_name(spec, key) == f"kimi+muon-tiny-s3-{key[:8]}"


@pytest.mark.slow
def test_status_lists_pending_trials_by_trial_key(tmp_path):
    """A matrix whose store holds one finished trial of three (its real trial key) and a run of the same name
    with another learning rate: status lists all three, two pending, and is not fooled by the name; with
    --experiment alone it never imports torch (it must answer in seconds)."""
    from mlflow import MlflowClient

    from harness.spec.matrix import load_matrix

    db = tmp_path / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.create_experiment("pend")
    m = write_matrix(tmp_path / "m.toml", "pend", seeds=(0, 1, 2))
    first = load_matrix(m).expand(256)[0]  # the byte tokenizer's vocabulary
    run = client.create_run(
        exp,
        run_name="gpt+adamw tiny s0",
        tags={
            "kb.kind": "trial",
            "kb.status": "finished",
            "kb.final_step": "20",
            "kb.trial_key": first.key("d0"),
            "kb.data_hash": "d0",
        },
    )
    client.log_metric(run.info.run_id, "val/ppl_final", 12.5, step=20)
    client.set_terminated(run.info.run_id, "FINISHED")
    other = load_matrix(m, ["optim.adamw.lr=4.5e-3"]).expand(256)[1]  # same name "gpt+adamw tiny s1"
    client.create_run(
        exp,
        run_name=other.name,
        tags={
            "kb.kind": "trial",
            "kb.status": "finished",
            "kb.final_step": "20",
            "kb.trial_key": other.key("d0"),
            "kb.data_hash": "d0",
        },
    )
    code = (
        "import sys, cli\n"
        "try:\n    cli.app(sys.argv[1:], prog_name='kimi-bench')\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "status", "--matrix", str(m), "--tracking-uri", f"sqlite:///{db}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    rows = {ln.split("│")[1].strip(): ln for ln in lines if ln.startswith("│")}
    assert set(rows) == {"gpt+adamw tiny s0", "gpt+adamw tiny s1", "gpt+adamw tiny s2"}, proc.stdout
    assert "finished" in rows["gpt+adamw tiny s0"] and "20" in rows["gpt+adamw tiny s0"]
    assert "12.500" in rows["gpt+adamw tiny s0"]
    assert "pending" in rows["gpt+adamw tiny s1"] and "pending" in rows["gpt+adamw tiny s2"]
    assert "1 finished, 2 pending" in proc.stdout and "1 other trial(s)" in proc.stdout
    with_set = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "status",
            "--matrix",
            str(m),
            "--set",
            "optim.adamw.lr=4.5e-3",
            "--tracking-uri",
            f"sqlite:///{db}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert "2 pending, 1 finished" in with_set.stdout, with_set.stdout + with_set.stderr
    rows = {ln.split("│")[1].strip(): ln for ln in with_set.stdout.splitlines() if ln.startswith("│")}
    assert "finished" in rows["gpt+adamw tiny s1"] and "pending" in rows["gpt+adamw tiny s0"]
    plain = subprocess.run(
        [sys.executable, "-c", code, "status", "--experiment", "pend", "--tracking-uri", f"sqlite:///{db}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert "2 trials (2 finished)" in plain.stdout and plain.stdout.splitlines()[-1] == "NO-TORCH", plain.stdout


def test_trials_json_lists_each_trial_with_its_folder(tmp_path):
    from harness.executors.matrix_run import trial_list
    from harness.spec.matrix import load_matrix
    from harness.trial.runs import trial_dir_name

    trials = load_matrix(write_matrix(tmp_path / "m.toml", "tl", seeds=(0, 1))).expand(256)
    listed = json.loads(json.dumps(trial_list(trials, "h"), default=str))
    assert [t["folder"] for t in listed] == [trial_dir_name(t, t.key("h")) for t in trials]
    assert listed[1]["params"]["seed"] == 1


def test_hints_carry_the_tracking_uri_and_the_runs_view():
    from harness.console import browse_lines, report_hint

    assert (
        report_hint("smoke", "http://127.0.0.1:5000")
        == "kimi-bench report --experiment smoke --tracking-uri http://127.0.0.1:5000"
    )
    assert browse_lines("http://127.0.0.1:5000", "7") == [
        "runs: http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    ]
    assert browse_lines("sqlite:///x.db", "7")[0].startswith("browse: mlflow ui --backend-store-uri")


def test_status_help_path(tmp_path, capsys):
    assert_one_line_error(
        kb(["status", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}", "--experiment", "x"], capsys),
        "--tracking-uri",
        "no MLflow store",
    )
    assert_one_line_error(kb(["status"], capsys), "--experiment / --matrix")
    assert Path(tmp_path / "none.db").exists() is False


def test_run_options_are_the_run_commands_parameters():
    """RunOptions has one field per option of `kimi-bench run`, same name and default, and is built by name."""
    import dataclasses
    import inspect

    import cli
    from harness.commands import RunOptions

    params = inspect.signature(cli.run).parameters
    fields = {f.name: f for f in dataclasses.fields(RunOptions)}
    assert list(params) == list(fields)
    for name, p in params.items():
        if p.default is not inspect.Parameter.empty and name != "sets":
            assert fields[name].default == p.default, name
    options = RunOptions.of({**{k: p.default for k, p in params.items()}, "matrix": "m.toml", "sets": None})
    assert options.sets == [] and options.executor == "local" and options.out == cli.Path("runs")
