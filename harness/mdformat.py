"""Markdown numbers and tables, one definition for the report (reports/) and the bench records (harness/measure/bench).

`fmt` shows a float with 4 significant digits (whole numbers from 1000 up, an exponent below 1e-3, NaN as
n/a); `fmt_pm` and `fmt_ci` show an estimate (anything with n, mean, low, high: reports.stats.Estimate) as
`mean ± h` or `mean [low, high]`; `fmt_exact` shows a value every seed shares once; `fmt_spec` formats with a
given format string (the bench tables' fixed decimals); `md_table` writes a GitHub table, escaping `|` and
newlines in cells. A leaf: it imports nothing of the project and no pandas (the GPU image has none), so the
reports and the bench both use it.
"""

from __future__ import annotations

import math
from typing import Any

BIG = 1e300  # at or above: shown as inf (a stored inf reads back as sys.float_info.max)


def decimals(x: float) -> int | None:
    """Decimal places that show x (already scaled) with 4 significant digits; None: use an exponent."""
    ax = abs(x)
    if ax == 0 or ax >= 1000:
        return 0
    if ax >= 1e-3:
        return max(0, 3 - math.floor(math.log10(ax)))
    return None


def missing(x: Any) -> bool:
    """None or NaN, whatever its type (float, numpy, pandas' NA and NaT), without importing pandas."""
    if x is None:
        return True
    try:
        return bool(x != x)  # NaN and NaT are not equal to themselves
    except TypeError:  # pandas.NA: its comparisons are NA, which has no truth value
        return True


def fmt(x: float | None, scale: float = 1.0, places: int | None = None) -> str:
    """4 significant digits, whole numbers from 1000 up, exponent below 1e-3; NaN -> n/a.
    places: force that many decimals (used for a half-width, shown to the precision of its mean)."""
    if missing(x):
        return "n/a"
    x = float(x) / scale
    if math.isinf(x) or abs(x) >= BIG:  # MLflow stores inf as the largest double
        return "inf" if x > 0 else "-inf"
    d = decimals(x) if places is None else places
    return f"{x:.3e}" if d is None else f"{x:.{d}f}"


def fmt_pm(e: Any, scale: float = 1.0) -> str:
    """'mean ± half-width' of a t interval, the half-width to the mean's decimals; '(n=1)' without an
    interval; 'n/a' without data."""
    if e.n == 0:
        return "n/a"
    if e.n == 1 or math.isnan(e.low):
        return f"{fmt(e.mean, scale)} (n=1)"
    d = decimals(e.mean / scale) if e.mean != 0 else None  # mean 0: the half-width's own 4 digits
    return f"{fmt(e.mean, scale)} ± {fmt(e.high - e.mean, scale, d)}"


def fmt_ci(e: Any, scale: float = 1.0, sign: bool = False) -> str:
    """'mean [low, high]'; sign=True prefixes '+' on positive means (differences)."""
    if e.n == 0:
        return "n/a"
    m = fmt(e.mean, scale)
    if sign and e.mean > 0:
        m = "+" + m
    if e.n == 1 or math.isnan(e.low):
        return f"{m} (n=1, no CI)"
    return f"{m} [{fmt(e.low, scale)}, {fmt(e.high, scale)}]"


def fmt_exact(values: Any, scale: float = 1.0) -> str:
    """A deterministic value over seeds (a pandas Series): shown once; 'a to b' if the seeds disagree (they
    should not)."""
    v = values.dropna()
    if v.empty:
        return "n/a"
    lo, hi = v.min(), v.max()
    return fmt(lo, scale) if lo == hi else f"{fmt(lo, scale)} to {fmt(hi, scale)} (seeds differ)"


def fmt_spec(value: Any, spec: str = "{:,.2f}") -> str:
    """`spec.format(value)`; None -> n/a, a non-finite float as Python prints it (the bench tables)."""
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return spec.format(value)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
