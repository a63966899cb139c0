"""Shared helpers for the end-to-end tests: tiny matrix files, the CLI in a subprocess, local servers.

Everything here is sized for 2 shared CPU cores: the tiny preset, a few steps, a 200 kB corpus slice,
single-threaded torch in each child process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.reaper import die_with_parent

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's scripts: kimi-bench, mlflow

# Small enough to train in seconds; `eval_tokens` 2048 and `max_chars` 200_000 keep eval and data prep cheap.
TINY_TRAIN: dict[str, Any] = {
    "steps": 20,
    "micro_batch_size": 4,
    "eval_interval": 10,
    "eval_tokens": 2048,
    "log_interval": 5,
    "infer_new_tokens": 4,
    "infer_batch_sizes": [1],
}
TINY_DATA: dict[str, Any] = {"corpus": "python-stdlib", "tokenizer": "byte", "max_chars": 200_000}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def _table(name: str, fields: dict[str, Any]) -> str:
    return f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in fields.items())


def matrix_text(
    name: str,
    *,
    variants: Sequence[str] = ("gpt",),
    optimizers: Sequence[str] = ("adamw",),
    seeds: Sequence[int] = (0,),
    train: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    optim: dict[str, dict[str, Any]] | None = None,
) -> str:
    """TOML of a tiny matrix; `train` / `data` entries override TINY_TRAIN / TINY_DATA (None removes one)."""
    train_fields = {k: v for k, v in {**TINY_TRAIN, **(train or {})}.items() if v is not None}
    data_fields = {k: v for k, v in {**TINY_DATA, **(data or {})}.items() if v is not None}
    matrix = {"presets": ["tiny"], "variants": list(variants), "optimizers": list(optimizers), "seeds": list(seeds)}
    parts = [
        f"name = {_toml_value(name)}\n",
        _table("data", data_fields),
        _table("train", train_fields),
        _table("matrix", matrix),
    ]
    for opt, fields in (optim or {}).items():
        parts.append(_table(f"optim.{opt}", fields))
    return "\n".join(parts)


def write_matrix(path: Path, name: str, **kwargs: Any) -> Path:
    path = Path(path)
    path.write_text(matrix_text(name, **kwargs), encoding="utf-8")
    return path


def child_env(extra: dict[str, str] | None = None, drop: Sequence[str] = ("MLFLOW_TRACKING_URI",)) -> dict:
    """The environment of a CLI child: one torch thread (several children share 2 cores), no inherited
    tracking URI (each test names its store), no colour codes in the captured output."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "NO_COLOR": "1",
            "TERM": "dumb",
            "COLUMNS": "200",
            "PYTHONUNBUFFERED": "1",
            "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
        }
    )
    env.update(extra or {})
    return env


def cli_command(*args: str) -> list[str]:
    script = BIN / "kimi-bench"
    if script.is_file():
        return [str(script), *args]
    return [sys.executable, "-m", "cli", *args]


def run_cli(
    args: Sequence[str], cwd: Path, timeout: float = 240, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`kimi-bench ARGS` in a subprocess; raises with the captured output if it runs past `timeout`."""
    try:
        return subprocess.run(
            cli_command(*args), cwd=cwd, env=env or child_env(), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise AssertionError(f"kimi-bench {' '.join(args)} ran past {timeout}s\n{out[-3000:]}\n{err[-3000:]}") from None


def popen_cli(
    args: Sequence[str], cwd: Path, env: dict[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen:
    """Start `kimi-bench ARGS` in its own process group (so a kill reaches it and nothing else)."""
    with open(log or os.devnull, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            cli_command(*args),
            cwd=cwd,
            env=env or child_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )


def finish(proc: subprocess.Popen, timeout: float) -> int:
    """Wait for a child; kill its group if it runs past `timeout` (then fail)."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise AssertionError(f"{proc.args} ran past {timeout}s") from None


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the process group this test started (start_new_session=True), by its id."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def error_lines(stderr: str) -> list[str]:
    """stderr minus MLflow's INFO/WARNING log lines and blank lines (what a user reads as the error)."""
    return [ln for ln in stderr.splitlines() if ln.strip() and " INFO " not in ln and " WARNING " not in ln]


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Exit code 2, stderr's only message is `kimi-bench: error: ...` (one line), no traceback."""
    lines = error_lines(proc.stderr)
    detail = f"rc={proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 2, detail
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, detail
    assert len(lines) == 1 and lines[0].startswith("kimi-bench: error: "), detail
    for w in words:
        assert w in lines[0], detail
    return lines[0]


def free_port() -> int:
    """A port nobody listens on right now (also what an 'unreachable server' test points at)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll `url` until it answers 200; fail early with the server's log if its process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            text = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
            raise AssertionError(f"server exited with {proc.returncode} before {url} answered\n{text}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    text = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
    raise AssertionError(f"{url} did not answer within {timeout}s\n{text}")


@contextlib.contextmanager
def mlflow_server(
    backend_uri: str, workdir: Path, *, command: str = "server", artifacts: Path | None = None, timeout: float = 150
) -> Iterator[str]:
    """`mlflow server|ui` on 127.0.0.1:<free port>; yields its URL; kills its process group at the end."""
    port = free_port()
    args = [
        str(BIN / "mlflow"),
        command,
        "--backend-store-uri",
        backend_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    if artifacts is not None:
        args += ["--default-artifact-root", str(artifacts)]
    log = workdir / f"mlflow-{command}-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            args,
            cwd=workdir,
            env=child_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", timeout, proc, log)
        yield url
    finally:
        kill_group(proc, signal.SIGTERM)
        if proc.poll() is None:
            kill_group(proc)


def trial_runs(client, experiment: str) -> list:
    """Every run tagged kb.kind=trial in `experiment` (deleted ones included: nothing may hide)."""
    from mlflow.entities import ViewType

    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r}"
    return client.search_runs(
        [exp.experiment_id], filter_string="tags.`kb.kind` = 'trial'", run_view_type=ViewType.ALL, max_results=1000
    )


def metric_steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# Keys the trainer logs both per step/eval and once more as a final value at the last step, so their history
# may hold two points at the last step; every other key must have each step at most once.
FINAL_OVERLAP = {"train/tokens", "train/tokens_per_s", "attn/max_logit", "moe/load_cv", "moe/max_load"}


def duplicate_steps(client, run) -> dict[str, dict[int, int]]:
    """{key: {step: count}} for every metric key with a step logged more than once (system/* excluded),
    ignoring the FINAL_OVERLAP keys' one extra point at the run's last step."""
    from collections import Counter

    last = int(run.data.tags.get("kb.final_step", "-1"))
    out = {}
    for key in run.data.metrics:
        if key.startswith("system/"):
            continue
        counts = Counter(m.step for m in client.get_metric_history(run.info.run_id, key))
        if key in FINAL_OVERLAP and counts.get(last, 0) == 2:
            counts[last] = 1
        dups = {step: n for step, n in counts.items() if n > 1}
        if dups:
            out[key] = dups
    return out
