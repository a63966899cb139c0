"""Tuning declared in the matrix (`[tune]`, harness/spec/tune_section.py): `kimi-bench run --matrix FILE` first runs
one Optuna study per arm with the same trial budget, then trains every evaluation seed at each arm's best.

    declared = run_declared(matrix, options, console)     # the studies; -> each arm's best (Matrix.expand tuned=)
    trials = declared.keep(matrix.expand(vocab, tuned=declared.tuned))

Budget: `[tune].trials` per study counts trials that ran to a result (complete, diverged or pruned), as
`kimi-bench tune --total-trials`; failed trials are retried, and three failures in a row stop that arm (its
evaluation trials are then skipped, the other arms go on). Resuming: the studies live in the Optuna storage
and the evaluation trials in MLflow under their keys, so the same command continues where a kill left off;
a trial left RUNNING by a killed process is failed first (run --matrix is one worker: a concurrent
`kimi-bench tune` on the same studies is not expected), so a kill loses at most the trial in flight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.progress import TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from harness import schema
from harness.spec.matrix import Matrix
from harness.spec.registry import TrialSpec, resolve_optimizer
from harness.spec.tune_section import seed_note, tuning_seed
from harness.tune.progress import RichTuneProgress, TuneEvent
from harness.tune.results import tuned_entry
from harness.tune.run import TuneConfig, run_worker
from harness.tune.spaces import study_name
from harness.tune.storage import open_storage


@dataclass
class DeclaredTuning:
    tuned: dict[str, dict] = field(default_factory=dict)  # arm -> tuned_entry (Matrix.expand(tuned=...))
    failed: list[str] = field(default_factory=list)  # arms whose study finished no trial: not evaluated
    interrupted: bool = False

    def keep(self, trials: Sequence[TrialSpec]) -> list[TrialSpec]:
        """The evaluation trials of the arms that have a best configuration."""
        return [t for t in trials if t.arm in self.tuned]


def config_for(
    matrix: Matrix,
    *,
    storage: str | None = None,
    study_prefix: str | None = None,
    tracking_uri: str | None = None,
    cache_dir: str | None = None,
    out: Path = Path("runs"),
    train_overrides: dict | None = None,
) -> TuneConfig:
    """The TuneConfig of a matrix's [tune] section (run's --study-storage / --study-prefix win)."""
    t = matrix.spec.tune
    assert t is not None, "config_for needs a matrix with a [tune] section"
    return TuneConfig(
        matrix,
        total_trials=t.trials,
        storage=storage or t.storage,
        study_prefix=study_prefix,
        tracking_uri=tracking_uri,
        cache_dir=cache_dir,
        out=out,
        sampler_seed=t.sampler_seed,
        pruner=t.pruner,
        seed=tuning_seed(t, matrix.spec.matrix.seeds),
        train_overrides={k: v for k, v in (train_overrides or {}).items() if v is not None},
    )


def fail_orphans(config: TuneConfig) -> int:
    """Fail the RUNNING trials of this matrix's studies (left by a killed run) and kill their MLflow runs;
    -> how many. Without this a killed trial would count toward the budget until its heartbeat expires."""
    from harness.stores.tracking import Tracker

    matrix = config.matrix
    assert isinstance(matrix, Matrix)
    st = open_storage(config.storage, config.tracking_uri, config.heartbeat_s)
    known = set(optuna.get_all_study_names(st.storage))
    client = None
    n = 0
    for variant, opt in matrix.arms():
        name = study_name(config.study_prefix or matrix.name, f"{variant}+{opt}")
        if name not in known:
            continue
        study = optuna.load_study(study_name=name, storage=st.storage)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            try:
                st.storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            n += 1
            run_id = t.user_attrs.get("mlflow_run_id")
            if run_id:
                client = client or Tracker(config.tracking_uri).client
                try:
                    client.set_tag(run_id, schema.TAG_STATUS, schema.KILLED)
                    client.set_terminated(run_id, "KILLED")
                except Exception:  # the run may be gone; the Optuna state is what counts
                    pass
    return n


class DeclaredProgress(RichTuneProgress):
    """The tune bars with the run's view: `study k/N <arm>`, `trial j/M`, and the ETA of all the tuning."""

    def __init__(self, console: Console | None, arms: list[str], trials: int):
        super().__init__(console)
        self.bar.columns = (*self.bar.columns[:-1], TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
        self.order, self.trials = arms, trials
        self.done: dict[str, int] = {}
        self.total_task = None

    def _on_arm(self, e: TuneEvent) -> None:
        super()._on_arm(e)
        self.done[e.arm] = e.info["done"]
        k = self.order.index(e.arm) + 1 if e.arm in self.order else 0
        self.bar.update(self.arms[e.arm], description=f"study {k}/{len(self.order)} {e.arm}")
        if self.total_task is None:
            self.total_task = self.bar.add_task("tuning, all studies", total=len(self.order) * self.trials, info="")
        self.bar.update(self.total_task, completed=min(sum(self.done.values()), len(self.order) * self.trials))

    def _on_trial_start(self, e: TuneEvent) -> None:
        super()._on_trial_start(e)
        j = min(self.done.get(e.arm, 0) + 1, self.trials)
        self.bar.update(self.step_task, description=f"  trial {j}/{self.trials} {e.arm} (#{e.trial})")


def check_single_process(matrix_path: Path) -> None:
    """The studies run in one process: under torchrun (--nproc) every rank would tune the same studies."""
    import os

    from harness.errors import UserError

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(
            f"--nproc: [tune] runs its studies in one process; tune first with `kimi-bench tune "
            f"--matrix {matrix_path} --total-trials N`, then `kimi-bench run --tuned --nproc ...`"
        )


def run_declared(
    matrix: Matrix,
    console: Console,
    *,
    storage: str | None = None,
    study_prefix: str | None = None,
    tracking_uri: str | None = None,
    cache_dir: str | None = None,
    out: Path = Path("runs"),
    train_overrides: dict | None = None,
) -> DeclaredTuning:
    """Run (or continue) every arm's study to [tune].trials; -> each arm's best, the arms that failed."""
    config = config_for(
        matrix,
        storage=storage,
        study_prefix=study_prefix,
        tracking_uri=tracking_uri,
        cache_dir=cache_dir,
        out=out,
        train_overrides=train_overrides,
    )
    t = matrix.spec.tune
    note, overlap = seed_note(t, matrix.spec.matrix.seeds)
    console.print(f"[yellow]{note}[/]" if overlap else f"tuning: {note}", highlight=False)
    orphans = fail_orphans(config)
    if orphans:
        console.print(
            f"tuning: {orphans} trial(s) left running by a killed run failed; they are retried", highlight=False
        )
    arms = [f"{v}+{o}" for v, o in matrix.arms()]
    from harness.console import mlflow_logs_to

    with mlflow_logs_to(config.out / matrix.name / "mlflow.log"), DeclaredProgress(console, arms, t.trials) as progress:
        outcome = run_worker(config, on_event=progress)
    declared = DeclaredTuning(interrupted=outcome.interrupted)
    if outcome.interrupted:  # the trial in flight is failed; the same command goes on from the studies' state
        return declared
    for arm, study in outcome.studies.items():
        best = study.best()
        if best is None:
            counts = study.counts()
            declared.failed.append(arm)
            console.print(
                f"[red]{arm}[/]: no tuning trial finished ({counts['fail']} failed); its evaluation "
                f"trials are skipped, the other arms go on (see the error.txt of its trials under "
                f"{config.out / study.name})",
                highlight=False,
            )
            continue
        beta1 = resolve_optimizer(study.base.optimizer, matrix.spec.optim.get(study.base.optimizer, {})).betas[0]
        declared.tuned[arm] = tuned_entry(best, study.space, beta1, outcome.storage, study.name)
    return declared


# -----------------------------------------------------------------------------------------------------------
# --dry-run


def tuning_plan(
    matrix: Matrix, trials: Sequence[TrialSpec], eval_costs: Sequence, console: Console
) -> tuple[float, float]:
    """Print the tuning cost (every arm: [tune].trials trials at the tuning seed, full budget: an upper bound,
    pruned trials stop early) apart from the evaluation cost; -> (tuning seconds, evaluation seconds)."""
    from harness.plan import _duration, _si

    t = matrix.spec.tune
    assert t is not None
    first: dict[str, object] = {}  # arm -> the cost of its first trial: a study trial costs the same (seed aside)
    for spec, cost in zip(trials, eval_costs, strict=True):
        first.setdefault(spec.arm, cost)
    table = Table(title=f"tuning: one study per arm, {t.trials} trials each (pruner {t.pruner})", header_style="bold")
    for col in ("study", "trials", "tokens", "train FLOPs", "time (at most)"):
        table.add_column(col, justify="left" if col == "study" else "right")
    tune_s = tune_tokens = tune_flops = 0.0
    for arm, c in first.items():
        s, tok, fl = (c.seconds or 0) * t.trials, (c.tokens or 0) * t.trials, (c.train_flops or 0) * t.trials
        tune_s, tune_tokens, tune_flops = tune_s + s, tune_tokens + tok, tune_flops + fl
        table.add_row(arm, str(t.trials), f"{tok:,.0f}", _si(fl, "FLOP"), _duration(s))
    console.print(table)
    eval_s = sum(c.seconds or 0 for c in eval_costs)
    note, overlap = seed_note(t, matrix.spec.matrix.seeds)
    console.print(
        ("warning: " if overlap and not note.startswith("warning") else "") + note, markup=False, highlight=False
    )
    console.print(
        f"tuning: {len(first)} studies x {t.trials} trials, {tune_tokens:,.0f} tokens, "
        f"{_si(tune_flops, 'FLOP')}, about {_duration(tune_s)} (at most; pruned trials stop early); "
        f"evaluation: {len(trials)} trials, about {_duration(eval_s)}; together about "
        f"{_duration(tune_s + eval_s)} (the rate of the estimate above)",
        markup=False,
        highlight=False,
    )
    return tune_s, eval_s
