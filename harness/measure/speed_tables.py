"""The console tables of the speed runs: per-shape medians with IQR and n, and the paired ratios A/B."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from harness import schema


def _is_ratio(key: str) -> bool:
    return key.startswith(schema.SPEED_RATIO.split("{")[0])


def speed_table(results: list) -> Table:
    """Medians +- IQR (n) of the speed runs, for the console."""
    table = Table(
        title=f"controlled speed ({results[0].threads} torch threads, {results[0].device.type})"
        if results
        else "controlled speed",
        header_style="bold",
    )
    for col in ("shape", "measure", "median", "IQR", "n"):
        table.add_column(col, justify="left" if col in ("shape", "measure") else "right")
    skip = (schema.SPEED_ROUNDS, schema.SPEED_TIMING_S)
    for r in results:
        for key in sorted(
            k for k in r.metrics if not k.endswith(("_iqr", "_n")) and not _is_ratio(k) and k not in skip
        ):
            value = r.metrics[key]
            iqr, n = r.metrics.get(f"{key}_iqr"), r.metrics.get(f"{key}_n")
            table.add_row(
                escape(r.group.label),
                key.removeprefix(schema.SPEED_PREFIX),
                f"{value:,.6g}",
                "" if iqr is None else f"{iqr:,.3g}",
                "" if n is None else f"{n:.0f}",
            )
    return table


def ratio_table(results: list) -> Table:
    """The paired ratios A/B (median [95% interval], rounds), each pair once, for the console."""
    labels = {r.group.key: r.group.label for r in results}
    first = results[0].metrics if results else {}
    title = (
        f"paired speed ratios A/B ({first.get(schema.SPEED_ROUNDS, 0):.0f} rounds, "
        f"{first.get(schema.SPEED_TIMING_S, 0):.1f} s)"
    )
    table = Table(title=title, header_style="bold")
    for col in ("A", "B", "measure", "A/B", "95% interval", "n"):
        table.add_column(col, justify="left" if col in ("A", "B", "measure") else "right")
    seen = set()
    for r in results:
        for key in sorted(k for k in r.metrics if _is_ratio(k) and not k.endswith(("_n", "_lo", "_hi"))):
            what, _, rest = key.removeprefix(schema.SPEED_RATIO.split("{")[0]).partition("/vs/")
            shape, _, other = rest.partition("/")
            if (shape, r.group.key, other, what) in seen:
                continue
            seen.add((r.group.key, shape, what, other))
            lo, hi = r.metrics.get(key + schema.LO_SUFFIX), r.metrics.get(key + schema.HI_SUFFIX)
            measure = what if what == other else f"{what} / {other}"
            table.add_row(
                escape(r.group.label),
                escape(labels.get(shape, shape)),
                measure,
                f"{r.metrics[key]:.3f}",
                "" if lo is None else f"[{lo:.3f}, {hi:.3f}]",
                f"{r.metrics.get(schema.n_of(key), 0):.0f}",
            )
    return table
