"""`kimi-bench status`: every trial's state from MLflow, and with a matrix also the trials never started.

It must answer in a few seconds, so it imports neither torch nor the matrix validator on its fast path (nor
MLflow: a local sqlite store is read with sqlite3, a tracking server through its REST API with urllib): the
planned trial names come from the TOML's [matrix] table directly (presets x arms x seeds, the order of
harness.matrix.Matrix.expand). A file the fast path cannot read goes through harness.matrix.load_matrix for
its one-line error.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import tomllib
from rich.table import Table

from harness import schema
from harness.errors import UserError

ENDED = schema.TERMINAL


@dataclass(frozen=True)
class TrialState:
    name: str
    status: str  # finished | running | killed | failed | diverged | oom | pruned | pending
    step: str  # last logged step ("" when none)
    elapsed_s: float | None
    val_ppl: float | None
    run_id: str
    trial_key: str


def planned_trials(path: Path) -> tuple[str, list[str]]:
    """(experiment name, trial names in run order) of a matrix file, without validating it in full."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        m = raw["matrix"]
        arms = [(a["variant"], a["optimizer"]) for a in m.get("arms", [])] or list(
            itertools.product(m["variants"], m["optimizers"]))
        names = [f"{v}+{o} {p} s{s}" for p in m.get("presets", ["tiny"]) for (v, o), s in
                 itertools.product(arms, m.get("seeds", [0])) for _ in (m.get("data_seeds") or [None])]
        return str(raw["name"]), list(dict.fromkeys(names))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError):
        from harness.matrix import load_matrix

        load_matrix(path)  # raises the one-line error that names the problem
        raise UserError(f"--matrix {path}: cannot list its trials; check its [matrix] table") from None


@dataclass
class RunRecord:
    """The few fields of an MLflow trial run that status shows."""

    name: str
    run_id: str
    start_ms: int | None
    end_ms: int | None
    tags: dict[str, str]
    metrics: dict[str, float]
    last_step: int | None  # the highest step of train/loss or val/loss


PROGRESS_KEYS = (schema.TRAIN_LOSS, schema.VAL_LOSS)  # a run's last logged step: the highest step of these


def _last_step(key_steps) -> int | None:
    """The highest step among (key, step) pairs of PROGRESS_KEYS; None when there is none."""
    return max((step for key, step in key_steps if key in PROGRESS_KEYS), default=None)


def _sqlite_records(db: Path, experiment: str, kind: str = schema.KIND_TRIAL) -> list[RunRecord] | None:
    """Trial runs read straight from a local MLflow sqlite store (read-only; MLflow's import alone takes
    seconds). None: no such experiment. Raises sqlite3.Error on a schema this reader does not know."""
    import sqlite3

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        row = con.execute("SELECT experiment_id FROM experiments WHERE name = ? AND lifecycle_stage = 'active'",
                          (experiment,)).fetchone()
        if row is None:
            return None
        runs = con.execute(
            "SELECT r.run_uuid, r.name, r.start_time, r.end_time FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "AND t.key = ? AND t.value = ? WHERE r.experiment_id = ? AND r.lifecycle_stage = 'active' "
            "ORDER BY r.start_time DESC", (schema.KIND, kind, row[0])).fetchall()
        records = []
        for run_id, name, start, end in runs:
            tags = dict(con.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (run_id,)))
            latest = con.execute("SELECT key, value, step FROM latest_metrics WHERE run_uuid = ?",
                                 (run_id,)).fetchall()
            records.append(RunRecord(name, run_id, start, end, tags, {k: v for k, v, _ in latest},
                                     _last_step((key, step) for key, _, step in latest)))
    return records


class _RestUnsupported(Exception):
    """The stdlib REST reader does not handle this server or answer: ask MLflow's client instead."""


def _rest_records(uri: str, experiment: str, timeout_s: float = 10.0, kind: str = schema.KIND_TRIAL
                  ) -> list[RunRecord] | None:
    """Trial runs read from a tracking server through MLflow's documented REST API (/api/2.0/mlflow), with the
    standard library: importing MLflow alone takes ~3 s. The search answer holds each run's latest metrics with
    their steps, so no request per run follows. None: no such experiment. Raises _RestUnsupported on anything
    it does not handle (credentials in the URI, TLS client settings, an unexpected answer)."""
    import base64
    import json
    import os
    import urllib.error
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(uri)
    tls_env = ("MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_CLIENT_CERT_PATH")
    if parts.username or parts.password or any(os.environ.get(k) for k in tls_env):
        raise _RestUnsupported(uri)
    headers = {"Content-Type": "application/json"}
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    elif user and password:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    base = uri.rstrip("/") + "/api/2.0/mlflow/"

    def call(endpoint: str, body: dict | None = None, query: dict | None = None) -> dict:
        url = base + endpoint + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            if e.code == 404 and "RESOURCE_DOES_NOT_EXIST" in e.read().decode(errors="replace"):
                return {}
            raise _RestUnsupported(f"{endpoint}: HTTP {e.code}") from None
        except (OSError, ValueError) as e:
            raise _RestUnsupported(f"{endpoint}: {e}") from None

    exp = call("experiments/get-by-name", query={"experiment_name": experiment}).get("experiment")
    if not exp or exp.get("lifecycle_stage", "active") != "active":
        return None
    records, token_ = [], None
    while True:
        body = {"experiment_ids": [exp["experiment_id"]], "max_results": 1000,
                "filter": f"tags.`{schema.KIND}` = '{kind}'", "order_by": ["attributes.start_time DESC"]}
        if token_:
            body["page_token"] = token_
        page = call("runs/search", body)
        for run in page.get("runs", []):
            info, data = run["info"], run.get("data", {})
            tags = {t["key"]: t.get("value", "") for t in data.get("tags", [])}
            metrics = data.get("metrics", [])
            start, end = info.get("start_time"), info.get("end_time")
            records.append(RunRecord(info.get("run_name", tags.get(schema.TAG_RUN_NAME, "")), info["run_id"],
                                     int(start) if start else None, int(end) if end else None, tags,
                                     {m["key"]: float(m["value"]) for m in metrics},
                                     _last_step((m["key"], int(m.get("step", 0))) for m in metrics)))
        token_ = page.get("next_page_token")
        if not token_:
            return records


def _client_records(client, experiment_id: str, kind: str = schema.KIND_TRIAL) -> list[RunRecord]:
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{schema.KIND}` = '{kind}'",
                              max_results=10000, order_by=["attributes.start_time DESC"])
    records = []
    for r in runs:
        last = None
        if schema.TAG_FINAL_STEP not in r.data.tags:  # still running or killed: ask for its last logged step
            last = _last_step((key, m.step) for key in PROGRESS_KEYS
                              for m in client.get_metric_history(r.info.run_id, key))
        records.append(RunRecord(r.info.run_name, r.info.run_id, r.info.start_time, r.info.end_time,
                                 r.data.tags, r.data.metrics, last))
    return records


def trial_states(records: list[RunRecord], planned: list[str] | None = None) -> list[TrialState]:
    """One row per trial: the newest run of each trial name (an ended one first); planned names without a
    run are `pending`. `records` are newest first."""
    by_name: dict[str, RunRecord] = {}
    for r in records:
        best = by_name.get(r.name)
        if best is None or (r.tags.get(schema.TAG_STATUS) in ENDED and best.tags.get(schema.TAG_STATUS) not in ENDED):
            by_name[r.name] = r
    names = list(planned) if planned is not None else sorted(by_name)
    names += [n for n in sorted(by_name) if n not in names] if planned is not None else []
    out = []
    for name in names:
        r = by_name.get(name)
        if r is None:
            out.append(TrialState(name, "pending", "", None, None, "", ""))
            continue
        step = r.tags.get(schema.TAG_FINAL_STEP, "" if r.last_step is None else str(r.last_step))
        elapsed = ((r.end_ms or time.time() * 1000) - r.start_ms) / 1000 if r.start_ms else None
        out.append(TrialState(name, r.tags.get(schema.TAG_STATUS, "?"), step, elapsed,
                              r.metrics.get(schema.VAL_PPL_FINAL), r.run_id, r.tags.get(schema.TAG_TRIAL_KEY, "")))
    return out


def _records(experiment: str, tracking_uri: str | None, kind: str = schema.KIND_TRIAL
             ) -> tuple[list[RunRecord] | None, list[str]]:
    """-> (the experiment's trial runs, or None when it does not exist; the names of all experiments)."""
    from harness.tracking import resolve_tracking_uri, strip_credentials

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_file():
            raise UserError(f"--tracking-uri: no MLflow store at {db}; run a matrix first or pass the store of one")
        import sqlite3

        try:
            records = _sqlite_records(db, experiment, kind)
            if records is not None:
                return records, []
        except sqlite3.Error:
            pass  # an unknown schema: ask MLflow itself
    if uri.startswith(("http://", "https://")):
        try:
            records = _rest_records(uri, experiment, kind=kind)
            if records is not None:
                return records, []
        except _RestUnsupported:
            pass  # MLflow's client handles it (and words any error)
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
    except Exception as e:
        from harness.tracking import first_line

        raise UserError(f"--tracking-uri {strip_credentials(uri)}: cannot reach the tracking store "
                        f"({first_line(e)}); start the server or fix the URI") from None
    if exp is None:
        return None, [e.name for e in client.search_experiments()]
    return _client_records(client, exp.experiment_id, kind), []


def _fmt_elapsed(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def status_table(experiment: str | None, matrix: Path | None, tracking_uri: str | None) -> Table:
    """The status command: --experiment NAME (its runs) or --matrix FILE (every planned trial, pending too)."""
    if (experiment is None) == (matrix is None):
        raise UserError("--experiment / --matrix: give one of them (the matrix also lists trials not started)")
    planned = None
    if matrix is not None:
        if not matrix.is_file():
            raise UserError(f"--matrix: no file at {matrix}; pass a TOML file such as experiments/smoke.toml")
        experiment, planned = planned_trials(matrix)
    records, existing = _records(experiment, tracking_uri)
    if records is None and planned is None:
        raise UserError(f"--experiment: no experiment {experiment!r}; existing: {', '.join(existing) or 'none'}")
    states = trial_states(records or [], planned)
    counts = {s: sum(t.status == s for t in states) for s in dict.fromkeys(t.status for t in states)}
    title = f"{experiment}: {len(states)} trials (" + ", ".join(f"{n} {s}" for s, n in counts.items()) + ")"
    table = Table(title=title, header_style="bold")
    for col in ("trial", "status", "step", "elapsed", "val ppl", "run id", "trial key"):
        table.add_column(col, justify="right" if col in ("step", "elapsed", "val ppl") else "left")
    for t in states:
        table.add_row(t.name, t.status, t.step, _fmt_elapsed(t.elapsed_s), f"{t.val_ppl:.3f}" if t.val_ppl else "",
                      t.run_id[:12], t.trial_key)
    if records is not None:  # the experiment's Optuna studies (kimi-bench tune, or a matrix's [tune] section)
        from harness.tune_status import tuning_caption

        table.caption = tuning_caption(_records(experiment, tracking_uri, schema.KIND_TUNE_TRIAL)[0] or [], matrix)
    return table
