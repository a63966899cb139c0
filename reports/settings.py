"""The report's [verdicts] settings (the target loss fixed before the runs, the equivalence margins), read from the
matrix invocation that ran the trials."""

from __future__ import annotations

import pandas as pd

from reports.collect import Collected

VERDICT_SETTINGS = ("verdicts.target_loss", "verdicts.loss_margin", "verdicts.ratio_margin")


def _setting(c: Collected, runs: pd.DataFrame, key: str) -> float | None:
    """A [verdicts] setting of the matrix invocation that ran these trials (its parent run's param), else None."""
    m = c.matrix_runs
    if len(m) and key in m:
        mine = m[m.run_id.isin(set(runs.parent_run_id.dropna()))] if "parent_run_id" in runs else m
        vals = pd.to_numeric(mine[key], errors="coerce").dropna()  # "None": the field was not set
        if len(vals):
            return float(vals.iloc[-1])
    return None


def verdict_settings(c: Collected, runs: pd.DataFrame):
    """(target loss fixed before the runs or None, Margins) from the matrix's [verdicts] section."""
    from reports.stats import Margins

    target = _setting(c, runs, "verdicts.target_loss")
    legacy = "param.report.target_loss"  # an older spelling, on the trial runs
    if target is None and legacy in runs and runs[legacy].notna().any():
        target = float(runs[legacy].dropna().iloc[0])
    loss, ratio = (_setting(c, runs, k) for k in VERDICT_SETTINGS[1:])
    d = Margins()
    return target, Margins(loss if loss is not None else d.loss_nats, ratio if ratio is not None else d.ratio)
