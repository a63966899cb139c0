"""The verdict rules on the claims path (reports/claims.py): Holm over difference and equivalence tests, compute to
target (fixed target, WSD stable phase, last crossing, censoring), grouped claims. Hand-computed cases."""

import math

import numpy as np
import pandas as pd
import pytest

from reports import claims as cl
from reports.compute import ratio_estimate, reach, reach_or_bound, schedule_of, stable_evals, to_target
from reports.stats import EXPLORATORY, INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Margins, t_p_value

T2 = 0.95 * math.sqrt(2 / 0.0975)  # t(0.975, 2), closed form


def p2(t: float) -> float:
    """Two-sided p of Student-t with 2 df: 1 - |t| / sqrt(2 + t^2)."""
    return 1 - abs(t) / math.sqrt(2 + t * t)


def claim(text_start: str) -> cl.Claim:
    return next(c for c in cl.CLAIMS if c.text.startswith(text_start))


def _runs(values: dict[str, list[float]], metric: str, extra: dict | None = None) -> pd.DataFrame:
    rows = []
    for arm, vals in values.items():
        variant, opt = arm.split("+")
        for s, v in enumerate(vals):
            rows.append(
                {
                    "run_id": f"{arm}-{s}",
                    "arm": arm,
                    "variant": variant,
                    "optimizer": opt,
                    "seed": s,
                    "preset": "tiny",
                    metric: v,
                    **(extra or {}),
                }
            )
    return pd.DataFrame(rows)


def _ctx(runs, curves=None, target=None, margins=Margins()) -> cl.Context:
    curves = curves if curves is not None else pd.DataFrame(columns=["run_id", "arm", "seed", "step", "loss"])
    return cl.Context(runs, curves, pd.DataFrame(), None, {}, target, margins)


def _rows(ctx, start):
    rows = cl.claim_rows(ctx)
    n = cl.apply_holm(rows)
    return [r for r in rows if r.claim.text.startswith(start)], n


# ----------------------------------------------------------------------------- statistical claims


@pytest.mark.parametrize("loss_margin, verdict", [(0.02, SUPPORTED), (0.05, "real, below the margin ±0.05 nats")])
def test_one_percent_val_loss_difference_on_the_claims_path(loss_margin, verdict):
    """Muon - AdamW val loss: d = -0.027 +- sd with CI [-0.0295, -0.0245] on a loss near 2.7 (about -1% of B).
    Only this claim has data: its family is its own two tests (p_diff, p_eq)."""
    sd = 0.0025 * math.sqrt(3) / T2
    b = [2.70, 2.71, 2.69]
    a = [x + d for x, d in zip(b, (-0.027 - sd, -0.027, -0.027 + sd), strict=True)]
    runs = _runs({"gpt+muon": a, "gpt+adamw": b}, "val/loss_final")
    (row,), n = _rows(_ctx(runs, margins=Margins(loss_margin, 0.1)), "Muon reaches lower loss")
    assert n == 2
    se = sd / math.sqrt(3)
    assert row.p == pytest.approx(p2(0.027 / se), rel=1e-4)
    lo, hi = sorted((row.p, row.p_eq))  # Holm over the two by hand
    assert row.p_adj == pytest.approx(2 * lo if row.p == lo else max(2 * lo, hi), rel=1e-9)
    assert row.verdict == verdict
    assert f"margin ±{loss_margin:g} nats" in row.diff_text and "unadjusted 95% CI" in row.diff_text
    assert cl.row_verdict(row).word == verdict and "Holm p_diff" in cl.row_verdict(row).rule


def test_stability_is_one_claim_with_two_measures():
    """grad-norm CV and p99/median of the same gradients: one row, p = the larger of the two (intersection-union),
    one member of the Holm family (two tests), not two."""
    cv = {"gpt+muon": [0.50, 0.60, 0.55], "gpt+adamw": [0.80, 0.82, 0.90]}
    p99 = {"gpt+muon": [3.0, 3.3, 3.1], "gpt+adamw": [5.0, 5.9, 5.2]}
    runs = _runs(cv, "grad/norm_cv")
    runs["grad/norm_p99_over_median"] = [v for arm in p99 for v in p99[arm]]
    rows, n = _rows(_ctx(runs), "Muon gives more stable gradients")
    assert len(rows) == 1 and n == 2
    lr_cv = np.log(cv["gpt+muon"]) - np.log(cv["gpt+adamw"])
    lr_99 = np.log(p99["gpt+muon"]) - np.log(p99["gpt+adamw"])
    assert rows[0].p == pytest.approx(max(t_p_value(lr_cv), t_p_value(lr_99)), rel=1e-12)
    assert "CV ×" in rows[0].diff_text and "p99/median ×" in rows[0].diff_text


def test_stability_measures_on_different_sides_are_inconclusive():
    runs = _runs({"gpt+muon": [0.50, 0.52, 0.51], "gpt+adamw": [0.80, 0.82, 0.81]}, "grad/norm_cv")
    runs["grad/norm_p99_over_median"] = [6.0, 6.2, 6.1, 3.0, 3.1, 3.05]  # p99/median worse with Muon
    (row,), _ = _rows(_ctx(runs), "Muon gives more stable gradients")
    assert row.verdict == INCONCLUSIVE


# ----------------------------------------------------------------------------- compute to target


def test_last_crossing_not_first():
    x, loss = [0, 100, 200, 300, 400], [5.0, 3.0, 3.5, 3.1, 2.9]
    # first crossing (at 90) is followed by a rise above 3.2; the last one is between (200, 3.5) and (300, 3.1):
    # 200 + 0.3 / 0.4 * 100 = 275
    assert reach(x, loss, 3.2) == pytest.approx(275.0, rel=1e-12)
    # reached, then lost again at the end: censored at the last x
    assert math.isnan(reach(x[:3], loss[:3], 3.2))
    assert reach_or_bound(x[:3], loss[:3], 3.2) == (200.0, True)
    assert reach_or_bound(x, loss, 3.2) == (pytest.approx(275.0), False)


def test_zero_spread_multiplier_has_no_p():
    est, p, p_eq = ratio_estimate([0.5, 0.5, 0.5], margin=0.1)
    assert est.mean == pytest.approx(0.5) and math.isnan(p) and math.isnan(p_eq)


def _curve(arm, seed, xs, losses, run_id=None):
    return pd.DataFrame(
        {
            "run_id": run_id or f"{arm}-{seed}",
            "arm": arm,
            "seed": seed,
            "step": range(len(xs)),
            "loss": losses,
            "tokens": np.asarray(xs, float),
            "flops": np.asarray(xs, float) * 10.0,
            "seconds": np.asarray(xs, float) / 1000,
        }
    )


def _compute_runs(curves: pd.DataFrame, schedule="wsd") -> pd.DataFrame:
    runs = curves.drop_duplicates("run_id")[["run_id", "arm", "seed"]].copy()
    runs[["variant", "optimizer"]] = runs.arm.str.split("+", expand=True)
    runs["preset"] = "tiny"
    if schedule:
        runs["param.train.schedule"] = schedule
        runs["param.train.cooldown_frac"] = "0.2"
        runs["param.train.seconds"] = "null"  # as MLflow holds an unset budget
    return runs.reset_index(drop=True)


X = [0, 100, 200, 300, 400, 500]  # eval steps 0..5; WSD cooldown 0.2: stable evals are steps 0..4 (x <= 400)


def test_stable_evals_drop_the_cooldown():
    cur = _curve("gpt+muon", 0, X, [5, 4, 3, 2.8, 2.7, 2.0])
    runs = _compute_runs(cur)
    assert schedule_of(runs) == "wsd" and schedule_of(runs.drop(columns="param.train.schedule")) == "cosine"
    assert stable_evals(cur, runs).tokens.tolist() == [0, 100, 200, 300, 400]


def test_an_arm_that_never_reaches_the_target_counts_against_it():
    """A (gpt+muon) never reaches 3.0 in the stable phase on any seed; B (gpt+adamw) does at 180, 190, 200.
    Censored A enters at its bound, 400 tokens: ratios 400/180, 400/190, 2, log-mean > 0, so 'A needs less' is
    not supported (the bound can only understate A's need). By hand: t = mean/se of the log ratios, 2 df."""
    b_need = [180.0, 190.0, 200.0]
    # B crosses 3.0 between (100, 4.0) and (200, l): x = 100 + 100 / (4 - l), so l = 4 - 100 / (x - 100)
    cur = pd.concat(
        [_curve("gpt+muon", s, X, [5, 4.5, 4, 3.6, 3.3, 1.0]) for s in range(3)]
        + [_curve("gpt+adamw", s, X, [5, 4, 4 - 100 / (x - 100), 2.9, 2.8, 2.5]) for s, x in enumerate(b_need)]
    )
    runs = _compute_runs(cur)
    t = to_target(stable_evals(cur, runs), "gpt+muon", "gpt+adamw", "tokens", 3.0)
    assert t.per_seed.b.tolist() == pytest.approx(b_need, rel=1e-12)
    assert t.per_seed.a.tolist() == [400.0] * 3 and t.censored("a") == [0, 1, 2] and t.censored("b") == []
    lr = np.log(400.0 / np.asarray(b_need))
    se = lr.std(ddof=1) / math.sqrt(3)
    assert t.p_value == pytest.approx(p2(lr.mean() / se), rel=1e-9)
    (row,), n = _rows(_ctx(runs, cur, target=3.0), "Muon converges faster")
    assert n == 2 and row.p_adj < 0.05 and row.verdict == NOT_SUPPORTED
    assert "gpt+muon never reaches it on seed(s) 0, 1, 2" in row.diff_text
    # the cooldown's final evals (A reaches 1.0 at x = 500) are not read: without the window A would reach it


def test_a_censored_favoured_arm_cannot_be_supported():
    """Kimi (3 FLOPs/token) vs GPT (10): kimi reaches 3.0 at 383 and 391 tokens on seeds 0 and 1 and never on seed 2
    (censored at 400 tokens = 1200 FLOPs); GPT at 270, 280, 290 tokens. The imputed FLOPs ratios are all ~0.42,
    significant in A's favour, but seed 2's bound cannot count in kimi's favour: inconclusive, and the row says
    why."""
    kimi = [[5, 4.5, 4, 3.5, 2.9 + 0.05 * s, 2] for s in (0, 1)] + [[5, 4.5, 4, 3.5, 3.2, 2]]
    gpt = [[5, 4.5, 3.5, 3.5 - 50 / (x - 200), 2.7, 2.6] for x in (270, 280, 290)]
    cur = pd.concat(
        [_curve("kimi+muon", s, X, kimi[s]).assign(flops=lambda d: d.tokens * 3.0) for s in range(3)]
        + [_curve("gpt+adamw", s, X, gpt[s]) for s in range(3)]
    )
    runs = _compute_runs(cur)
    t = to_target(stable_evals(cur, runs), "kimi+muon", "gpt+adamw", "flops", 3.0)
    a = [3 * (300 + 0.5 / 0.6 * 100), 3 * (300 + 0.5 / 0.55 * 100), 1200.0]
    assert t.per_seed.a.tolist() == pytest.approx(a, rel=1e-12) and t.censored("a") == [2]
    assert t.per_seed.b.tolist() == pytest.approx([2700.0, 2800.0, 2900.0], rel=1e-12)
    (row,), _ = _rows(_ctx(runs, cur, target=3.0), "Kimi is more compute-efficient")
    assert row.p_adj < 0.05 and row.verdict == INCONCLUSIVE
    assert "kimi+muon is censored" in row.why and "kimi+muon never reaches it on seed(s) 2" in row.diff_text


def test_compute_rows_with_a_cosine_schedule_or_no_fixed_target_are_exploratory():
    cur = pd.concat(
        [_curve("gpt+muon", s, X, [5, 3, 2.8, 2.7, 2.6, 2.5]) for s in range(3)]
        + [_curve("gpt+adamw", s, X, [5, 4, 3.5, 2.9, 2.8, 2.7]) for s in range(3)]
    )
    for runs, target, reason in (
        (_compute_runs(cur, schedule=None), 3.0, "cosine schedule"),
        (_compute_runs(cur), None, "no target_loss set before the runs"),
    ):
        (row,), n = _rows(_ctx(runs, cur, target=target), "Muon converges faster")
        assert row.verdict == EXPLORATORY and row.exploratory and reason in row.why and n == 0


def test_tokens_flops_and_seconds_are_one_claim():
    cur = pd.concat(
        [_curve("gpt+muon", s, X, [5, 3.1 - 0.05 * s, 2.8, 2.7, 2.6, 2.5]) for s in range(3)]
        + [_curve("gpt+adamw", s, X, [5, 4, 3.5 - 0.1 * s, 2.9, 2.8, 2.7]) for s in range(3)]
    )
    runs = _compute_runs(cur)
    rows, n = _rows(_ctx(runs, cur, target=3.0), "Muon converges faster")
    assert len(rows) == 1 and n == 2  # one p_diff and one p_eq: FLOPs/seconds not tested apart
    assert "FLOPs ×" in rows[0].diff_text and "training seconds ×" in rows[0].diff_text
    assert rows[0].verdict == SUPPORTED
