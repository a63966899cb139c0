"""The paired-ratio math on synthetic timings with hand-computed answers: binomial ranks, the order-statistic
interval for the median, per-round ratios of rates (drift cancels), the stopping rule's threshold."""

import math

import pytest

from harness.bench.ratios import (
    NO_RATIO,
    TARGET_HALF_WIDTH,
    Pair,
    Ratio,
    binomial_cdf,
    interval_rank,
    median_interval,
    paired_log_ratios,
    ratio_of,
    unsettled,
)


def test_binomial_cdf_by_hand():
    assert binomial_cdf(0, 6) == 1 / 64
    assert binomial_cdf(1, 6) == 7 / 64
    assert binomial_cdf(5, 20) == pytest.approx(21700 / 2**20)  # 1 + 20 + 190 + 1140 + 4845 + 15504
    assert binomial_cdf(-1, 5) == 0.0


@pytest.mark.parametrize("n, k", [(5, None), (6, 1), (8, 1), (9, 2), (10, 2), (20, 6), (40, 14)])
def test_interval_rank(n, k):
    """k: the largest with P(Bin(n, 1/2) <= k-1) <= 2.5%. n=5: even [min, max] covers 1 - 2/32 = 93.75% < 95%;
    n=9: P(<=1) = 10/512 = 1.95%; n=10: P(<=1) = 11/1024, P(<=2) = 56/1024 = 5.5%; n=20: P(<=5) = 2.07%,
    P(<=6) = 5.77%; n=40: P(<=13) = 1.92%, P(<=14) = 4.03%."""
    assert interval_rank(n) == k


def test_median_interval_by_hand():
    assert median_interval([float(x) for x in range(10, 0, -1)]) == (5.5, 2.0, 9.0)  # k = 2 of 10
    med, lo, hi = median_interval([3.0, 1.0, 2.0, 5.0, 4.0])
    assert med == 3.0 and math.isnan(lo) and math.isnan(hi)                        # n = 5: no interval
    assert all(math.isnan(x) for x in median_interval([]))


def test_paired_ratio_cancels_drift_between_rounds():
    """The machine slows by up to 3x between rounds, alike for both arms: each arm's own spread is huge, the
    per-round ratio of rates is exactly (8 / 0.2) / (1 / 0.1) = 4 in every round."""
    drift = [1.0, 1.5, 3.0, 1.2, 2.0, 1.0, 2.5, 1.1]
    times = {"a": [0.2 * f for f in drift], "b": [0.1 * f for f in drift]}
    r = ratio_of(Pair("a", "b", a_work=8.0, b_work=1.0), times)
    assert r.n == 8
    assert (r.median, r.low, r.high) == (pytest.approx(4.0), pytest.approx(4.0), pytest.approx(4.0))
    assert r.half_width == pytest.approx(0.0, abs=1e-12)


def test_rounds_that_timed_one_side_only_are_skipped():
    times = {"a": [1.0, None, 2.0, 1.0], "b": [2.0, 1.0, None, 4.0]}
    assert paired_log_ratios(Pair("a", "b"), times) == pytest.approx([math.log(2.0), math.log(4.0)])
    assert ratio_of(Pair("a", "b"), {"a": [None], "b": [1.0]}) is NO_RATIO


def test_ratio_interval_and_threshold_by_hand():
    """Seven rounds with ratios 1.00, 1.02, 0.98, 1.01, 0.99, 1.03, 0.97: median 1.00, interval [min, max] =
    [0.97, 1.03] (k = 1 of 7), half-width (0.029559 + 0.030459) / 2 = 0.030009 > ln 1.03 = 0.029559: not settled;
    without the 0.97 and 1.03 rounds (n = 5) there is no interval at all."""
    ratios = [1.00, 1.02, 0.98, 1.01, 0.99, 1.03, 0.97]
    times = {"a": [1.0] * 7, "b": ratios}  # equal work: rate ratio = t_b / t_a
    r = ratio_of(Pair("a", "b"), times)
    assert (r.median, r.low, r.high, r.n) == (pytest.approx(1.0), pytest.approx(0.97), pytest.approx(1.03), 7)
    assert r.half_width == pytest.approx(0.0300090, abs=1e-6) and r.half_width > TARGET_HALF_WIDTH
    assert abs(TARGET_HALF_WIDTH - 0.0295588) < 1e-6
    tight = {"a": [1.0] * 7, "c": [1.00, 1.02, 0.98, 1.01, 0.99, 1.029, 0.972]}
    assert ratio_of(Pair("a", "c"), tight).half_width < TARGET_HALF_WIDTH
    assert unsettled([Pair("a", "b"), Pair("a", "c")], {**times, **tight}) == ["a", "b"]
    assert ratio_of(Pair("a", "b"), {"a": [1.0] * 5, "b": ratios[:5]}).half_width == math.inf


def test_inverse_is_the_same_interval_from_the_other_side():
    r = Ratio(2.0, 1.6, 2.5, 12)
    inv = r.inverse()
    assert (inv.median, inv.low, inv.high, inv.n) == (0.5, 0.4, 0.625, 12)
    assert inv.half_width == pytest.approx(r.half_width)
