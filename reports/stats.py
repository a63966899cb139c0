"""Statistics over seeds: mean, 95% confidence intervals, paired differences, claim verdicts.

Each trial (one seed) is one sample. With n >= 2 the interval is Student-t: mean +- t(0.975, n-1) * s/sqrt(n)
(s = sample std, ddof=1); with n == 1 it is undefined (NaN), and verdicts built on it are "inconclusive".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as _st

from reports import names

LEVEL = 0.95
N_BOOT = 10_000
BOOT_SEED = 0
# Practical-equivalence margin, as a fraction of the reference (B) arm's mean: a difference whose whole
# 95% CI lies within +-2% of B is "practically equal".
EQUIVALENCE_MARGIN = 0.02
# Lower is more stable for both (coefficient of variation; 99th percentile over the median of grad/norm).
STABILITY_METRICS = (names.GRAD_NORM_CV, names.GRAD_NORM_P99_OVER_MEDIAN)

VERDICT_RULE = (
    "Verdict rule: d = A - B for each seed both arms finished (paired on seed); 95% Student-t CI of the "
    "mean of d, read in the claimed direction (sign flipped when the claim is 'A lower'). "
    "**supported**: the CI excludes zero on the claimed side. "
    "**not supported**: the CI excludes zero on the other side, or the whole CI lies within "
    f"+-{EQUIVALENCE_MARGIN:.0%} of B's mean (practically equal). "
    "**inconclusive**: anything else, including fewer than 2 paired seeds (no interval). "
    "A claim of equality (e.g. parameter counts) is supported when the whole CI lies within "
    f"+-{EQUIVALENCE_MARGIN:.0%} of B's mean, not supported when the CI lies entirely outside that margin, "
    "inconclusive otherwise."
)

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"


@dataclass(frozen=True)
class Estimate:
    n: int
    mean: float
    std: float            # sample std (ddof=1); NaN for n < 2
    low: float            # 95% CI; NaN for n < 2
    high: float


def t_quantile(df: int, level: float = LEVEL) -> float:
    """Two-sided Student-t quantile, e.g. t_quantile(2) = 4.302652729911275."""
    return float(_st.t.ppf(0.5 + level / 2, df))


def estimate(values, ci: str = "t", level: float = LEVEL, n_boot: int = N_BOOT,
             seed: int = BOOT_SEED) -> Estimate:
    """Mean and CI of the finite values. ci="t" (Student-t) or "bootstrap" (percentile, fixed seed)."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        return Estimate(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Estimate(1, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    if ci == "t":
        half = t_quantile(n - 1, level) * std / math.sqrt(n)
        return Estimate(n, mean, std, mean - half, mean + half)
    if ci == "bootstrap":
        rng = np.random.default_rng(seed)
        means = x[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
        low, high = np.quantile(means, [0.5 - level / 2, 0.5 + level / 2])
        return Estimate(n, mean, std, float(low), float(high))
    raise ValueError(f"ci: unknown interval {ci!r}; use 't' or 'bootstrap'")


def summarize(runs: pd.DataFrame, metric: str, by: str | list[str] = "arm", ci: str = "t") -> pd.DataFrame:
    """Per group: n (finite values), mean, std, ci_low, ci_high. Rows sorted by the group key."""
    by = [by] if isinstance(by, str) else list(by)
    rows = []
    for key, g in runs.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        e = estimate(g.get(metric, []), ci=ci)
        rows.append(dict(zip(by, key, strict=True)) | {"n": e.n, "mean": e.mean, "std": e.std,
                                           "ci_low": e.low, "ci_high": e.high})
    return pd.DataFrame(rows, columns=by + ["n", "mean", "std", "ci_low", "ci_high"])


@dataclass(frozen=True)
class Paired:
    """A - B for one metric, paired on `pair_on`. `pairs`: pair_on columns, a, b, diff (sorted)."""
    metric: str
    a_arm: str
    b_arm: str
    pairs: pd.DataFrame
    diff: Estimate
    b_mean: float         # mean of B over the paired seeds (reference for relative differences/margins)

    @property
    def n(self) -> int:
        return self.diff.n


def paired_differences(runs: pd.DataFrame, metric: str, a_arm: str, b_arm: str,
                       pair_on: str | list[str] = "seed", ci: str = "t") -> Paired:
    """Per-seed differences a - b (runs sharing arm and seed are averaged first) and their mean/CI."""
    on = [pair_on] if isinstance(pair_on, str) else list(pair_on)

    def side(arm: str) -> pd.DataFrame:
        g = runs.loc[runs.arm.eq(arm) & runs[metric].notna(), on + [metric]] if metric in runs else None
        if g is None or g.empty:
            return pd.DataFrame(columns=on + [metric])
        return g.groupby(on, sort=True)[metric].mean().reset_index()

    pairs = side(a_arm).merge(side(b_arm), on=on, suffixes=("_a", "_b"))
    pairs = pairs.rename(columns={f"{metric}_a": "a", f"{metric}_b": "b"})
    pairs = pairs.astype({"a": float, "b": float}).sort_values(on).reset_index(drop=True)
    pairs["diff"] = pairs.a - pairs.b
    b_mean = float(pairs.b.mean()) if len(pairs) else math.nan
    return Paired(metric, a_arm, b_arm, pairs, estimate(pairs["diff"], ci=ci), b_mean)


def pairs_across(runs: pd.DataFrame, metric: str, vary: str, a: str, b: str, within: str) -> list[Paired]:
    """For each value w of `within` with both arms present: (vary=a, within=w) - (vary=b, within=w).

    vary="variant", a="kimi", b="gpt", within="optimizer" -> Kimi - GPT for each optimizer;
    vary="optimizer", a="muon", b="adamw", within="variant" -> Muon - AdamW for each variant.
    """
    out = []
    for w in sorted(runs[within].dropna().unique()):
        arms = runs.loc[runs[within].eq(w)].groupby(vary).arm.first()
        if a in arms and b in arms:
            out.append(paired_differences(runs, metric, arms[a], arms[b]))
    return out


def kimi_minus_gpt(runs: pd.DataFrame, metric: str) -> list[Paired]:
    """Kimi - GPT for each optimizer both variants were trained with."""
    return pairs_across(runs, metric, "variant", "kimi", "gpt", "optimizer")


def muon_minus_adamw(runs: pd.DataFrame, metric: str, muon: str = "muon") -> list[Paired]:
    """Muon (or muon="muonclip") - AdamW for each variant trained with both."""
    return pairs_across(runs, metric, "optimizer", muon, "adamw", "variant")


def _direction(claimed) -> int:
    if isinstance(claimed, str):
        table = {"higher": 1, "greater": 1, "+": 1, "lower": -1, "less": -1, "-": -1,
                 "equal": 0, "same": 0, "=": 0}
        if claimed.lower() not in table:
            raise ValueError(f"claimed_direction: {claimed!r}; use 'higher', 'lower' or 'equal'")
        return table[claimed.lower()]
    if claimed not in (-1, 0, 1):
        raise ValueError(f"claimed_direction: {claimed!r}; use +1 (A higher), -1 (A lower) or 0 (equal)")
    return int(claimed)


def verdict(diff_low: float, diff_high: float, claimed_direction, n: int, margin: float = 0.0) -> str:
    """Apply VERDICT_RULE to the CI [diff_low, diff_high] of A - B.

    claimed_direction: +1/"higher" (claim: A > B), -1/"lower" (A < B), 0/"equal" (A ~ B).
    margin: practical-equivalence half-width in the metric's units (the report passes
    EQUIVALENCE_MARGIN * |mean of B|); 0 disables the equivalence part of the rule.
    """
    d = _direction(claimed_direction)
    if n < 2 or not (math.isfinite(diff_low) and math.isfinite(diff_high)):
        return INCONCLUSIVE
    within = -margin <= diff_low and diff_high <= margin
    if d == 0:
        if margin > 0 and within:
            return SUPPORTED
        if diff_low > margin or diff_high < -margin:
            return NOT_SUPPORTED
        return INCONCLUSIVE
    low, high = sorted((d * diff_low, d * diff_high))   # difference measured in the claimed direction
    if low > 0:
        return SUPPORTED
    if high < 0 or (margin > 0 and within):
        return NOT_SUPPORTED
    return INCONCLUSIVE


def paired_verdict(p: Paired, claimed_direction, rel_margin: float = EQUIVALENCE_MARGIN) -> str:
    """verdict() on a Paired result, margin = rel_margin * |mean of B over the paired seeds|."""
    margin = rel_margin * abs(p.b_mean) if math.isfinite(p.b_mean) else 0.0
    return verdict(p.diff.low, p.diff.high, claimed_direction, p.n, margin)


# ----------------------------------------------------------------------------- multiplicity (Holm)

HOLM_RULE = (
    "Multiplicity: the rows with a p-value (paired two-sided t-test over seeds, or of the log ratio for "
    "compute multipliers) are Holm-corrected together (step-down, family-wise error 5%): a row is supported "
    "or not supported on its direction only when its Holm-adjusted p is below 0.05; practical equality "
    "(the whole 95% CI within ±2% of B) still reads not supported. Exact facts (counts, bytes) and "
    "controlled speed measurements have no p-value and are judged on their own rule."
)


def holm(pvalues) -> list[float]:
    """Holm-adjusted p-values (step-down, made monotone, capped at 1); NaN stays NaN and is not counted."""
    p = [float(x) for x in pvalues]
    idx = sorted((i for i, x in enumerate(p) if math.isfinite(x)), key=lambda i: p[i])
    m = len(idx)
    out = [math.nan] * len(p)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def paired_p_value(p: Paired) -> float:
    """Two-sided paired t-test of mean(A - B) = 0; NaN with fewer than 2 pairs."""
    d = p.pairs["diff"].to_numpy(float) if p.n else np.array([])
    d = d[np.isfinite(d)]
    if len(d) < 2:
        return math.nan
    sd = float(d.std(ddof=1))
    if sd == 0:
        return 0.0 if d.mean() != 0 else 1.0
    return float(_st.ttest_1samp(d, 0.0).pvalue)


def holm_verdict(mean_diff: float, low: float, high: float, direction: int, p_adjusted: float, n: int,
                 margin: float = 0.0, alpha: float = 1 - LEVEL) -> str:
    """Verdict of a directional claim after Holm: the direction counts only where the adjusted p < alpha."""
    if n < 2 or not math.isfinite(p_adjusted):
        return INCONCLUSIVE
    if margin > 0 and math.isfinite(low) and -margin <= low and high <= margin:
        return NOT_SUPPORTED                       # practically equal
    if p_adjusted < alpha:
        return SUPPORTED if direction * mean_diff > 0 else NOT_SUPPORTED
    return INCONCLUSIVE


def exact_verdict(a: float, b: float, direction: int, digits: int | None = None,
                  tolerance: float | None = None) -> str:
    """Deterministic values judged exactly. direction +1/-1: A higher/lower than B after rounding both to the
    claim's own `digits` significant digits (None: unrounded). direction 0 (equality): |A - B| <= tolerance x |B|
    (the matrix's match tolerance)."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return INCONCLUSIVE
    if direction == 0:
        if tolerance is None:
            raise ValueError("exact_verdict: an equality claim needs the match tolerance")
        return SUPPORTED if abs(a - b) <= tolerance * abs(b) else NOT_SUPPORTED
    ra, rb = (round_sig(v, digits) for v in (a, b))
    return SUPPORTED if direction * (ra - rb) > 0 else NOT_SUPPORTED


def round_sig(x: float, digits: int | None) -> float:
    """x to `digits` significant digits (None or 0: unchanged)."""
    if not digits or x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - math.floor(math.log10(abs(x))))
