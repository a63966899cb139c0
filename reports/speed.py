"""The speed and memory sections read ONLY the controlled speed runs (kb.kind=speed): one run per model shape per
matrix invocation, timed in interleaved rounds, logged as median with `_iqr` and `_n` siblings (the per-arm table)
and, between shapes, as paired ratios A/B with a 95% interval over rounds (`speed/ratio/...`, with `_lo`, `_hi`,
`_n`; harness/measure/bench/ratios.py), which the speed claims are judged on. Training throughput seen during a trial
(`train/tokens_per_s`) is shown apart, labelled "observed during training"."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import pandas as pd

from harness.schema import NOISY_REL_IQR
from reports import names
from reports.stats import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED

EQUAL_MARGIN = 0.03  # a ratio interval inside [0.97, 1.03]: the two arms are equally fast within ±3%
EQUAL = "equal within ±3%"
MIN_ROUNDS = 6  # the fewest rounds with a 95% order-statistic interval (harness/measure/bench/ratios.py)

SPEED_RULE = (
    "Speed rule: the arms are timed in the same interleaved rounds (one process, one pinned CPU thread on CPU); "
    "in each round the ratio A/B of their rates, so what drifts between rounds (other processes, clock "
    "frequency) cancels; the median ratio over n rounds with a distribution-free 95% interval for it "
    "(order statistics of the log ratios). **supported**: the interval excludes 1 on the claimed side; "
    "**not supported**: it excludes 1 on the other side; **equal within ±3%**: it lies inside [0.97, 1.03] "
    "(checked first); **inconclusive**: otherwise, or fewer than 6 rounds, or no paired ratio logged (a speed "
    "run from before paired rounds). Per-arm medians, IQRs and the **noisy** flag (IQR above {noisy:.0%} of the "
    "median) are information on each arm; the verdict uses the ratio."
)


@functools.cache
def noisy_threshold() -> float:
    """harness.schema.NOISY_REL_IQR, the one threshold (the timer flags a noisy Timing with the same constant)."""
    return NOISY_REL_IQR


@dataclass(frozen=True)
class Measured:
    """One controlled measurement: median, IQR and n (n = 0: not measured)."""

    median: float
    iqr: float
    n: int

    @property
    def rel_iqr(self) -> float:
        return self.iqr / abs(self.median) if self.median and math.isfinite(self.iqr) else math.inf

    def noisy(self, threshold: float | None = None) -> bool:
        return self.rel_iqr > (noisy_threshold() if threshold is None else threshold)


NOT_MEASURED = Measured(math.nan, math.nan, 0)


def measured(row: pd.Series | dict | None, metric: str) -> Measured:
    """The metric and its `_iqr` / `_n` siblings from a speed-run row."""
    if row is None:
        return NOT_MEASURED
    get = row.get
    med = get(metric)
    if med is None or (isinstance(med, float) and math.isnan(med)):
        return NOT_MEASURED
    iqr = get(metric + names.IQR_SUFFIX)
    n = get(metric + names.N_SUFFIX)
    iqr = float(iqr) if iqr is not None and not pd.isna(iqr) else math.nan
    n = int(n) if n is not None and not pd.isna(n) else 1
    return Measured(float(med), iqr, n)


def fmt_measured(m: Measured, scale: float = 1.0, threshold: float | None = None) -> str:
    """'median (IQR x, n=k)' plus ' **noisy**' above the threshold; 'n/a' when not measured."""
    from harness.mdformat import fmt

    if m.n == 0:
        return "n/a"
    if not math.isfinite(m.iqr):
        return f"{fmt(m.median, scale)} (n={m.n}, no IQR)"
    text = f"{fmt(m.median, scale)} (IQR {fmt(m.iqr, scale)}, n={m.n})"
    return text + (" **noisy**" if m.noisy(threshold) else "")


@dataclass(frozen=True)
class PairedRatio:
    """A logged paired ratio A/B: median over n rounds and its 95% interval (NaN: none)."""

    median: float
    low: float
    high: float
    n: int

    def inverse(self) -> PairedRatio:
        return PairedRatio(1 / self.median, 1 / self.high, 1 / self.low, self.n)

    @property
    def has_interval(self) -> bool:
        return self.n >= MIN_ROUNDS and 0 < self.low <= self.high < math.inf


def _number(row, key: str) -> float:
    v = row.get(key) if row is not None else None
    return float(v) if v is not None and not pd.isna(v) else math.nan


def paired_ratio(row_a, row_b, metric_a: str, metric_b: str) -> PairedRatio | None:
    """A's `metric_a` over B's `metric_b` from the speed runs' ratio metrics: logged on A's run (A/B) or on B's
    (B/A, inverted); None when neither holds it (an older speed run, or shapes measured apart)."""
    if row_a is None or row_b is None:
        return None
    for row, other, this_m, other_m, invert in (
        (row_a, row_b, metric_a, metric_b, False),
        (row_b, row_a, metric_b, metric_a, True),
    ):
        shape = other.get("shape")
        if not shape:
            continue
        key = names.speed_ratio(this_m, str(shape), other_m)
        med = _number(row, key)
        if math.isfinite(med) and med > 0:
            r = PairedRatio(
                med,
                _number(row, key + names.LO_SUFFIX),
                _number(row, key + names.HI_SUFFIX),
                int(_number(row, key + names.N_SUFFIX)) if math.isfinite(_number(row, key + names.N_SUFFIX)) else 0,
            )
            return r.inverse() if invert else r
    return None


def ratio_verdict(r: PairedRatio | None, direction: int, margin: float = EQUAL_MARGIN) -> str:
    """SPEED_RULE on a paired ratio A/B (direction +1: A higher, -1: A lower)."""
    if r is None or not r.has_interval:
        return INCONCLUSIVE
    if 1 - margin <= r.low and r.high <= 1 + margin:
        return EQUAL
    if r.low > 1:
        return SUPPORTED if direction > 0 else NOT_SUPPORTED
    if r.high < 1:
        return SUPPORTED if direction < 0 else NOT_SUPPORTED
    return INCONCLUSIVE


def fmt_ratio(r: PairedRatio) -> str:
    """'×1.532 [1.481, 1.584], 24 paired rounds' (no interval: '×1.532, 4 paired rounds (no interval)')."""
    if not r.has_interval:
        return f"×{r.median:.3f}, {r.n} paired rounds (no interval)"
    return f"×{r.median:.3f} [{r.low:.3f}, {r.high:.3f}], {r.n} paired rounds"


@dataclass(frozen=True)
class SpeedComparison:
    """One speed claim row's cells: each arm's controlled measurement, the paired ratio, the verdict."""

    a_text: str
    b_text: str
    diff_text: str
    verdict: str
    measured: bool = True


def speed_comparison(
    a: str, b: str, row_a, row_b, metric_a: str, metric_b: str, direction: int, scale: float = 1.0
) -> SpeedComparison:
    """A speed claim on arms a, b (their speed-run rows and metrics): per-arm medians with IQR and n beside,
    the verdict from the paired ratio A/B."""
    ma, mb = measured(row_a, metric_a), measured(row_b, metric_b)
    a_text, b_text = f"{a}: {fmt_measured(ma, scale)}", f"{b}: {fmt_measured(mb, scale)}"
    if ma.n == 0 or mb.n == 0:
        return SpeedComparison(
            a_text, b_text, "no controlled speed run (kb.kind=speed) for this shape", INCONCLUSIVE, measured=False
        )
    what = (
        metric_a.removeprefix(names.SPEED_PREFIX)
        if metric_a == metric_b
        else f"{metric_a.removeprefix(names.SPEED_PREFIX)} / {metric_b.removeprefix(names.SPEED_PREFIX)}"
    )
    r = paired_ratio(row_a, row_b, metric_a, metric_b)
    if r is None:
        rel = f"{100 * (ma.median - mb.median) / abs(mb.median):+.1f}%" if mb.median else "n/a"
        return SpeedComparison(a_text, b_text, f"medians {rel} ({what}); no paired ratio logged", INCONCLUSIVE)
    return SpeedComparison(a_text, b_text, f"A/B {fmt_ratio(r)} ({what})", ratio_verdict(r, direction))


def speed_rows_for(speed: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """The speed runs that measured the shapes of `runs`, one row per shape: by the trials' kb.shape tag where
    logged (two arms of one variant whose tuned settings change the model, the MoE's bias_update_speed say,
    trained two shapes), else by (variant, preset); where a shape was measured in several invocations, the one
    whose matrix run holds these trials, else the newest. Each row names the arms that trained it (`arms`)."""
    if speed is None or speed.empty or runs.empty:
        return pd.DataFrame()
    parents = set(runs.parent_run_id.dropna())
    out = []
    for (variant, preset), g in runs.groupby(["variant", "preset"], sort=True, dropna=False):
        shapes = sorted(set(g["shape"].dropna())) if "shape" in g else []
        if shapes:
            groups = [(speed[speed["shape"].eq(s)], g[g["shape"].eq(s)]) for s in shapes]
        else:
            groups = [(speed[speed.variant.eq(variant) & speed.preset.eq(preset)], g)]
        for cand, trained in groups:
            if cand.empty:
                continue
            mine = cand[cand.parent_run_id.isin(parents)]
            pick = (mine if len(mine) else cand).sort_values("start_time").iloc[-1]
            arms = ",".join(sorted(trained["arm"].dropna().unique())) if "arm" in trained else ""
            out.append(pick.to_dict() | {"variant": variant, "preset": preset, "arms": arms})
    rows = pd.DataFrame(out)
    if len(rows):
        rows["label"] = _shape_labels(rows)
    return rows


def _shape_labels(rows: pd.DataFrame) -> list[str]:
    """Each row's name in the tables: the variant, or 'variant (its arms)' where the variant trained more than
    one shape at that preset."""
    shapes_of = rows.groupby(["variant", "preset"], dropna=False)["variant"].transform("size")
    return [
        f"{r.variant} ({r.arms.replace(',', ', ')})" if n > 1 and r.arms else str(r.variant)
        for r, n in zip(rows.itertuples(), shapes_of, strict=True)
    ]


def row_for_arm(speed_rows: pd.DataFrame, arm: str) -> dict | None:
    """The speed row of the shape `arm` trained, None where no speed run measured it."""
    if speed_rows.empty or "arms" not in speed_rows:
        return None
    sel = speed_rows[speed_rows["arms"].map(lambda arms: arm in str(arms).split(","))]
    return sel.iloc[0].to_dict() if len(sel) else None


def decode_batches(speed_rows: pd.DataFrame) -> list[int]:
    prefix = names.SPEED_DECODE.split("{")[0]
    out = set()
    for c in speed_rows.columns:
        if c.startswith(prefix) and not c.endswith((names.IQR_SUFFIX, names.N_SUFFIX)):
            tail = c[len(prefix) :]
            if tail.isdigit():
                out.add(int(tail))
    return sorted(out)


def _arm_label(variant: str, label: str, metric_tail: str) -> str:
    """'kimi+muon' for a train-step metric ('muon/train_tokens_per_s'), else the shape's label (a shape's figure)."""
    return f"{variant}+{metric_tail.split('/')[0]}" if "/" in metric_tail else label


def ratio_table_rows(speed_rows: pd.DataFrame) -> list[list[str]]:
    """[A, B, measure, A/B with interval and rounds] for every paired ratio the speed runs logged, each pair of
    arms once (as logged on the first run that holds it)."""
    prefix = names.SPEED_RATIO.split("{")[0]
    named = {r.get("shape"): (str(r.get("variant")), r["label"]) for r in speed_rows.to_dict("records")}
    out, seen = [], set()
    for r in speed_rows.to_dict("records"):
        for key in sorted(
            k
            for k in r
            if isinstance(k, str)
            and k.startswith(prefix)
            and not k.endswith((names.LO_SUFFIX, names.HI_SUFFIX, names.N_SUFFIX))
        ):
            what, _, rest = key.removeprefix(prefix).partition("/vs/")
            shape, _, other = rest.partition("/")
            if (shape, r.get("shape"), other, what) in seen or pd.isna(r.get(key)):
                continue
            seen.add((r.get("shape"), shape, what, other))
            ratio = paired_ratio(r, {"shape": shape}, names.SPEED_PREFIX + what, names.SPEED_PREFIX + other)
            if ratio is None:
                continue
            out.append(
                [
                    _arm_label(*named[r.get("shape")], what),
                    _arm_label(*named.get(shape, (shape, shape)), other),
                    what.split("/")[-1],
                    fmt_ratio(ratio),
                ]
            )
    return out
