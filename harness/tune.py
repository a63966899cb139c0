"""Optuna studies: one per arm of a matrix, the same trial budget and the same kind of search space for each.

    kimi-bench tune --matrix experiments/tune-smoke.toml --n-trials 4        # then: run --tuned
    kimi-bench tune -m experiments/paper.toml --total-trials 30 --storage journal:/shared/paper.journal

Study `<prefix>/<variant>+<optimizer>` (prefix: the matrix name) tunes that arm at the matrix's first preset,
first seed and full budget. The objective is the trial's `val/loss_final` (minimized). Decisions:

- Diverged trial (non-finite training loss): COMPLETE with value +inf, not FAIL. It spent its share of the
  budget, so it counts toward the trial totals, and TPE sees its parameters as bad (TPE ignores FAIL trials
  and would keep sampling the diverging region). Importances skip non-finite values; `best_params_for_arms`
  never picks one. Trials that crash or run out of memory are FAIL (not counted toward --total-trials).
- Trial counting: `--n-trials N` is per worker and per arm: every process running the command adds N
  trials of any state to each study, so two workers with N=4 end with 8. `--total-trials T` instead stops
  asking once the study holds T COMPLETE + PRUNED + RUNNING trials (RUNNING counted, stale ones failed first,
  so concurrent workers do not overshoot; two workers asking in the same instant can still add one extra).
  Given both, a worker stops at whichever comes first. Arms are run round-robin (one trial per arm per
  round), so a --timeout or Ctrl-C leaves the arms with equal counts, give or take one.
- Sampler: TPE (multivariate, constant liar for parallel workers) re-seeded before every trial from
  (--sampler-seed, trial number): one worker is reproducible, two workers do not draw the same random
  start points, and arms with the same search space start from the same points.
- Pruning: the trial's evals (every train.eval_interval steps) report val loss to Optuna; the pruner may
  stop a trial before its budget (never at step 0 or at the last step). Median (default), Hyperband or none;
  the choice is recorded in the study's user attrs.
- Storage: `--storage` is a local sqlite file by default (./optuna.db), any SQLAlchemy URL, a plain file path
  (sqlite), or `journal:PATH` (Optuna JournalFileBackend: a file on a shared filesystem, no database). The
  MLflow store is refused: its sqlite file cannot hold an Optuna study (CONTRACT, REFERENCES).
- Stale trials (a worker killed mid-trial): RDB storages use Optuna's heartbeat (`heartbeat_interval`,
  `grace_period` = 2 x interval, `fail_stale_trials` before every trial). Optuna's journal storage has no
  heartbeat, so this module writes one itself: a thread sets the trial's system attr `kb:heartbeat` every
  interval, and every worker fails RUNNING trials whose last beat (or start, if none) is older than the grace
  period. Clocks of machines sharing a journal file must agree within the grace period. Either way the stale
  trial's MLflow run is marked killed.
- MLflow: per study a run `study <name>` (kb.kind=study, in the matrix's experiment; its id is kept in the
  study's user attrs so every worker nests under the same run) and per Optuna trial a child run
  (kb.kind=tune-trial) trained and logged by `harness.trial.run_trial`, like a matrix trial. The tune-trial
  specs carry the study name as `experiment`, so their trial keys never collide with the matrix's trials.
  At the end the study run gets the best value/params (tags, metrics), `trials.csv` (trials_dataframe) and
  `importances.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shlex
import sqlite3
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from harness.errors import UserError
from harness.matrix import Matrix, load_matrix
from harness.registry import TrialSpec, check_choice, resolve_optimizer, suggest
from harness.tracking import Tracker, first_line, resolve_tracking_uri, strip_credentials

DEFAULT_STORAGE_FILE = "optuna.db"
DEFAULT_N_TRIALS = 20
DEFAULT_HEARTBEAT_S = 60
PRUNERS = ("median", "hyperband", "none")
OBJECTIVE = "val/loss_final"
HEARTBEAT_ATTR = "kb:heartbeat"  # journal storage: unix time of the trial's last heartbeat
RUN_ATTR = "mlflow_run_id"  # trial user attr: its MLflow run
MOE_VARIANTS = ("gpt-moe", "kimi")


# -----------------------------------------------------------------------------------------------------------
# search spaces (data: every range in one place)


@dataclass(frozen=True)
class Dim:
    """One searched hyperparameter: where it goes (optim / train / model field) and its range."""

    name: str
    target: str  # "optim" | "train" | "model"
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[str, ...] = ()
    why: str = ""

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def describe(self) -> dict[str, Any]:
        if self.choices:
            return {"name": self.name, "target": self.target, "choices": list(self.choices)}
        return {"name": self.name, "target": self.target, "low": self.low, "high": self.high, "log": self.log}


# Ranges: around the defaults in registry.OPTIMIZER_DEFAULTS / arch.optimizers, wide enough to hold the tiny
# and the paper presets' optima. Muon's muon_lr spans both scalings: "original" wants ~0.02 (Keller Jordan),
# "match_rms_adamw" an AdamW-like lr (Moonlight), so one log range 1e-3..1e-1 covers both.
_LR = Dim("lr", "optim", 1e-4, 1e-2, log=True, why="AdamW lr (Muon arms: the AdamW groups' lr)")
_WD = Dim("weight_decay", "optim", 0.0, 0.3,
          why="decoupled weight decay of the AdamW groups (Muon's own stays at its default, 0)")
_WARMUP = Dim("warmup_frac", "train", 0.0, 0.2, why="linear warmup share of the budget (warmup_steps unset)")
SEARCH_SPACES: dict[str, tuple[Dim, ...]] = {
    "adamw": (_LR, _WD, _WARMUP, Dim("beta2", "optim", 0.9, 0.999, why="AdamW beta2 (beta1 kept)")),
    "muon": (
        Dim("muon_lr", "optim", 1e-3, 1e-1, log=True, why="Muon lr (hidden matrices)"),
        _LR, _WD, _WARMUP,
        Dim("momentum", "optim", 0.85, 0.99, why="Muon momentum (Nesterov)"),
        Dim("muon_scaling", "optim", choices=("original", "match_rms_adamw"), why="Muon update scale rule"),
    ),
}
MOE_SPACE: tuple[Dim, ...] = (
    Dim("bias_update_speed", "model", 1e-4, 1e-2, log=True, why="router bias step gamma (K2/V3: 1e-3)"),
)
FAMILY = {"adamw": "adamw", "muon": "muon", "muonclip": "muon"}  # optimizer -> search space


def search_space(variant: str, optimizer: str) -> tuple[Dim, ...]:
    """The searched dims of one arm: its optimizer family's space, plus the router's for MoE variants."""
    if optimizer not in FAMILY:
        raise UserError(f"optimizer {optimizer!r}: no search space; add it to harness.tune.FAMILY "
                        f"(families: {', '.join(SEARCH_SPACES)})")
    return SEARCH_SPACES[FAMILY[optimizer]] + (MOE_SPACE if variant in MOE_VARIANTS else ())


def split_params(space: tuple[Dim, ...], params: dict[str, Any], beta1: float) -> dict[str, dict[str, Any]]:
    """Optuna params -> {"optim": OptimizerConfig overrides, "train": TrainConfig fields, "model": dims}."""
    out: dict[str, dict[str, Any]] = {"optim": {}, "train": {}, "model": {}}
    for dim in space:
        if dim.name not in params:
            continue
        value = params[dim.name]
        if dim.name == "beta2":
            out["optim"]["betas"] = (beta1, value)
        else:
            out[dim.target][dim.name] = value
    if "warmup_frac" in out["train"]:
        out["train"]["warmup_steps"] = None  # a fixed warmup_steps would override the tuned fraction
    return out


def apply_params(base: TrialSpec, matrix: Matrix, params: dict[str, Any], experiment: str) -> TrialSpec:
    """The arm's base spec with one trial's params applied (optimizer rebuilt from the matrix's overrides)."""
    parts = split_params(search_space(base.variant, base.optimizer), params, base.optim.betas[0])
    optim = resolve_optimizer(base.optimizer, {**matrix.spec.optim.get(base.optimizer, {}), **parts["optim"]})
    return dataclasses.replace(base, experiment=experiment, optim=optim,
                               train=dataclasses.replace(base.train, **parts["train"]),
                               dims=dataclasses.replace(base.dims, **parts["model"]))


def study_name(prefix: str, arm: str) -> str:
    return f"{prefix}/{arm}"


# -----------------------------------------------------------------------------------------------------------
# storage


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
    if (file is not None and (file.name == "mlflow.db" or file == tracking_file or _is_mlflow_sqlite(file))) \
            or url == tracking:
        raise UserError(f"--storage: {strip_credentials(url)} is the MLflow store; Optuna needs its own "
                        f"file or database, e.g. --storage sqlite:///{DEFAULT_STORAGE_FILE}")


def _storage_url(storage: str | None) -> str:
    if storage is None or not storage.strip():
        return f"sqlite:///{Path.cwd() / DEFAULT_STORAGE_FILE}"
    storage = storage.strip()
    if storage.startswith("journal:") or "://" in storage:
        return storage
    return f"sqlite:///{Path(storage).expanduser().resolve()}"  # a plain path: a sqlite file


def open_storage(storage: str | None, tracking_uri: str | None = None, heartbeat_s: int = DEFAULT_HEARTBEAT_S,
                 must_exist: bool = False) -> StudyStorage:
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
                    url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_s, grace_period=st.grace_s,
                    heartbeat_stale_trial_callback=st._stale)
            return st
        except Exception as e:
            if attempt == 2 or path is None:
                first = first_line(e)
                raise UserError(f"--storage {st.display}: cannot open the Optuna storage ({first}); "
                                "check the URL, the driver and the server") from None
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def _check_file(path: Path, must_exist: bool) -> None:
    if must_exist and not path.is_file():
        raise UserError(f"--study-storage: no Optuna storage at {path}; run kimi-bench tune first or pass "
                        "the storage it used")
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


# -----------------------------------------------------------------------------------------------------------
# sampler and pruner


def n_startup_trials(target: int) -> int:
    """TPE's random start: a third of the per-arm budget, 2..10 (Optuna's default 10 suits 30+ trials)."""
    return max(2, min(10, target // 3))


class SeededTPESampler(optuna.samplers.TPESampler):
    """TPE whose random stream is re-seeded from (seed, trial number) at the start of every trial.

    Trial numbers are unique in a study, so one worker is reproducible, two workers sharing the study never
    draw the same random start points, and arms with the same search space start from the same points.
    """

    def __init__(self, seed: int, **kwargs: Any):
        super().__init__(seed=seed, **kwargs)
        self.base_seed = seed

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        trial_seed = (self.base_seed * 1_000_003 + trial.number) % 2**32
        random_sampler = getattr(self, "_random_sampler", None)
        for state in (getattr(self, "_rng", None), getattr(random_sampler, "_rng", None)):
            if state is not None:  # optuna's LazyRandomState (private): without it, TPE's own stream is used
                state.rng.seed(trial_seed)
        super().before_trial(study, trial)


def make_sampler(seed: int, target: int) -> optuna.samplers.TPESampler:
    return SeededTPESampler(seed, n_startup_trials=n_startup_trials(target), constant_liar=True)


def make_pruner(pruner: str | optuna.pruners.BasePruner, target: int, spec: TrialSpec
                ) -> tuple[optuna.pruners.BasePruner, str]:
    """The pruner and its description (a study user attr). A BasePruner passes through (tests, scripts)."""
    if isinstance(pruner, optuna.pruners.BasePruner):
        return pruner, type(pruner).__name__
    name = check_choice("--pruner", pruner, PRUNERS)
    if name == "median":
        n = max(2, min(5, target // 4))
        return (optuna.pruners.MedianPruner(n_startup_trials=n, n_warmup_steps=0),
                f"median(n_startup_trials={n}, n_warmup_steps=0, checked every eval)")
    if name == "hyperband":
        total = spec.train.total_steps(spec.dims.block_size)
        max_resource: int | str = total if total is not None else "auto"
        hyperband = optuna.pruners.HyperbandPruner(min_resource=spec.train.eval_interval,
                                                   max_resource=max_resource, reduction_factor=3)
        return (hyperband,
                f"hyperband(min_resource={spec.train.eval_interval}, max_resource={max_resource}, "
                "reduction_factor=3, resource=step)")
    return optuna.pruners.NopPruner(), "none"


# -----------------------------------------------------------------------------------------------------------
# one arm's study


class TrialFailed(Exception):
    """A trial that crashed or ran out of memory: Optuna records it FAIL."""


@dataclass
class ArmStudy:
    arm: str
    name: str
    base: TrialSpec
    study: optuna.Study
    space: tuple[Dim, ...]
    matrix: Matrix
    run_id: str | None = None  # the MLflow study run
    added: int = 0  # trials this worker added
    consecutive_fail: int = 0
    done: bool = False

    def counts(self) -> dict[str, int]:
        out = {"complete": 0, "pruned": 0, "fail": 0, "running": 0, "diverged": 0}
        for t in self.study.get_trials(deepcopy=False):
            out[t.state.name.lower()] = out.get(t.state.name.lower(), 0) + 1
            if t.state == TrialState.COMPLETE and not math.isfinite(t.value):
                out["diverged"] += 1
        return out

    def best(self) -> optuna.trial.FrozenTrial | None:
        finite = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                  if t.value is not None and math.isfinite(t.value)]
        return min(finite, key=lambda t: (t.value, t.number)) if finite else None


def _space_attr(space: tuple[Dim, ...]) -> list[dict[str, Any]]:
    return [d.describe() for d in space]


def _open_study(st: StudyStorage, name: str, base: TrialSpec, space: tuple[Dim, ...], pruner_obj,
                pruner_desc: str, seed: int, target: int, matrix: Matrix, console: Console) -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=st.storage, direction="minimize",
                                sampler=make_sampler(seed, target), pruner=pruner_obj, load_if_exists=True)
    attrs = study.user_attrs
    wanted = {
        "kb.matrix": matrix.name, "kb.arm": base.arm, "kb.preset": base.preset, "kb.seed": base.seed,
        "kb.objective": f"{OBJECTIVE} at the budget, minimized; diverged trials = +inf",
        "kb.search_space": _space_attr(space),
        "kb.sampler": f"TPESampler(multivariate, constant_liar, n_startup_trials={n_startup_trials(target)}, "
                      f"seed=({seed}, trial number))",
        "kb.pruner": pruner_desc,
    }
    if "kb.search_space" in attrs and attrs["kb.search_space"] != wanted["kb.search_space"]:
        raise UserError(f"--study-prefix: study {name} in {st.display} was created with another search "
                        "space; use a new --study-prefix (or storage) to tune with this one")
    if "kb.seed" in attrs and (attrs["kb.seed"], attrs.get("kb.preset")) != (base.seed, base.preset):
        raise UserError(f"--seed: study {name} tunes seed {attrs['kb.seed']} at preset "
                        f"{attrs.get('kb.preset')}; use the same --seed or a new --study-prefix")
    if attrs.get("kb.pruner", pruner_desc) != pruner_desc:
        console.print(f"[yellow]note[/]: study {name} was started with pruner {attrs['kb.pruner']}; "
                      f"this worker prunes with {pruner_desc}")
    for key, value in wanted.items():
        if key not in attrs:
            study.set_user_attr(key, value)
    return study


# -----------------------------------------------------------------------------------------------------------
# MLflow


class Mlflow:
    """The study runs and tune-trial runs of one tune invocation."""

    def __init__(self, tracker: Tracker, experiment_id: str, common_tags: dict[str, str], st: StudyStorage,
                 system_metrics: bool):
        self.tracker, self.experiment_id, self.common_tags = tracker, experiment_id, common_tags
        self.st, self.system_metrics = st, system_metrics
        self.attr_key = f"mlflow_study_run:{strip_credentials(tracker.uri)}"  # one run per tracking store

    def study_run(self, arm: ArmStudy, command: str, extra: dict[str, str]) -> str:
        """The study's MLflow run: the one a worker already made (study user attr) or a new one."""
        client = self.tracker.client
        run_id = arm.study.user_attrs.get(self.attr_key)
        if run_id:
            with contextlib.suppress(Exception):
                run = client.get_run(run_id)
                if run.info.lifecycle_stage == "active" and run.info.experiment_id == self.experiment_id:
                    client.update_run(run_id, status="RUNNING")
                    return run_id
        b = arm.base
        tags = {**self.common_tags, "kb.kind": "study", "kb.study": arm.name, "kb.arm": arm.arm,
                "kb.variant": b.variant, "kb.optimizer": b.optimizer, "kb.preset": b.preset,
                "kb.seed": str(b.seed), "kb.experiment": b.experiment, "kb.optuna_storage": self.st.display,
                "kb.command": command, "kb.objective": OBJECTIVE, **extra}
        run_id = client.create_run(self.experiment_id, run_name=f"study {arm.name}", tags=tags).info.run_id
        arm.study.set_user_attr(self.attr_key, run_id)
        # Two workers creating the run at once: the last write wins; the other drops its own run.
        stored = optuna.load_study(study_name=arm.name, storage=self.st.storage).user_attrs.get(self.attr_key)
        if stored and stored != run_id:
            client.delete_run(run_id)
            return stored
        return run_id

    def mark_killed(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Stale-trial callback: the dead worker's run is killed, not running forever."""
        run_id = trial.user_attrs.get(RUN_ATTR)
        if not run_id:
            return
        client = self.tracker.client
        run = client.get_run(run_id)
        if run.data.tags.get("kb.status") == "running":
            client.set_tag(run_id, "kb.status", "killed")
            client.set_tag(run_id, "kb.error", "worker stopped beating; failed as stale by another worker")
            client.set_terminated(run_id, "KILLED")

    def summarize(self, arm: ArmStudy, status: str) -> None:
        """Best value/params as tags and metrics, trials.csv and importances.json on the study run."""
        if arm.run_id is None:
            return
        from mlflow.entities import Metric, RunTag

        client = self.tracker.client
        counts = arm.counts()
        n_done = counts["complete"] + counts["pruned"]
        ts = int(time.time() * 1000)
        metrics = [Metric(f"study/n_{k}", float(v), ts, n_done) for k, v in counts.items() if k != "running"]
        n_trials = len(arm.study.get_trials(deepcopy=False))
        tags = [RunTag("kb.status", status), RunTag("kb.n_trials", str(n_trials))]
        best = arm.best()
        if best is not None:
            metrics.append(Metric("study/best_value", float(best.value), ts, n_done))
            tags += [RunTag("kb.best_value", f"{best.value:.6g}"), RunTag("kb.best_trial", str(best.number)),
                     RunTag("kb.best_params", json.dumps(best.params, sort_keys=True)),
                     RunTag("kb.best_run_id", str(best.user_attrs.get(RUN_ATTR, "")))]
        client.log_batch(arm.run_id, metrics=metrics, tags=tags)
        with tempfile.TemporaryDirectory() as tmp:
            csv = Path(tmp) / "trials.csv"
            arm.study.trials_dataframe().to_csv(csv, index=False)
            imp = Path(tmp) / "importances.json"
            imp.write_text(json.dumps(param_importances(arm.study), indent=2, sort_keys=True))
            space = Path(tmp) / "search_space.json"
            space.write_text(json.dumps(_space_attr(arm.space), indent=2))
            for path in (csv, imp, space):
                client.log_artifact(arm.run_id, str(path))
        client.set_terminated(arm.run_id, {"finished": "FINISHED", "killed": "KILLED"}.get(status, "FAILED"))


def param_importances(study: optuna.Study) -> dict[str, Any]:
    """fANOVA importances over COMPLETE trials with a finite value; needs 2 or more."""
    finite = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if t.value is not None and math.isfinite(t.value)]
    if len(finite) < 2:
        return {"importances": None, "n_trials": len(finite),
                "reason": f"{len(finite)} complete trial(s) with a finite value; importances need 2"}
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        values = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except Exception as e:  # e.g. every trial at the same point: nothing to attribute
        return {"importances": None, "n_trials": len(finite), "reason": f"{type(e).__name__}: {e}"[:300]}
    return {"importances": {k: float(v) for k, v in values.items()}, "n_trials": len(finite),
            "evaluator": "fanova(seed=0)", "objective": OBJECTIVE}


# -----------------------------------------------------------------------------------------------------------
# the tune loop


@dataclass
class TuneOutcome:
    storage: str
    studies: dict[str, ArmStudy]
    interrupted: bool = False


def _parse_arms(matrix: Matrix, arms: list[str] | None) -> list[tuple[str, str]]:
    all_arms = matrix.arms()
    if not arms:
        return all_arms
    names = {f"{v}+{o}": (v, o) for v, o in all_arms}
    wanted = [a.strip() for item in arms for a in item.split(",") if a.strip()]
    for a in wanted:
        if a not in names:
            raise UserError(f"--arms: {a!r} is not an arm of {matrix.name}; {suggest(a, tuple(names))}")
    return [names[a] for a in dict.fromkeys(wanted)]


def _base_specs(matrix: Matrix, vocab_size: int, arms: list[tuple[str, str]], seed: int | None
                ) -> dict[str, TrialSpec]:
    """Each arm's spec at the first preset, first seed (or --seed) and first data seed."""
    specs: dict[str, TrialSpec] = {}
    for spec in matrix.expand(vocab_size):
        if (spec.variant, spec.optimizer) in arms and spec.arm not in specs:
            specs[spec.arm] = spec if seed is None else dataclasses.replace(spec, seed=seed)
    return specs


def _validate(n_trials: int | None, total_trials: int | None, timeout: float | None) -> None:
    if n_trials is not None and n_trials < 1:
        raise UserError(f"--n-trials: must be >= 1, got {n_trials}")
    if total_trials is not None and total_trials < 1:
        raise UserError(f"--total-trials: must be >= 1, got {total_trials}")
    if timeout is not None and timeout <= 0:
        raise UserError(f"--timeout: must be > 0 seconds, got {timeout}")


def tune(matrix: Matrix | str | Path, *, n_trials: int | None = None, total_trials: int | None = None,
         storage: str | None = None, study_prefix: str | None = None, tracking_uri: str | None = None,
         cache_dir: str | None = None, out: Path = Path("runs"), sampler_seed: int = 0,
         pruner: str | optuna.pruners.BasePruner = "median", arms: list[str] | None = None,
         timeout: float | None = None, seed: int | None = None, heartbeat_s: int = DEFAULT_HEARTBEAT_S,
         console: Console | None = None, system_metrics: bool = True, keep_checkpoints: bool = False
         ) -> TuneOutcome:
    """Tune every (selected) arm of a matrix; see the module docstring for the rules."""
    from harness.runner import prepare_data, run_tags
    from harness.trial import resolve_device

    console = console or Console()
    out = Path(out)
    matrix = matrix if isinstance(matrix, Matrix) else load_matrix(matrix)
    _validate(n_trials, total_trials, timeout)
    if n_trials is None and total_trials is None:
        n_trials = DEFAULT_N_TRIALS
    target = min(x for x in (n_trials, total_trials) if x is not None)  # sizes TPE's start and the pruner
    if isinstance(pruner, str):
        check_choice("--pruner", pruner, PRUNERS)
    selected = _parse_arms(matrix, arms)
    st = open_storage(storage, tracking_uri, heartbeat_s)
    prefix = study_prefix or matrix.name
    data = prepare_data(matrix.data_fields(), cache_dir, console)
    bases = _base_specs(matrix, data.vocab_size, selected, seed)

    tracker = Tracker(tracking_uri)
    experiment_id = tracker.ensure_experiment(matrix.name)
    device = resolve_device(next(iter(bases.values())).train.device)
    mlf = Mlflow(tracker, experiment_id, run_tags(data, device), st, system_metrics)
    st.on_stale.append(mlf.mark_killed)
    command = strip_credentials(" ".join(shlex.quote(a) for a in ["kimi-bench", *sys.argv[1:]]))

    studies: dict[str, ArmStudy] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial comes from us instead
        for arm, base in bases.items():
            name = study_name(prefix, arm)
            space = search_space(base.variant, base.optimizer)
            pruner_obj, pruner_desc = make_pruner(pruner, target, base)
            study = _open_study(st, name, base, space, pruner_obj, pruner_desc, sampler_seed, target, matrix,
                                console)
            studies[arm] = ArmStudy(arm, name, base, study, space, matrix)
            studies[arm].run_id = mlf.study_run(studies[arm], command, {
                "kb.pruner": pruner_desc, "kb.sampler_seed": str(sampler_seed),
                "kb.matrix_file": str(matrix.path), "kb.search_space": json.dumps(_space_attr(space))})
        outcome = TuneOutcome(st.display, studies)
        console.print(f"tuning {len(studies)} arm(s) of {matrix.name}: "
                      + (f"{n_trials} trial(s) per arm from this worker" if n_trials else "")
                      + (" and " if n_trials and total_trials else "")
                      + (f"until each study holds {total_trials}" if total_trials else "")
                      + f"; storage {st.display}")
        try:
            _loop(studies, st, mlf, data, out, n_trials, total_trials, timeout, console, keep_checkpoints)
        except KeyboardInterrupt:
            outcome.interrupted = True
            console.print("[yellow]interrupted[/]: the current trial is failed in Optuna and killed in "
                          "MLflow; run the same command to go on")
        finally:
            for arm in studies.values():
                try:
                    mlf.summarize(arm, "killed" if outcome.interrupted else "finished")
                except Exception as e:  # the trials are safe in Optuna and MLflow; only the summary is lost
                    console.print(f"[yellow]note[/]: could not summarize {arm.name} on MLflow ({e})")
    return outcome


def _wants_more(arm: ArmStudy, st: StudyStorage, n_trials: int | None, total_trials: int | None) -> bool:
    if arm.done:
        return False
    if n_trials is not None and arm.added >= n_trials:
        return False
    if total_trials is not None:
        fail_stale_trials(arm.study, st)
        counts = arm.counts()
        if counts["complete"] + counts["pruned"] + counts["running"] >= total_trials:
            return False
    return True


def _loop(studies: dict[str, ArmStudy], st: StudyStorage, mlf: Mlflow, data, out: Path, n_trials: int | None,
          total_trials: int | None, timeout: float | None, console: Console, keep_checkpoints: bool) -> None:
    """Round-robin over the arms, one trial each per round, until every arm has its trials (or time is up)."""
    deadline = time.monotonic() + timeout if timeout else None
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        tasks = {}
        for arm in studies.values():
            total = total_trials if total_trials is not None and n_trials is None else n_trials
            tasks[arm.arm] = bar.add_task(arm.arm, total=total, info="", completed=_done(arm, n_trials))
        step_task = bar.add_task("  trial", total=None, info="", visible=False)
        while True:
            pending = [a for a in studies.values() if _wants_more(a, st, n_trials, total_trials)]
            if not pending:
                return
            for arm in pending:
                if deadline is not None and time.monotonic() > deadline:
                    console.print(f"[yellow]--timeout[/]: {timeout:g} s reached; no new trials started")
                    return
                if not _wants_more(arm, st, n_trials, total_trials):
                    continue
                fail_stale_trials(arm.study, st)
                objective = _Objective(arm, st, mlf, data, out, bar, step_task, console, keep_checkpoints)
                arm.study.optimize(objective, n_trials=1, catch=(TrialFailed,))
                arm.added += 1
                trials = arm.study.get_trials(deepcopy=False)
                state = trials[objective.number].state if objective.number is not None else None
                arm.consecutive_fail = arm.consecutive_fail + 1 if state == TrialState.FAIL else 0
                if arm.consecutive_fail >= 3:
                    console.print(f"[red]{arm.arm}[/]: 3 failed trials in a row; stopping this arm (see the "
                                  "runs' error.txt)")
                    arm.done = True
                best = arm.best()
                bar.update(tasks[arm.arm], completed=_done(arm, n_trials),
                           info=f"best {best.value:.4f} (#{best.number})" if best else "")


def format_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _done(arm: ArmStudy, n_trials: int | None) -> int:
    if n_trials is not None:
        return arm.added
    counts = arm.counts()
    return counts["complete"] + counts["pruned"]


class _Objective:
    """One Optuna trial = one harness trial (run_trial) logged as a tune-trial child of the study run."""

    def __init__(self, arm: ArmStudy, st: StudyStorage, mlf: Mlflow, data, out: Path, bar: Progress,
                 step_task, console: Console, keep_checkpoints: bool):
        self.arm, self.st, self.mlf, self.data, self.out = arm, st, mlf, data, out
        self.bar, self.step_task, self.console, self.keep = bar, step_task, console, keep_checkpoints
        self.number: int | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        from harness.runner import trial_tags
        from harness.trial import run_trial

        self.number = trial.number
        arm = self.arm
        params = {d.name: d.suggest(trial) for d in arm.space}
        spec = apply_params(arm.base, arm.matrix, params, experiment=arm.name)
        key = spec.key(self.data.data_hash)
        tags = {**self.mlf.common_tags, **trial_tags(spec, key), "kb.experiment": arm.base.experiment,
                "kb.study": arm.name, "kb.optuna_trial": str(trial.number),
                "kb.optuna_storage": self.st.display}
        run_params = {**spec.flat_params(), **{f"tune.{k}": v for k, v in params.items()},
                      "tune.study": arm.name, "tune.trial": trial.number}
        run = self.mlf.tracker.start_trial(self.mlf.experiment_id, arm.run_id, f"{arm.arm} t{trial.number}",
                                           tags, run_params, system_metrics=self.mlf.system_metrics,
                                           kind="tune-trial")
        trial.set_user_attr(RUN_ATTR, run.run_id)
        trial.set_user_attr("trial_key", key)
        run.log_dataset(self.data.corpus_name, self.data.data_hash, str(self.data.path))
        total = spec.train.total_steps(spec.dims.block_size)
        self.bar.update(self.step_task, description=f"  {arm.arm} #{trial.number}", total=total, completed=0,
                        visible=True, info="")

        def on_progress(step: int, total_: int | None, info: dict) -> None:
            self.bar.update(self.step_task, completed=step, info=f"loss {info['loss']:.3f}")

        def on_eval(step: int, metrics: dict) -> None:
            from harness.trial import Pruned

            value = metrics.get("val/loss")
            if step <= 0 or value is None or not math.isfinite(value):
                return  # step 0 is the untrained model: the same for every trial
            trial.report(value, step)
            if (total is None or step < total) and trial.should_prune():
                raise Pruned(f"pruned at step {step} (val loss {value:.4f})")

        out_dir = self.out / arm.name / f"trial{trial.number:04d}-{key}"
        try:
            with JournalHeartbeat(self.st, trial._trial_id):
                result = run_trial(spec, self.data, out_dir, run, progress=on_progress, on_eval=on_eval,
                                   resume=False)
        except BaseException:  # run_trial only raises KeyboardInterrupt (run ended killed) or on a bug here
            with contextlib.suppress(Exception):
                run.end("killed")
            raise
        self.bar.update(self.step_task, visible=False)
        if not self.keep:
            for name in ("model.pt", "trial_state.pt"):
                with contextlib.suppress(OSError):
                    (out_dir / name).unlink()
        trial.set_user_attr("kb_status", result.status)
        value = result.metrics.get(OBJECTIVE)
        shown = format_params(params)
        if result.status == "finished" and value is not None:
            value = float(value) if math.isfinite(value) else math.inf
            self._done(run.run_id, "COMPLETE", value, f"{OBJECTIVE} {value:.4f}", shown)
            return value
        if result.status == "diverged":
            self._done(run.run_id, "COMPLETE", math.inf, f"diverged ({result.error}): value inf", shown)
            return math.inf
        if result.status == "pruned":
            self._done(run.run_id, "PRUNED", None, result.error or "pruned", shown)
            raise optuna.TrialPruned(result.error)
        self._done(run.run_id, "FAIL", None, f"{result.status}: {result.error}", shown)
        raise TrialFailed(f"{result.status}: {result.error}")

    def _done(self, run_id: str, state: str, value: float | None, what: str, shown: str) -> None:
        tags = {"kb.optuna_state": state}
        if value is not None:
            tags["kb.optuna_value"] = f"{value:.6g}"
        with contextlib.suppress(Exception):
            for k, v in tags.items():
                self.mlf.tracker.client.set_tag(run_id, k, v)
        style = {"COMPLETE": "green", "PRUNED": "yellow"}.get(state, "red")
        self.console.print(f"[{style}]{state.lower()}[/] {self.arm.arm} #{self.number}: {what}  "
                           f"[dim]{shown}[/]")


# -----------------------------------------------------------------------------------------------------------
# results: run --tuned, summary


def tuned_entry(best: optuna.trial.FrozenTrial, space: tuple[Dim, ...], beta1: float, display: str,
                name: str) -> dict[str, Any]:
    """One arm's entry for Matrix.expand(tuned=...): optimizer overrides in `params`, the rest beside."""
    parts = split_params(space, best.params, beta1)
    return {"params": parts["optim"], "train": parts["train"], "model": parts["model"],
            "source": f"optuna:{display}#{name}/trial{best.number} value={best.value:.6g}",
            "value": best.value, "trial": best.number, "run_id": best.user_attrs.get(RUN_ATTR)}


def best_params_for_arms(matrix: Matrix, storage: str | None, study_prefix: str | None = None
                         ) -> dict[str, dict[str, Any]]:
    """Each arm's best trial (lowest finite val/loss_final) -> {"params", "train", "model", "source", ...}.

    `params` are OptimizerConfig overrides (Matrix.expand merges them over the matrix's [optim.NAME]);
    `train` (warmup_frac, warmup_steps=None) and `model` (bias_update_speed) must be applied to the spec's
    TrainConfig and ModelDims. Every arm of the matrix needs a study with a finished trial: tuning one arm
    and not the other would make the comparison unequal, so a missing one is an error.
    """
    st = open_storage(storage, must_exist=True)
    prefix = study_prefix or matrix.name
    out: dict[str, dict[str, Any]] = {}
    missing: list[str] = []
    known = set(optuna.get_all_study_names(st.storage))
    for variant, opt in matrix.arms():
        arm = f"{variant}+{opt}"
        name = study_name(prefix, arm)
        if name not in known:
            missing.append(f"{name} (no study)")
            continue
        study = optuna.load_study(study_name=name, storage=st.storage)
        finite = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                  if t.value is not None and math.isfinite(t.value)]
        if not finite:
            missing.append(f"{name} (no finished trial)")
            continue
        best = min(finite, key=lambda t: (t.value, t.number))
        beta1 = resolve_optimizer(opt, matrix.spec.optim.get(opt, {})).betas[0]
        out[arm] = tuned_entry(best, search_space(variant, opt), beta1, st.display, name)
    if missing:
        raise UserError(f"--tuned: {'; '.join(missing)} in {st.display}; run kimi-bench tune --matrix "
                        f"{matrix.path} first (every arm needs its study)")
    return out


def summary_table(outcome: TuneOutcome) -> Table:
    table = Table(title=f"tune summary ({outcome.storage})", header_style="bold")
    for col in ("study", "added", "complete", "pruned", "diverged", "failed", "best val loss", "best"):
        table.add_column(col, justify="left" if col == "study" else "right")
    for arm in outcome.studies.values():
        c = arm.counts()
        best = arm.best()
        table.add_row(arm.name, str(arm.added), str(c["complete"] - c["diverged"]), str(c["pruned"]),
                      str(c["diverged"]), str(c["fail"]), f"{best.value:.4f}" if best else "-",
                      f"#{best.number}" if best else "-")
    return table


def best_params_lines(outcome: TuneOutcome) -> list[str]:
    lines = []
    for arm in outcome.studies.values():
        best = arm.best()
        if best is not None:
            lines.append(f"{arm.name} #{best.number}: {format_params(best.params)}")
    return lines


# -----------------------------------------------------------------------------------------------------------
