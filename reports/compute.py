"""Compute to a target loss: tokens, FLOPs and training seconds each arm needs to reach a val loss both reach,
their ratio (the compute multiplier) with a 95% CI over seeds, and, with three or more sizes, a fitted
loss-vs-compute curve per arm (L = a C^-b + c) with the multiplier read off the curves (bootstrap interval).

Curves are the eval points of `val/loss`; the x value at an eval step is `train/tokens` interpolated at that
step (0 at step 0), FLOPs = `train/flops_per_token` x tokens, seconds = `train/elapsed_s` interpolated the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from reports import names
from reports.stats import LEVEL, Estimate, t_quantile

AXES = {"tokens": "tokens", "flops": "FLOPs", "seconds": "training seconds"}
N_BOOT_FIT = 400
BOOT_SEED = 0


def reach(x: np.ndarray, loss: np.ndarray, target: float) -> float:
    """The x at which the eval curve first reaches `target`, linearly interpolated between the two evals around
    the crossing; NaN if it never does."""
    x, loss = np.asarray(x, float), np.asarray(loss, float)
    hit = np.flatnonzero(loss <= target)
    if not len(hit):
        return math.nan
    i = int(hit[0])
    if i == 0:
        return float(x[0])
    x0, x1, l0, l1 = x[i - 1], x[i], loss[i - 1], loss[i]
    return float(x0 + (l0 - target) / (l0 - l1) * (x1 - x0))


def _interp_at(steps: np.ndarray, src: pd.DataFrame) -> np.ndarray:
    s = src.sort_values("step")
    xs, vs = s.step.to_numpy(float), s.value.to_numpy(float)
    if not len(xs):
        return np.full(len(steps), np.nan)
    if xs[0] > 0:
        xs, vs = np.r_[0.0, xs], np.r_[0.0, vs]
    return np.interp(steps, xs, vs)


def eval_curves(history: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per eval of every run: run_id, arm, seed, step, loss, tokens, flops, seconds."""
    out = []
    fpt = runs.set_index("run_id")[names.FLOPS_PER_TOKEN] if names.FLOPS_PER_TOKEN in runs else pd.Series(dtype=float)
    for rid, g in history[history.key.eq(names.VAL_LOSS)].groupby("run_id", sort=True):
        g = g.sort_values("step").drop_duplicates("step", keep="last")
        steps = g.step.to_numpy(float)
        tokens = _interp_at(steps, history[history.run_id.eq(rid) & history.key.eq(names.TRAIN_TOKENS)])
        seconds = _interp_at(steps, history[history.run_id.eq(rid) & history.key.eq(names.TRAIN_ELAPSED)])
        out.append(pd.DataFrame({"run_id": rid, "arm": g.arm.to_numpy(), "seed": g.seed.to_numpy(),
                                 "step": steps, "loss": g.value.to_numpy(float), "tokens": tokens,
                                 "flops": tokens * float(fpt.get(rid, math.nan)), "seconds": seconds}))
    cols = ["run_id", "arm", "seed", "step", "loss", "tokens", "flops", "seconds"]
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=cols)


@dataclass(frozen=True)
class ToTarget:
    """A and B reaching `target`: per seed x values and the multiplier A/B (< 1: A needs less)."""
    a_arm: str
    b_arm: str
    target: float
    axis: str
    per_seed: pd.DataFrame          # seed, a, b, ratio
    multiplier: Estimate            # geometric mean of ratio over seeds; CI from a t-interval of log ratio
    p_value: float                  # two-sided paired t-test of log ratio = 0 (NaN with fewer than 2 seeds)

    @property
    def n(self) -> int:
        return self.multiplier.n


def target_loss(curves: pd.DataFrame, a_arm: str, b_arm: str) -> float:
    """The worse arm's final loss: the highest final val loss over both arms' seeds, so every seed of both reaches
    it."""
    last = curves[curves.arm.isin([a_arm, b_arm])].sort_values("step").groupby("run_id").loss.last()
    return float(last.max()) if len(last) else math.nan


def ratio_estimate(ratios, level: float = LEVEL) -> tuple[Estimate, float]:
    """Geometric mean of ratios, CI = exp(t-interval of the mean log ratio), and its two-sided p-value."""
    from scipy import stats as st

    r = np.asarray(ratios, float)
    r = r[np.isfinite(r) & (r > 0)]
    n = len(r)
    if n == 0:
        return Estimate(0, math.nan, math.nan, math.nan, math.nan), math.nan
    lr = np.log(r)
    mean = float(np.exp(lr.mean()))
    if n < 2:
        return Estimate(1, mean, math.nan, math.nan, math.nan), math.nan
    sd = float(lr.std(ddof=1))
    half = t_quantile(n - 1, level) * sd / math.sqrt(n)
    p = float(st.ttest_1samp(lr, 0.0).pvalue) if sd > 0 else (0.0 if lr.mean() != 0 else 1.0)
    return Estimate(n, mean, sd, float(np.exp(lr.mean() - half)), float(np.exp(lr.mean() + half))), p


def to_target(curves: pd.DataFrame, a_arm: str, b_arm: str, axis: str = "tokens",
              target: float | None = None) -> ToTarget:
    """Per seed both arms ran: x needed by each to reach the target, and the multiplier A/B."""
    target = target_loss(curves, a_arm, b_arm) if target is None or math.isnan(target) else float(target)
    rows = []
    for arm in (a_arm, b_arm):
        for (_rid, seed), g in curves[curves.arm.eq(arm)].groupby(["run_id", "seed"], sort=True):
            g = g.sort_values("step")
            rows.append((arm, seed, reach(g[axis].to_numpy(), g.loss.to_numpy(), target)))
    df = pd.DataFrame(rows, columns=["arm", "seed", "x"])
    a = df[df.arm.eq(a_arm)].groupby("seed").x.mean()
    b = df[df.arm.eq(b_arm)].groupby("seed").x.mean()
    per = pd.DataFrame({"a": a, "b": b}).dropna().reset_index().rename(columns={"index": "seed"})
    per["ratio"] = per.a / per.b
    est, p = ratio_estimate(per.ratio)
    return ToTarget(a_arm, b_arm, target, axis, per, est, p)


# ----------------------------------------------------------------------------- scaling fit

@dataclass(frozen=True)
class PowerLaw:
    """L(C) = a * (C / c0)^-b + c, with c0 the geometric mean of the fitted C (keeps a well scaled)."""
    a: float
    b: float
    c: float
    c0: float

    def loss(self, compute) -> np.ndarray:
        return self.a * (np.asarray(compute, float) / self.c0) ** (-self.b) + self.c

    def compute_for(self, loss: float) -> float:
        """The compute at which the curve reaches `loss` (inf if it never does: loss at or below c)."""
        if loss <= self.c or self.a <= 0 or self.b <= 0:
            return math.inf
        return float(self.c0 * ((loss - self.c) / self.a) ** (-1.0 / self.b))


def fit_power_law(compute, loss) -> PowerLaw | None:
    """Least-squares fit of L = a (C/c0)^-b + c (scipy.optimize.curve_fit, bounded: a > 0, 0 < b < 3,
    0 <= c < min L); None when there are fewer than 3 distinct C values or the fit fails."""
    from scipy.optimize import curve_fit

    c_arr, l_arr = np.asarray(compute, float), np.asarray(loss, float)
    ok = np.isfinite(c_arr) & np.isfinite(l_arr) & (c_arr > 0)
    c_arr, l_arr = c_arr[ok], l_arr[ok]
    if len(np.unique(c_arr)) < 3:
        return None
    c0 = float(np.exp(np.log(c_arr).mean()))
    lmin = float(l_arr.min())

    def f(x, a, b, c):
        return a * x ** (-b) + c

    x = c_arr / c0
    try:
        popt, _ = curve_fit(f, x, l_arr, p0=[max(float(l_arr.max() - lmin), 1e-3), 0.3, 0.5 * lmin],
                            bounds=([1e-12, 1e-4, 0.0], [np.inf, 3.0, lmin]), maxfev=20_000)
    except (RuntimeError, ValueError):
        return None
    return PowerLaw(float(popt[0]), float(popt[1]), float(popt[2]), c0)


@dataclass(frozen=True)
class FittedMultiplier:
    a_arm: str
    b_arm: str
    target: float
    fit_a: PowerLaw | None
    fit_b: PowerLaw | None
    multiplier: float               # C_A(target) / C_B(target)
    low: float                      # bootstrap percentile interval over seeds (NaN with one seed per size);
    high: float                     # 0 / inf where B's / A's refitted curve misses the target in the tail
    n_sizes: int
    n_unreached: int = 0            # resamples where one arm's refitted curve never reaches the target
    n_resamples: int = 0            # resamples with both fits


def _fit_points(points: pd.DataFrame, arm: str) -> pd.DataFrame:
    return points[points.arm.eq(arm)]


def fitted_multiplier(points: pd.DataFrame, a_arm: str, b_arm: str, target: float | None = None,
                      n_boot: int = N_BOOT_FIT, seed: int = BOOT_SEED, level: float = LEVEL) -> FittedMultiplier:
    """points: one row per (arm, size, seed) with compute (e.g. training FLOPs) and final loss.
    The target defaults to the worse arm's mean final loss at the largest size (both curves reach it).
    Bootstrap: resample seeds within each size, refit both arms, read the multiplier again."""
    pa, pb = _fit_points(points, a_arm), _fit_points(points, b_arm)
    fa, fb = fit_power_law(pa.compute, pa.loss), fit_power_law(pb.compute, pb.loss)
    if target is None or math.isnan(target):
        finals = [p[p["size"].eq(p.sort_values("compute")["size"].iloc[-1])].loss.mean() for p in (pa, pb) if len(p)]
        target = float(max(finals)) if finals else math.nan
    n_sizes = int(min(pa["size"].nunique(), pb["size"].nunique())) if len(pa) and len(pb) else 0
    if fa is None or fb is None:
        return FittedMultiplier(a_arm, b_arm, target, fa, fb, math.nan, math.nan, math.nan, n_sizes)
    mult = fa.compute_for(target) / fb.compute_for(target)
    rng = np.random.default_rng(seed)
    boots = []
    if pa.groupby("size").size().min() > 1 or pb.groupby("size").size().min() > 1:
        for _ in range(n_boot):
            ra, rb = (_resample(p, rng) for p in (pa, pb))
            ga, gb = fit_power_law(ra.compute, ra.loss), fit_power_law(rb.compute, rb.loss)
            if ga is None or gb is None:
                continue
            need_a, need_b = ga.compute_for(target), gb.compute_for(target)
            # an arm whose refit never reaches the target needs unbounded compute: the ratio is inf (A) or 0 (B),
            # kept so the interval says so; dropping them would bias it towards the other arm
            boots.append(math.nan if math.isinf(need_a) and math.isinf(need_b) else need_a / need_b)
    usable = [m for m in boots if not math.isnan(m)]   # 0 and inf included
    if len(usable) >= 20:   # inverted_cdf: no interpolation, so a tail of 0s or infs stays 0 or inf
        low, high = (float(q) for q in np.quantile(usable, [0.5 - level / 2, 0.5 + level / 2], method="inverted_cdf"))
    else:
        low = high = math.nan
    unreached = sum(1 for m in boots if not 0 < m < math.inf)
    return FittedMultiplier(a_arm, b_arm, target, fa, fb, float(mult), low, high, n_sizes, unreached, len(boots))


def _resample(points: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    parts = [g.iloc[rng.integers(0, len(g), len(g))] for _, g in points.groupby("size", sort=True)]
    return pd.concat(parts)


def scaling_points(curves: pd.DataFrame, runs: pd.DataFrame, axis: str = "flops") -> pd.DataFrame:
    """(arm, size, seed, compute, loss) at each run's last eval; size = the preset."""
    last = curves.sort_values("step").groupby("run_id").last()
    meta = runs.set_index("run_id")[["preset"]]
    df = last.join(meta, how="inner")
    return pd.DataFrame({"arm": df.arm, "size": df.preset, "seed": df.seed, "compute": df[axis],
                         "loss": df.loss}).reset_index(drop=True)
