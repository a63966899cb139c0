"""`kimi-bench run --matrix` with a [tune] section: equal-budget studies first, then every evaluation seed at
each arm's best; resumable; an arm whose every trial fails is stopped alone (harness/tune/declared.py)."""

from __future__ import annotations

import optuna
import pytest
from rich.console import Console

import harness.measure.speed_runs
import harness.trial.loop
from harness import schema
from harness.commands import RunOptions, run
from harness.status import status_table
from tests.harness.tune.common import REPO, runs_of, write_matrix

TUNE = """
[tune]
trials = 2
[tune.ranges."kimi+muon"]
muon_lr = [3e-3, 3e-2]
"""


def _run(env, tmp_path, matrix, monkeypatch) -> int:
    monkeypatch.setattr(harness.measure.speed_runs, "measure_matrix_speed", lambda *a, **k: [])  # not under test here
    opts = RunOptions(
        matrix=matrix,
        tracking_uri=env["uri"],
        out=tmp_path / "runs",
        cache_dir=env["cache"],
        study_storage=f"sqlite:///{tmp_path}/optuna.db",
    )
    return run(opts, Console(width=200, record=True))


def _two_seeds(path):
    path.write_text(path.read_text().replace("seeds = [0]", "seeds = [0, 1]"))
    return path


@pytest.mark.slow
def test_run_tunes_each_arm_then_evaluates_held_out_seeds_and_resumes(env, tmp_path, monkeypatch):
    matrix = _two_seeds(write_matrix(env, tmp_path, "declared", extra=TUNE))
    assert _run(env, tmp_path, matrix, monkeypatch) == 0
    storage = f"sqlite:///{tmp_path}/optuna.db"
    for arm in ("gpt+adamw", "kimi+muon"):
        study = optuna.load_study(study_name=f"declared/{arm}", storage=storage)
        assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
        assert study.user_attrs[schema.TAG_SEED] == 1000  # held out from the evaluation seeds 0, 1
    muon = optuna.load_study(study_name="declared/kimi+muon", storage=storage)
    assert all(3e-3 <= t.params["muon_lr"] <= 3e-2 for t in muon.trials)  # the arm's range override
    trials = runs_of(env, "declared", schema.KIND_TRIAL)
    assert sorted((r.data.tags[schema.TAG_ARM], r.data.tags[schema.TAG_SEED]) for r in trials) == [
        ("gpt+adamw", "0"),
        ("gpt+adamw", "1"),
        ("kimi+muon", "0"),
        ("kimi+muon", "1"),
    ]
    assert all(r.data.tags[schema.TAG_TUNED_FROM].startswith("optuna:") for r in trials)
    caption = status_table(None, matrix, env["uri"]).caption
    assert "study 1/2 declared/gpt+adamw: 2/2 trials (2 complete)" in caption
    # a kill left a trial RUNNING: the rerun fails it, and neither trains anything twice nor adds trials
    optuna.load_study(study_name="declared/gpt+adamw", storage=storage).ask()
    n_tune = len(runs_of(env, "declared", schema.KIND_TUNE_TRIAL))
    assert _run(env, tmp_path, matrix, monkeypatch) == 0
    assert len(runs_of(env, "declared", schema.KIND_TUNE_TRIAL)) == n_tune == 4
    assert len(runs_of(env, "declared", schema.KIND_TRIAL)) == 4
    states = [t.state.name for t in optuna.load_study(study_name="declared/gpt+adamw", storage=storage).trials]
    assert states == ["COMPLETE", "COMPLETE", "FAIL"]


@pytest.mark.slow
def test_an_arm_whose_every_trial_fails_stops_alone(env, tmp_path, monkeypatch):
    real = harness.trial.loop.run_trial

    def kimi_crashes(spec, data, out_dir, run, **kw):
        if spec.variant == "kimi":
            return harness.trial.loop.TrialResult(schema.FAILED, spec.key(data.data_hash), error="RuntimeError: boom")
        return real(spec, data, out_dir, run, **kw)

    monkeypatch.setattr(harness.trial.loop, "run_trial", kimi_crashes)
    matrix = write_matrix(env, tmp_path, "declared-fail", extra=TUNE)
    assert _run(env, tmp_path, matrix, monkeypatch) == 1
    trials = runs_of(env, "declared-fail", schema.KIND_TRIAL)
    assert [r.data.tags[schema.TAG_ARM] for r in trials] == ["gpt+adamw"]  # the other arm went on
    kimi = optuna.load_study(study_name="declared-fail/kimi+muon", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [t.state.name for t in kimi.trials] == ["FAIL"] * 3


ARMS_4 = (
    '[{ variant = "gpt", optimizer = "adamw" }, { variant = "gpt", optimizer = "muon" }, '
    '{ variant = "kimi", optimizer = "adamw" }, { variant = "kimi", optimizer = "muon" }]'
)


@pytest.mark.slow
def test_tiny_factorial_matrix_with_tune_end_to_end_report(env, tmp_path, monkeypatch):
    """run --matrix with [tune] on gpt/kimi x adamw/muon, then the report: the budget table, a tuning status on
    every quality and compute claims row (none on exact and speed rows), both tuning figures, the decomposition."""
    from reports.collect import collect
    from reports.markdown import write_report
    from tests.reports.test_markdown import table_rows

    matrix = _two_seeds(write_matrix(env, tmp_path, "declared-e2e", arms=ARMS_4, extra="[tune]\ntrials = 2\n"))
    assert _run(env, tmp_path, matrix, monkeypatch) == 0
    md = write_report(collect(env["uri"], "declared-e2e"), tmp_path / "report").read_text()
    assert "held out from the evaluation seeds, with an equal budget of 2 trials each." in md
    budget = table_rows(md, "## Tuning budget")
    assert sorted(budget) == ["gpt+adamw", "gpt+muon", "kimi+adamw", "kimi+muon"]
    assert {r["budget (trials with a result)"] for r in budget.values()} == {"2"}
    assert {r["tuned at seed"] for r in budget.values()} == {"1000"}
    block = md.split("## Claims vs measured", 1)[1].split("\n\n", 2)[1].splitlines()[2:]
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in block]
    from reports.claims import CLAIMS

    kinds = {c.text: c.kind for c in CLAIMS}
    measured = [c for c in cells if c[-2] != "not measured"]  # columns end: tuning, verdict, why
    assert measured
    for c in measured:
        kind = kinds[c[0].split(" [")[0]]
        assert (c[-3] != "") == (kind in ("stat", "compute")), c  # the tuning column
        if kind in ("stat", "compute"):
            assert c[-3] == "both tuned, equal budgets (2 trials each)" or "optimum at the edge" in c[-3], c
    for name in ("tuning_best_so_far.png", "tuning_lr_gpt_adamw.png", "tuning_lr_kimi_muon.png"):
        assert f"(figures/{name})" in md and (tmp_path / "report" / "figures" / name).is_file(), name
    section = md.split("## Which change made the difference", 1)[1]
    decomposition = table_rows(section, section.split("\n\n")[1])  # the table under its "Arms ...:" line
    assert "interaction (architecture effect at muon - at adamw)" in decomposition
    assert decomposition["optimizer muon vs adamw, at gpt"]["seeds"] == "2"


def test_progress_shows_study_k_of_n_trial_j_of_m_and_the_total():
    import io

    from harness.tune.declared import DeclaredProgress
    from harness.tune.progress import TuneEvent

    progress = DeclaredProgress(Console(file=io.StringIO()), ["gpt+adamw", "kimi+muon"], trials=3)
    with progress:
        for arm, done in (("gpt+adamw", 1), ("kimi+muon", 0)):
            progress(TuneEvent("arm", 0, arm, total=3, info={"done": done, "best": None}))
        progress(TuneEvent("trial_start", 0, "kimi+muon", trial=4, total=100))
        shown = {t.description: (t.completed, t.total) for t in progress.bar.tasks if t.visible}
    assert shown["study 1/2 gpt+adamw"] == (1, 3) and shown["study 2/2 kimi+muon"] == (0, 3)
    assert shown["tuning, all studies"] == (1, 6)  # the ETA column reads this task's rate
    assert shown["  trial 1/3 kimi+muon (#4)"] == (0, 100)


@pytest.mark.slow
def test_tune_command_fills_each_study_to_the_matrix_budget_and_no_further(env, tmp_path):
    from harness.commands import tune
    from tests.harness.tune.common import ARM_GPT

    matrix = write_matrix(env, tmp_path, "declared-tune", arms=ARM_GPT, extra="[tune]\ntrials = 2\n")
    storage = f"sqlite:///{tmp_path}/optuna.db"
    kw = dict(tracking_uri=env["uri"], cache_dir=env["cache"], out=tmp_path / "runs", storage=storage)
    console = Console(width=200, record=True)
    for _ in range(2):  # the rerun finds both trials and adds none: [tune] trials is what a study holds
        tune(matrix, [], console, **kw)
        study = optuna.load_study(study_name="declared-tune/gpt+adamw", storage=storage)
        assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert "tuning until each study holds 2 trials ([tune] trials of declared-tune)" in console.export_text()
    tune(matrix, [], console, n_trials=1, **kw)  # an explicit --n-trials still adds that many
    assert len(optuna.load_study(study_name="declared-tune/gpt+adamw", storage=storage).trials) == 3


def test_a_library_call_without_a_budget_takes_the_matrix_tune_trials():
    """harness.tune.tune(matrix) with neither budget: the [tune] section's trials per study (what `kimi-bench
    tune` and `run --matrix` use), not DEFAULT_N_TRIALS; a matrix without [tune] keeps the default."""
    from harness.spec.matrix import load_matrix
    from harness.tune.run import DEFAULT_N_TRIALS, TuneConfig

    declared = TuneConfig(load_matrix(REPO / "experiments" / "fair-cpu.toml"))
    assert (declared.n_trials, declared.total_trials) == (None, 12)
    by_path = TuneConfig(REPO / "experiments" / "fair-cpu.toml", out="x")
    assert (by_path.n_trials, by_path.total_trials) == (None, 12)
    plain = TuneConfig(load_matrix(REPO / "experiments" / "smoke.toml"))
    assert (plain.n_trials, plain.total_trials) == (DEFAULT_N_TRIALS, None)
    explicit = TuneConfig(load_matrix(REPO / "experiments" / "fair-cpu.toml"), n_trials=3)
    assert (explicit.n_trials, explicit.total_trials) == (3, None)
