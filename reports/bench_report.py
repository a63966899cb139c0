"""How long `kimi-bench report` takes, and how much memory, on a store shaped like a big matrix.

Builds a real MLflow sqlite store of RUNS trial runs x STEPS logged steps (runs, tags, params and final metrics
through MlflowClient; the step metrics bulk-inserted into its `metrics` table with plain SQL, which is what
MLflow's own SQL store holds), then times `kimi-bench report` in a fresh process on the sqlite URI and on a real
`mlflow server` bound to 127.0.0.1 over the same database, and prints seconds (median and range over --repeats
fresh processes) and peak memory (max RSS); `kimi-bench status` likewise.
Each run also gets the curves artifact a real trial logs at its end (harness/stores/curves.py); `--no-artifacts` leaves
it out, so the report reads every curve from MLflow's metric history (runs logged by an older version).

    python -m reports.bench_report                       # 128 runs x 20,000 steps (target: < 60 s, < 1 GB)
    python -m reports.bench_report --runs 8 --steps 500  # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from harness import schema as S
from harness.stores.curves import CURVE_KEYS, write_curves

EXPERIMENT = "bench-report"
T0 = 1_760_000_000_000
STEP_KEYS = (S.TRAIN_LOSS, S.GRAD_NORM, S.TRAIN_LR, S.TRAIN_TOKENS, S.TRAIN_ELAPSED, S.TRAIN_TOKENS_PER_S)
EVAL_EVERY = 100
TOKENS_PER_STEP = 8192
TARGET_S, TARGET_BYTES = 60.0, 1e9
STATUS_TARGET_S = 3.0

# the measured process: one kimi-bench command in-process (imports included), then its own wall time and peak RSS
# as one JSON line
_MEASURE = """
import json, resource, sys, time
t = time.perf_counter()
from cli import app
try:
    app(sys.argv[1:])
except SystemExit as e:
    if e.code:
        raise
print("BENCH " + json.dumps({"seconds": time.perf_counter() - t,
                             "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _arms(n_runs: int) -> list[tuple[str, str, int]]:
    """(variant, optimizer, seed) for n_runs trials: gpt/kimi x adamw/muon, seeds 0.. as many as needed."""
    arms = [("gpt", "adamw"), ("gpt", "muon"), ("kimi", "adamw"), ("kimi", "muon")]
    return [(*arms[i % len(arms)], i // len(arms)) for i in range(n_runs)]


def build_store(
    root: Path, n_runs: int, n_steps: int, progress: bool = True, analyze: bool = True, artifacts: bool = True
) -> str:
    """A sqlite MLflow store at root/mlflow.db with one matrix run and n_runs finished trials."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient
    from rich.progress import Progress

    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    parent = client.create_run(exp, start_time=T0, tags={S.KIND: S.KIND_MATRIX, S.TAG_COMMAND: "bench_report"})
    steps = np.arange(n_steps, dtype=np.int64)
    rng = np.random.default_rng(0)
    with Progress(disable=not progress) as bar:
        task = bar.add_task("runs (MLflow client)", total=n_runs)
        run_ids = []
        for i, (variant, opt, seed) in enumerate(_arms(n_runs)):
            arm = f"{variant}+{opt}"
            start = T0 + 1000 * (i + 1)
            run = client.create_run(
                exp,
                start_time=start,
                run_name=f"{arm}-s{seed}",
                tags={
                    S.KIND: S.KIND_TRIAL,
                    S.TAG_PARENT: parent.info.run_id,
                    S.TAG_ARM: arm,
                    S.TAG_VARIANT: variant,
                    S.TAG_OPTIMIZER: opt,
                    S.TAG_PRESET: "tiny",
                    S.TAG_SEED: str(seed),
                    S.TAG_STATUS: S.FINISHED,
                    S.TAG_TRIAL_KEY: f"{arm}-{seed}",
                    S.TAG_GIT: "bench",
                    S.TAG_DEVICE: "cpu",
                    S.TAG_DATA_HASH: "bench",
                    S.TAG_SHAPE: variant,
                    S.TAG_FINAL_STEP: str(n_steps - 1),
                },
            )
            final = 2.0 + (0.1 if variant == "gpt" else 0.0) + (0.05 if opt == "adamw" else 0.0) + 0.01 * seed % 0.05
            finals = {
                S.VAL_LOSS_FINAL: final,
                S.VAL_PPL_FINAL: math.exp(final),
                S.VAL_BPB: final / math.log(2) / 4,
                S.PARAMS_TOTAL: 1.6e5,
                S.PARAMS_ACTIVE: 1.2e5 if variant == "kimi" else 1.6e5,
                S.CKPT_BYTES: 7e5,
                S.FLOPS_PER_TOKEN: 1e6,
                S.TRAIN_TOKENS_PER_S: 5e3,
                S.TRAIN_TOKENS: float(n_steps * TOKENS_PER_STEP),
                S.GRAD_NORM_CV: 0.3,
                S.GRAD_NORM_P99_OVER_MEDIAN: 2.0,
                S.MEM_PARAM: 6.4e5,
            }
            evals = [s for s in range(0, n_steps, EVAL_EVERY)] + [n_steps - 1]
            val = [Metric(S.VAL_LOSS, final + 3.0 * math.exp(-s / (n_steps / 5)), start + s, s) for s in evals]
            client.log_batch(
                run.info.run_id,
                metrics=[Metric(k, v, start + n_steps, n_steps - 1) for k, v in finals.items()] + val,
                params=[
                    Param("seed", str(seed)),
                    Param("variant", variant),
                    Param("optimizer", opt),
                    Param("train.steps", str(n_steps)),
                    Param("model.dim", "64"),
                    Param("optim.lr", "0.003"),
                ],
                tags=[RunTag("bench", "1")],
            )
            client.set_terminated(run.info.run_id, "FINISHED", end_time=start + n_steps)
            run_ids.append((run.info.run_id, start, final, val))
            bar.advance(task)
        client.set_terminated(parent.info.run_id, "FINISHED")
        con = sqlite3.connect(root / "mlflow.db")
        con.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;")
        task = bar.add_task("step metrics (bulk SQL)", total=n_runs)
        curves_dir = root / "curves"
        curves_dir.mkdir(exist_ok=True)
        for rid, start, final, val in run_ids:
            loss = final + 3.0 * np.exp(-steps / (n_steps / 5)) + 0.05 * rng.standard_normal(n_steps)
            cols = {
                S.TRAIN_LOSS: loss,
                S.GRAD_NORM: 0.5 + 0.1 * rng.standard_normal(n_steps) ** 2,
                S.TRAIN_LR: np.full(n_steps, 3e-3),
                S.TRAIN_TOKENS: (steps + 1.0) * TOKENS_PER_STEP,
                S.TRAIN_ELAPSED: (steps + 1.0) * 0.2,
                S.TRAIN_TOKENS_PER_S: np.full(n_steps, 5e3),
            }
            ts = start + steps
            rows = (
                (key, float(v), int(t), rid, int(s), 0)
                for key in STEP_KEYS
                for v, t, s in zip(cols[key], ts, steps, strict=True)
            )
            con.executemany(
                "INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) VALUES (?, ?, ?, ?, ?, ?)", rows
            )
            con.executemany(
                "INSERT OR REPLACE INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid) "
                "VALUES (?, ?, ?, ?, 0, ?)",
                [(k, float(cols[k][-1]), int(ts[-1]), n_steps - 1, rid) for k in STEP_KEYS],
            )
            con.commit()
            if artifacts:  # what the trial logs at its end: the same values, thinned (harness/stores/curves.py)
                history = {
                    key: list(zip(steps.tolist(), cols[key].tolist(), strict=True)) for key in CURVE_KEYS if key in cols
                }
                history[S.VAL_LOSS] = [(m.step, m.value) for m in val]
                path = write_curves(curves_dir / S.ARTIFACT_CURVES, history)
                client.log_artifact(rid, str(path))
                client.set_tag(rid, S.TAG_CURVES, S.ARTIFACT_CURVES)
            bar.advance(task)
        if analyze:
            # sqlite keeps no statistics until ANALYZE; without them it plans MLflow's bulk-interval sampler (the
            # server's) on the primary key (key first) and scans every run's rows of that key: ~2 s per run and
            # key here. Postgres and MySQL keep statistics themselves. The reports' own SQL path does not need it.
            con.execute("ANALYZE")
            con.commit()
        con.close()
    return uri


def measure(args: list[str], cwd: Path) -> dict:
    """One `kimi-bench` command in a fresh process: {"seconds", "max_rss_bytes"}."""
    env = {**os.environ, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "PYTHONPATH": str(cwd)}
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=3600
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(line[len("BENCH ") :])


def measure_report(uri: str, out: Path, cwd: Path) -> dict:
    return measure(["report", "--experiment", EXPERIMENT, "--tracking-uri", uri, "--out", str(out), "--no-log"], cwd)


def measure_status(uri: str, cwd: Path) -> dict:
    return measure(["status", "--experiment", EXPERIMENT, "--tracking-uri", uri], cwd)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, db_uri: str, timeout_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` on 127.0.0.1 over the same database; waits (bounded) until /health answers."""
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        db_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--default-artifact-root",
        (root / "artifacts").as_uri(),
    ]
    log = open(root / "server.log", "w")  # noqa: SIM115 - kept open for the server's lifetime
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"mlflow server did not answer within {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    """Stop the server and its uvicorn worker: the process group it was started in (start_new_session)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=30)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--dir", type=Path, default=None, help="where the store goes (default: a temp folder)")
    ap.add_argument("--no-server", action="store_true", help="sqlite only")
    ap.add_argument(
        "--no-analyze",
        action="store_true",
        help="leave the sqlite store without statistics "
        "(as MLflow leaves it: the server's bulk-interval sampler then scans whole keys)",
    )
    ap.add_argument("--reuse", action="store_true", help="reuse the store already in --dir")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per measured command (median, range)")
    ap.add_argument(
        "--no-artifacts",
        action="store_true",
        help="no curves artifacts: the report reads every curve from the metric history",
    )
    args = ap.parse_args(argv)
    repo = Path(__file__).resolve().parents[1]
    root = args.dir or Path(tempfile.mkdtemp(prefix="kb-bench-report-"))
    root.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    db = root / "mlflow.db"
    if args.reuse and db.exists():
        uri = f"sqlite:///{db}"
    else:
        db.unlink(missing_ok=True)
        uri = build_store(root, args.runs, args.steps, analyze=not args.no_analyze, artifacts=not args.no_artifacts)
    n_rows = args.runs * args.steps * len(STEP_KEYS)
    print(
        f"store: {args.runs} runs x {args.steps:,} steps x {len(STEP_KEYS)} keys = {n_rows:,} metric rows, "
        f"{db.stat().st_size / 1e9:.2f} GB, ready in {time.perf_counter() - t:.0f} s ({root}"
        f"{', reused' if args.reuse else ''}{', not analyzed' if args.no_analyze else ', ANALYZEd'}"
        f", {_tagged_runs(db)} of {args.runs} runs with a curves artifact)"
    )
    ok = _measure_and_print("sqlite", uri, root, repo, args.repeats)
    if not args.no_server:
        proc, url = start_server(root, uri)
        try:
            ok &= _measure_and_print("server", url, root, repo, args.repeats)
        finally:
            stop_server(proc)
    return 0 if ok else 1


def _tagged_runs(db: Path) -> int:
    """Runs of the store tagged kb.curves (a --reuse'd store says what it holds, not what the flags say)."""
    with sqlite3.connect(db) as con:
        return con.execute("SELECT COUNT(*) FROM tags WHERE key = ?", (S.TAG_CURVES,)).fetchone()[0]


def _measure_and_print(where: str, uri: str, root: Path, repo: Path, repeats: int) -> bool:
    """Time `report` and `status` on one URI, `repeats` fresh processes each, alternating; print the median and
    range of each as it is measured; -> both medians within their targets."""
    reports, statuses = [], []
    for _ in range(repeats):
        reports.append(measure_report(uri, root / f"out-{where}", repo))
        statuses.append(measure_status(uri, repo))
    secs, rss = [r["seconds"] for r in reports], max(r["max_rss_bytes"] for r in reports)
    med = statistics.median(secs)
    report_met = med < TARGET_S and rss < TARGET_BYTES
    print(
        f"report on {where:6s}: median {med:6.1f} s (range {min(secs):.1f}-{max(secs):.1f}, n={repeats}), "
        f"peak memory {rss / 1e9:.2f} GB (target < {TARGET_S:.0f} s and < {TARGET_BYTES / 1e9:.0f} GB: "
        f"{'met' if report_met else 'NOT met'})",
        flush=True,
    )
    st = [r["seconds"] for r in statuses]
    st_med = statistics.median(st)
    status_met = st_med < STATUS_TARGET_S
    print(
        f"status on {where:6s}: median {st_med:6.1f} s (range {min(st):.1f}-{max(st):.1f}, n={repeats}) "
        f"(target < {STATUS_TARGET_S:.0f} s: {'met' if status_met else 'NOT met'})",
        flush=True,
    )
    return report_met and status_met


if __name__ == "__main__":
    sys.exit(main())
