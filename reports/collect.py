"""Read one kimi-bench experiment out of MLflow into tidy pandas frames.

Only MLflow is read (never harness.trial.loop or arch), so a report can be rebuilt from any tracking
server long after the runs. Names: harness/schema.py; the runs they describe: docs/design.md.

    c = collect("sqlite:///mlflow.db", "paper")
    c.runs                      # one row per trial (kb.kind=trial), final metrics as columns
    c.history(["val/loss"])     # long frame: run_id, arm, seed, key, step, value, timestamp
    c.moe_load                  # moe_load.csv artifacts, concatenated, with run_id/arm/seed
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.entities import Run, ViewType
from mlflow.tracking import MlflowClient

from harness import schema
from harness.errors import UserError
from harness.schema import strip_credentials
from harness.stores.credentials import move_tracking_credentials
from harness.stores.curves import CURVE_POINTS, is_eval_key, read_curves, thin
from reports import names

# Final metrics of a trial (logged once, at the last step). Always present as columns of `runs`
# (NaN where a run did not log one), so callers can index them without checking.
FINAL_METRICS = schema.REPORTED_FINAL_METRICS

# tag -> column of `runs`
TRIAL_TAGS = schema.TRIAL_TAG_COLUMNS
# tag -> column of `speed` (controlled speed runs, kb.kind=speed; see docs/design.md)
SPEED_TAGS = schema.SPEED_TAG_COLUMNS
# Curves: step-dense keys are read downsampled to about CURVE_POINTS points per run (first and last kept);
# keys logged at evals (val/*) are read at every eval up to the server's cap of 2500 points per run.
EVAL_POINTS = 2500
_REST_RUNS = 100  # MLflow server: at most 100 run ids per get-history-bulk-interval request
ID_COLUMNS = [
    "run_id",
    "experiment_id",
    "arm",
    "variant",
    "optimizer",
    "preset",
    "seed",
    "status",
    "trial_key",
    "start_time",
    "end_time",
    "artifact_uri",
]
HISTORY_COLUMNS = ["run_id", "arm", "seed", "key", "step", "value", "timestamp"]
# MLflow run status, used when a run has no kb.status tag (e.g. the process died before tagging)
_MLFLOW_STATUS = schema.STATUS_FROM_MLFLOW
_PAGE = 1000


@dataclass
class Collected:
    """Everything a report needs from one experiment. `runs` is sorted by (arm, seed, run_id)."""

    tracking_uri: str  # as given or resolved (may hold credentials: print strip_credentials)
    experiment: str
    experiment_id: str
    runs: pd.DataFrame  # one row per trial after de-duplication
    dropped: pd.DataFrame  # runs superseded by another run with the same trial key
    matrix_runs: pd.DataFrame  # parent runs (kb.kind=matrix): run_id, start_time, command, git_commit, match.*
    client: MlflowClient = field(repr=False)
    speed: pd.DataFrame = field(default_factory=pd.DataFrame)  # controlled speed runs (kb.kind=speed)

    @property
    def n_dropped(self) -> int:
        return len(self.dropped)

    @property
    def tuning(self) -> pd.DataFrame:
        """Optuna provenance: (arm, tuned_from) pairs from the `kb.tuned_from` tags."""
        t = self.runs.loc[self.runs.tuned_from.notna(), ["arm", "tuned_from"]]
        return t.drop_duplicates().sort_values(["arm", "tuned_from"]).reset_index(drop=True)

    def history(self, keys: str | list[str], run_ids: list[str] | None = None) -> pd.DataFrame:
        """Step-metric history of the trial runs (all of them unless `run_ids`), long format."""
        keys = [keys] if isinstance(keys, str) else list(keys)
        ids = sorted(self.runs.run_id if run_ids is None else run_ids)
        frames = [_history_frame(self.client, key, ids) for key in keys]
        h = pd.concat(frames, ignore_index=True) if frames else _history_frame(self.client, "", [])
        meta = self.runs[["run_id", "arm", "seed"]]
        h = h.merge(meta, on="run_id", how="left")[HISTORY_COLUMNS]
        return h.sort_values(["key", "run_id", "step", "timestamp"], kind="stable").reset_index(drop=True)

    def curves(
        self, keys: str | list[str], run_ids: list[str] | None = None, points: int = CURVE_POINTS
    ) -> pd.DataFrame:
        """Like `history`, but downsampled: step-dense keys at about `points` points per run (first and last kept),
        eval keys (val/*) at every eval, the eval steps exact in every key. A run tagged `kb.curves` is read from its
        curves artifact (one small download, harness/stores/curves.py); any other run, or a key the artifact lacks,
        through MLflow's bulk-interval history, many runs per request. Either way the cost does not grow with the
        number of logged steps. `timestamp` is empty (<NA>) for points read from an artifact."""
        keys = [keys] if isinstance(keys, str) else list(keys)
        ids = sorted(self.runs.run_id if run_ids is None else run_ids)
        stored = self._stored_curves(ids, points)
        frames = []
        eval_steps: list[int] = []
        for key in sorted(keys, key=lambda k: not is_eval_key(k)):  # evals first: their steps stay exact
            n = EVAL_POINTS if is_eval_key(key) else points
            rows = [
                (rid, s, v, None)
                for rid, cur in stored.items()
                if key in cur
                for s, v in (cur[key] if len(cur[key]) <= n else thin(cur[key], n, eval_steps))
            ]
            rest = [rid for rid in ids if key not in stored.get(rid, {})]
            rows += _interval_history(self.client, key, rest, n, eval_steps)
            if is_eval_key(key):
                eval_steps = sorted({r[1] for r in rows} | set(eval_steps))
            df = pd.DataFrame(rows, columns=["run_id", "step", "value", "timestamp"])
            df.insert(1, "key", key)
            frames.append(df.astype({"step": "int64", "value": "float64", "timestamp": "Int64"}))
        h = (
            pd.concat(frames, ignore_index=True)
            if frames
            else pd.DataFrame(columns=HISTORY_COLUMNS[:1] + ["key", "step", "value", "timestamp"])
        )
        meta = self.runs[["run_id", "arm", "seed"]]
        h = h.merge(meta, on="run_id", how="left")[HISTORY_COLUMNS]
        return h.sort_values(["key", "run_id", "step", "timestamp"], kind="stable").reset_index(drop=True)

    def _stored_curves(self, run_ids: list[str], points: int) -> dict[str, dict[str, list[tuple[int, float]]]]:
        """run_id -> the curves artifact of each run tagged `kb.curves` that holds at least `points` per key.
        A run whose artifact cannot be read is left to the metric history."""
        tagged = self.runs[self.runs.run_id.isin(run_ids) & self.runs.curves_artifact.notna()]
        got = self._read_artifacts(tagged, lambda row: row.curves_artifact, read_curves)
        return {rid: cur for rid, (n, cur) in got.items() if n >= points}

    def _read_artifacts(
        self, runs: pd.DataFrame, artifact: Callable[[Any], str], read: Callable[[Path], Any]
    ) -> dict[str, Any]:
        """run_id -> read(local copy of the run's `artifact(row)`), for the runs that have it; the downloads run in
        parallel, straight from each run's artifact URI (no request per run to the tracking server first)."""
        if runs.empty:
            return {}
        from mlflow.artifacts import download_artifacts

        def fetch(row, tmp: str) -> tuple[str, Any]:
            dst = Path(tmp) / row.run_id
            dst.mkdir()
            try:
                path = download_artifacts(
                    artifact_uri=f"{row.artifact_uri.rstrip('/')}/{artifact(row)}",
                    dst_path=str(dst),
                    tracking_uri=self.tracking_uri,
                )
                return row.run_id, read(Path(path))
            except Exception:  # not there (or unreadable): the caller goes without it
                return row.run_id, None

        with (
            tempfile.TemporaryDirectory(prefix="kb-artifacts-") as tmp,
            _no_progress_bar(),
            ThreadPoolExecutor(max_workers=8) as pool,
        ):
            got = list(pool.map(lambda row: fetch(row, tmp), runs.itertuples(index=False)))
        return {rid: value for rid, value in got if value is not None}

    @cached_property
    def moe_load(self) -> pd.DataFrame:
        """`moe_load.csv` artifacts (step, layer, expert, load) of every trial that has one."""
        cols = ["run_id", "arm", "seed", "step", "layer", "expert", "load"]
        got = self._read_artifacts(self.runs, lambda row: schema.ARTIFACT_MOE_LOAD, pd.read_csv)
        meta = self.runs.set_index("run_id")
        frames = [df.assign(run_id=rid, arm=meta.arm[rid], seed=meta.seed[rid])[cols] for rid, df in got.items()]
        if not frames:
            return pd.DataFrame(columns=cols)
        df = pd.concat(frames, ignore_index=True)
        return df.sort_values(["arm", "seed", "run_id", "step", "layer", "expert"]).reset_index(drop=True)

    def studies(self) -> dict[str, tuple[pd.DataFrame, dict | None]]:
        """Per arm, the Optuna study's trials (trials.csv) and importances (importances.json) logged on the
        experiment's study runs (kb.kind=study) by `kimi-bench tune`; empty when nothing was tuned."""
        runs = self.client.search_runs(
            [self.experiment_id], f"tags.`{schema.KIND}` = '{schema.KIND_STUDY}'", max_results=1000
        )
        out: dict[str, tuple[pd.DataFrame, dict | None]] = {}
        with tempfile.TemporaryDirectory(prefix="kb-optuna-") as tmp, _no_progress_bar():
            for run in sorted(runs, key=lambda r: r.info.start_time):  # newest study of an arm wins
                artifacts = {Path(f.path).name for f in self.client.list_artifacts(run.info.run_id)}
                if "trials.csv" not in artifacts:
                    continue
                folder = Path(tmp) / run.info.run_id
                folder.mkdir()
                trials = pd.read_csv(self.client.download_artifacts(run.info.run_id, "trials.csv", str(folder)))
                importances = None
                if "importances.json" in artifacts:
                    raw = json.loads(
                        Path(
                            self.client.download_artifacts(run.info.run_id, "importances.json", str(folder))
                        ).read_text()
                    )
                    importances = raw.get("importances") if isinstance(raw, dict) else None
                out[run.data.tags.get(names.TAG_ARM, run.info.run_name)] = (trials, importances)
        return out


@contextmanager
def _no_progress_bar():
    """MLflow draws a tqdm bar per artifact download; silence it without leaving the setting changed."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def collect(tracking_uri: str | None, experiment: str) -> Collected:
    """Read the trial runs of `experiment`; raise UserError if the store or the experiment is missing."""
    import mlflow

    uri = move_tracking_credentials(tracking_uri or mlflow.get_tracking_uri())  # no password in any URI
    _check_sqlite_exists(uri)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None or exp.lifecycle_stage != "active":
        names = sorted(e.name for e in _all_experiments(client))
        raise UserError(
            f"experiment: no MLflow experiment named {experiment!r} at {strip_credentials(uri)}; "
            f"existing: {', '.join(names) or '(none)'}; pass one of them"
        )
    trials = _search(client, exp.experiment_id, f"tags.`{schema.KIND}` = '{schema.KIND_TRIAL}'")
    matrices = _search(client, exp.experiment_id, f"tags.`{schema.KIND}` = '{schema.KIND_MATRIX}'")
    speed = _search(client, exp.experiment_id, f"tags.`{schema.KIND}` = '{schema.KIND_SPEED}'")
    runs, dropped = _dedupe(_runs_frame(trials))
    return Collected(
        tracking_uri=uri,
        experiment=experiment,
        experiment_id=exp.experiment_id,
        runs=runs,
        dropped=dropped,
        matrix_runs=_matrix_frame(matrices),
        client=client,
        speed=_speed_frame(speed),
    )


def _check_sqlite_exists(uri: str) -> None:
    # MlflowClient would silently create an empty database at a mistyped path.
    if uri.startswith("sqlite:///") and ":memory:" not in uri:
        path = Path(uri[len("sqlite:///") :].split("?")[0])
        if not path.exists():
            raise UserError(
                f"tracking_uri: no MLflow database at {path} ({uri}); "
                "run some trials first or pass the right --tracking-uri"
            )


def _all_experiments(client: MlflowClient) -> list:
    out, token = [], None
    while True:
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=_PAGE, page_token=token)
        out += list(page)
        token = page.token
        if not token:
            return out


def _search(client: MlflowClient, experiment_id: str, filter_string: str) -> list[Run]:
    out, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string, max_results=_PAGE, page_token=token, order_by=["attributes.start_time ASC"]
        )
        out += list(page)
        token = page.token
        if not token:
            return out


def _ms_to_time(ms: int | None) -> pd.Timestamp:
    return pd.to_datetime(ms, unit="ms", utc=True) if ms else pd.NaT


def _runs_frame(trials: list[Run]) -> pd.DataFrame:
    rows = []
    for r in trials:
        tags = r.data.tags
        row = {
            "run_id": r.info.run_id,
            "experiment_id": r.info.experiment_id,
            "artifact_uri": r.info.artifact_uri,
            "start_time": _ms_to_time(r.info.start_time),
            "end_time": _ms_to_time(r.info.end_time),
            "mlflow_status": r.info.status,
        }
        row |= {col: tags.get(tag) for tag, col in TRIAL_TAGS.items()}
        row["status"] = row["status"] or _MLFLOW_STATUS.get(r.info.status, r.info.status.lower())
        row |= dict(r.data.metrics)
        row |= {f"param.{k}": v for k, v in r.data.params.items()}
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in ID_COLUMNS + list(TRIAL_TAGS.values()) + ["mlflow_status"] + list(FINAL_METRICS):
        if col not in df:
            df[col] = float("nan") if col in FINAL_METRICS else None
    df["seed"] = pd.to_numeric(df["seed"], errors="coerce").astype("Int64")
    # arm is "{variant}+{optimizer}": fill either side from the other when a tag is missing
    parts = df.arm.fillna("").str.split("+", n=1, expand=True).reindex(columns=[0, 1])
    df["variant"] = df.variant.fillna(parts[0].where(df.arm.notna()))
    df["optimizer"] = df.optimizer.fillna(parts[1].where(df.arm.notna()))
    combined = df.variant + "+" + df.optimizer
    df["arm"] = df.arm.fillna(combined)
    # Column order: ids, tags, metrics (sorted), params (sorted)
    tag_cols = [c for c in TRIAL_TAGS.values() if c not in ID_COLUMNS] + ["mlflow_status"]
    params = sorted(c for c in df.columns if c.startswith("param."))
    metrics = sorted(c for c in df.columns if c not in ID_COLUMNS + tag_cols + params)
    return df[ID_COLUMNS + tag_cols + metrics + params]


def _dedupe(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One run per trial key: the finished one if any, else the newest (resumes and reruns share a key)."""
    key = df.trial_key.fillna(df.run_id)  # a run without a key is its own trial
    order = df.assign(_key=key, _fin=df.status.eq("finished"))
    order = order.sort_values(["_key", "_fin", "start_time", "run_id"], ascending=[True, False, False, True])
    keep = ~order._key.duplicated()
    sort = ["arm", "seed", "run_id"]
    runs = order[keep].drop(columns=["_key", "_fin"]).sort_values(sort, na_position="last")
    dropped = order[~keep].drop(columns=["_key", "_fin"]).sort_values(sort, na_position="last")
    return runs.reset_index(drop=True), dropped.reset_index(drop=True)


def _matrix_frame(matrices: list[Run]) -> pd.DataFrame:
    match = (
        names.MATCH_BY,
        names.MATCH_REFERENCE,
        names.MATCH_TOLERANCE,
        "verdicts.target_loss",
        "verdicts.loss_margin",
        "verdicts.ratio_margin",
    )  # [verdicts]: the report's
    rows = [
        {
            "run_id": r.info.run_id,
            "start_time": _ms_to_time(r.info.start_time),
            "command": r.data.tags.get(names.TAG_COMMAND),
            "git_commit": r.data.tags.get(names.TAG_GIT) or r.data.tags.get(schema.TAG_SOURCE_GIT),
            **{k: r.data.params.get(k, r.data.tags.get(f"{schema.KB_PREFIX}{k}")) for k in match},
        }
        for r in matrices
    ]
    df = pd.DataFrame(rows, columns=["run_id", "start_time", "command", "git_commit", *match])
    return df.sort_values(["start_time", "run_id"]).reset_index(drop=True)


def _speed_frame(runs: list[Run]) -> pd.DataFrame:
    """One row per controlled speed run: its tags, metrics (with _iqr/_n siblings) and `param.*` dims."""
    rows = []
    for r in runs:
        row = {"run_id": r.info.run_id, "start_time": _ms_to_time(r.info.start_time)}
        row |= {col: r.data.tags.get(tag) for tag, col in SPEED_TAGS.items()}
        row["parent_run_id"] = row["parent_run_id"] or r.data.tags.get(names.TAG_PARENT)
        row |= dict(r.data.metrics)
        row |= {f"param.{k}": v for k, v in r.data.params.items()}
        rows.append(row)
    cols = ["run_id", "start_time", *SPEED_TAGS.values()]
    df = pd.DataFrame(rows)
    for c in cols:
        if c not in df:
            df[c] = None
    return df.sort_values(["start_time", "run_id"]).reset_index(drop=True) if len(df) else df[cols]


def _history_frame(client: MlflowClient, key: str, run_ids: list[str]) -> pd.DataFrame:
    """History of one key for many runs: one bulk query on SQL stores, parallel requests elsewhere."""
    rows = _bulk_history(client, key, run_ids)
    if rows is None:
        with ThreadPoolExecutor(max_workers=8) as pool:
            per_run = pool.map(lambda rid: (rid, client.get_metric_history(rid, key)), run_ids)
            rows = [(rid, m.step, m.value, m.timestamp) for rid, ms in per_run for m in ms]
    df = pd.DataFrame(rows, columns=["run_id", "step", "value", "timestamp"])
    df.insert(1, "key", key)
    return df.astype({"step": "int64", "value": "float64", "timestamp": "int64"})


def _bulk_history(client: MlflowClient, key: str, run_ids: list[str]) -> list[tuple] | None:
    # SqlAlchemyStore.get_metric_history_bulk is not on the public client; use it when the store has it
    # (sqlite/postgres/mysql backends), else return None and the caller falls back to per-run requests.
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    bulk = getattr(store, "get_metric_history_bulk", None)
    if bulk is None:
        return None
    rows = []
    for i in range(0, len(run_ids), 500):  # bounded IN (...) lists
        for m in bulk(run_ids[i : i + 500], key, max_results=2**62):
            rows.append((m.run_id, m.step, m.value, m.timestamp))
    return rows


def _interval_history(
    client: MlflowClient, key: str, run_ids: list[str], points: int, extra_steps: list[int] | None = None
) -> list[tuple]:
    """(run_id, step, value, timestamp) rows of `key`, at most `points` per run evenly over the logged rows
    with the first and last kept: the SQL store's get_metric_history_bulk_interval (sampled in SQL), or a
    server's get-history-bulk-interval endpoint (100 runs per request); else full histories thinned here."""
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    if not run_ids:
        return []
    if hasattr(store, "get_metric_history_bulk_interval") and hasattr(store, "ManagedSessionMaker"):
        try:
            return _sql_interval_history(store, key, run_ids, points, extra_steps)
        except Exception:  # an unusual backend or schema: MLflow's own sampler (slower: it scans the key)
            rows = []
            for i in range(0, len(run_ids), 500):
                for m in store.get_metric_history_bulk_interval(run_ids[i : i + 500], key, points, None, None):
                    rows.append((m.run_id, m.step, m.value, m.timestamp))
            return rows
    if hasattr(store, "get_host_creds"):
        return _rest_interval_history(store, key, run_ids, points)
    rows = _bulk_history(client, key, run_ids) or [
        (rid, m.step, m.value, m.timestamp) for rid in run_ids for m in client.get_metric_history(rid, key)
    ]
    return _thin(rows, points)


def _sql_interval_history(
    store, key: str, run_ids: list[str], points: int, extra_steps: list[int] | None = None
) -> list[tuple]:
    """The SQL store, sampled by step on the (run_uuid, key, step) index: one query for each run's step range
    and row count, one for the rows at every stride-th logged step (first and last kept, and `extra_steps`, the
    eval steps, exact). MLflow's own sampler filters on the key first and scans every run's rows of that key."""
    from sqlalchemy import text

    rows: list[tuple] = []
    extra = sorted({int(s) for s in extra_steps or []})
    with store.ManagedSessionMaker() as session:
        for i in range(0, len(run_ids), 500):
            chunk = run_ids[i : i + 500]
            ids = {f"r{j}": rid for j, rid in enumerate(chunk)}
            id_list = ", ".join(f":{k}" for k in ids)
            ranges = session.execute(
                text(
                    f"SELECT run_uuid, MIN(step), MAX(step), COUNT(*) FROM metrics WHERE run_uuid IN ({id_list}) "
                    "AND key = :key GROUP BY run_uuid"
                ),
                {**ids, "key": key},
            ).fetchall()
            for rid, lo, hi, n in ranges:
                spacing = max(1, round((hi - lo) / max(n - 1, 1)))
                stride = spacing * max(1, math.ceil(n / max(points - 1, 1)))
                steps = ", ".join(str(s) for s in extra if lo <= s <= hi) or "-1"
                part = session.execute(
                    text(
                        "SELECT step, value, timestamp FROM metrics WHERE run_uuid = :rid AND key = :key AND "
                        f"((step - :lo) % :stride = 0 OR step = :hi OR step IN ({steps})) ORDER BY step, timestamp"
                    ),
                    {"rid": rid, "key": key, "lo": lo, "hi": hi, "stride": stride},
                ).fetchall()
                rows += [(rid, int(st), float(v), int(ts)) for st, v, ts in part]
    return rows


def _rest_interval_history(store, key: str, run_ids: list[str], points: int) -> list[tuple]:
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    endpoint = "/api/2.0/mlflow/metrics/get-history-bulk-interval"
    rows: list[tuple] = []

    def fetch(chunk: list[str]) -> list[tuple]:
        params = {"run_ids": chunk, "metric_key": key, "max_results": min(points, EVAL_POINTS)}
        resp = verify_rest_response(http_request(store.get_host_creds(), endpoint, "GET", params=params), endpoint)
        return [
            (m["run_id"], int(m.get("step", 0)), float(m["value"]), int(m.get("timestamp", 0)))
            for m in resp.json().get("metrics", [])
        ]

    chunks = [run_ids[i : i + _REST_RUNS] for i in range(0, len(run_ids), _REST_RUNS)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for part in pool.map(fetch, chunks):
            rows += part
    return rows


def _thin(rows: list[tuple], points: int) -> list[tuple]:
    """Keep about `points` rows per run, evenly spaced over its rows ordered by step, first and last kept."""
    by_run: dict[str, list[tuple]] = {}
    for rid, step, value, ts in sorted(rows):
        by_run.setdefault(rid, []).append((step, value, ts))
    return [(rid, step, value, ts) for rid, pts in by_run.items() for step, value, ts in thin(pts, points)]
