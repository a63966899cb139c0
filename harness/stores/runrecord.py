"""A portable run record: the trial loop's tracking on a machine without MLflow, imported into MLflow later.

`--tracking-uri record:DIR` makes `kimi-bench run` write DIR/events.jsonl and DIR/artifacts/ through the same
Tracker / TrialRun interface as harness.stores.tracking, importing no mlflow (the GPU image has none). Afterwards,
on a machine with MLflow, `kimi-bench import DIR [--tracking-uri URI]` replays the record into an MLflow store,
so `kimi-bench report` reads runs as always.

The record is append-only and crash-safe: one JSON object per line (experiment, run, params, tags, metrics,
dataset, artifact, status events), each appended whole under a file lock and flushed to the OS at once (a
killed process loses nothing already logged; `flush(wait=True)`, at checkpoints and ends, also fsyncs). A
line torn by a crash mid-write is the last one and is skipped on reading. Artifacts are copied under a
temporary name and renamed, and their event comes after the rename.

Import is idempotent: every imported run carries the tag `kb.record_run_id`, set with the other tags after
its params and metrics; a second import skips runs whose tag is there (and completes or redoes none of them),
and a run an interrupted import left half-written (tag `kb.record_import` = "partial") is deleted and redone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import schema
from harness.errors import UserError
from harness.schema import MLFLOW_RUN_STATUS, TERMINAL, param_value
from harness.stores.buffered import BufferedRun, now_ms
from harness.stores.tracking import resolve_tracking_uri, strip_credentials

SCHEME = "record:"
EVENTS = "events.jsonl"
FORMAT = 1
GIT_COMMIT_ENV = "KB_GIT_COMMIT"  # the commit of a checkout that travelled without .git (the device machine)


def is_record_uri(uri: str | None) -> bool:
    return bool(uri) and uri.startswith(SCHEME)


def open_tracker(tracking_uri: str | None):
    """The tracker for a URI: a RecordTracker for record:DIR, else the MLflow Tracker."""
    uri = resolve_tracking_uri(tracking_uri)
    if is_record_uri(uri):
        return RecordTracker(uri)
    from harness.stores.tracking import Tracker

    return Tracker(uri)


def _fix_commit(tags: dict[str, str]) -> dict[str, str]:
    if tags.get(schema.TAG_GIT) == "unknown" and os.environ.get(GIT_COMMIT_ENV):
        return {**tags, schema.TAG_GIT: os.environ[GIT_COMMIT_ENV]}
    return tags


def read_events(folder: Path) -> Iterator[dict]:
    """The record's events in order; a torn last line (a crash mid-write) is skipped."""
    path = folder / EVENTS
    if not path.is_file():
        raise UserError(f"record: no {EVENTS} in {folder}; give the folder a `--tracking-uri record:DIR` run wrote")
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                return  # torn by a crash: never acknowledged to the writer's caller
            with contextlib.suppress(ValueError):
                yield json.loads(line)


# ----------------------------------------------------------------------------------------------- state


@dataclass
class RecordedRun:
    """One run as the record holds it (folded from its events); quacks like an MLflow Run where the runner
    reads one (`info.run_id`, `info.status`, `data.tags`, `data.params`, `data.metrics`)."""

    run_id: str
    experiment_id: str
    run_name: str
    start_ms: int
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    history: list[tuple[str, float, int, int]] = field(default_factory=list)  # key, value, timestamp, step
    artifacts: list[tuple[str, str | None]] = field(default_factory=list)  # record-relative path, artifact_path
    datasets: list[dict] = field(default_factory=list)
    status: str = "RUNNING"
    end_ms: int | None = None

    @property
    def info(self) -> RecordedRun:
        return self

    @property
    def data(self) -> RecordedRun:
        return self

    @property
    def metrics(self) -> dict[str, float]:
        return {key: value for key, value, _, _ in self.history}


@dataclass
class RecordState:
    experiments: dict[str, str] = field(default_factory=dict)  # id -> name
    runs: dict[str, RecordedRun] = field(default_factory=dict)  # in creation order


def load_state(folder: Path) -> RecordState:
    state = RecordState()
    for ev in read_events(folder):
        kind, run = ev.get("ev"), state.runs.get(ev.get("run_id", ""))
        if kind == "experiment":
            state.experiments[ev["id"]] = ev["name"]
        elif kind == "run":
            state.runs[ev["run_id"]] = RecordedRun(
                ev["run_id"], ev["experiment_id"], ev["run_name"], ev["start_ms"], dict(ev["tags"])
            )
        elif run is None:
            continue
        elif kind == "params":
            run.params.update(ev["params"])
        elif kind == "tags":
            run.tags.update(ev["tags"])
        elif kind == "metrics":
            run.history.extend((k, v, ts, step) for k, v, ts, step in ev["metrics"])
        elif kind == "artifact":
            run.artifacts.append((ev["path"], ev.get("artifact_path")))
        elif kind == "dataset":
            run.datasets.append({k: ev[k] for k in ("name", "digest", "source", "context")})
        elif kind == "status":
            run.status, run.end_ms = ev["status"], ev.get("end_ms")
    return state


# ----------------------------------------------------------------------------------------------- writing


class RecordWriter:
    """Appends whole JSON lines under an exclusive lock (several processes may share a record)."""

    def __init__(self, folder: Path):
        self.folder = folder
        try:
            (folder / "artifacts").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(
                f"--tracking-uri record:{folder}: cannot create the record folder ({e.strerror}); "
                "pick a writable folder"
            ) from None
        self.path = folder / EVENTS
        if not self.path.exists():
            self.append({"ev": "format", "format": FORMAT, "created_ms": now_ms()})

    def append(self, event: dict, sync: bool = False) -> None:
        line = json.dumps(event, separators=(",", ":"), default=str) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                f.write(line)
                f.flush()
                if sync:
                    os.fsync(f.fileno())
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def copy_artifact(self, run_id: str, src: Path, artifact_path: str | None) -> str:
        rel = Path("artifacts") / run_id / (artifact_path or "") / src.name
        dest = self.folder / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        return rel.as_posix()


class _RecordClient:
    """The two MLflow client calls the runner makes on a tracker (`get_metric_history`, `set_terminated`)."""

    def __init__(self, tracker: RecordTracker):
        self.tracker = tracker

    def get_metric_history(self, run_id: str, key: str) -> list:
        run = load_state(self.tracker.folder).runs.get(run_id)
        return [_Metric(k, v, ts, step) for k, v, ts, step in (run.history if run else []) if k == key]

    def set_terminated(self, run_id: str, status: str = "FINISHED", end_time: int | None = None) -> None:
        self.tracker.writer.append(
            {"ev": "status", "run_id": run_id, "status": status, "end_ms": end_time or now_ms()}, sync=True
        )


@dataclass(frozen=True)
class _Metric:
    key: str
    value: float
    timestamp: int
    step: int


class RecordTracker:
    """harness.stores.tracking.Tracker's interface over a record folder (no MLflow)."""

    def __init__(self, uri: str):
        self.uri = uri
        folder = uri.removeprefix(SCHEME)
        if not folder:
            raise UserError("--tracking-uri: record: needs a folder, e.g. record:runs/record")
        self.folder = Path(folder).expanduser()
        self.writer = RecordWriter(self.folder)
        self.client = _RecordClient(self)

    def ensure_experiment(self, name: str, description: str = "") -> str:
        # the description travels as the parent run's mlflow.note.content tag (start_parent); import names
        # the experiment after the record's, as MLflow would
        for exp_id, exp_name in load_state(self.folder).experiments.items():
            if exp_name == name:
                return exp_id
        exp_id = uuid.uuid4().hex
        self.writer.append({"ev": "experiment", "id": exp_id, "name": name}, sync=True)
        return exp_id

    def _create_run(self, experiment_id: str, run_name: str, tags: dict[str, str]) -> str:
        run_id = uuid.uuid4().hex
        self.writer.append(
            {
                "ev": "run",
                "run_id": run_id,
                "experiment_id": experiment_id,
                "run_name": run_name,
                "start_ms": now_ms(),
                "tags": _fix_commit(tags),
            },
            sync=True,
        )
        return run_id

    def start_parent(
        self, experiment_id: str, name: str, command: str, tags: dict[str, str], description: str = ""
    ) -> str:
        all_tags = {schema.KIND: schema.KIND_MATRIX, schema.TAG_COMMAND: command, **tags}
        if description:
            all_tags[schema.TAG_NOTE] = description
        return self._create_run(experiment_id, f"matrix {name}", all_tags)

    def log_matrix(self, run_id: str, matrix_text: str, params: dict[str, Any], trials: list[dict]) -> None:
        """Tracker.log_matrix over the record: the parent's params, matrix.toml and trials.json."""
        self.writer.append(
            {"ev": "params", "run_id": run_id, "params": {k: param_value(v) for k, v in sorted(params.items())}}
        )
        run = RecordTrialRun(self, run_id)
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in (
                ("matrix.toml", matrix_text),
                ("trials.json", json.dumps(trials, indent=1, default=str)),
            ):
                (Path(tmp) / name).write_text(text, encoding="utf-8")
                run.log_artifact(Path(tmp) / name)

    def end_parent(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, MLFLOW_RUN_STATUS.get(status, "FINISHED"))

    def join_matrix(self, run_id: str, parent_id: str) -> None:
        self.writer.append({"ev": "tags", "run_id": run_id, "tags": {schema.TAG_MATRIX_RUN: parent_id}})

    def find_trial(self, experiment_id: str, trial_key: str) -> RecordedRun | None:
        """The newest run with this trial key: finished ones first (a rerun skips them)."""
        runs = [
            r
            for r in load_state(self.folder).runs.values()
            if r.experiment_id == experiment_id and r.tags.get(schema.TAG_TRIAL_KEY) == trial_key
        ]
        runs.sort(key=lambda r: r.start_ms, reverse=True)
        terminal = [r for r in runs if r.tags.get(schema.TAG_STATUS) in TERMINAL]
        return (terminal or runs or [None])[0]

    def trials(self, experiment_id: str) -> list[RecordedRun]:
        return [
            r
            for r in load_state(self.folder).runs.values()
            if r.experiment_id == experiment_id and r.tags.get(schema.KIND) == schema.KIND_TRIAL
        ]

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
    ) -> RecordTrialRun:
        if resume_run_id:
            run_id = resume_run_id
            self.writer.append({"ev": "status", "run_id": run_id, "status": "RUNNING"})
            logged = load_state(self.folder).runs[run_id].params
            params = {k: v for k, v in params.items() if k not in logged}
        else:
            all_tags = {schema.KIND: kind, **tags}
            if parent_id:
                all_tags[schema.TAG_PARENT] = parent_id
            run_id = self._create_run(experiment_id, run_name, all_tags)
        self.writer.append(
            {"ev": "params", "run_id": run_id, "params": {k: param_value(v) for k, v in sorted(params.items())}}
        )
        tags = {schema.TAG_STATUS: schema.RUNNING} | ({schema.TAG_MATRIX_RUN: parent_id} if parent_id else {})
        self.writer.append({"ev": "tags", "run_id": run_id, "tags": tags}, sync=True)
        return RecordTrialRun(self, run_id)


@dataclass
class RecordTrialRun(BufferedRun):
    """harness.stores.tracking.TrialRun's interface: the buffer goes out as one metrics line of the record."""

    system_metrics: bool = False  # MLflow's monitor is not there; accepted for the same signature

    def _entry(self, key: str, value: float, timestamp: int, step: int) -> tuple:
        return key, value, timestamp, step

    def _send(self, batch: list, wait: bool) -> None:
        """Append the batch (flushed to the OS: a killed process keeps it); wait=True also fsyncs."""
        if batch:
            self.tracker.writer.append({"ev": "metrics", "run_id": self.run_id, "metrics": batch}, sync=wait)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tracker.writer.append(
            {"ev": "tags", "run_id": self.run_id, "tags": {k: strip_credentials(str(v)) for k, v in tags.items()}}
        )

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        rel = self.tracker.writer.copy_artifact(self.run_id, Path(path), artifact_path)
        self.tracker.writer.append(
            {"ev": "artifact", "run_id": self.run_id, "path": rel, "artifact_path": artifact_path}
        )

    def log_dataset(self, name: str, digest: str, source: str, context: str = "training") -> None:
        self.tracker.writer.append(
            {
                "ev": "dataset",
                "run_id": self.run_id,
                "name": name,
                "digest": digest,
                "source": source,
                "context": context,
            }
        )


# ----------------------------------------------------------------------------------------------- import


@dataclass
class ImportSummary:
    added: list[str] = field(default_factory=list)  # run names
    skipped: list[str] = field(default_factory=list)  # already imported
    redone: list[str] = field(default_factory=list)  # half-imported by an interrupted import


RECORD_TAG = schema.TAG_RECORD_RUN_ID
IMPORT_TAG = schema.TAG_RECORD_IMPORT


def import_record(folder: str | Path, tracking_uri: str | None = None, progress=None) -> ImportSummary:
    """Replay a record into an MLflow store (idempotent: runs already imported are skipped)."""
    from mlflow.entities import Metric, Param, RunTag

    from harness.stores.tracking import Tracker

    folder = Path(str(folder).removeprefix(SCHEME))
    state = load_state(folder)
    uri = resolve_tracking_uri(tracking_uri)
    if is_record_uri(uri):
        raise UserError(
            "--tracking-uri: import needs an MLflow store (sqlite:///PATH, http://HOST:PORT), not a record: folder"
        )
    tracker = Tracker(uri)
    client = tracker.client
    summary = ImportSummary()
    exp_ids = {rid: tracker.ensure_experiment(name) for rid, name in state.experiments.items()}
    new_ids: dict[str, str] = {}
    for i, run in enumerate(state.runs.values(), 1):
        if progress:
            progress(i, len(state.runs), run.run_name)
        exp_id = exp_ids[run.experiment_id]
        found = client.search_runs([exp_id], filter_string=f"tags.`{RECORD_TAG}` = '{run.run_id}'", max_results=10)
        done = [r for r in found if r.data.tags.get(IMPORT_TAG) == "complete"]
        if done:
            new_ids[run.run_id] = done[0].info.run_id
            summary.skipped.append(run.run_name)
            continue
        for half in found:  # an interrupted import's: redo it whole
            client.delete_run(half.info.run_id)
        tags = dict(run.tags)
        for ref in (schema.TAG_PARENT, schema.TAG_MATRIX_RUN):  # run ids of the record -> of the store
            if tags.get(ref):
                tags[ref] = new_ids.get(tags[ref], tags[ref])
        mlflow_run = client.create_run(
            exp_id, start_time=run.start_ms, run_name=run.run_name, tags={RECORD_TAG: run.run_id, IMPORT_TAG: "partial"}
        )
        run_id = mlflow_run.info.run_id
        new_ids[run.run_id] = run_id
        params = [Param(k, v) for k, v in sorted(run.params.items())]
        for j in range(0, len(params), 100):  # MLflow caps a batch at 100 params
            client.log_batch(run_id, params=params[j : j + 100])
        metrics = [Metric(k, v, ts, step) for k, v, ts, step in run.history]
        for j in range(0, len(metrics), 1000):  # and at 1000 metrics
            client.log_batch(run_id, metrics=metrics[j : j + 1000])
        for rel, artifact_path in run.artifacts:
            if (folder / rel).is_file():
                client.log_artifact(run_id, str(folder / rel), artifact_path)
        for ds in run.datasets:
            _log_dataset(client, run_id, ds)
        status = run.status
        if status == "RUNNING":  # its writer is gone (killed mid-trial, e.g. at the device's time limit)
            status = "KILLED"
            if tags.get(schema.TAG_STATUS) == schema.RUNNING:
                tags[schema.TAG_STATUS] = schema.KILLED
        tag_list = [RunTag(k, v) for k, v in tags.items()]
        for j in range(0, len(tag_list), 100):
            client.log_batch(run_id, tags=tag_list[j : j + 100])
        client.set_terminated(run_id, status, end_time=run.end_ms)
        client.set_tag(run_id, IMPORT_TAG, "complete")  # last: a run without it is redone by the next import
        (summary.redone if found else summary.added).append(run.run_name)
    _save_views(client, state, exp_ids, new_ids)
    return summary


def _save_views(client, state: RecordState, exp_ids: dict[str, str], new_ids: dict[str, str]) -> None:
    """The MLflow UI view of each imported matrix invocation (harness.stores.views): its own run, the runs it created
    and the runs it was the last to reuse (the record keeps a run's latest kb.matrix_run only)."""
    from harness.stores.views import save_view

    for run in state.runs.values():
        new_id = new_ids.get(run.run_id)
        if run.tags.get(schema.KIND) != schema.KIND_MATRIX or new_id is None:
            continue
        members = [
            new_ids[r.run_id]
            for r in state.runs.values()
            if r.run_id in new_ids
            and run.run_id in (r.run_id, r.tags.get(schema.TAG_PARENT), r.tags.get(schema.TAG_MATRIX_RUN))
        ]
        with contextlib.suppress(Exception):  # the view is a nicety; the import is done
            client.set_tag(new_id, schema.TAG_MATRIX_RUN, new_id)
            save_view(client, exp_ids[run.experiment_id], new_id, f"{run.run_name} ({new_id[:8]})", members)


def _log_dataset(client, run_id: str, ds: dict) -> None:
    try:
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.entities import DatasetInput, InputTag

        dataset = MetaDataset(LocalArtifactDatasetSource(ds["source"]), name=ds["name"], digest=ds["digest"][:36])
        client.log_inputs(
            run_id, [DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", ds["context"])])]
        )
    except Exception:  # older MLflow without dataset inputs: the data hash is still a tag
        pass
