"""`kimi-bench status`: every trial's state from MLflow, and with a matrix also the trials never started.

It must answer in a few seconds, so it never imports MLflow on its fast path (a local sqlite store is read
with sqlite3, a tracking server through its REST API with urllib), and `--experiment` alone imports no torch.
`--matrix FILE [--set ...]` answers for exactly that configuration: the file is resolved as `run` resolves it
(harness.spec.matrix, which imports torch: about 2 s) and runs are matched by trial key, never by name (a run
with another learning rate has the same name and is another trial).
A RUNNING run whose process is gone is shown `stale`: on this machine its pid (kb.pid) is checked; elsewhere
its heartbeat (kb.heartbeat, renewed with the metric batches) must be younger than STALE_AFTER_S.
"""

from __future__ import annotations

import itertools
import math
import os
import time
import urllib.parse
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
    note: str = ""  # why a running run is stale


@dataclass(frozen=True)
class PlannedTrial:
    """A trial of the matrix: its name and the keys it has under each data hash found in the store."""

    name: str
    keys: frozenset[str]


def planned_by_key(path: Path, sets: list[str], data_hashes: set[str]) -> tuple[str, list[PlannedTrial]]:
    """(experiment, its trials) of the matrix file with its --set overrides, resolved like `run`; each trial's
    keys are computed under every data hash the store's runs carry (the data is never read here)."""
    from harness.plan import vocab_size_for
    from harness.spec.matrix import load_matrix

    spec = load_matrix(path, sets)
    trials = spec.expand(vocab_size_for(spec.data_fields())[0])
    return spec.name, [PlannedTrial(t.name, frozenset(t.key(h) for h in data_hashes)) for t in trials]


def planned_trials(path: Path) -> tuple[str, list[str]]:
    """(experiment name, trial names in run order) of a matrix file, without validating it in full."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        m = raw["matrix"]
        arms = [(a["variant"], a["optimizer"]) for a in m.get("arms", [])] or list(
            itertools.product(m["variants"], m["optimizers"])
        )
        names = [
            f"{v}+{o} {p} s{s}"
            for p in m.get("presets", ["tiny"])
            for (v, o), s in itertools.product(arms, m.get("seeds", [0]))
            for _ in (m.get("data_seeds") or [None])
        ]
        return str(raw["name"]), list(dict.fromkeys(names))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError):
        from harness.spec.matrix import load_matrix

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
        row = con.execute(
            "SELECT experiment_id FROM experiments WHERE name = ? AND lifecycle_stage = 'active'", (experiment,)
        ).fetchone()
        if row is None:
            return None
        runs = con.execute(
            "SELECT r.run_uuid, r.name, r.start_time, r.end_time FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "AND t.key = ? AND t.value = ? WHERE r.experiment_id = ? AND r.lifecycle_stage = 'active' "
            "ORDER BY r.start_time DESC",
            (schema.KIND, kind, row[0]),
        ).fetchall()
        records = []
        for run_id, name, start, end in runs:
            tags = dict(con.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (run_id,)))
            latest = con.execute("SELECT key, value, step FROM latest_metrics WHERE run_uuid = ?", (run_id,)).fetchall()
            records.append(
                RunRecord(
                    name,
                    run_id,
                    start,
                    end,
                    tags,
                    {k: v for k, v, _ in latest},
                    _last_step((key, step) for key, _, step in latest),
                )
            )
    return records


class _RestUnsupported(Exception):
    """The stdlib REST reader does not handle this server or answer: ask MLflow's client instead."""


def _rest_records(
    uri: str, experiment: str, timeout_s: float = 10.0, kind: str = schema.KIND_TRIAL
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
        body = {
            "experiment_ids": [exp["experiment_id"]],
            "max_results": 1000,
            "filter": f"tags.`{schema.KIND}` = '{kind}'",
            "order_by": ["attributes.start_time DESC"],
        }
        if token_:
            body["page_token"] = token_
        page = call("runs/search", body)
        for run in page.get("runs", []):
            info, data = run["info"], run.get("data", {})
            tags = {t["key"]: t.get("value", "") for t in data.get("tags", [])}
            metrics = data.get("metrics", [])
            start, end = info.get("start_time"), info.get("end_time")
            records.append(
                RunRecord(
                    info.get("run_name", tags.get(schema.TAG_RUN_NAME, "")),
                    info["run_id"],
                    int(start) if start else None,
                    int(end) if end else None,
                    tags,
                    {m["key"]: float(m["value"]) for m in metrics},
                    _last_step((m["key"], int(m.get("step", 0))) for m in metrics),
                )
            )
        token_ = page.get("next_page_token")
        if not token_:
            return records


def _client_records(client, experiment_id: str, kind: str = schema.KIND_TRIAL) -> list[RunRecord]:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{schema.KIND}` = '{kind}'",
        max_results=10000,
        order_by=["attributes.start_time DESC"],
    )
    records = []
    for r in runs:
        last = None
        if schema.TAG_FINAL_STEP not in r.data.tags:  # still running or killed: ask for its last logged step
            last = _last_step(
                (key, m.step) for key in PROGRESS_KEYS for m in client.get_metric_history(r.info.run_id, key)
            )
        records.append(
            RunRecord(
                r.info.run_name, r.info.run_id, r.info.start_time, r.info.end_time, r.data.tags, r.data.metrics, last
            )
        )
    return records


def _best(records: list[RunRecord], group) -> dict[str, RunRecord]:
    """The newest run of each group (an ended one first); `records` are newest first."""
    best: dict[str, RunRecord] = {}
    for r in records:
        g = group(r)
        b = best.get(g)
        if b is None or (r.tags.get(schema.TAG_STATUS) in ENDED and b.tags.get(schema.TAG_STATUS) not in ENDED):
            best[g] = r
    return best


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def stale_reason(tags: dict[str, str], now: float | None = None, host: str | None = None) -> str:
    """Why a run tagged running is not running any more ("" when it may well be): its process is gone (same
    machine), or its heartbeat is older than STALE_AFTER_S. Runs without liveness tags are not judged."""
    now = time.time() if now is None else now
    host = os.uname().nodename if host is None else host
    pid, beat = tags.get(schema.TAG_PID, ""), tags.get(schema.TAG_HEARTBEAT, "")
    if tags.get(schema.TAG_HOST) == host and pid.isdigit() and not _pid_alive(int(pid)):
        return f"process {pid} on {host} is gone"
    try:
        age = now - float(beat)
    except ValueError:
        return ""
    return f"no heartbeat for {_fmt_elapsed(age)}" if age > schema.STALE_AFTER_S else ""


def _state(name: str, r: RunRecord | None) -> TrialState:
    if r is None:
        return TrialState(name, "pending", "", None, None, "", "")
    status = r.tags.get(schema.TAG_STATUS, "?")
    note = stale_reason(r.tags) if status == schema.RUNNING else ""
    step = r.tags.get(schema.TAG_FINAL_STEP, "" if r.last_step is None else str(r.last_step))
    elapsed = ((r.end_ms or time.time() * 1000) - r.start_ms) / 1000 if r.start_ms else None
    return TrialState(
        name,
        "stale" if note else status,
        step,
        elapsed,
        r.metrics.get(schema.VAL_PPL_FINAL),
        r.run_id,
        r.tags.get(schema.TAG_TRIAL_KEY, ""),
        note,
    )


def trial_states(records: list[RunRecord], planned: list[PlannedTrial] | None = None) -> list[TrialState]:
    """One row per trial. Without a matrix: the newest run of each trial key (an ended one first). With one:
    a row per planned trial, its run the one whose trial key it has, else `pending`. `records` are newest
    first."""
    if planned is None:
        by_key = _best(records, lambda r: r.tags.get(schema.TAG_TRIAL_KEY) or r.run_id)
        return sorted((_state(r.name, r) for r in by_key.values()), key=lambda t: (t.name, t.trial_key))
    by_key = _best(records, lambda r: r.tags.get(schema.TAG_TRIAL_KEY, ""))
    return [_state(p.name, next((by_key[k] for k in sorted(p.keys) if k in by_key), None)) for p in planned]


def _records(
    experiment: str, tracking_uri: str | None, kind: str = schema.KIND_TRIAL
) -> tuple[list[RunRecord] | None, list[str]]:
    """-> (the experiment's trial runs, or None when it does not exist; the names of all experiments)."""
    from harness.stores.tracking import resolve_tracking_uri

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
        from harness.stores.tracking import store_error

        raise store_error(uri, e) from None
    if exp is None:
        return None, [e.name for e in client.search_experiments()]
    return _client_records(client, exp.experiment_id, kind), []


def _fmt_elapsed(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def status_table(
    experiment: str | None, matrix: Path | None, tracking_uri: str | None, sets: list[str] | None = None
) -> Table:
    """The status command: --experiment NAME (its runs) or --matrix FILE [--set ...] (every trial of exactly
    that configuration, pending too)."""
    if (experiment is None) == (matrix is None):
        raise UserError("--experiment / --matrix: give one of them (the matrix also lists trials not started)")
    if sets and matrix is None:
        raise UserError("--set: only with --matrix (it changes the matrix's trials); drop it or pass --matrix")
    planned = None
    if matrix is not None:
        if not matrix.is_file():
            raise UserError(f"--matrix: no file at {matrix}; pass a TOML file such as experiments/smoke.toml")
        experiment, _ = planned_trials(matrix)  # the experiment's name without torch; a broken file's error
    records, existing = _records(experiment, tracking_uri)
    if records is None and matrix is None:
        raise UserError(f"--experiment: no experiment {experiment!r}; existing: {', '.join(existing) or 'none'}")
    records = records or []
    if matrix is not None:
        hashes = {r.tags[schema.TAG_DATA_HASH] for r in records if r.tags.get(schema.TAG_DATA_HASH)}
        experiment, planned = planned_by_key(matrix, list(sets or []), hashes)
    states = trial_states(records, planned)
    counts = {s: sum(t.status == s for t in states) for s in dict.fromkeys(t.status for t in states)}
    title = f"{experiment}: {len(states)} trials (" + ", ".join(f"{n} {s}" for s, n in counts.items()) + ")"
    if planned is not None:
        mine = {t.run_id for t in states}
        others = len({r.tags.get(schema.TAG_TRIAL_KEY) for r in records if r.run_id not in mine} - {None})
        if others:
            title += f"; {others} other trial(s) of this experiment have other settings (--set) and are not shown"
    table = Table(title=title, header_style="bold")
    notes = any(t.note for t in states)
    for col in ("trial", "status", "step", "elapsed", "val ppl", "run id", "trial key", *(["note"] if notes else [])):
        table.add_column(col, justify="right" if col in ("step", "elapsed", "val ppl") else "left")
    for t in states:
        table.add_row(
            t.name,
            t.status,
            t.step,
            _fmt_elapsed(t.elapsed_s),
            f"{t.val_ppl:.3f}" if t.val_ppl else "",
            t.run_id[:12],
            t.trial_key,
            *([t.note] if notes else []),
        )
    if records is not None:  # the experiment's Optuna studies (kimi-bench tune, or a matrix's [tune] section)
        table.caption = tuning_caption(_records(experiment, tracking_uri, schema.KIND_TUNE_TRIAL)[0] or [], matrix)
    return table


def browse_lines_for(experiment: str, tracking_uri: str | None) -> list[str]:
    """`kimi-bench status`'s pointer to the MLflow UI: the newest invocation's view of `experiment` (the
    plain runs page for a store from before views); [] when the store cannot say (status has its table)."""
    from harness.console import browse_lines
    from harness.stores import views
    from harness.stores.tracking import resolve_tracking_uri, strip_credentials

    uri = resolve_tracking_uri(tracking_uri)
    try:
        if uri.startswith("sqlite:///"):
            found = views.sqlite_experiment(uri.removeprefix("sqlite:///"), experiment)
        elif uri.startswith(("http://", "https://")) and "@" not in urllib.parse.urlsplit(uri).netloc:
            found = views.rest_experiment(uri, experiment)
        else:
            return []
    except Exception:  # an unreachable server or an unknown schema: status already said what it could
        return []
    if found is None:
        return []
    experiment_id, tags = found
    return browse_lines(strip_credentials(uri), experiment_id, views.newest_view_key(tags))


# ----------------------------------------------------------------------------- the tuning lines
# Per study: trials done of the budget, by state, and the best value; read from the experiment's tune-trial runs
# (kb.kind=tune-trial, one per Optuna trial, harness/tune/objective.py), so status opens no Optuna storage. The
# budget comes from the matrix's [tune].trials.


def _budget(matrix: Path | None) -> int | None:
    if matrix is None:
        return None
    try:
        trials = tomllib.loads(matrix.read_text(encoding="utf-8")).get("tune", {}).get("trials")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, AttributeError):
        return None
    return trials if isinstance(trials, int) else None


def _optuna_state(tags: dict[str, str]) -> str:
    """COMPLETE | PRUNED | FAIL from the trial's Optuna state tag; RUNNING while it trains (or was killed)."""
    state = tags.get(schema.TAG_OPTUNA_STATE)
    if state:
        return state
    status = tags.get(schema.TAG_STATUS, schema.RUNNING)
    return "RUNNING" if status == schema.RUNNING else "FAIL"


def tuning_caption(records, matrix: Path | None = None) -> str | None:
    """'tuning: study 1/2 gpt+adamw 3/8 trials (3 complete, 1 running), best 2.6612; ...' or None."""
    by_study: dict[str, list] = {}
    for r in records:
        by_study.setdefault(r.tags.get(schema.TAG_STUDY, "?"), []).append(r)
    if not by_study:
        return None
    budget = _budget(matrix)
    parts = []
    for k, (study, runs) in enumerate(sorted(by_study.items()), 1):
        states = [_optuna_state(r.tags) for r in runs]
        counts = {s: states.count(s) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING") if s in states}
        done = counts.get("COMPLETE", 0) + counts.get("PRUNED", 0)
        values = [float(r.tags[schema.TAG_OPTUNA_VALUE]) for r in runs if r.tags.get(schema.TAG_OPTUNA_VALUE)]
        finite = [v for v in values if math.isfinite(v)]
        shown = ", ".join(f"{n} {s.lower()}" for s, n in counts.items())
        parts.append(
            f"study {k}/{len(by_study)} {study}: {done}"
            + (f"/{budget}" if budget else "")
            + f" trials ({shown})"
            + (f", best {min(finite):.4f}" if finite else "")
        )
    return "tuning: " + "; ".join(parts)
