import math

import pandas as pd
import pytest

from reports.stats import (
    INCONCLUSIVE,
    NOT_SUPPORTED,
    SUPPORTED,
    VERDICT_RULE,
    estimate,
    kimi_minus_gpt,
    muon_minus_adamw,
    paired_differences,
    paired_verdict,
    summarize,
    t_quantile,
    verdict,
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
    runs = frame([("kimi+muon", 0, 10.0), ("kimi+muon", 1, 12.0), ("kimi+muon", 2, 11.0),
                  ("kimi+muon", 5, 99.0), ("gpt+adamw", 0, 8.0), ("gpt+adamw", 1, 11.0),
                  ("gpt+adamw", 2, 7.0), ("gpt+adamw", 3, 1.0)])
    p = paired_differences(runs, "m", "kimi+muon", "gpt+adamw")
    assert p.pairs.seed.tolist() == [0, 1, 2]             # seeds 3 and 5 are unpaired
    assert p.pairs["diff"].tolist() == [2.0, 1.0, 4.0]
    d = [2.0, 1.0, 4.0]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    assert p.n == 3 and p.diff.mean == pytest.approx(mean)
    assert p.diff.low == pytest.approx(mean - T2 * sd / math.sqrt(3))
    assert p.diff.high == pytest.approx(mean + T2 * sd / math.sqrt(3))
    assert p.b_mean == pytest.approx(26 / 3)


def test_pair_helpers():
    runs = frame([(arm, s, v + s) for arm, v in [("kimi+muon", 1.0), ("gpt+muon", 3.0), ("gpt+adamw", 4.0),
                                                  ("kimi+adamw", 2.5)] for s in range(3)])
    kg = kimi_minus_gpt(runs, "m")
    assert [(p.a_arm, p.b_arm) for p in kg] == [("kimi+adamw", "gpt+adamw"), ("kimi+muon", "gpt+muon")]
    assert [p.diff.mean for p in kg] == [-1.5, -2.0]
    ma = muon_minus_adamw(runs, "m")
    assert [(p.a_arm, p.b_arm) for p in ma] == [("gpt+muon", "gpt+adamw"), ("kimi+muon", "kimi+adamw")]
    assert [p.diff.mean for p in ma] == [-1.0, -1.5]
    assert muon_minus_adamw(runs, "m", muon="muonclip") == []


@pytest.mark.parametrize("low, high, direction, n, margin, expected", [
    (1.0, 2.0, +1, 3, 0.0, SUPPORTED),            # excludes zero on the claimed side
    (-2.0, -1.0, "lower", 3, 0.0, SUPPORTED),
    (-2.0, -1.0, +1, 3, 0.0, NOT_SUPPORTED),      # excludes zero on the other side
    (1.0, 2.0, "lower", 3, 0.0, NOT_SUPPORTED),
    (-0.5, 1.0, +1, 3, 0.0, INCONCLUSIVE),        # straddles zero
    (-0.1, 0.1, +1, 3, 0.2, NOT_SUPPORTED),       # practically equal (inside the margin)
    (-0.1, 0.3, +1, 3, 0.2, INCONCLUSIVE),        # straddles, not inside the margin
    (0.05, 0.1, +1, 3, 0.2, SUPPORTED),           # direction wins over the margin
    (1.0, 2.0, +1, 1, 0.0, INCONCLUSIVE),         # n < 2
    (float("nan"), float("nan"), -1, 1, 0.0, INCONCLUSIVE),
    (-0.1, 0.1, 0, 3, 0.2, SUPPORTED),            # equality claim within the margin
    (0.3, 0.5, "equal", 3, 0.2, NOT_SUPPORTED),   # equality claim clearly outside
    (0.1, 0.5, 0, 3, 0.2, INCONCLUSIVE),
])
def test_verdict_rule(low, high, direction, n, margin, expected):
    assert verdict(low, high, direction, n, margin) == expected


def test_verdict_rejects_unknown_direction():
    with pytest.raises(ValueError):
        verdict(0.0, 1.0, "faster", 3)


@pytest.mark.parametrize("a_values, b_values, direction, expected", [
    ([45.0, 46.0, 44.5], [30.0, 31.0, 30.5], +1, SUPPORTED),       # Kimi clearly faster
    ([18.5, 18.0, 18.2], [22.9, 22.5, 22.8], +1, NOT_SUPPORTED),   # claimed higher, measured lower
    ([10.0, 10.01, 9.99], [10.0, 10.0, 10.0], +1, NOT_SUPPORTED),  # within +-2% of B: practically equal
    ([10.0, 12.0, 9.0], [10.5, 10.0, 11.0], -1, INCONCLUSIVE),     # noisy, straddles zero
    ([10.0], [12.0], -1, INCONCLUSIVE),                            # one seed
])
def test_paired_verdict_on_synthetic_frames(a_values, b_values, direction, expected):
    runs = frame([("kimi+muon", s, v) for s, v in enumerate(a_values)] +
                 [("gpt+adamw", s, v) for s, v in enumerate(b_values)])
    p = paired_differences(runs, "m", "kimi+muon", "gpt+adamw")
    assert paired_verdict(p, direction) == expected


def test_rule_text_names_all_three_outcomes():
    for word in ("supported", "not supported", "inconclusive", "95%", "2%"):
        assert word in VERDICT_RULE
