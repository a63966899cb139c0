"""Documented commands are tested commands: every ```bash block of README.md, docs/*.md and the folders' READMEs
runs here, in order, in a temporary folder with a fresh sqlite store and token cache.

A command is run unless a rule in SKIP names why it cannot run on a CPU here (an install line, a GPU, a server
or cluster, the network); a budget that is large on purpose is shrunk by TINY, appended to every training `run`
and `tune` (a later `--set` wins, so the documented ones still parse and apply first). A new block in a doc is
therefore run by default, and a doc whose path breaks (README's tune -> run --tuned -> report crashed in
`report` once) fails here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import BIN, REPO, child_env
from tests.test_docs import docs

# (pattern on one command, why it is not run here); the first match wins
SKIP: list[tuple[str, str]] = [
    (
        r"^python3 -m venv |^\. \.venv/bin/activate$|^pip install ",
        "installs: the environment under test is already installed",
    ),
    (r"^pytest\b", "the test suite itself (CI runs it)"),
    (r"^mlflow (ui|server)\b", "a long-running server (tests/test_servers.py starts one)"),
    (r"^export MLFLOW_TRACKING_URI=http", "points later commands at a server that is not started here"),
    (r"--nproc \d", "several GPUs of one node"),
    (
        r"postgresql://|^(initdb|pg_ctl|createdb|psql)\b|PGDATA",
        "a PostgreSQL server (tests/test_team_setup.py starts one)",
    ),
    (r"^(export RAY_AUTH_MODE|export KB_OPTUNA_STORAGE|ray (start|get-auth-token))", "a multi-machine Ray cluster"),
    (r"--ray-address auto", "a multi-machine Ray cluster"),
    (
        r"team\.toml|--tracking-uri http|--storage postgresql",
        "the tested team setup: tests/test_team_setup.py runs it on PostgreSQL",
    ),
    (
        r"^kimi-bench run --matrix experiments/paper\.toml(?!.*--dry-run)",
        "the paper's scale: a GPU and the TinyStories download",
    ),
    (r"(gpu-run|paper-h200-run)\.sh --prepare", "prepares the GPU run (downloads wheels for the GPU machine's Python)"),
    (
        r"gpu-run\.sh --device cpu",
        "the GPU script's CPU rehearsal: tests/harness/measure/bench/test_gpu_run.py runs it",
    ),
]
# appended to every `kimi-bench run` / `tune` that trains: two steps, one seed, small evals and data
TINY = (
    "--set train.steps=2 --set train.eval_interval=1 --set train.eval_tokens=1024 --set train.log_interval=1"
    " --set matrix.seeds=[0] --set data.max_chars=200000 --set train.infer_new_tokens=4"
    " --set train.infer_batch_sizes=[1]"
)
SHRINK = [(r"--n-trials \d+", "--n-trials 2"), (r"--n-workers \d+", "--n-workers 2")]


@dataclass
class Command:
    doc: str
    text: str  # as documented (continuations joined, comments dropped)
    skip: str | None  # why it does not run here, or None

    def runnable(self, placeholders: dict[str, str]) -> str:
        cmd = self.text
        for pattern, repl in SHRINK:
            cmd = re.sub(pattern, repl, cmd)
        for name, value in placeholders.items():
            cmd = cmd.replace(name, value)
        if re.match(r"kimi-bench (run|tune) ", cmd) and "--dry-run" not in cmd:
            cmd = f"{cmd} {TINY}"
        return cmd


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)


def commands_of(block: str) -> list[str]:
    """One command per logical line, `a && b` split in two, comments dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        out += [part.strip() for part in line.split(" && ") if part.strip()]
    return out


def why_skipped(command: str) -> str | None:
    return next((why for pattern, why in SKIP if re.search(pattern, command)), None)


def documented_commands() -> dict[str, list[Command]]:
    out = {}
    for doc in docs():
        name = str(doc.relative_to(REPO))
        cmds = [Command(name, c, why_skipped(c)) for block in bash_blocks(doc.read_text()) for c in commands_of(block)]
        if cmds:
            out[name] = cmds
    return out


def test_commands_split_and_skip_as_documented():
    block = (
        "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && kimi-bench run --matrix m.toml\n"
        "kimi-bench tune --matrix t.toml --n-workers 4 \\\n    --n-trials 8   # two lines\n"
        "mlflow ui --backend-store-uri sqlite:///mlflow.db     # then open it\n"
    )
    cmds = commands_of(block)
    assert cmds == [
        "python3 -m venv .venv",
        ". .venv/bin/activate",
        "pip install -e .",
        "kimi-bench run --matrix m.toml",
        "kimi-bench tune --matrix t.toml --n-workers 4 --n-trials 8",
        "mlflow ui --backend-store-uri sqlite:///mlflow.db",
    ]
    assert [why_skipped(c) is None for c in cmds] == [False, False, False, True, True, False]
    tune = Command("x", cmds[4], None).runnable({})
    assert tune == f"kimi-bench tune --matrix t.toml --n-workers 2 --n-trials 2 {TINY}"
    assert Command("x", "kimi-bench run --matrix m.toml --dry-run", None).runnable({}).endswith("--dry-run")


def test_every_skip_rule_is_used_and_readme_paths_are_run():
    """No stale rule (each skips a documented command), and README's main paths are not skipped."""
    commands = [c for cmds in documented_commands().values() for c in cmds]
    for pattern, why in SKIP:
        assert any(re.search(pattern, c.text) for c in commands), f"unused skip rule {pattern!r} ({why})"
    run = {c.text for c in commands if c.skip is None}
    for wanted in (
        "kimi-bench run --matrix experiments/smoke.toml",
        "kimi-bench report --experiment smoke",
        "kimi-bench tune --matrix experiments/tune-smoke.toml --n-trials 4",
        "kimi-bench run --matrix experiments/tune-smoke.toml --tuned",
        "kimi-bench report --experiment tune-smoke",
    ):
        assert wanted in run, wanted


def _kimi_trial_run_id(workdir: Path) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs(
        [exp.experiment_id],
        "tags.`kb.kind` = 'trial' and tags.`kb.status` = 'finished' and params.variant = 'kimi'",
        max_results=1,
    )
    assert runs, "no finished kimi trial in the smoke experiment to export"
    return runs[0].info.run_id


def _run_in(workdir: Path, command: str, env: dict[str, str], timeout: float = 480) -> None:
    try:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", command],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(f"ran past {timeout}s: {command}") from None
    assert done.returncode == 0, f"{command}\nrc={done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-4000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("doc", sorted(d for d, cmds in documented_commands().items() if any(not c.skip for c in cmds)))
def test_documented_commands_run(doc, tmp_path):
    shutil.copytree(REPO / "experiments", tmp_path / "experiments")
    env = child_env(
        {
            "PYTHONPATH": str(REPO),
            "KIMI_BENCH_CACHE": str(tmp_path / "cache"),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )
    env.pop("PYTHONHOME", None)
    for cmd in documented_commands()[doc]:
        if cmd.skip:
            continue
        placeholders = {"<trial run id>": _kimi_trial_run_id(tmp_path)} if "<trial run id>" in cmd.text else {}
        _run_in(tmp_path, cmd.runnable(placeholders), env)
