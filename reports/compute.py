"""Compute to a target loss: tokens, FLOPs and training seconds each arm needs to reach a val loss both reach,
their ratio (the compute multiplier) with a 95% CI over seeds, and, with four or more sizes, a fitted
loss-vs-compute curve per arm (L = a C^-b + c) with the multiplier read off the curves (cluster bootstrap over
seed ids; exploratory, outside the Holm family).

The crossing is the LAST one (the curve stays at or below the target from there); a seed whose curve ends above
the target is censored at the compute it had. With a WSD schedule only stable-phase evals are read (docs/verdicts.md).

Curves are the eval points of `val/loss`; the x value at an eval step is `train/tokens` interpolated at that
step (0 at step 0), FLOPs = `train/flops_per_token` x tokens, seconds = `train/elapsed_s` interpolated the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from reports import names
from reports.stats import LEVEL, Estimate, t_p_value, t_quantile, tost_p_value

AXES = {"tokens": "tokens", "flops": "FLOPs", "seconds": "training seconds"}
N_BOOT_FIT = 400
BOOT_SEED = 0


def reach(x: np.ndarray, loss: np.ndarray, target: float) -> float:
    """The x at which the eval curve reaches `target` for good: the LAST crossing from above (the curve stays at or
    below the target from there on), linearly interpolated between the two evals around it; NaN when the last eval
    is above the target (never reached, or reached and lost again: censored)."""
    x, loss = np.asarray(x, float), np.asarray(loss, float)
    if not len(loss) or not loss[-1] <= target:
        return math.nan
    above = np.flatnonzero(~(loss <= target))
    if not len(above):
        return float(x[0])
    i = int(above[-1]) + 1  # first eval of the final run of evals at or below the target
    x0, x1, l0, l1 = x[i - 1], x[i], loss[i - 1], loss[i]
    return float(x0 + (l0 - target) / (l0 - l1) * (x1 - x0))


def reach_or_bound(x: np.ndarray, loss: np.ndarray, target: float) -> tuple[float, bool]:
    """(x needed, censored): reach(); a curve that does not end at or below the target is censored at its last x
    (it needs at least that much)."""
    r = reach(x, loss, target)
    if math.isfinite(r):
        return r, False
    x = np.asarray(x, float)
    return (float(x[-1]) if len(x) else math.nan), True


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
        out.append(
            pd.DataFrame(
                {
                    "run_id": rid,
                    "arm": g.arm.to_numpy(),
                    "seed": g.seed.to_numpy(),
                    "step": steps,
                    "loss": g.value.to_numpy(float),
                    "tokens": tokens,
                    "flops": tokens * float(fpt.get(rid, math.nan)),
                    "seconds": seconds,
                }
            )
        )
    cols = ["run_id", "arm", "seed", "step", "loss", "tokens", "flops", "seconds"]
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=cols)


SCHEDULE_PARAM, COOLDOWN_PARAM, SECONDS_PARAM = (
    "param.train.schedule",
    "param.train.cooldown_frac",
    "param.train.seconds",
)


def schedule_of(runs: pd.DataFrame) -> str:
    """'wsd' when every run used the warmup-stable-decay schedule, else 'cosine' (runs logged before the schedule
    option have no train.schedule param: cosine)."""
    col = runs[SCHEDULE_PARAM] if SCHEDULE_PARAM in runs else pd.Series("cosine", index=runs.index)
    return "wsd" if len(runs) and col.fillna("cosine").astype(str).eq("wsd").all() else "cosine"


def stable_evals(curves: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """The evals of WSD runs taken during the stable phase (constant peak learning rate, before the cooldown): at
    these every arm is at the same learning rate at every token count, so a loss read mid-run compares with
    another arm's. Progress = step / the run's last eval step (seconds / train.seconds for a wall-clock budget)."""
    meta = runs.set_index("run_id")

    def number(col: str, rid: str) -> float:  # params are text: "0.2", or "null" for an unset budget
        return float(pd.to_numeric(meta[col].get(rid), errors="coerce")) if col in meta else math.nan

    keep = []
    for rid, g in curves.groupby("run_id", sort=False):
        cool = number(COOLDOWN_PARAM, rid)
        cool = cool if math.isfinite(cool) else 0.2
        secs = number(SECONDS_PARAM, rid)
        progress = g.seconds / secs if math.isfinite(secs) else g.step / max(float(g.step.max()), 1.0)
        keep.append(g[progress <= 1 - cool + 1e-9])
    return pd.concat(keep) if keep else curves.iloc[0:0]


@dataclass(frozen=True)
class ToTarget:
    """A and B reaching `target`: per seed x values and the multiplier A/B (< 1: A needs less).

    A seed whose curve does not end at or below the target is censored: it enters at its bound (the x it had,
    the least it could need) and is flagged, so a verdict can refuse to favour a censored arm."""

    a_arm: str
    b_arm: str
    target: float
    axis: str
    per_seed: pd.DataFrame  # seed, a, b, a_censored, b_censored, ratio (seeds where both censored dropped)
    multiplier: Estimate  # geometric mean of ratio over seeds; CI from a t-interval of log ratio
    p_value: float  # two-sided paired t-test of log ratio = 0 (NaN: < 2 seeds or zero spread)
    p_eq: float = math.nan  # TOST of |log ratio| < log(1 + margin)
    both_censored: int = 0  # seeds where neither arm reached the target (no ratio)

    @property
    def n(self) -> int:
        return self.multiplier.n

    def censored(self, arm: str) -> list:
        """Seeds on which `arm` ("a" or "b") never reached the target."""
        return self.per_seed.loc[self.per_seed[f"{arm}_censored"], "seed"].tolist()


def target_loss(curves: pd.DataFrame, a_arm: str, b_arm: str) -> float:
    """The worse arm's final loss: the highest final val loss over both arms' seeds, so every seed of both reaches
    it. Chosen after the runs: only an exploratory reading uses it."""
    last = curves[curves.arm.isin([a_arm, b_arm])].sort_values("step").groupby("run_id").loss.last()
    return float(last.max()) if len(last) else math.nan


def ratio_estimate(ratios, level: float = LEVEL, margin: float = math.nan) -> tuple[Estimate, float, float]:
    """Geometric mean of ratios, CI = exp(t-interval of the mean log ratio), its two-sided p-value and the TOST p of
    |log ratio| < log(1 + margin) (NaN without a margin). Zero spread: no p (NaN), never 0."""
    r = np.asarray(ratios, float)
    r = r[np.isfinite(r) & (r > 0)]
    n = len(r)
    if n == 0:
        return Estimate(0, math.nan, math.nan, math.nan, math.nan), math.nan, math.nan
    lr = np.log(r)
    mean = float(np.exp(lr.mean()))
    if n < 2:
        return Estimate(1, mean, math.nan, math.nan, math.nan), math.nan, math.nan
    sd = float(lr.std(ddof=1))
    half = t_quantile(n - 1, level) * sd / math.sqrt(n)
    p_eq = tost_p_value(lr, math.log1p(margin)) if margin > 0 else math.nan
    est = Estimate(n, mean, sd, float(np.exp(lr.mean() - half)), float(np.exp(lr.mean() + half)))
    return est, t_p_value(lr), p_eq


def to_target(
    curves: pd.DataFrame,
    a_arm: str,
    b_arm: str,
    axis: str = "tokens",
    target: float | None = None,
    margin: float = math.nan,
) -> ToTarget:
    """Per seed both arms ran: x needed by each to reach the target (last crossing; censored at the last eval's x
    when the curve ends above it), and the multiplier A/B. margin: relative equivalence margin of the multiplier."""
    target = target_loss(curves, a_arm, b_arm) if target is None or math.isnan(target) else float(target)
    rows = []
    for arm in (a_arm, b_arm):
        for (_rid, seed), g in curves[curves.arm.eq(arm)].groupby(["run_id", "seed"], sort=True):
            g = g.sort_values("step")
            x, cens = reach_or_bound(g[axis].to_numpy(), g.loss.to_numpy(), target)
            rows.append((arm, seed, x, cens))
    df = pd.DataFrame(rows, columns=["arm", "seed", "x", "censored"])
    side = {
        k: df[df.arm.eq(arm)].groupby("seed").agg(x=("x", "mean"), censored=("censored", "any"))
        for k, arm in (("a", a_arm), ("b", b_arm))
    }
    per = side["a"].merge(side["b"], left_index=True, right_index=True, suffixes=("_a", "_b")).reset_index()
    per = per.rename(columns={"x_a": "a", "x_b": "b", "censored_a": "a_censored", "censored_b": "b_censored"})
    per = per.dropna(subset=["a", "b"])
    both = per.a_censored & per.b_censored
    per = per[~both].reset_index(drop=True)
    per["ratio"] = per.a / per.b
    est, p, p_eq = ratio_estimate(per.ratio, margin=margin)
    cols = ["seed", "a", "b", "a_censored", "b_censored", "ratio"]
    return ToTarget(a_arm, b_arm, target, axis, per[cols], est, p, p_eq, int(both.sum()))


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
        popt, _ = curve_fit(
            f,
            x,
            l_arr,
            p0=[max(float(l_arr.max() - lmin), 1e-3), 0.3, 0.5 * lmin],
            bounds=([1e-12, 1e-4, 0.0], [np.inf, 3.0, lmin]),
            maxfev=20_000,
        )
    except (RuntimeError, ValueError):
        return None
    return PowerLaw(float(popt[0]), float(popt[1]), float(popt[2]), c0)


MIN_SIZES = 4  # L = a C^-b + c has 3 parameters: 4 sizes leave one residual degree of freedom
EDGE_SLACK = 1.5  # a fitted curve may reach the target up to 1.5x beyond the compute its runs span


@dataclass(frozen=True)
class FittedMultiplier:
    a_arm: str
    b_arm: str
    target: float
    fit_a: PowerLaw | None
    fit_b: PowerLaw | None
    multiplier: float  # C_A(target) / C_B(target)
    low: float  # cluster-bootstrap percentile interval over shared seed ids (NaN: < 2 seeds);
    high: float  # 0 / inf where B's / A's refitted curve misses the target
    n_sizes: int
    n_unreached: int = 0  # resamples where one arm's refitted curve never reaches the target
    n_resamples: int = 0  # resamples with both fits
    n_extrapolated: int = 0  # resamples where an arm's refit reaches the target outside its compute range
    seeds: tuple = ()  # the seed ids resampled (shared by both arms at every size)
    extrapolated: str = ""  # the arm whose point fit reaches the target outside its range ("" if none)


def _fit_points(points: pd.DataFrame, arm: str) -> pd.DataFrame:
    return points[points.arm.eq(arm)]


def shared_seeds(points: pd.DataFrame, arms: tuple[str, ...]) -> list:
    """Seed ids present for every arm at every size those arms share: the clusters of the bootstrap."""
    sel = points[points.arm.isin(arms)]
    sizes = set.intersection(*(set(sel.loc[sel.arm.eq(a), "size"]) for a in arms)) if len(sel) else set()
    per = [set(sel.loc[sel.arm.eq(a) & sel["size"].eq(s), "seed"]) for a in arms for s in sizes]
    return sorted(set.intersection(*per)) if per else []


def outside_range(fit: PowerLaw | None, compute: pd.Series, target: float, slack: float = EDGE_SLACK) -> bool:
    """Whether the fit reaches the target outside [min C / slack, max C * slack] of the points it was fitted to."""
    need = fit.compute_for(target) if fit is not None else math.inf
    return not (compute.min() / slack <= need <= compute.max() * slack)


def fitted_multiplier(
    points: pd.DataFrame,
    a_arm: str,
    b_arm: str,
    target: float | None = None,
    n_boot: int = N_BOOT_FIT,
    seed: int = BOOT_SEED,
    level: float = LEVEL,
) -> FittedMultiplier:
    """points: one row per (arm, size, seed) with compute (e.g. training FLOPs) and final loss.
    The target defaults to the worse arm's mean final loss at the largest size (both curves reach it).
    Cluster bootstrap: resample seed ids (shared by both arms and all sizes) with replacement, take every point of
    each drawn seed (both arms, all sizes: the pairing is kept), refit both arms, read the multiplier again and
    check on that resample whether either refit extrapolates."""
    seeds = shared_seeds(points, (a_arm, b_arm))
    points = points[points.seed.isin(seeds)]
    pa, pb = _fit_points(points, a_arm), _fit_points(points, b_arm)
    fa, fb = fit_power_law(pa.compute, pa.loss), fit_power_law(pb.compute, pb.loss)
    if target is None or math.isnan(target):
        finals = [p[p["size"].eq(p.sort_values("compute")["size"].iloc[-1])].loss.mean() for p in (pa, pb) if len(p)]
        target = float(max(finals)) if finals else math.nan
    n_sizes = int(min(pa["size"].nunique(), pb["size"].nunique())) if len(pa) and len(pb) else 0
    if fa is None or fb is None:
        return FittedMultiplier(a_arm, b_arm, target, fa, fb, math.nan, math.nan, math.nan, n_sizes, seeds=tuple(seeds))
    mult = fa.compute_for(target) / fb.compute_for(target)
    point_extra = next(
        (arm for arm, f, p in ((a_arm, fa, pa), (b_arm, fb, pb)) if outside_range(f, p.compute, target)), ""
    )
    rng = np.random.default_rng(seed)
    boots, n_extra = [], 0
    if len(seeds) > 1:
        by_seed = {s: g for s, g in points.groupby("seed")}
        for _ in range(n_boot):
            draw = pd.concat([by_seed[seeds[i]] for i in rng.integers(0, len(seeds), len(seeds))])
            ra, rb = _fit_points(draw, a_arm), _fit_points(draw, b_arm)
            ga, gb = fit_power_law(ra.compute, ra.loss), fit_power_law(rb.compute, rb.loss)
            if ga is None or gb is None:
                continue
            need_a, need_b = ga.compute_for(target), gb.compute_for(target)
            n_extra += outside_range(ga, ra.compute, target) or outside_range(gb, rb.compute, target)
            # an arm whose refit never reaches the target needs unbounded compute: the ratio is inf (A) or 0 (B),
            # kept so the interval says so; dropping them would bias it towards the other arm
            boots.append(math.nan if math.isinf(need_a) and math.isinf(need_b) else need_a / need_b)
    usable = [m for m in boots if not math.isnan(m)]  # 0 and inf included
    if len(usable) >= 20:  # inverted_cdf: no interpolation, so a tail of 0s or infs stays 0 or inf
        low, high = (float(q) for q in np.quantile(usable, [0.5 - level / 2, 0.5 + level / 2], method="inverted_cdf"))
    else:
        low = high = math.nan
    unreached = sum(1 for m in boots if not 0 < m < math.inf)
    return FittedMultiplier(
        a_arm,
        b_arm,
        target,
        fa,
        fb,
        float(mult),
        low,
        high,
        n_sizes,
        unreached,
        len(boots),
        n_extra,
        tuple(seeds),
        point_extra,
    )


def scaling_points(curves: pd.DataFrame, runs: pd.DataFrame, axis: str = "flops") -> pd.DataFrame:
    """(arm, size, seed, compute, loss) at each run's last eval; size = the preset."""
    last = curves.sort_values("step").groupby("run_id").last()
    meta = runs.set_index("run_id")[["preset"]]
    df = last.join(meta, how="inner")
    return pd.DataFrame(
        {"arm": df.arm, "size": df.preset, "seed": df.seed, "compute": df[axis], "loss": df.loss}
    ).reset_index(drop=True)
