"""The tune entry: TuneConfig -> run_worker (one worker's trials on the shared storage) -> TuneOutcome.

    outcome = run_tune(TuneConfig(matrix="experiments/tune-smoke.toml", n_trials=4))   # the CLI's path
    outcome = run_worker(config, worker_id=3, on_event=forward)                         # e.g. in a Ray task

Trial counting: `n_trials` is per worker and per arm: every worker adds n_trials trials of any state to each
study, so two workers with 4 end with 8. `total_trials` instead stops asking once the study holds that many
COMPLETE + PRUNED + RUNNING trials (RUNNING counted, stale ones failed first, so concurrent workers do not
overshoot; two workers asking in the same instant can still add one extra). Given both, a worker stops at
whichever comes first. Arms are run round-robin (one trial per arm per round), so a timeout or Ctrl-C leaves
the arms with equal counts, give or take one. Three failed trials in a row stop an arm.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState
from rich.console import Console

from harness import schema
from harness.errors import UserError
from harness.spec.matrix import Matrix, load_matrix
from harness.spec.registry import TrialSpec, check_choice, suggest
from harness.stores.tracking import Tracker, strip_credentials
from harness.tune.objective import Objective
from harness.tune.progress import OnEvent, RichTuneProgress, TuneEvent, ignore_events
from harness.tune.sampler import PRUNERS, make_pruner
from harness.tune.spaces import arm_search_space, space_attr, study_name
from harness.tune.storage import DEFAULT_HEARTBEAT_S, StudyStorage, fail_stale_trials, open_storage
from harness.tune.study import ArmStudy, StudyRuns, TrialFailed, open_study

DEFAULT_N_TRIALS = 20


@dataclass
class TuneConfig:
    """One tune invocation (the `kimi-bench tune` options). Validated on construction (one-line UserErrors)."""

    matrix: Matrix | str | Path
    n_trials: int | None = None  # per worker and arm; neither budget given: the matrix's [tune] trials
    # (as total_trials), else DEFAULT_N_TRIALS
    total_trials: int | None = None  # per study, over all workers
    storage: str | None = None  # Optuna storage (harness.tune.storage); default ./optuna.db
    study_prefix: str | None = None  # studies are PREFIX/<arm>; default the matrix name
    tracking_uri: str | None = None
    cache_dir: str | None = None
    out: Path = Path("runs")
    sampler_seed: int = 0
    pruner: str | optuna.pruners.BasePruner = "median"
    arms: list[str] | None = None  # e.g. ["gpt+adamw,kimi+muon"]; default every arm
    timeout: float | None = None  # seconds; no new trial starts after it
    seed: int | None = None  # tune at this seed instead of the matrix's first ([tune] seed when it has one)
    train_overrides: dict = dataclasses.field(default_factory=dict)  # run's --device / --steps (declared tuning)
    heartbeat_s: int = DEFAULT_HEARTBEAT_S
    system_metrics: bool = True
    keep_checkpoints: bool = False

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        for name, value in (("--n-trials", self.n_trials), ("--total-trials", self.total_trials)):
            if value is not None and value < 1:
                raise UserError(f"{name}: must be >= 1, got {value}")
        if self.timeout is not None and self.timeout <= 0:
            raise UserError(f"--timeout: must be > 0 seconds, got {self.timeout}")
        if self.heartbeat_s < 1:
            raise UserError(f"--heartbeat: must be >= 1 second, got {self.heartbeat_s}")
        if isinstance(self.pruner, str):
            check_choice("--pruner", self.pruner, PRUNERS)
        if self.n_trials is None and self.total_trials is None:
            declared = self._declared_tune()
            if declared is not None:  # the matrix's own budget: each study ends holding [tune] trials
                self.total_trials = declared.trials
            else:
                self.n_trials = DEFAULT_N_TRIALS

    def _declared_tune(self):
        """The matrix's [tune] section, or None (a matrix without one); a path is loaded once, here."""
        if not isinstance(self.matrix, Matrix):
            self.matrix = load_matrix(self.matrix)
        return self.matrix.spec.tune

    @property
    def target(self) -> int:
        """The per-arm budget that sizes TPE's random start and the pruner's warm-up."""
        return min(x for x in (self.n_trials, self.total_trials) if x is not None)


@dataclass
class TuneOutcome:
    storage: str
    studies: dict[str, ArmStudy]
    interrupted: bool = False
    worker_id: int = 0


def run_tune(config: TuneConfig, console: Console | None = None) -> TuneOutcome:
    """Tune every (selected) arm of the matrix in this process, with progress on the console."""
    with RichTuneProgress(console) as progress:
        return run_worker(config, worker_id=0, on_event=progress)


def run_worker(config: TuneConfig, worker_id: int = 0, on_event: OnEvent | None = None) -> TuneOutcome:
    """One worker: join (or create) every arm's study on the shared storage and add its trials. Progress goes
    to on_event only; nothing is printed. Ctrl-C fails the running trial (killed in MLflow) and returns an
    outcome with interrupted=True; every study run is summarized either way."""
    from harness.trial.loop import resolve_device

    emit = on_event or ignore_events
    matrix = config.matrix if isinstance(config.matrix, Matrix) else load_matrix(config.matrix)
    selected = _parse_arms(matrix, config.arms)
    st = open_storage(config.storage, config.tracking_uri, config.heartbeat_s)
    data = _prepare_data(matrix, config.cache_dir, emit, worker_id)
    bases = _base_specs(matrix, data.vocab_size, selected, _seed_of(config, matrix), config.train_overrides)

    tracker = Tracker(config.tracking_uri)
    experiment_id = tracker.ensure_experiment(matrix.name)
    device = resolve_device(next(iter(bases.values())).train.device)
    runs = StudyRuns(tracker, experiment_id, _run_tags(data, device), st, config.system_metrics)
    st.on_stale.append(runs.mark_killed)
    command = strip_credentials(" ".join(shlex.quote(a) for a in ["kimi-bench", *sys.argv[1:]]))

    def note(text: str, label: str = "note", style: str = "yellow") -> None:
        emit(
            TuneEvent(
                "note",
                worker_id,
                text=f": {text}" if label else text,
                style=style if label else "",
                info={"label": label},
            )
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial comes from the events instead
        studies = _open_studies(config, matrix, bases, st, runs, command, note)
        outcome = TuneOutcome(st.display, studies, worker_id=worker_id)
        n, total = config.n_trials, config.total_trials
        note(
            f"tuning {len(studies)} arm(s) of {matrix.name}: "
            + (f"{n} trial(s) per arm from this worker" if n else "")
            + (" and " if n and total else "")
            + (f"until each study holds {total}" if total else "")
            + f"; storage {st.display}",
            label="",
        )
        try:
            _loop(config, studies, st, runs, data, emit, note, worker_id)
        except KeyboardInterrupt:
            outcome.interrupted = True
            note(
                "the current trial is failed in Optuna and killed in MLflow; run the same command to go on",
                label="interrupted",
            )
        finally:
            for arm in studies.values():
                try:
                    runs.summarize(arm, schema.KILLED if outcome.interrupted else schema.FINISHED)
                except Exception as e:  # the trials are safe in Optuna and MLflow; only the summary is lost
                    note(f"could not summarize {arm.name} on MLflow ({e})")
    return outcome


def tune(matrix: Matrix | str | Path, *, console: Console | None = None, **options) -> TuneOutcome:
    """`run_tune(TuneConfig(matrix, **options), console)`: the keyword form cli.py calls today."""
    return run_tune(TuneConfig(matrix, **options), console)


# -----------------------------------------------------------------------------------------------------------
# setup


def _prepare_data(matrix: Matrix, cache_dir: str | None, emit: OnEvent, worker_id: int):
    from harness.data import DataConfig, prepare

    fields = {**matrix.data_fields(), **({"cache_dir": Path(cache_dir)} if cache_dir else {})}

    def on_progress(description: str, completed: int, total: int) -> None:
        emit(TuneEvent("data", worker_id, step=completed, total=total, text=description))

    return prepare(DataConfig(**fields), progress=on_progress)


def _run_tags(data, device) -> dict[str, str]:
    from harness.trial.runs import run_tags

    return run_tags(data, device)


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


def _seed_of(config: TuneConfig, matrix: Matrix) -> int | None:
    """--seed, else the [tune] section's tuning seed (held out from the evaluation seeds), else None."""
    from harness.spec.tune_section import tuning_seed

    if config.seed is not None or matrix.spec.tune is None:
        return config.seed
    return tuning_seed(matrix.spec.tune, matrix.spec.matrix.seeds)


def _base_specs(
    matrix: Matrix, vocab_size: int, arms: list[tuple[str, str]], seed: int | None, train_overrides: dict | None = None
) -> dict[str, TrialSpec]:
    """Each arm's spec at the first preset, first seed (or --seed) and first data seed."""
    specs: dict[str, TrialSpec] = {}
    for spec in matrix.expand(vocab_size, **(train_overrides or {})):
        if (spec.variant, spec.optimizer) in arms and spec.arm not in specs:
            specs[spec.arm] = spec if seed is None else dataclasses.replace(spec, seed=seed)
    return specs


def _open_studies(
    config: TuneConfig,
    matrix: Matrix,
    bases: dict[str, TrialSpec],
    st: StudyStorage,
    runs: StudyRuns,
    command: str,
    note,
) -> dict[str, ArmStudy]:
    studies: dict[str, ArmStudy] = {}
    prefix = config.study_prefix or matrix.name
    for arm, base in bases.items():
        name = study_name(prefix, arm)
        space = arm_search_space(matrix, base.variant, base.optimizer)
        pruner_obj, pruner_desc = make_pruner(config.pruner, config.target, base)
        study = open_study(
            st, name, base, space, pruner_obj, pruner_desc, config.sampler_seed, config.target, matrix, note
        )
        studies[arm] = ArmStudy(arm, name, base, study, space, matrix)
        studies[arm].run_id = runs.study_run(
            studies[arm],
            command,
            {
                schema.TAG_PRUNER: pruner_desc,
                schema.TAG_SAMPLER_SEED: str(config.sampler_seed),
                schema.TAG_MATRIX_FILE: str(matrix.path),
                schema.TAG_SEARCH_SPACE: json.dumps(space_attr(space)),
            },
        )
    return studies


# -----------------------------------------------------------------------------------------------------------
# the loop


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


def _done(arm: ArmStudy, n_trials: int | None) -> int:
    if n_trials is not None:
        return arm.added
    counts = arm.counts()
    return counts["complete"] + counts["pruned"]


def _arm_event(arm: ArmStudy, config: TuneConfig, worker_id: int) -> TuneEvent:
    n, total = config.n_trials, config.total_trials
    best = arm.best()
    return TuneEvent(
        "arm",
        worker_id,
        arm.arm,
        total=total if total is not None and n is None else n,
        info={"done": _done(arm, n), "best": (best.number, best.value) if best else None},
    )


def _loop(
    config: TuneConfig,
    studies: dict[str, ArmStudy],
    st: StudyStorage,
    runs: StudyRuns,
    data,
    emit: OnEvent,
    note,
    worker_id: int,
) -> None:
    """Round-robin over the arms, one trial each per round, until every arm has its trials (or time is up)."""
    n_trials, total_trials = config.n_trials, config.total_trials
    deadline = time.monotonic() + config.timeout if config.timeout else None
    for arm in studies.values():
        emit(_arm_event(arm, config, worker_id))
    while True:
        pending = [a for a in studies.values() if _wants_more(a, st, n_trials, total_trials)]
        if not pending:
            return
        for arm in pending:
            if deadline is not None and time.monotonic() > deadline:
                note(f"{config.timeout:g} s reached; no new trials started", label="--timeout")
                return
            if not _wants_more(arm, st, n_trials, total_trials):
                continue
            fail_stale_trials(arm.study, st)
            objective = Objective(arm, st, runs, data, config.out, emit, config.keep_checkpoints, worker_id)
            arm.study.optimize(objective, n_trials=1, catch=(TrialFailed,))
            arm.added += 1
            trials = arm.study.get_trials(deepcopy=False)
            state = trials[objective.number].state if objective.number is not None else None
            arm.consecutive_fail = arm.consecutive_fail + 1 if state == TrialState.FAIL else 0
            if arm.consecutive_fail >= 3:
                note(
                    "3 failed trials in a row; stopping this arm (see the runs' error.txt)", label=arm.arm, style="red"
                )
                arm.done = True
            emit(_arm_event(arm, config, worker_id))
