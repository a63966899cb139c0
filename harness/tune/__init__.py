"""Optuna studies: one per arm of a matrix, the same trial budget and the same kind of search space for each.

    kimi-bench tune --matrix experiments/tune-smoke.toml --n-trials 4        # then: run --tuned
    kimi-bench tune -m experiments/paper.toml --total-trials 30 --storage journal:/shared/paper.journal

Study `<prefix>/<variant>+<optimizer>` (prefix: the matrix name) tunes that arm at the matrix's first preset,
first seed and full budget; the objective is the trial's `val/loss_final` (minimized). One module per concern:

  spaces     the search spaces as data, and how a trial's params reach a TrialSpec
  storage    --storage parsing, the MLflow-store refusal, opening, stale-trial heartbeats
  sampler    TPE seeded per trial (public Optuna API), the pruners
  study      one arm's study and its MLflow study run (summary, importances)
  objective  one Optuna trial = one harness trial (diverged = +inf, crash = FAIL, pruned)
  run        TuneConfig -> run_worker / run_tune -> TuneOutcome; trial counting and the round-robin loop
  progress   TuneEvent (what a worker reports) and its rich console view
  results    best params per arm for `run --tuned`, the summary table
"""

from harness.tune.objective import Objective, format_params
from harness.tune.progress import OnEvent, RichTuneProgress, TuneEvent
from harness.tune.results import best_params_for_arms, best_params_lines, summary_table, tuned_entry
from harness.tune.run import DEFAULT_N_TRIALS, TuneConfig, TuneOutcome, run_tune, run_worker, tune
from harness.tune.sampler import PRUNERS, TrialSeededTPE, make_pruner, make_sampler, n_startup_trials
from harness.tune.spaces import (
    FAMILY,
    MOE_SPACE,
    MOE_VARIANTS,
    SEARCH_SPACES,
    Dim,
    apply_params,
    search_space,
    split_params,
    study_name,
)
from harness.tune.storage import (
    DEFAULT_HEARTBEAT_S,
    DEFAULT_STORAGE_FILE,
    HEARTBEAT_ATTR,
    JournalHeartbeat,
    StudyStorage,
    check_not_mlflow,
    fail_stale_trials,
    open_storage,
)
from harness.tune.study import OBJECTIVE, RUN_ATTR, ArmStudy, StudyRuns, TrialFailed, param_importances

__all__ = [
    "ArmStudy",
    "DEFAULT_HEARTBEAT_S",
    "DEFAULT_N_TRIALS",
    "DEFAULT_STORAGE_FILE",
    "Dim",
    "FAMILY",
    "HEARTBEAT_ATTR",
    "JournalHeartbeat",
    "MOE_SPACE",
    "MOE_VARIANTS",
    "OBJECTIVE",
    "Objective",
    "OnEvent",
    "PRUNERS",
    "RUN_ATTR",
    "RichTuneProgress",
    "SEARCH_SPACES",
    "StudyRuns",
    "StudyStorage",
    "TrialFailed",
    "TrialSeededTPE",
    "TuneConfig",
    "TuneEvent",
    "TuneOutcome",
    "apply_params",
    "best_params_for_arms",
    "best_params_lines",
    "check_not_mlflow",
    "fail_stale_trials",
    "format_params",
    "make_pruner",
    "make_sampler",
    "n_startup_trials",
    "open_storage",
    "param_importances",
    "run_tune",
    "run_worker",
    "search_space",
    "split_params",
    "study_name",
    "summary_table",
    "tune",
    "tuned_entry",
]
