import math

import pandas as pd
import pytest

from reports.stats import (
    BELOW_MARGIN,
    EQUIVALENT,
    INCONCLUSIVE,
    NOT_SUPPORTED,
    SUPPORTED,
    VERDICT_RULE,
    decide,
    estimate,
    exact_verdict,
    holm,
    kimi_minus_gpt,
    muon_minus_adamw,
    paired_differences,
    paired_p_value,
    side_of,
    summarize,
    t_p_value,
    t_quantile,
    tost_p_value,
)

# Student-t 0.975 quantile with 2 degrees of freedom, closed form (2p-1)*sqrt(2/(4p(1-p))) at p = 0.975:
# 4.302652729749464 (printed tables' 4.302652729911275 is off in the 10th digit)
T2 = 0.95 * math.sqrt(2 / 0.0975)


def frame(rows):
    """rows: (arm, seed, value) -> runs-like frame with variant/optimizer columns and metric 'm'."""
    df = pd.DataFrame(rows, columns=["arm", "seed", "m"])
    df[["variant", "optimizer"]] = df.arm.str.split("+", expand=True)
    return df


def test_t_quantile():
    assert t_quantile(2) == pytest.approx(T2, abs=1e-12)
    assert t_quantile(2) == pytest.approx(4.302652729911275, abs=1e-9)
    assert t_quantile(10**6) == pytest.approx(1.959963984540054, abs=1e-5)


def test_summarize_n3_equals_hand_computation():
    runs = frame([("a+x", 0, 1.0), ("a+x", 1, 2.0), ("a+x", 2, 4.0), ("b+x", 0, 5.0)])
    s = summarize(runs, "m").set_index("arm")
    mean = 7 / 3
    std = math.sqrt(((1 - mean) ** 2 + (2 - mean) ** 2 + (4 - mean) ** 2) / 2)
    half = T2 * std / math.sqrt(3)
    assert s.loc["a+x", "n"] == 3
    assert s.loc["a+x", "mean"] == pytest.approx(mean, rel=1e-15)
    assert s.loc["a+x", "std"] == pytest.approx(std, rel=1e-15)
    assert s.loc["a+x", "ci_low"] == pytest.approx(mean - half, rel=1e-14)
    assert s.loc["a+x", "ci_high"] == pytest.approx(mean + half, rel=1e-14)
    # n == 1: the mean, no interval
    assert s.loc["b+x", "n"] == 1 and s.loc["b+x", "mean"] == 5.0
    assert math.isnan(s.loc["b+x", "ci_low"]) and math.isnan(s.loc["b+x", "ci_high"])


def test_nan_values_are_not_counted():
    e = estimate([1.0, float("nan"), 3.0])
    assert e.n == 2 and e.mean == 2.0


def test_bootstrap_is_deterministic_and_brackets_the_mean():
    x = [1.0, 2.0, 4.0, 3.5, 2.5]
    a, b = estimate(x, ci="bootstrap"), estimate(x, ci="bootstrap")
    assert a == b
    assert a.low < a.mean < a.high
    assert min(x) <= a.low and a.high <= max(x)
    with pytest.raises(ValueError):
        estimate(x, ci="wilson")


def test_paired_differences_by_hand():
    runs = frame(
        [
            ("kimi+muon", 0, 10.0),
            ("kimi+muon", 1, 12.0),
            ("kimi+muon", 2, 11.0),
            ("kimi+muon", 5, 99.0),
            ("gpt+adamw", 0, 8.0),
            ("gpt+adamw", 1, 11.0),
            ("gpt+adamw", 2, 7.0),
            ("gpt+adamw", 3, 1.0),
        ]
    )
    p = paired_differences(runs, "m", "kimi+muon", "gpt+adamw")
    assert p.pairs.seed.tolist() == [0, 1, 2]  # seeds 3 and 5 are unpaired
    assert p.pairs["diff"].tolist() == [2.0, 1.0, 4.0]
    d = [2.0, 1.0, 4.0]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    assert p.n == 3 and p.diff.mean == pytest.approx(mean)
    assert p.diff.low == pytest.approx(mean - T2 * sd / math.sqrt(3))
    assert p.diff.high == pytest.approx(mean + T2 * sd / math.sqrt(3))
    assert p.b_mean == pytest.approx(26 / 3)


def test_pair_helpers():
    runs = frame(
        [
            (arm, s, v + s)
            for arm, v in [("kimi+muon", 1.0), ("gpt+muon", 3.0), ("gpt+adamw", 4.0), ("kimi+adamw", 2.5)]
            for s in range(3)
        ]
    )
    kg = kimi_minus_gpt(runs, "m")
    assert [(p.a_arm, p.b_arm) for p in kg] == [("kimi+adamw", "gpt+adamw"), ("kimi+muon", "gpt+muon")]
    assert [p.diff.mean for p in kg] == [-1.5, -2.0]
    ma = muon_minus_adamw(runs, "m")
    assert [(p.a_arm, p.b_arm) for p in ma] == [("gpt+muon", "gpt+adamw"), ("kimi+muon", "kimi+adamw")]
    assert [p.diff.mean for p in ma] == [-1.0, -1.5]
    assert muon_minus_adamw(runs, "m", muon="muonclip") == []


def p2(t: float) -> float:
    """Two-sided p of Student-t with 2 df, closed form: 1 - |t| / sqrt(2 + t^2)."""
    return 1 - abs(t) / math.sqrt(2 + t * t)


def upper2(t: float) -> float:
    """One-sided P(T > t), 2 df, closed form: 1/2 - t / (2 sqrt(2 + t^2))."""
    return 0.5 - t / (2 * math.sqrt(2 + t * t))


def test_t_and_tost_p_values_by_hand():
    d = [0.1, 0.2, 0.3]  # mean 0.2, sd 0.1, se 0.1/sqrt(3)
    se = 0.1 / math.sqrt(3)
    assert t_p_value(d) == pytest.approx(p2(0.2 / se), rel=1e-9)
    # TOST at margin 0.25: H0 mean <= -0.25 (t = 0.45/se) and H0 mean >= 0.25 (t = -0.05/se); p = the larger
    assert tost_p_value(d, 0.25) == pytest.approx(max(upper2(0.45 / se), 1 - upper2(-0.05 / se)), rel=1e-9)
    assert tost_p_value(d, 0.25) == pytest.approx(1 - upper2(-0.05 / se), rel=1e-9)
    assert tost_p_value(d, 0.5) < 0.05 < tost_p_value(d, 0.25)
    assert math.isnan(tost_p_value(d, 0.0)) and math.isnan(t_p_value([0.2]))


def test_zero_spread_gives_no_test_never_p_zero():
    assert math.isnan(t_p_value([0.1, 0.1, 0.1]))
    assert math.isnan(tost_p_value([0.1, 0.1, 0.1], 0.5))
    runs = frame([("a+x", s, 2.0) for s in range(3)] + [("b+x", s, 1.0) for s in range(3)])
    assert math.isnan(paired_p_value(paired_differences(runs, "m", "a+x", "b+x")))
    v = decide(+1, math.nan, math.nan, "0.02 nats")
    assert v.word == INCONCLUSIVE and "zero spread" in v.rule


def _holm_pair(d, margin):
    """The family of one claim: its difference and equivalence p, Holm-adjusted together."""
    return holm([t_p_value(d), tost_p_value(d, margin)])


def test_grad_norm_cv_case_ci_excludes_zero_but_holm_p_decides():
    """The smoke report's gpt+muon grad-norm CV: CI [-0.340, -0.110] excludes 0, raw p 0.0138, yet the row is
    inconclusive after Holm; the printed rule says so (p decides; the intervals are unadjusted)."""
    m, sd = -0.225, 0.115 * math.sqrt(3) / T2  # half-width 0.115 with n = 3
    d = [m - sd, m, m + sd]  # sample sd = sd exactly
    e = estimate(d)
    assert (e.low, e.high) == (pytest.approx(-0.340, abs=1e-12), pytest.approx(-0.110, abs=1e-12))
    p = t_p_value(d)
    assert p == pytest.approx(p2(m / (sd / math.sqrt(3))), rel=1e-9) and p == pytest.approx(0.0138, abs=5e-5)
    # in a family of 10 p-values where it is the smallest, Holm multiplies it by 10
    adj = holm([p] + [0.5] * 9)[0]
    assert adj == pytest.approx(10 * p)
    v = decide(side_of(-1, [m]), adj, 1.0, "10%")
    assert v.word == INCONCLUSIVE and f"Holm p_diff {adj:.3g} ≥ 0.05" in v.rule
    assert "unadjusted" in VERDICT_RULE and "Holm" in VERDICT_RULE
    # alone in its family it is supported
    assert decide(-1 * -1, holm([p, 1.0])[0], 1.0, "10%").word == SUPPORTED


@pytest.mark.parametrize("margin, word", [(0.02, SUPPORTED), (0.05, BELOW_MARGIN)])
def test_a_significant_one_percent_difference_is_never_not_supported(margin, word):
    """About -1% of B (CI [-0.0295, -0.0245] on a val loss near 2.7, p tiny): the old rule's ±2%-of-B band made it
    'not supported'. With a 0.02-nat margin the difference exceeds the margin (supported); with 0.05 nats it is
    real and below the margin. TOST by hand (2 df): p_eq = max(P(T > (m + M)/se), P(T < (m - M)/se))."""
    m, half = -0.027, 0.0025
    sd = half * math.sqrt(3) / T2
    d = [m - sd, m, m + sd]
    e = estimate(d)
    assert (e.low, e.high) == (pytest.approx(-0.0295, abs=1e-12), pytest.approx(-0.0245, abs=1e-12))
    se = sd / math.sqrt(3)
    assert tost_p_value(d, margin) == pytest.approx(
        max(upper2((m + margin) / se), 1 - upper2((m - margin) / se)), rel=1e-6
    )
    p_diff, p_eq = _holm_pair(d, margin)
    assert p_diff < 1e-3
    v = decide(side_of(-1, [m]), p_diff, p_eq, f"{margin:g} nats")
    assert v.word == word
    if word == BELOW_MARGIN:
        assert v.text == f"real, below the margin ±{margin:g} nats"


def test_equivalence_is_its_own_verdict():
    d = [0.001, -0.002, 0.0015, -0.0005]  # tiny, noisy differences: no difference, equivalent
    p_diff, p_eq = _holm_pair(d, 0.02)
    assert p_diff >= 0.05 and p_eq < 0.05
    v = decide(side_of(-1, [sum(d) / 4]), p_diff, p_eq, "0.02 nats")
    assert v.word == EQUIVALENT and v.text == "equivalent within ±0.02 nats"
    assert decide(+1, 0.2, 0.3, "0.02 nats").word == INCONCLUSIVE
    assert decide(-1, 0.001, 0.3, "0.02 nats").word == NOT_SUPPORTED  # significant, other side
    assert decide(0, 0.001, 0.3, "10%").word == INCONCLUSIVE  # measures on different sides


def test_side_of_needs_every_measure_on_one_side():
    assert side_of(-1, [-0.2, -0.1]) == 1 and side_of(-1, [0.2, 0.1]) == -1
    assert side_of(-1, [-0.2, 0.1]) == 0 and side_of(+1, [0.0]) == 0


@pytest.mark.parametrize(
    "a, b, direction, threshold, word",
    [
        (1.049, 1.051, -1, 0.01, EQUIVALENT),  # 0.19% apart: inside the 1% threshold
        (1.01, 1.04, -1, 0.01, SUPPORTED),  # 2.88% apart on the claimed side
        (1.04, 1.01, -1, 0.01, NOT_SUPPORTED),
        (101.8, 100.0, 0, 0.03, SUPPORTED),  # equality within the match tolerance
        (101.8, 100.0, 0, 0.01, NOT_SUPPORTED),
        (float("nan"), 1.0, -1, 0.01, INCONCLUSIVE),
    ],
)
def test_exact_verdict_unrounded(a, b, direction, threshold, word):
    v = exact_verdict(a, b, direction, threshold)
    assert v.word == word
    if math.isfinite(a):
        assert f"relative gap {100 * (a - b) / b:+.2f}%" in v.rule and f"±{100 * threshold:g}%" in v.rule


def test_rule_text_names_every_outcome():
    for word in (
        "supported",
        "not supported",
        "inconclusive",
        "equivalent within ±m",
        "real, below the margin",
        "Holm",
        "TOST",
        "unadjusted",
    ):
        assert word in VERDICT_RULE
