"""Optuna storage: parsing --storage, refusing the MLflow store, opening it, and stale-trial heartbeats.

`--storage` is a local sqlite file by default (./optuna.db), any SQLAlchemy URL, a plain file path (sqlite),
or `journal:PATH` (Optuna JournalFileBackend: a file on a shared filesystem, no database). The MLflow store
is refused: its sqlite file holds MLflow's schema, and Optuna needs its own.

Stale trials (a worker killed mid-trial): RDB storages use Optuna's heartbeat (`heartbeat_interval`,
`grace_period` = 2 x interval, `fail_stale_trials` before every trial). Optuna's journal storage has no
heartbeat, so JournalHeartbeat writes one: a thread sets the trial's system attr `kb:heartbeat` every
interval, and every worker fails RUNNING trials whose last beat (or start, if none) is older than the grace
period. Clocks of machines sharing a journal file must agree within the grace period.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from harness.errors import UserError
from harness.stores.tracking import first_line, resolve_tracking_uri, strip_credentials

DEFAULT_STORAGE_FILE = "optuna.db"
DEFAULT_HEARTBEAT_S = 60
HEARTBEAT_ATTR = "kb:heartbeat"  # journal storage: unix time of the trial's last heartbeat


@dataclass
class StudyStorage:
    storage: optuna.storages.BaseStorage
    display: str  # the URL without credentials (for tags, sources and messages)
    native_heartbeat: bool  # RDB: Optuna's heartbeat; journal: ours (HEARTBEAT_ATTR)
    heartbeat_s: int
    on_stale: list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = field(default_factory=list)

    @property
    def grace_s(self) -> int:
        return 2 * self.heartbeat_s

    def _stale(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        for callback in self.on_stale:
            with contextlib.suppress(Exception):
                callback(study, trial)


def _sqlite_path(url: str) -> Path | None:
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///").split("?")[0]).expanduser().resolve()
    return None


def _is_mlflow_sqlite(path: Path) -> bool:
    """True for an existing sqlite file holding MLflow's tables (whatever its name)."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as con:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.Error:
        return False
    return {"experiments", "runs", "metrics"} <= tables


def check_not_mlflow(url: str, file: Path | None, tracking_uri: str | None) -> None:
    """Refuse a storage that is the MLflow store: its file name, its path, its tables or its URL."""
    tracking = resolve_tracking_uri(tracking_uri)
    tracking_file = _sqlite_path(tracking)
    if (
        file is not None and (file.name == "mlflow.db" or file == tracking_file or _is_mlflow_sqlite(file))
    ) or url == tracking:
        raise UserError(
            f"--storage: {strip_credentials(url)} is the MLflow store; Optuna needs its own "
            f"file or database, e.g. --storage sqlite:///{DEFAULT_STORAGE_FILE}"
        )


def _storage_url(storage: str | None) -> str:
    if storage is None or not storage.strip():
        return f"sqlite:///{Path.cwd() / DEFAULT_STORAGE_FILE}"
    storage = storage.strip()
    if storage.startswith("journal:") or "://" in storage:
        return storage
    return f"sqlite:///{Path(storage).expanduser().resolve()}"  # a plain path: a sqlite file


def open_storage(
    storage: str | None,
    tracking_uri: str | None = None,
    heartbeat_s: int = DEFAULT_HEARTBEAT_S,
    must_exist: bool = False,
) -> StudyStorage:
    """Parse --storage (default ./optuna.db; an RDB URL; a path; journal:PATH) and open it."""
    url = _storage_url(storage)
    if heartbeat_s < 1:
        raise UserError(f"--heartbeat: must be >= 1 second, got {heartbeat_s}")
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:")).expanduser().resolve()
        check_not_mlflow(url, path, tracking_uri)
        _check_file(path, must_exist)
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        backend = JournalFileBackend(str(path))
        return StudyStorage(JournalStorage(backend), f"journal:{path}", False, heartbeat_s)
    path = _sqlite_path(url)
    check_not_mlflow(url, path, tracking_uri)
    if path is not None:
        _check_file(path, must_exist)
    st = StudyStorage(None, strip_credentials(url), True, heartbeat_s)  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if path is not None else {}
    for attempt in range(3):  # two workers creating a fresh sqlite schema at once: the loser retries
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                st.storage = optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=kwargs,
                    heartbeat_interval=heartbeat_s,
                    grace_period=st.grace_s,
                    heartbeat_stale_trial_callback=st._stale,
                )
            return st
        except Exception as e:
            if attempt == 2 or path is None:
                first = first_line(e)
                raise UserError(
                    f"--storage {st.display}: cannot open the Optuna storage ({first}); "
                    "check the URL, the driver and the server"
                ) from None
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def _check_file(path: Path, must_exist: bool) -> None:
    if must_exist and not path.is_file():
        raise UserError(
            f"--study-storage: no Optuna storage at {path}; run kimi-bench tune first or pass the storage it used"
        )
    if not path.parent.is_dir():
        raise UserError(f"--storage: folder {path.parent} does not exist; create it or pick another path")


def fail_stale_trials(study: optuna.Study, st: StudyStorage) -> None:
    """Fail RUNNING trials whose worker stopped beating (see the module docstring)."""
    if st.native_heartbeat:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # calls st._stale for each failed trial
        return
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = t.system_attrs.get(HEARTBEAT_ATTR)
        last = float(beat) if beat is not None else t.datetime_start.timestamp()  # local naive -> epoch
        if now - last <= st.grace_s:
            continue
        try:
            failed = st.storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it first
            continue
        if failed:
            st._stale(study, t)


class JournalHeartbeat:
    """Journal storage: a thread writing the trial's HEARTBEAT_ATTR every interval (RDB: a no-op)."""

    def __init__(self, st: StudyStorage, trial_id: int):
        self.st, self.trial_id = st, trial_id
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name="kb-heartbeat")

    def _beat(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                self.st.storage.set_trial_system_attr(self.trial_id, HEARTBEAT_ATTR, time.time())
            if self.stop.wait(self.st.heartbeat_s):
                return

    def __enter__(self) -> JournalHeartbeat:
        if not self.st.native_heartbeat:
            self.st.storage.set_trial_system_attr(self.trial_id, HEARTBEAT_ATTR, time.time())
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.thread.is_alive():
            self.stop.set()
            self.thread.join()
