"""The fitted multiplier: compute to target read off L = a C^-b + c curves fitted per arm over four or more sizes
(a cluster bootstrap over the seeds shared by both arms and every size); exploratory rows, outside the Holm family."""

from __future__ import annotations

import math

import pandas as pd

from harness.mdformat import fmt
from reports.paper_claims import CLAIMS, Row
from reports.stats import EXPLORATORY


def fitted_rows(
    runs: pd.DataFrame, curves: pd.DataFrame, folded: dict[str, str], target: float | None = None
) -> list[Row]:
    """With three or more sizes: the FLOPs multiplier read off fitted loss-vs-compute curves (each run's last eval),
    cluster bootstrap over shared seed ids. Exploratory rows (no p-value, outside the Holm family); fewer than
    MIN_SIZES sizes: not read (a 3-parameter curve through 3 sizes has no residual degrees of freedom)."""
    from reports.compute import MIN_SIZES, fitted_multiplier, scaling_points

    if runs.preset.nunique() < 3:
        return []
    points = scaling_points(curves, runs, "flops")
    rows = []
    for claim in CLAIMS:
        if claim.kind != "compute":
            continue
        for a, b in claim.pairs(runs):
            if not a or not b or a in folded or b in folded:
                continue
            sizes = min(points.loc[points.arm.eq(arm), "size"].nunique() for arm in (a, b))
            head = (claim, f"fit over {sizes} sizes", a, b, f"{a}: L = a C^-b + c", f"{b}: L = a C^-b + c")
            if sizes < MIN_SIZES:
                rows.append(
                    Row(
                        *head,
                        f"not read: {sizes} sizes (needs {MIN_SIZES}: L = a C^-b + c has 3 "
                        "parameters, so 3 sizes leave no residual degree of freedom)",
                        verdict=EXPLORATORY,
                        why="fewer than 4 sizes",
                        exploratory=True,
                    )
                )
                continue
            f = fitted_multiplier(points, a, b, target)
            if not math.isfinite(f.multiplier):
                continue
            rows.append(
                Row(
                    *head,
                    fitted_text(f),
                    verdict=EXPLORATORY,
                    why="no p-value: outside the Holm family",
                    exploratory=True,
                )
            )
    return rows


def fitted_text(f) -> str:
    """The fitted multiplier as the row states it: point, interval, and how many resamples miss or extrapolate."""
    has_ci = not math.isnan(f.low)
    ci = f"[{fmt(f.low)}, {fmt(f.high)}]" if has_ci else "(no interval: fewer than 2 shared seeds)"
    notes = [f"cluster bootstrap over seed ids {', '.join(map(str, f.seeds))} (both arms, all sizes)"]
    if f.n_unreached:
        notes.append(f"{f.n_unreached} of {f.n_resamples} resamples: a refitted curve never reaches the target")
    if f.n_extrapolated:
        notes.append(
            f"{f.n_extrapolated} of {f.n_resamples} resamples extrapolate (a refit reaches the target "
            "outside its measured compute range)"
        )
    if f.extrapolated:
        notes.append(f"the point fit extrapolates: {f.extrapolated} reaches the target outside its measured range")
    reading = "no reading"
    if has_ci and not f.n_extrapolated and not f.extrapolated and f.low > 0 and f.high < math.inf:
        reading = "interval below 1" if f.high < 1 else "interval above 1" if f.low > 1 else "interval spans 1"
    return (
        f"FLOPs ×{fmt(f.multiplier)} {ci} at val loss {fmt(f.target)}; "
        + "; ".join(notes)
        + f"; exploratory reading: {reading}"
    )
