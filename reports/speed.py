"""The speed and memory sections read ONLY the controlled speed runs (kb.kind=speed): one run per model shape per
matrix invocation, timed in interleaved rounds, logged as median with `_iqr` and `_n` siblings. Training throughput
seen during a trial (`train/tokens_per_s`) is shown apart, labelled "observed during training"."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import pandas as pd

from harness.schema import NOISY_REL_IQR
from reports import names
from reports.stats import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED

PRACTICAL = 0.02        # medians within 2% of each other: practically equal

SPEED_RULE = (
    "Speed rule: controlled measurements, median with IQR (p25-p75) and n measurements; no CI is drawn "
    "(the measurements are not seeds). **supported**: A's interquartile band lies entirely on the claimed side of "
    "B's and the medians differ by more than 2%; **not supported**: the bands are apart on the other side, or the "
    "medians are within 2%; **inconclusive**: the bands overlap, or a measurement is noisy "
    "(IQR above {noisy:.0%} of its median)."
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


def speed_verdict(a: Measured, b: Measured, direction: int, threshold: float | None = None) -> str:
    """SPEED_RULE on two controlled measurements (direction +1: A higher, -1: A lower)."""
    if a.n == 0 or b.n == 0 or not (math.isfinite(a.iqr) and math.isfinite(b.iqr)):
        return INCONCLUSIVE
    if a.noisy(threshold) or b.noisy(threshold):
        return INCONCLUSIVE
    rel = (a.median - b.median) / abs(b.median) if b.median else math.inf
    if abs(rel) <= PRACTICAL:
        return NOT_SUPPORTED
    a_lo, a_hi = a.median - a.iqr / 2, a.median + a.iqr / 2
    b_lo, b_hi = b.median - b.iqr / 2, b.median + b.iqr / 2
    if direction * (a.median - b.median) > 0 and (a_lo > b_hi or a_hi < b_lo):
        return SUPPORTED
    if direction * (a.median - b.median) < 0 and (a_lo > b_hi or a_hi < b_lo):
        return NOT_SUPPORTED
    return INCONCLUSIVE


def speed_rows_for(speed: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """The speed runs that measured the shapes of `runs`: by the trials' kb.shape tag where logged, else by
    (variant, preset); where a shape was measured in several invocations, the one whose matrix run holds these
    trials, else the newest."""
    if speed is None or speed.empty or runs.empty:
        return pd.DataFrame()
    parents = set(runs.parent_run_id.dropna())
    out = []
    for (variant, preset), g in runs.groupby(["variant", "preset"], sort=True, dropna=False):
        shapes = set(g["shape"].dropna()) if "shape" in g else set()
        cand = speed[speed["shape"].isin(shapes)] if shapes else speed[speed.variant.eq(variant) &
                                                                         speed.preset.eq(preset)]
        if cand.empty:
            continue
        mine = cand[cand.parent_run_id.isin(parents)]
        pick = (mine if len(mine) else cand).sort_values("start_time").iloc[-1]
        out.append(pick.to_dict() | {"variant": variant, "preset": preset})
    return pd.DataFrame(out)


def row_for(speed_rows: pd.DataFrame, variant: str, preset: str | None) -> dict | None:
    if speed_rows.empty:
        return None
    sel = speed_rows[speed_rows.variant.eq(variant) & (speed_rows.preset.eq(preset) if preset else True)]
    return sel.iloc[0].to_dict() if len(sel) else None


def decode_batches(speed_rows: pd.DataFrame) -> list[int]:
    prefix = names.SPEED_DECODE.split("{")[0]
    out = set()
    for c in speed_rows.columns:
        if c.startswith(prefix) and not c.endswith((names.IQR_SUFFIX, names.N_SUFFIX)):
            tail = c[len(prefix):]
            if tail.isdigit():
                out.add(int(tail))
    return sorted(out)
