"""Statistics over seeds: mean, 95% confidence intervals, paired differences, and the verdict rules.

Each trial (one seed) is one sample. With n >= 2 the interval is Student-t: mean +- t(0.975, n-1) * s/sqrt(n)
(s = sample std, ddof=1); with n == 1 it is undefined (NaN), and verdicts built on it are "inconclusive".
The rules (docs/verdicts.md): a paired t-test and a TOST equivalence test per claim, Holm across the table
(VERDICT_RULE, `decide`); exact facts against a relative threshold (EXACT_RULE, `exact_verdict`). `Verdict`
carries the word and the branch of the rule that produced it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as _st

from reports import names

LEVEL = 0.95
ALPHA = 1 - LEVEL  # family-wise error rate of the Holm step
N_BOOT = 10_000
BOOT_SEED = 0
# Lower is more stable for both (coefficient of variation; 99th percentile over the median of grad/norm).
STABILITY_METRICS = (names.GRAD_NORM_CV, names.GRAD_NORM_P99_OVER_MEDIAN)

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
EQUIVALENT = "equivalent"  # shown as "equivalent within ±m"
BELOW_MARGIN = "real, below the margin"  # shown as "real, below the margin ±m"
EXPLORATORY = "exploratory"  # outside the Holm family: no verdict

# Equivalence margins, set before the runs (matrix [verdicts] overrides them; docs/verdicts.md gives the reasons).
LOSS_MARGIN_NATS = 0.02  # losses: 0.02 nats = 2% in perplexity; seed-to-seed spread at small scale, and a tenth
#                           of the paper's 0.23-nat (18.1 vs 22.8 ppl) claim
RATIO_MARGIN = 0.10  # ratios (grad-norm CV, p99/median, compute multipliers): a 10% change
EXACT_THRESHOLD = 0.01  # exact facts: a 1% gap between deterministic counts


@dataclass(frozen=True)
class Margins:
    """The equivalence margins of one report (matrix [verdicts] loss_margin / ratio_margin, else the defaults)."""

    loss_nats: float = LOSS_MARGIN_NATS
    ratio: float = RATIO_MARGIN


VERDICT_RULE = (
    "Verdict rule (rows with a p-value): per claim and pair of arms, d = A − B per seed both arms finished "
    "(paired on seed; log A − log B for ratios and multipliers). Two tests: a two-sided paired t-test of "
    "mean d = 0 (p_diff) and an equivalence test (TOST: two one-sided t-tests) of |mean d| < m (p_eq), m the "
    "margin set before the runs and shown in the row. Every p_diff and p_eq of the table is Holm-corrected "
    "together (step-down, family-wise error 5%); with the adjusted values: "
    "**supported**: p_diff < 0.05, mean on the claimed side, p_eq ≥ 0.05; "
    "**real, below the margin**: p_diff < 0.05 on the claimed side and p_eq < 0.05 (a real difference smaller "
    "than m); **not supported**: p_diff < 0.05, mean on the other side; "
    "**equivalent within ±m**: p_eq < 0.05 and p_diff ≥ 0.05; **inconclusive**: neither adjusted p below 0.05, "
    "or no test (fewer than 2 paired seeds, or zero spread over seeds). A claim measured two ways (stability: "
    "grad-norm CV and p99/median) is one claim: each p is the larger of its two measures' (intersection-union), "
    "and a side counts only when both measures are on it. The 95% intervals printed are unadjusted: one can "
    "exclude 0 while the Holm-adjusted p is at or above 0.05 (then the row is not supported on its direction)."
)


@dataclass(frozen=True)
class Verdict:
    """The outcome of one row and the branch of the rule that produced it, as printed in the table."""

    word: str  # SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE, EQUIVALENT, BELOW_MARGIN, EXPLORATORY, ...
    rule: str  # why, with the numbers: "Holm p_diff 0.013 < 0.05, on the claimed side; ..."
    margin: str = ""  # the equivalence margin in words ("0.02 nats", "10%"), for EQUIVALENT / BELOW_MARGIN

    @property
    def text(self) -> str:
        """The verdict as the table shows it: 'equivalent within ±0.02 nats', 'supported', ..."""
        if self.word == EQUIVALENT:
            return f"equivalent within ±{self.margin}"
        if self.word == BELOW_MARGIN:
            return f"real, below the margin ±{self.margin}"
        return self.word


@dataclass(frozen=True)
class Estimate:
    n: int
    mean: float
    std: float  # sample std (ddof=1); NaN for n < 2
    low: float  # 95% CI; NaN for n < 2
    high: float


def t_quantile(df: int, level: float = LEVEL) -> float:
    """Two-sided Student-t quantile, e.g. t_quantile(2) = 4.302652729911275."""
    return float(_st.t.ppf(0.5 + level / 2, df))


def estimate(values, ci: str = "t", level: float = LEVEL, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> Estimate:
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
        rows.append(
            dict(zip(by, key, strict=True))
            | {"n": e.n, "mean": e.mean, "std": e.std, "ci_low": e.low, "ci_high": e.high}
        )
    return pd.DataFrame(rows, columns=by + ["n", "mean", "std", "ci_low", "ci_high"])


@dataclass(frozen=True)
class Paired:
    """A - B for one metric, paired on `pair_on`. `pairs`: pair_on columns, a, b, diff (sorted)."""

    metric: str
    a_arm: str
    b_arm: str
    pairs: pd.DataFrame
    diff: Estimate
    b_mean: float  # mean of B over the paired seeds (reference for relative differences/margins)

    @property
    def n(self) -> int:
        return self.diff.n


def paired_differences(
    runs: pd.DataFrame, metric: str, a_arm: str, b_arm: str, pair_on: str | list[str] = "seed", ci: str = "t"
) -> Paired:
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
        table = {"higher": 1, "greater": 1, "+": 1, "lower": -1, "less": -1, "-": -1, "equal": 0, "same": 0, "=": 0}
        if claimed.lower() not in table:
            raise ValueError(f"claimed_direction: {claimed!r}; use 'higher', 'lower' or 'equal'")
        return table[claimed.lower()]
    if claimed not in (-1, 0, 1):
        raise ValueError(f"claimed_direction: {claimed!r}; use +1 (A higher), -1 (A lower) or 0 (equal)")
    return int(claimed)


# ----------------------------------------------------------------------------- the tests


def zero_spread(x: np.ndarray) -> bool:
    """No spread over seeds: sd 0, or below 1e-9 of the mean (float rounding of identical values, e.g. 0.1 three
    times, gives sd ~1e-17 and a t of ~1e16: a p of 0 from nothing)."""
    sd = float(x.std(ddof=1))
    return sd == 0 or sd <= 1e-9 * abs(float(x.mean()))


def t_p_value(d) -> float:
    """Two-sided one-sample t-test of mean(d) = 0 (df = n - 1). NaN with fewer than 2 finite values or zero spread:
    identical differences over seeds give no estimate of the noise, so no test (never p = 0)."""
    x = np.asarray(d, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) < 2 or zero_spread(x):
        return math.nan
    return float(_st.ttest_1samp(x, 0.0).pvalue)


def tost_p_value(d, margin: float) -> float:
    """TOST (two one-sided t-tests) of |mean(d)| < margin: the larger of the p-values of H0: mean <= -margin and
    H0: mean >= +margin, each a one-sided t-test with df = n - 1. NaN with fewer than 2 values, zero spread or no
    margin."""
    x = np.asarray(d, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) < 2 or not (margin > 0) or zero_spread(x):
        return math.nan
    se = float(x.std(ddof=1)) / math.sqrt(len(x))
    df = len(x) - 1
    p_low = float(_st.t.sf((x.mean() + margin) / se, df))  # against mean <= -margin
    p_high = float(_st.t.cdf((x.mean() - margin) / se, df))  # against mean >= +margin
    return max(p_low, p_high)


def paired_p_value(p: Paired) -> float:
    """Two-sided paired t-test of mean(A - B) = 0; NaN with fewer than 2 pairs or zero spread."""
    return t_p_value(p.pairs["diff"] if p.n else [])


def _p(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.3g}"


def decide(
    side: int,
    p_diff_adj: float,
    p_eq_adj: float,
    margin: str,
    alpha: float = ALPHA,
    no_test: str = "fewer than 2 paired seeds or zero spread: no test",
) -> Verdict:
    """VERDICT_RULE on one row, from its Holm-adjusted p-values.

    side: +1 when the estimate (every measure of it) lies on the claimed side of zero, -1 on the other side,
    0 when mixed or zero. margin: the equivalence margin in words (shown in the verdict)."""
    if not (math.isfinite(p_diff_adj) or math.isfinite(p_eq_adj)):
        return Verdict(INCONCLUSIVE, no_test, margin)
    diff = math.isfinite(p_diff_adj) and p_diff_adj < alpha
    eq = math.isfinite(p_eq_adj) and p_eq_adj < alpha
    why = (
        f"Holm p_diff {_p(p_diff_adj)} {'<' if diff else '≥'} {alpha:g}; "
        f"Holm p_eq {_p(p_eq_adj)} {'<' if eq else '≥'} {alpha:g} (margin ±{margin})"
    )
    if diff and side > 0:
        return Verdict(BELOW_MARGIN if eq else SUPPORTED, why + "; claimed side", margin)
    if diff and side < 0:
        return Verdict(NOT_SUPPORTED, why + "; other side", margin)
    if eq:
        return Verdict(EQUIVALENT, why, margin)
    return Verdict(INCONCLUSIVE, why + ("; measures on different sides" if diff else ""), margin)


def side_of(direction: int, means) -> int:
    """+1 when every mean difference is on the claimed side (direction +1: A higher), -1 when every one is on the
    other side, 0 otherwise."""
    signs = {int(np.sign(direction * m)) for m in means if math.isfinite(m)}
    return signs.pop() if len(signs) == 1 and 0 not in signs else 0


# ----------------------------------------------------------------------------- multiplicity (Holm)


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


# ----------------------------------------------------------------------------- exact facts

EXACT_RULE = (
    "Exact-fact rule (deterministic values: counts, bytes; no interval, no p): the relative gap g = (A − B) / |B| "
    "is computed unrounded and compared with the claim's threshold t (shown in the row): **supported** when g is "
    "beyond t on the claimed side, **not supported** when beyond t on the other side, **equivalent within ±t** "
    'otherwise. "Same parameters": supported when |g| is within the matrix\'s match tolerance, else not '
    "supported; **not matched** for a matrix without [match]."
)


def exact_verdict(a: float, b: float, direction: int, rel_threshold: float) -> Verdict:
    """EXACT_RULE: A vs B unrounded; direction +1/-1 (A higher/lower, beyond rel_threshold), 0 (equality: |gap| <=
    rel_threshold, the match tolerance)."""
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return Verdict(INCONCLUSIVE, "a value is missing or B is 0: no relative gap")
    gap = (a - b) / abs(b)
    t = f"{100 * rel_threshold:g}%"
    why = f"relative gap {100 * gap:+.2f}%, threshold ±{t}"
    if direction == 0:
        ok = abs(gap) <= rel_threshold
        return Verdict(SUPPORTED if ok else NOT_SUPPORTED, why + ("; within" if ok else "; outside"), t)
    if direction * gap > rel_threshold:
        return Verdict(SUPPORTED, why + "; beyond it on the claimed side", t)
    if direction * gap < -rel_threshold:
        return Verdict(NOT_SUPPORTED, why + "; beyond it on the other side", t)
    return Verdict(EQUIVALENT, why + "; within it", t)
