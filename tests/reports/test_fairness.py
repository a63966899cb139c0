"""Tuning status of every verdict (reports/fairness.py): the edge rule, pair statuses, provisional verdicts, and
the report's banner, budget table and tuning figures on stores with and without equal-budget studies."""

from __future__ import annotations

import dataclasses

import pytest

from reports import fairness
from reports.claims import CLAIMS, Row
from reports.collect import collect
from reports.fairness import ArmTuning, annotate, at_edge, pair_status
from reports.markdown import fmt, write_report
from tests.reports.conftest import build_store
from tests.reports.studies import FLOPS_PER_TOKEN, TOKENS_PER_TRIAL, add_study, retag
from tests.reports.test_markdown import table_rows


def test_edge_is_the_outer_tenth_of_the_log_range():
    # [1e-4, 1e-2] spans 2 decades; the outer tenth is 0.2 decade: below 10^-3.8 = 1.585e-4, above 10^-2.2 = 6.31e-3
    assert at_edge(1.5e-4, 1e-4, 1e-2) and not at_edge(1.7e-4, 1e-4, 1e-2)
    assert at_edge(6.5e-3, 1e-4, 1e-2) and not at_edge(6.0e-3, 1e-4, 1e-2)
    assert not at_edge(1e-3, 1e-4, 1e-2)
    space = [
        {"name": "lr", "low": 1e-4, "high": 1e-2, "log": True},
        {"name": "weight_decay", "low": 0.0, "high": 0.3, "log": False},
    ]
    assert fairness.edge_dims(space, {"lr": 1.2e-4, "weight_decay": 0.0}) == ["lr"]  # wd is not a learning rate


def _tuned(arm: str, budget: int, edge: tuple[str, ...] = ()) -> ArmTuning:
    return ArmTuning(
        arm,
        study=f"s/{arm}",
        counts={"complete": budget - 1, "diverged": 1, "pruned": 0, "fail": 2, "running": 0},
        edge=list(edge),
    )


def test_pair_status():
    a, b = ArmTuning("kimi+muon"), ArmTuning("gpt+adamw")
    assert pair_status(a, b) == ("both on defaults", "untuned")
    assert pair_status(_tuned("kimi+muon", 8), b) == ("one tuned (kimi+muon, 8 trials)", "one arm untuned")
    assert pair_status(_tuned("kimi+muon", 8), _tuned("gpt+adamw", 5)) == (
        "unequal budgets (8 vs 5 trials)",
        "unequal budgets",
    )  # failed trials are not budget
    assert pair_status(_tuned("kimi+muon", 8), _tuned("gpt+adamw", 8)) == (
        "both tuned, equal budgets (8 trials each)",
        None,
    )
    assert pair_status(_tuned("kimi+muon", 8, ("muon_lr",)), _tuned("gpt+adamw", 8)) == (
        "both tuned, equal budgets (8 trials each); optimum at the edge: kimi+muon muon_lr",
        "optimum at the edge",
    )


def _row(kind: str, a: str, b: str, verdict: str) -> Row:
    claim = next(c for c in CLAIMS if c.kind == kind)
    return Row(claim, "", a, b, "", "", "", verdict=verdict)


def test_annotate_makes_only_cross_optimizer_quality_and_compute_rows_provisional():
    rows = [
        _row("stat", "kimi+muon", "gpt+adamw", "supported"),
        _row("compute", "kimi+muon", "kimi+adamw", "not supported"),
        _row("stat", "kimi+adamw", "gpt+adamw", "supported"),  # same optimizer: status shown, verdict kept
        _row("stat", "kimi+muon", "gpt+adamw", "inconclusive"),
        _row("exact", "kimi+muon", "gpt+adamw", "supported"),
        _row("speed", "kimi+muon", "gpt+adamw", "supported"),
    ]
    annotate(rows, {})
    assert [r.verdict for r in rows] == [
        "supported, untuned: provisional",
        "not supported, untuned: provisional",
        "supported",
        "inconclusive",
        "supported",
        "supported",
    ]
    assert [r.tuning for r in rows] == ["both on defaults"] * 4 + ["", ""]
    fair = [_row("stat", "kimi+muon", "gpt+adamw", "supported")]
    annotate(fair, {"kimi+muon": _tuned("kimi+muon", 8), "gpt+adamw": _tuned("gpt+adamw", 8)})
    assert fair[0].verdict == "supported"


def _store(tmp_path_factory, name: str, studies: dict[str, dict]):
    root = tmp_path_factory.mktemp(name)
    st = build_store(root)
    for i, (arm, kw) in enumerate(studies.items()):
        add_study(st.uri, st.experiment_id, root, arm, start=1_750_010_000_000 + 1000 * i, **kw)
    retag(st, set(studies))
    return st


def _collected(st):
    """The store's runs, with a per-seed wobble on Kimi's perplexity: the shared fixture scales both arms by the
    same factor per seed, so their log ratio has zero spread and no test (as in test_markdown)."""
    c = collect(st.uri, st.experiment)
    runs = c.runs.copy()
    kimi = runs.arm.eq("kimi+muon")
    runs.loc[kimi, "val/ppl_final"] *= 1 + 0.004 * runs.loc[kimi, "seed"].astype(float) ** 2
    return dataclasses.replace(c, runs=runs)


def _claims(md: str) -> dict:
    return table_rows(md, "## Claims vs measured")


@pytest.mark.slow
def test_untuned_report_says_defaults_and_calls_no_optimizer_row_plainly_supported(tmp_path_factory, tmp_path):
    st = _store(tmp_path_factory, "untuned", {})
    md = write_report(_collected(st), tmp_path, figures=False).read_text()
    assert "> **Tuning.** Every arm ran on its default hyperparameters (no study)" in md
    rows = _claims(md)
    ppl = rows["Kimi has lower perplexity (val ppl; bits/byte beside it)"]
    assert ppl["verdict"] == "**supported, untuned: provisional**" and ppl["tuning"] == "both on defaults"
    assert "2 paired" not in ppl["A vs B"] and "[" in ppl["A vs B"]  # the interval is still shown
    assert rows["Kimi caches fewer KV bytes per token"]["verdict"] == "**supported**"  # exact fact unaffected
    assert "No arm was tuned" in md.split("## Tuning budget")[1]


@pytest.mark.slow
def test_equal_budget_report_has_plain_verdicts_budget_table_and_figures(tmp_path_factory, tmp_path):
    st = _store(tmp_path_factory, "equal", {"gpt+adamw": {"n_trials": 6}, "kimi+muon": {"n_trials": 6, "n_fail": 1}})
    md = write_report(_collected(st), tmp_path).read_text()
    assert (
        "> **Tuning.** Every arm was tuned by its own study at seed 99, held out from the evaluation seeds, "
        "with an equal budget of 6 trials each."
    ) in md
    ppl = _claims(md)["Kimi has lower perplexity (val ppl; bits/byte beside it)"]
    assert ppl["tuning"] == "both tuned, equal budgets (6 trials each)"
    assert ppl["verdict"] == "**supported**"  # fair: both tuned, equal budgets, best lrs inside their ranges
    budget = table_rows(md, "## Tuning budget")
    col = "budget (trials with a result)"
    assert budget["gpt+adamw"][col] == budget["kimi+muon"][col] == "6"
    assert (budget["kimi+muon"]["complete"], budget["kimi+muon"]["failed"]) == ("6", "1")
    assert budget["gpt+adamw"]["tuned at seed"] == "99"
    assert budget["gpt+adamw"]["tokens trained"] == fmt(6 * TOKENS_PER_TRIAL)
    assert budget["gpt+adamw"]["FLOPs trained"] == fmt(6 * TOKENS_PER_TRIAL * FLOPS_PER_TOKEN["gpt"])
    assert budget["kimi+muon"]["tokens trained"] == fmt(6 * TOKENS_PER_TRIAL + TOKENS_PER_TRIAL / 4)  # + the failed one
    assert "Search spaces differ in dimension: gpt+adamw 4 dims, kimi+muon 7 dims" in md
    assert "held out from the evaluation seeds (0, 1, 2, 3)" in md
    for name in ("tuning_best_so_far.png", "tuning_lr_gpt_adamw.png", "tuning_lr_kimi_muon.png"):
        assert (tmp_path / "figures" / name).is_file(), name
        assert f"(figures/{name})" in md
    assert fairness.WIDEN not in md


@pytest.mark.slow
def test_unequal_budgets_and_an_edge_optimum_are_provisional(tmp_path_factory, tmp_path):
    st = _store(
        tmp_path_factory, "edge", {"gpt+adamw": {"n_trials": 6, "best": {"lr": 1.1e-4}}, "kimi+muon": {"n_trials": 5}}
    )
    md = write_report(_collected(st), tmp_path, figures=False).read_text()
    ppl = _claims(md)["Kimi has lower perplexity (val ppl; bits/byte beside it)"]
    assert ppl["tuning"] == "unequal budgets (5 vs 6 trials)"
    assert ppl["verdict"] == "**supported, unequal budgets: provisional**"
    assert "**gpt+adamw lr: optimum at the edge of the range: widen it**" in md
    space = md.split("Search space and best value per arm:")[1]
    assert "| gpt+adamw | lr | [0.0001, 0.01] log | 0.00011 | optimum at the edge of the range: widen it |" in space
    assert "with unequal budgets" in md.split("## Claims")[0]
