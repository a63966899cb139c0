"""The MLflow sink: the experiment, a parent run per matrix, a child run per trial, batched metrics.

Default store: `sqlite:///<cwd>/mlflow.db` (MLflow's own default). One synchronous MLflow call costs 3-11 ms
on sqlite, so step metrics are buffered and sent with `log_batch` every `flush_every` values or
`flush_seconds`, and always at evals and at the end, through MLflow's asynchronous logging (a background
queue) so the loop does not wait on the store; checkpoints and the end of a run wait until it is drained.
The time the training thread spends in logging calls is logged as `track/log_s` and `track/overhead_frac`
(share of the training time).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import schema
from harness.errors import UserError
from harness.schema import MLFLOW_RUN_STATUS, TERMINAL, param_value, strip_credentials  # noqa: F401  (re-exported)
from harness.stores import views
from harness.stores.buffered import BufferedRun
from harness.stores.credentials import move_tracking_credentials


def default_tracking_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None) -> str:
    """The store to use, as MLflow should see it: a server's user:password@ moves to MLflow's credential
    variables in this process (harness/stores/credentials.py), so no URI handed on or printed carries it."""
    return move_tracking_credentials(uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri())


def git_commit() -> str:
    """The project's git commit (+ '-dirty' with uncommitted changes), or 'unknown' outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def source_tags(commit: str) -> dict[str, str]:
    """MLflow's own source tags (the UI's "Source" and "Git commit" columns); the commit without '-dirty'."""
    tags = {schema.TAG_SOURCE_NAME: "kimi-bench", schema.TAG_SOURCE_TYPE: "LOCAL"}
    if commit != "unknown":
        tags[schema.TAG_SOURCE_GIT] = commit.removesuffix("-dirty")
    return tags


# MLflow 3.17's UI does not read the experiment's `mlflow.experimentKind` tag to pick a view: it reads the
# browser-wide "workflow type" (localStorage `mlflow.workflowType`, GenAI unless the user switched it) or the
# page URL's `workflowType` query parameter, which wins. Links that should open the training-runs view carry
# it. The tag is still set: MLflow 3.0-3.4 chose the view from it.
TRAINING_VIEW_QUERY = "workflowType=machine_learning"


def runs_page_url(server: str, experiment_id: str) -> str:
    """The experiment's training-runs table in the MLflow UI at `server` (http://host:port); with a saved
    view, see harness.stores.views.view_url."""
    return views.view_url(server, experiment_id)


@contextlib.contextmanager
def _store_lock(uri: str):
    """An exclusive file lock beside a sqlite store while it is created: several processes starting at once
    on a fresh store would otherwise race MLflow's schema migration and can break the file for good."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock_path = Path(uri.removeprefix("sqlite:///") + ".lock")
    with open(lock_path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# MLflow's HTTP client retries a failed request 7 times with exponential backoff (about 4 minutes) by
# default. The first contact with a store uses these bounds (unless the user set them), so an unreachable
# server is reported in seconds; later calls keep MLflow's patient defaults (a hiccup mid-run is retried).
_FIRST_CONTACT_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


@contextlib.contextmanager
def _first_contact_http():
    added = [k for k in _FIRST_CONTACT_HTTP if k not in os.environ]
    os.environ.update({k: _FIRST_CONTACT_HTTP[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _create_sqlite_store(uri: str) -> None:
    """Build a new sqlite store under a temporary name, then rename it into place (call under _store_lock).
    MLflow migrates a new file through dozens of schema revisions in seconds; a process killed in between
    leaves a store that no later run can open ("duplicate column name"), so the real path only ever holds
    a complete store."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///"))
    if path.exists():
        return
    for stale in path.parent.glob(f"{path.name}.creating-*"):  # a killed creator's; we hold the lock
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f"{path.name}.creating-{os.getpid()}")
    _mlflow().MlflowClient(f"sqlite:///{tmp}").search_experiments(max_results=1)  # creates and migrates
    os.replace(tmp, path)


def first_line(e: Exception) -> str:
    """An exception as one short line (MLflow's errors can span pages), credentials stripped (an error can
    quote the URI it failed on)."""
    text = strip_credentials(str(e).strip())
    return text.splitlines()[0][:200] if text else type(e).__name__


_DB_SCHEMES = ("postgresql", "mysql", "mssql")  # SQLAlchemy stores MLflow opens itself (sqlite aside)


def _probe_database(uri: str) -> None:
    """One connection attempt to a database store before MLflow's own (which retries for seconds and logs a
    page per try): a wrong host, port, database name or login is one line, and nothing is created."""
    if uri.split("://", 1)[0].split("+", 1)[0] not in _DB_SCHEMES:
        return
    import sqlalchemy

    engine = None
    try:
        args = {"connect_timeout": 10} if uri.startswith("postgresql") else {}
        engine = sqlalchemy.create_engine(uri, connect_args=args)
        with engine.connect():
            pass
    except Exception as e:
        raise UserError(
            f"--tracking-uri {strip_credentials(uri)}: cannot connect to the database ({first_line(e)});"
            " check the host, port, database name and login"
        ) from None
    finally:
        if engine is not None:
            engine.dispose()


def store_error(uri: str, e: Exception) -> UserError:
    """The one line for a store that did not answer as it should: a refused login is named as such."""
    first = first_line(e)
    if any(f"error code {code}" in first or f"HTTP {code}" in first for code in (401, 403)):
        return UserError(
            f"--tracking-uri {strip_credentials(uri)}: the tracking server refused the login "
            f"({first}); check the user and password (user:password@ in the URI, or "
            "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)"
        )
    return UserError(
        f"--tracking-uri {strip_credentials(uri)}: cannot reach the tracking store ({first}); "
        "start the server or fix the URI"
    )


def _mlflow():
    import mlflow  # heavy import: only when tracking is used

    return mlflow


class Tracker:
    """One tracking store; creates the experiment once, before any worker starts (no migration races)."""

    def __init__(self, tracking_uri: str | None = None):
        mlflow = _mlflow()
        self.uri = resolve_tracking_uri(tracking_uri)
        if self.uri.startswith("sqlite:///"):
            parent = Path(self.uri.removeprefix("sqlite:///")).parent
            if not parent.is_dir():
                raise UserError(f"--tracking-uri: folder {parent} does not exist; create it or pick another path")
        _probe_database(self.uri)
        # no mlflow.set_tracking_uri: it also exports MLFLOW_TRACKING_URI, which child processes would inherit;
        # every call here goes through this client and its explicit URI
        with _store_lock(self.uri):  # the first process creates the store; the others wait, then open it
            try:
                _create_sqlite_store(self.uri)
                self.client = mlflow.MlflowClient(self.uri)
            except Exception as e:  # a store another tool broke, a newer MLflow's schema, a bad URI ...
                first = first_line(e)
                raise UserError(
                    f"--tracking-uri {strip_credentials(self.uri)}: cannot open the tracking "
                    f"store ({first}); fix or move the store, or pick another URI"
                ) from None
            self._touch_store()

    def _touch_store(self) -> None:
        """Open the store once (MLflow creates and migrates a fresh sqlite schema on first use)."""
        try:
            with _first_contact_http():
                self.client.search_experiments(max_results=1)
        except Exception as e:
            raise store_error(self.uri, e) from None

    def ensure_experiment(self, name: str, description: str = "") -> str:
        """The experiment's id (created, or restored from deleted); its description is the matrix's."""
        try:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                tags = {schema.TAG_EXPERIMENT_KIND: schema.EXPERIMENT_KIND_TRAINING}
                if description:
                    tags[schema.TAG_NOTE] = description
                try:
                    return self.client.create_experiment(name, tags=tags)
                except Exception:
                    # another process (a second Optuna worker on Ray) created it between the two calls
                    exp = self.client.get_experiment_by_name(name)
                    if exp is None:
                        raise
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            if description and exp.tags.get(schema.TAG_NOTE) != description:
                self.client.set_experiment_tag(exp.experiment_id, schema.TAG_NOTE, description)
            return exp.experiment_id
        except Exception as e:  # connection refused, bad URI, locked store ...
            if isinstance(e, UserError):
                raise
            first = first_line(e)
            raise UserError(
                f"--tracking-uri {strip_credentials(self.uri)}: cannot reach the tracking store "
                f"({first}); start the server or fix the URI"
            ) from None

    def start_parent(
        self, experiment_id: str, name: str, command: str, tags: dict[str, str], description: str = ""
    ) -> str:
        all_tags = {schema.KIND: schema.KIND_MATRIX, schema.TAG_COMMAND: command, **tags}
        if description:
            all_tags[schema.TAG_NOTE] = description  # the run page's "Description"
        run_id = self.client.create_run(experiment_id, run_name=f"matrix {name}", tags=all_tags).info.run_id
        self.client.set_tag(run_id, schema.TAG_MATRIX_RUN, run_id)  # the parent is in its own view
        with contextlib.suppress(Exception):  # the view is a nicety (a store that refuses the tag still runs)
            views.save_view(self.client, experiment_id, run_id, f"matrix {name} ({run_id[:8]})")
        return run_id

    def log_matrix(self, run_id: str, matrix_text: str, params: dict[str, Any], trials: list[dict]) -> None:
        """The matrix as given (matrix.toml), its resolved trials (trials.json) and its settings as params."""
        from mlflow.entities import Param

        param_list = [Param(k, param_value(v)) for k, v in sorted(params.items())]
        for i in range(0, len(param_list), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(run_id, params=param_list[i : i + 100])
        self.client.log_text(run_id, matrix_text, "matrix.toml")
        self.client.log_text(run_id, json.dumps(trials, indent=1, default=str), "trials.json")

    def end_parent(self, run_id: str, status: str) -> None:
        run = self.client.get_run(run_id)
        with contextlib.suppress(Exception):  # the view is a nicety; the run's end is not
            views.freeze_view(self.client, run.info.experiment_id, run_id, f"{run.info.run_name} ({run_id[:8]})")
        self.client.set_terminated(run_id, MLFLOW_RUN_STATUS.get(status, "FINISHED"))

    def join_matrix(self, run_id: str, parent_id: str) -> None:
        """A run this invocation reuses (skipped as ended) is listed in its view too."""
        self.client.set_tag(run_id, schema.TAG_MATRIX_RUN, parent_id)

    def find_trial(self, experiment_id: str, trial_key: str):
        """The newest run with this trial key: finished ones first (a rerun skips them)."""
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{schema.TAG_TRIAL_KEY}` = '{trial_key}'",
            order_by=["attributes.start_time DESC"],
            max_results=50,
        )
        terminal = [r for r in runs if r.data.tags.get(schema.TAG_STATUS) in TERMINAL]
        return (terminal or runs or [None])[0]

    def trials(self, experiment_id: str) -> list:
        return self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{schema.KIND}` = '{schema.KIND_TRIAL}'", max_results=10000
        )

    def start_trial(
        self,
        experiment_id: str,
        parent_id: str | None,
        run_name: str,
        tags: dict[str, str],
        params: dict[str, Any],
        resume_run_id: str | None = None,
        system_metrics: bool = True,
        kind: str = schema.KIND_TRIAL,
    ) -> TrialRun:
        from mlflow.entities import Param, RunTag

        if resume_run_id:
            run_id = resume_run_id
            self.client.update_run(run_id, status="RUNNING")
            # a run killed between create_run and its params has none (or some): log what is missing
            logged = self.client.get_run(run_id).data.params
            params = {k: v for k, v in params.items() if k not in logged}
        else:
            all_tags = {schema.KIND: kind, **tags}
            if parent_id:
                all_tags[schema.TAG_PARENT] = parent_id
            run_id = self.client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id
        param_list = [Param(k, param_value(v)) for k, v in sorted(params.items())]
        for i in range(0, len(param_list), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(run_id, params=param_list[i : i + 100])
        tags_now = [RunTag(schema.TAG_STATUS, schema.RUNNING), *liveness_tags()]
        if parent_id:  # new or resumed: this invocation's run (harness.stores.views)
            tags_now.append(RunTag(schema.TAG_MATRIX_RUN, parent_id))
        self.client.log_batch(run_id, tags=tags_now)
        return TrialRun(self, run_id, system_metrics=system_metrics)


def liveness_tags() -> list:
    """Who logs this run and that it is alive: host, pid and a heartbeat (read by `kimi-bench status`)."""
    from mlflow.entities import RunTag

    return [
        RunTag(schema.TAG_HOST, os.uname().nodename),
        RunTag(schema.TAG_PID, str(os.getpid())),
        RunTag(schema.TAG_HEARTBEAT, str(int(time.time()))),
    ]


class TrackingLost(Exception):
    """The tracking store stopped answering mid-trial, past MLflow's own retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    _BACKOFF_FACTOR, _TIMEOUT). The trial stops: nothing after its last confirmed flush is relied on, its last
    checkpoint (taken only after a confirmed flush) is where the next `run` resumes it."""

    PREFIX = "tracking store unreachable"

    def __init__(self, what: str, e: Exception):
        super().__init__(f"{self.PREFIX} ({what}: {first_line(e)})")


@dataclass
class TrialRun(BufferedRun):
    """A child run in MLflow: the buffer goes out with `log_batch` through MLflow's asynchronous logging."""

    _pending: list = field(default_factory=list)  # async log_batch operations not yet confirmed
    _last_beat: float = field(default_factory=time.monotonic)
    _monitor: Any = None

    def __post_init__(self) -> None:
        if self.system_metrics:
            self._start_system_metrics()

    def _start_system_metrics(self) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self.run_id, sampling_interval=5, resume_logging=True, tracking_uri=self.tracker.uri
            )
            self._monitor.start()
        except Exception:  # psutil missing or an unsupported platform: system metrics are a nicety
            self._monitor = None

    def _entry(self, key: str, value: float, timestamp: int, step: int):
        from mlflow.entities import Metric

        return Metric(key, value, timestamp, step)

    def _send(self, batch: list, wait: bool) -> None:
        """wait=False hands the batch to MLflow's async logging queue (the training loop goes on); wait=True also
        waits for everything queued so far to be stored. The liveness tags ride on a batch: no extra call."""
        beat = []
        if batch and time.monotonic() - self._last_beat > schema.HEARTBEAT_S:
            beat, self._last_beat = liveness_tags(), time.monotonic()
        while batch:
            chunk, batch = batch[:1000], batch[1000:]  # MLflow's per-batch cap
            self._pending.append(
                self.tracker.client.log_batch(self.run_id, metrics=chunk, tags=beat, synchronous=False)
            )
            beat = []
        if wait:
            pending, self._pending = self._pending, []
            try:
                for op in pending:
                    op.wait()
            except Exception as e:  # MLflow retried each request and gave up: the store is gone
                raise TrackingLost("storing metrics", e) from None

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        try:
            self.tracker.client.log_batch(
                self.run_id, tags=[RunTag(k, strip_credentials(str(v))) for k, v in tags.items()]
            )
        except Exception as e:
            raise TrackingLost("setting tags", e) from None

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        try:
            self.tracker.client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as e:
            raise TrackingLost("uploading an artifact", e) from None

    def log_dataset(self, name: str, digest: str, source: str, context: str = "training") -> None:
        """Record the corpus as an MLflow dataset input (name + digest), so runs show what they trained on."""
        try:
            from mlflow.data.meta_dataset import MetaDataset
            from mlflow.data.sources import LocalArtifactDatasetSource
            from mlflow.entities import DatasetInput, InputTag

            ds = MetaDataset(LocalArtifactDatasetSource(source), name=name, digest=digest[:36])
            self.tracker.client.log_inputs(
                self.run_id, [DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])]
            )
        except Exception:  # older MLflow without dataset inputs: the data hash is still a tag
            pass

    def _close(self) -> None:
        if self._monitor is not None:
            with contextlib.suppress(Exception):
                self._monitor.finish()
            self._monitor = None

    def end(self, status: str) -> None:
        """BufferedRun.end; raises TrackingLost when the store does not answer (the run stays RUNNING there and
        the next `run` resumes it)."""
        try:
            super().end(status)
        except TrackingLost:
            raise
        except Exception as e:
            raise TrackingLost("ending the run", e) from None
