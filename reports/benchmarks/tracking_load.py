"""Many writers at once: N processes logging through kimi-bench's own tracking path (Tracker.start_trial,
TrialRun.log / flush / end, exactly what a trial calls), against a local sqlite store and an MLflow server on
PostgreSQL. Not a test: a measurement whose table is committed (tracking_load.md).

    python reports/benchmarks/tracking_load.py --writers 4,16,64 --stores sqlite,server \
        --out reports/benchmarks/tracking_load.md

Two patterns per writer, both with the trial loop's three step metrics (train/loss, grad/norm, train/lr):
- cadence: one step every STEP_S seconds (a tiny CPU trial's pace), the buffer flushed as a trial flushes it
  (every 500 values or 10 s, handed to MLflow's async queue) and a waited flush every CHECKPOINT steps (what a
  checkpoint does);
- burst: no pause, a waited flush every 10 steps (the worst a trial can do: eval-heavy, tiny budget).
Per case: values sent vs stored (read back per run and key: the step sets must be equal, nothing lost or
doubled), p50/p99 of one TrialRun.log call and of one waited flush, writers that failed, and the HTTP
retries MLflow's client made (urllib3's "Retrying" warnings) or sqlite lock errors it raised.
The PostgreSQL server is the throwaway one of the tests (tests/postgres.py: initdb + pg_ctl, loopback).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

KEYS = ("train/loss", "grad/norm", "train/lr")
STEP_S = 0.05
CHECKPOINT = 50


class RetryCounter(logging.Handler):
    """Counts urllib3's retry warnings (MLflow's HTTP client retries through urllib3's Retry)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "Retrying" in record.getMessage():
            self.count += 1


def _value(writer: int, step: int, k: int) -> float:
    return 10.0 / (1 + step) + writer * 1e-3 + k


def writer(uri: str, experiment_id: str, index: int, steps: int, mode: str, queue) -> None:
    """One writer process: a trial run, `steps` steps of KEYS, then end. Reports its timings to `queue`."""
    from harness.stores.tracking import Tracker

    retries = RetryCounter()
    logging.getLogger("urllib3").addHandler(retries)
    log_s, flush_s, error = [], [], ""
    run_id = ""
    try:
        tracker = Tracker(uri)
        run = tracker.start_trial(
            experiment_id, None, f"w{index}", {"kb.trial_key": f"load-{index}"}, {"writer": index}, system_metrics=False
        )
        run_id = run.run_id
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            run.log(step, {k: _value(index, step, i) for i, k in enumerate(KEYS)})
            log_s.append(time.perf_counter() - t0)
            if (mode == "burst" and step % 10 == 0) or (mode == "cadence" and step % CHECKPOINT == 0):
                t0 = time.perf_counter()
                run.flush()
                flush_s.append(time.perf_counter() - t0)
            if mode == "cadence":
                time.sleep(STEP_S)
        run.end("finished")
    except Exception as e:  # counted, never hidden: a lost writer is a finding
        text = str(e)
        error = "database is locked" if "database is locked" in text else f"{type(e).__name__}: {text[:80]}"
    queue.put(
        {"index": index, "run_id": run_id, "log_s": log_s, "flush_s": flush_s, "error": error, "retries": retries.count}
    )


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run_case(uri: str, n: int, steps: int, mode: str) -> dict:
    from mlflow import MlflowClient

    from harness.stores.tracking import Tracker

    name = f"load-{mode}-{n}-{time.time_ns()}"
    exp = Tracker(uri).ensure_experiment(name)
    ctx = mp.get_context("fork")  # mlflow and harness are imported once, here
    queue = ctx.Queue()
    procs = [ctx.Process(target=writer, args=(uri, exp, i, steps, mode, queue)) for i in range(n)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    results = [queue.get(timeout=900) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    wall = time.perf_counter() - t0
    client = MlflowClient(uri)
    stored, wrong = 0, 0
    for r in results:
        if not r["run_id"]:
            continue
        for k in KEYS:
            hist = client.get_metric_history(r["run_id"], k)
            stored += len(hist)
            expected = {(s, _value(r["index"], s, KEYS.index(k))) for s in range(1, steps + 1)}
            wrong += len({(m.step, m.value) for m in hist} ^ expected) + (len(hist) - len({m.step for m in hist}))
    logs = [x for r in results for x in r["log_s"]]
    flushes = [x for r in results for x in r["flush_s"]]
    errors = [r["error"] for r in results if r["error"]]
    return {
        "writers": n,
        "mode": mode,
        "sent": n * steps * len(KEYS),
        "stored": stored,
        "mismatched": wrong,
        "log_p50_ms": 1e3 * _pct(logs, 0.5),
        "log_p99_ms": 1e3 * _pct(logs, 0.99),
        "flush_p50_ms": 1e3 * _pct(flushes, 0.5),
        "flush_p99_ms": 1e3 * _pct(flushes, 0.99),
        "failed_writers": len(errors),
        "retries": sum(r["retries"] for r in results),
        "first_error": errors[0] if errors else "",
        "wall_s": wall,
    }


@contextlib.contextmanager
def server_on_postgres(work: Path, workers: int):
    from tests import postgres
    from tests.helpers import BIN, free_port, kill_group, wait_http

    with postgres.postgres_server("mlflow") as pg:
        port = free_port()
        log = work / "server.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    str(BIN / "mlflow"),
                    "server",
                    "--backend-store-uri",
                    pg.url("mlflow"),
                    "--artifacts-destination",
                    str(work / "artifacts"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--workers",
                    str(workers),
                ],
                cwd=work,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"},
            )
        try:
            wait_http(f"http://127.0.0.1:{port}/health", 150, proc, log)
            yield f"http://127.0.0.1:{port}"
        finally:
            kill_group(proc)


def table(rows: list[dict], header: str) -> str:
    cols = (
        "store",
        "writers",
        "mode",
        "sent",
        "stored",
        "mismatched",
        "log p50 ms",
        "log p99 ms",
        "flush p50 ms",
        "flush p99 ms",
        "failed writers",
        "HTTP retries",
        "wall s",
        "first error",
    )
    out = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append(
            f"| {r['store']} | {r['writers']} | {r['mode']} | {r['sent']} | {r['stored']} | {r['mismatched']} "
            f"| {r['log_p50_ms']:.3f} | {r['log_p99_ms']:.2f} | {r['flush_p50_ms']:.1f} | "
            f"{r['flush_p99_ms']:.1f} | {r['failed_writers']} | {r['retries']} | {r['wall_s']:.0f} | "
            f"{r['first_error'].replace('|', '/')} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--writers", default="4,16,64")
    ap.add_argument("--stores", default="sqlite,server")
    ap.add_argument("--modes", default="cadence,burst")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--server-workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="append the table to this markdown file")
    args = ap.parse_args()
    out = args.out.resolve() if args.out else None  # before the chdir below
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    work = Path(tempfile.mkdtemp(prefix="kbload-", dir="/tmp"))
    os.chmod(work, 0o755)
    os.chdir(work)  # a sqlite store's artifacts go to ./mlruns
    rows = []
    try:
        for store in args.stores.split(","):
            cm = (
                server_on_postgres(work, args.server_workers)
                if store == "server"
                else contextlib.nullcontext(f"sqlite:///{work / 'mlflow.db'}")
            )
            with cm as uri:
                for n in (int(x) for x in args.writers.split(",")):
                    for mode in args.modes.split(","):
                        row = {
                            "store": "MLflow server on PostgreSQL" if store == "server" else "local sqlite",
                            **run_case(uri, n, args.steps, mode),
                        }
                        rows.append(row)
                        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    header = (
        f"### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {os.cpu_count()} CPU cores, "
        f"{args.steps} steps x {len(KEYS)} metrics per writer; cadence = a step every {STEP_S * 1e3:.0f} ms "
        f"and a waited flush every {CHECKPOINT} steps, burst = no pause and a waited flush every 10 steps; "
        f"server: `mlflow server --workers {args.server_workers}` on PostgreSQL 15"
    )
    text = table(rows, header)
    print(text)
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write("\n" + text)
    print(f"median wall per case: {statistics.median(r['wall_s'] for r in rows):.0f} s")


if __name__ == "__main__":
    main()
