"""Paired speed ratios: A/B within each interleaved round, their median and a 95% interval over rounds.

Two arms timed in the same round share the machine's state (other processes, clock frequency, thermal
state), so the ratio of their rates in that round cancels what drifts slower than a round; comparing the two
arms' medians, each with its own spread, does not. Per round r: ratio_r = (work_A / t_A,r) / (work_B / t_B,r)
(rates, e.g. tokens/s; work is what one call does). Over the rounds both arms were timed in:

- the estimate is the median of log(ratio_r), exponentiated (the median ratio);
- the interval is the distribution-free 95% interval for that median from order statistics (the sign-test,
  or binomial, interval): with the log ratios sorted x_(1) <= ... <= x_(n), [x_(k), x_(n+1-k)] for the largest k
  with P(Binomial(n, 1/2) <= k-1) <= 2.5%; it covers the true median with probability >= 95% whatever the
  distribution of the rounds, needs n >= 6, and contains no resampling noise.
  Chosen over a t-interval because a shared machine's rounds are heavy-tailed (one round that another process
  interrupted is far off), which a t-interval of the mean turns into a wide interval around a shifted centre,
  and over a bootstrap of the median because it is what that bootstrap approximates, exactly and repeatably.
- its half-width is (ln hi - ln lo) / 2, the same for A/B and B/A; rounds continue until it is <= ln 1.03
  (the interval spans at most a factor 1.03 either side) or the time cap is reached.

Pure Python (no torch): harness.measure runs it between rounds, tests check it on synthetic timings.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

LEVEL = 0.95
TARGET_HALF_WIDTH = math.log(1.03)  # stop once every pair's interval is within a factor 1.03 either side
MIN_ROUNDS_FOR_INTERVAL = 6  # the smallest n with a 95% order-statistic interval (coverage 1 - 2/2^6 = 96.9%)


@dataclass(frozen=True)
class Pair:
    """Two timed callables whose rates are compared: A/B of (work per call / seconds per call)."""

    a: str
    b: str
    a_work: float = 1.0
    b_work: float = 1.0


@dataclass(frozen=True)
class Ratio:
    """The median A/B over n paired rounds and its 95% interval (low/high NaN: too few rounds)."""

    median: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        """(ln high - ln low) / 2; inf without an interval."""
        if not (self.low > 0 and self.high > 0):
            return math.inf
        return (math.log(self.high) - math.log(self.low)) / 2

    def inverse(self) -> Ratio:
        """B/A: the same rounds, so the same interval inverted."""
        return Ratio(1 / self.median, 1 / self.high, 1 / self.low, self.n)


NO_RATIO = Ratio(math.nan, math.nan, math.nan, 0)


def binomial_cdf(k: int, n: int) -> float:
    """P(Binomial(n, 1/2) <= k), exact."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n if k >= 0 else 0.0


def interval_rank(n: int, level: float = LEVEL) -> int | None:
    """The largest k (1-based) with P(Binomial(n, 1/2) <= k-1) <= (1 - level)/2: the interval for the median is
    [x_(k), x_(n+1-k)] of the sorted sample. None when even [min, max] covers less than `level`."""
    tail = (1 - level) / 2
    k = 0
    while k + 1 <= (n + 1) // 2 and binomial_cdf(k, n) <= tail:
        k += 1
    return k or None


def median_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """(median, low, high) of `values` with the order-statistic interval for the median; NaN bounds when
    there are too few values for one."""
    if not values:
        return math.nan, math.nan, math.nan
    xs = sorted(values)
    k = interval_rank(len(xs), level)
    if k is None:
        return statistics.median(xs), math.nan, math.nan
    return statistics.median(xs), xs[k - 1], xs[len(xs) - k]


def paired_log_ratios(pair: Pair, times: Mapping[str, Sequence[float | None]]) -> list[float]:
    """ln((work_A / t_A,r) / (work_B / t_B,r)) for every round r that timed both (None: not timed in r)."""
    out = []
    for ta, tb in zip(times[pair.a], times[pair.b], strict=True):
        if ta is not None and tb is not None:
            out.append(math.log(pair.a_work / ta) - math.log(pair.b_work / tb))
    return out


def ratio_of(pair: Pair, times: Mapping[str, Sequence[float | None]], level: float = LEVEL) -> Ratio:
    logs = paired_log_ratios(pair, times)
    if not logs:
        return NO_RATIO
    med, lo, hi = median_interval(logs, level)
    return Ratio(math.exp(med), math.exp(lo), math.exp(hi), len(logs))


def unsettled(
    pairs: Iterable[Pair], times: Mapping[str, Sequence[float | None]], target: float = TARGET_HALF_WIDTH
) -> list[str]:
    """The callables of every pair whose interval is still wider than `target` (or has none), in order."""
    names: dict[str, None] = {}
    for p in pairs:
        if ratio_of(p, times).half_width > target:
            names.update({p.a: None, p.b: None})
    return list(names)
