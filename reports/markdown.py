"""The kimi-bench report: report.md (GitHub-renderable) + figures/ + summary.csv + trials.csv, from a Collected.

Layout: the first screen holds the scope banner, the claims table with verdicts and one figure; then compute
to target, per-arm tables, the controlled speed and memory measurements, the paired differences the claims use,
the other figures, unfinished trials, the groups in the experiment and the reproducibility block.

A report compares only runs whose resolved configuration differs in the seed (reports/groups.py): by default the
group(s) of the newest matrix invocation; `all_runs=True` renders every group as its own block.
Deterministic: the same runs give a byte-identical report.md (no wall-clock time, everything sorted).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.mdformat import fmt, fmt_ci, fmt_exact, fmt_pm, md_table
from reports import names
from reports.claims_table import claims_section
from reports.collect import Collected
from reports.figure_section import first_figure, other_figures
from reports.groups import finished_runs, row_keys
from reports.sections import groups_section, not_finished_section, repro_section, speed_section
from reports.settings import verdict_settings
from reports.stats import estimate

ROUNDING_NOTE = (
    "Numbers: 4 significant digits (whole numbers from 1000 up); `mean ± h` is the mean over finished "
    "seeds and the half-width of its 95% Student-t CI (to the mean's decimals); `(n=1)` means one seed, "
    "so no interval. Exact facts (counts, bytes) are the same for every seed and shown without an interval. "
    "Units: params in millions (M), bytes in MB (10^6). Full precision: `summary.csv`, per trial `trials.csv`."
)

# (metric, column header, divide by)
TABLES: dict[str, list[tuple[str, str, float]]] = {
    "Quality and size": [
        (names.PARAMS_TOTAL, "total params (M)", 1e6),
        (names.PARAMS_ACTIVE, "active params (M)", 1e6),
        (names.VAL_PPL_FINAL, "val ppl", 1.0),
        (names.VAL_BPB, "val bits/byte", 1.0),
        (names.VAL_LOSS_FINAL, "val loss", 1.0),
        (names.CKPT_BYTES, "checkpoint (MB)", 1e6),
    ],
    "Memory (exact bytes; peak per trial on CUDA only)": [
        (names.MEM_PARAM, "params (MB)", 1e6),
        (names.MEM_GRAD, "grads (MB)", 1e6),
        (names.MEM_OPTIM, "optimizer state (MB)", 1e6),
        (names.MEM_PEAK, "peak, CUDA trial (MB)", 1e6),
    ],
    "Gradient stability (lower is more stable)": [
        (names.GRAD_NORM_MEDIAN, "grad-norm median", 1.0),
        (names.GRAD_NORM_P99_OVER_MEDIAN, "grad-norm p99/median", 1.0),
        (names.GRAD_NORM_CV, "grad-norm CV", 1.0),
        (names.GRAD_NORM_SPIKES, "grad-norm spikes", 1.0),
        (names.TRAIN_LOSS_SPIKES, "loss spikes", 1.0),
    ],
    "Throughput observed during training (not a benchmark; the speed claims use the controlled runs)": [
        (names.TRAIN_TOKENS_PER_S, "train tok/s (observed during training)", 1.0)
    ],
}
HISTORY_KEYS = [names.VAL_LOSS, names.TRAIN_LOSS, names.GRAD_NORM, names.TRAIN_TOKENS, names.TRAIN_ELAPSED]
STATUS_ORDER = [names.FINISHED, names.DIVERGED, names.OOM, names.KILLED, names.FAILED, names.PRUNED, names.RUNNING]
CLAIM_SCALE = "about 75M parameters (nanoKimi's table)"


# ----------------------------------------------------------------------------- formatting


def status_counts(statuses: pd.Series) -> str:
    """'3 finished, 1 diverged' in STATUS_ORDER (unknown statuses last, alphabetical)."""
    counts = statuses.fillna("unknown").value_counts()
    order = [s for s in STATUS_ORDER if s in counts]
    order += sorted(s for s in counts.index if s not in STATUS_ORDER)
    return ", ".join(f"{counts[s]} {s}" for s in order) or "0"


EXACT_METRICS = {
    names.PARAMS_TOTAL,
    names.PARAMS_ACTIVE,
    names.PARAMS_EMBEDDING,
    names.CKPT_BYTES,
    names.MEM_PARAM,
    names.MEM_GRAD,
    names.MEM_OPTIM,
    names.FLOPS_PER_TOKEN,
    names.INFER_KV_BYTES,
}


# ----------------------------------------------------------------------------- grouping helpers


def _presets(runs: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """[(label, runs of that preset)]; label is '' when the block has a single preset."""
    if runs.preset.nunique(dropna=False) <= 1:
        return [("", runs)]
    return [(str(p), g) for p, g in runs.groupby(runs.preset.fillna("?"), sort=True)]


# ----------------------------------------------------------------------------- per-arm tables


def summary_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """summary.csv: one row per (group,) arm (per preset and arm with several presets), full precision."""
    keys = (["group"] if "group" in runs else []) + row_keys(runs)
    rows = []
    for key, g in runs.groupby(keys, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(keys, key, strict=True))
        row |= {
            "variant": g.variant.iloc[0],
            "optimizer": g.optimizer.iloc[0],
            "trials": status_counts(g.status),
            "n_trials": len(g),
            "n_finished": int(g.status.eq(names.FINISHED).sum()),
        }
        f = finished_runs(g)
        for metric, _, _ in [m for table in TABLES.values() for m in table]:
            e = estimate(f[metric]) if metric in f else estimate([])
            row |= {
                f"{metric}:n": e.n,
                f"{metric}:mean": e.mean,
                f"{metric}:std": e.std,
                f"{metric}:ci_low": e.low,
                f"{metric}:ci_high": e.high,
            }
        rows.append(row)
    return pd.DataFrame(rows)


def trials_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """trials.csv: one row per trial of the report, its ids and final metrics."""
    from reports.collect import FINAL_METRICS

    cols = [
        "group",
        "config_id",
        "run_id",
        "arm",
        "variant",
        "optimizer",
        "preset",
        "seed",
        "status",
        "trial_key",
        "git_commit",
        "device",
        "threads",
        "data_hash",
        "start_time",
    ]
    cols = [c for c in cols if c in runs] + [m for m in FINAL_METRICS if m in runs]
    return runs[cols].sort_values(["arm", "seed", "run_id"]).reset_index(drop=True)


def _main_tables(runs: pd.DataFrame) -> list[str]:
    keys = row_keys(runs)
    if names.MEM_PEAK in runs:  # per-trial peak memory means something only on CUDA (CPU RSS grew with run order)
        runs = runs.assign(**{names.MEM_PEAK: runs[names.MEM_PEAK].where(runs.device.astype(str).ne("cpu"))})
    out = []
    for i, (title, cols) in enumerate(TABLES.items()):
        cols = [c for c in cols if c[0] in runs and runs[c[0]].notna().any()]
        if not cols:
            continue
        header = keys + (["trials"] if i == 0 else []) + [h for _, h, _ in cols]
        rows = []
        for key, g in runs.groupby(keys, sort=True, dropna=False):
            key = key if isinstance(key, tuple) else (key,)
            f = finished_runs(g)
            cells = list(key) + ([status_counts(g.status)] if i == 0 else [])
            for metric, _, scale in cols:
                cells.append(
                    fmt_exact(f[metric], scale) if metric in EXACT_METRICS else fmt_pm(estimate(f[metric]), scale)
                )
            rows.append(cells)
        out.append(f"### {title}\n\n{md_table(header, rows)}")
    return out


# ----------------------------------------------------------------------------- speed (controlled runs)


# ----------------------------------------------------------------------------- scope banner


def _scope_banner(runs: pd.DataFrame, match: tuple[str, float] | None) -> str:
    fin = finished_runs(runs)
    params = fin[names.PARAMS_TOTAL].dropna() if names.PARAMS_TOTAL in fin else pd.Series(dtype=float)
    tokens = fin[names.TRAIN_TOKENS].dropna() if names.TRAIN_TOKENS in fin else pd.Series(dtype=float)
    seeds = fin.groupby("arm").seed.nunique() if len(fin) else pd.Series(dtype=int)
    devices = sorted({str(d) for d in runs.device.dropna()}) or ["?"]
    p = (
        f"{fmt(params.min(), 1e6)}M"
        if len(params) and params.min() == params.max()
        else f"{fmt(params.min(), 1e6)}M to {fmt(params.max(), 1e6)}M"
        if len(params)
        else "? "
    )
    t = (
        f"{fmt(tokens.min())}"
        if len(tokens) and tokens.min() == tokens.max()
        else f"{fmt(tokens.min())} to {fmt(tokens.max())}"
        if len(tokens)
        else "?"
    )
    s = (
        f"{int(seeds.min())}"
        if len(seeds) and seeds.min() == seeds.max()
        else f"{int(seeds.min())} to {int(seeds.max())}"
        if len(seeds)
        else "0"
    )
    one_seed = len(seeds) and seeds.min() < 2
    matched = f"a matched matrix ({match[0]} params within ±{match[1]:.0%})" if match else "not a matched matrix"
    lines = [
        f"> **Scope.** These runs: {p} parameters, {t} training tokens per trial, {s} seed(s) per arm, on "
        f"{', '.join(devices)}; {matched}. "
        f"The claims were made at {CLAIM_SCALE}.",
        "> The verdicts say what these runs show at this scale and budget; they cannot confirm or refute a claim "
        "at the paper's scale (orderings between architectures and optimizers can change with size and tokens)."
        + (
            " With one seed per arm there is no interval: statistical rows are inconclusive by construction."
            if one_seed
            else ""
        ),
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- claims and compute


def _match_of(c: Collected, runs: pd.DataFrame) -> tuple[str, float] | None:
    """(by, tolerance) when the matrix that ran these trials logged its [match] section, else None."""
    cands = []
    for col in (f"param.{names.MATCH_BY}",):
        if col in runs and runs[col].notna().any():
            tol = runs.get(f"param.{names.MATCH_TOLERANCE}")
            cands.append(
                (
                    str(runs[col].dropna().iloc[0]),
                    float(tol.dropna().iloc[0]) if tol is not None and tol.notna().any() else 0.01,
                )
            )
    m = c.matrix_runs
    if not cands and len(m) and names.MATCH_BY in m:
        mine = m[m.run_id.isin(set(runs.parent_run_id.dropna()))]
        mine = mine[mine[names.MATCH_BY].notna()]
        if len(mine):
            r = mine.iloc[-1]
            tol = r.get(names.MATCH_TOLERANCE)
            cands.append(
                (str(r[names.MATCH_BY]).strip('"'), float(tol) if tol is not None and not pd.isna(tol) else 0.01)
            )
    return cands[0] if cands else None


def _compute_section(curves: pd.DataFrame, runs: pd.DataFrame, pairs, target) -> str:
    from reports.compute import AXES, schedule_of, stable_evals, to_target

    rows = []
    for label, pr in _presets(runs):
        cur = curves[curves.run_id.isin(pr.run_id)]
        if schedule_of(pr) == "wsd":
            cur = stable_evals(cur, pr)
        for a, b in pairs(pr):
            for axis in AXES:
                t = to_target(cur, a, b, axis, target)
                if t.n == 0:
                    continue
                med = t.per_seed.median(numeric_only=True)
                cens = len(t.censored("a")) + len(t.censored("b"))
                rows.append(
                    [
                        f"{a} vs {b}" + (f" [{label}]" if label else ""),
                        AXES[axis],
                        fmt(t.target),
                        fmt(med["a"]),
                        fmt(med["b"]),
                        fmt_ci(t.multiplier),
                        t.n,
                        cens,
                    ]
                )
    if not rows:
        return "No pair of arms reaches a common val loss on a shared seed."
    return md_table(
        [
            "A vs B",
            "to target",
            "target val loss",
            "A (median)",
            "B (median)",
            "multiplier A/B [95% CI]",
            "seeds",
            "censored seeds",
        ],
        rows,
    ) + ("\n\nSeconds are training wall-clock on the host that ran the trials (shared hosts slow some runs).")


def _paired_section(runs: pd.DataFrame, rows) -> str:
    """Paired differences only for the (statistical) comparisons the claims use."""
    from reports.stats import paired_differences

    used = sorted(
        {
            (r.a, r.b, m, r.label)
            for r in rows
            if r.claim.kind == "stat" and r.a
            for m in (r.claim.metric, *getattr(r.claim, "also", ()))
        }
    )
    out = []
    for a, b, metric, label in used:
        pr = runs if not label else runs[runs.preset.astype(str).eq(label)]
        p = paired_differences(finished_runs(pr), metric, a, b)
        if p.n == 0:
            continue
        rel = f"{100 * p.diff.mean / abs(p.b_mean):+.1f}%" if p.b_mean else "n/a"
        out.append([f"{a} − {b}" + (f" [{label}]" if label else ""), metric, p.n, fmt_ci(p.diff, sign=True), rel])
    if not out:
        return "No claim comparison shares a finished seed."
    return md_table(["A − B", "metric", "paired seeds", "mean difference [95% CI]", "relative to B"], out) + (
        "\n\nEvery other comparison is in `summary.csv` (per arm) and `trials.csv` (per trial)."
    )


# ----------------------------------------------------------------------------- figures

# ----------------------------------------------------------------------------- other sections


# ----------------------------------------------------------------------------- one block, the report


def _block(
    c: Collected,
    runs: pd.DataFrame,
    hist: pd.DataFrame,
    out_dir: Path,
    fig_dir: Path,
    figures: bool,
    optuna,
    heading: str,
) -> list[str]:
    from reports import claims as cl
    from reports import factorial, fairness
    from reports.compute import eval_curves
    from reports.speed import speed_rows_for

    fin = finished_runs(runs)
    curves = eval_curves(hist[hist.run_id.isin(fin.run_id)], fin)
    folded = cl.identical_arms(curves)
    match = _match_of(c, runs)
    speed_rows = speed_rows_for(c.speed, runs)
    target, margins = verdict_settings(c, runs)
    rows = []
    for label, pr in _presets(fin):
        ctx = cl.Context(
            pr,
            curves[curves.run_id.isin(pr.run_id)],
            speed_rows[speed_rows.preset.astype(str).eq(label)] if label and len(speed_rows) else speed_rows,
            match,
            folded,
            target,
            margins,
        )
        rows += cl.claim_rows(ctx, label)
    family_size = cl.apply_holm(rows)
    rows += cl.fitted_rows(fin, curves, folded, target)
    tuning = fairness.arm_tuning(c, runs)
    fairness.annotate(rows, tuning)  # every quality/compute row's tuning status; provisional where unfair
    sections = [
        _scope_banner(runs, match) + "\n" + fairness.banner(tuning, runs),
        f"{heading}Claims vs measured",
        claims_section(rows, folded, match, family_size, out_dir),
    ]
    if figures:
        sections.append(first_figure(runs, hist, fig_dir, out_dir))
    decomposition = factorial.section(fin, curves, target)  # a variants x optimizers 2x2: which change did it
    if decomposition:
        sections += [f"{heading}Which change made the difference", decomposition]
    sections += [f"{heading}Tuning budget", fairness.budget_section(tuning, runs)]
    if figures:
        sections += [
            f"**{cap}**\n\n![{cap}]({p.relative_to(out_dir).as_posix()})"
            for cap, p in fairness.tuning_figures(tuning, fig_dir)
        ]

    def compute_pairs(r: pd.DataFrame) -> list[tuple[str, str]]:
        """The pairs the compute claims use, folded arms left out."""
        pairs = (
            [cl.headline_pair(r)]
            + cl.same_optimizer_pairs(r)
            + cl.optimizer_pairs(r, "muon")
            + cl.optimizer_pairs(r, "muonclip")
        )
        return list(dict.fromkeys((a, b) for a, b in pairs if a and b and a not in folded and b not in folded))

    sections += [
        f"{heading}Compute to target",
        _compute_section(curves, fin, compute_pairs, target),
        f"{heading}Results per arm",
        ROUNDING_NOTE,
        *_main_tables(runs),
        f"{heading}Speed and memory (controlled measurements)",
        speed_section(speed_rows),
        f"{heading}Paired differences",
        "Per seed A − B over the seeds both arms finished (same seed = same data order), mean and 95% "
        "Student-t CI of the differences; relative = mean difference / B's mean. Only the comparisons the "
        "claims use.",
        _paired_section(runs, rows),
    ]
    if figures:
        figs = other_figures(c, runs, out_dir, fig_dir, hist, optuna)
        sections += [
            f"{heading}Figures",
            "\n\n".join(f"**{cap}**\n\n![{cap}]({p.relative_to(out_dir).as_posix()})" for cap, p in figs)
            or "No figure.",
        ]
    sections += [f"{heading}Trials that did not finish", not_finished_section(c, runs, hist)]
    return sections


def write_report(
    collected: Collected,
    out_dir: str | Path,
    command: str | None = None,
    optuna: tuple | dict | None = None,
    figures: bool = True,
    all_runs: bool = False,
) -> Path:
    """Write out_dir/report.md, summary.csv, trials.csv and figures/*.png; return report.md's path.

    command: the command that made this report (printed in the reproducibility block).
    optuna: (trials dataframe, param importances), or {arm: that pair}, for the tuning figures; by default
    they come from the experiment's Optuna study runs (kb.kind=study: trials.csv, importances.json).
    figures: False skips the PNGs (tables only, faster).
    all_runs: every group of runs as its own block (default: the group(s) of the newest matrix invocation).
    """
    from reports.groups import assign_groups, default_groups

    c, out_dir = collected, Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    every = assign_groups(c.runs)
    groups = (
        sorted(every.group.dropna().unique(), key=lambda g: int(g[1:]))
        if all_runs
        else default_groups(every, c.matrix_runs)
    )
    runs = every[every.group.isin(groups)].reset_index(drop=True)
    summary_frame(runs).to_csv(out_dir / "summary.csv", index=False)
    trials_frame(runs).to_csv(out_dir / "trials.csv", index=False)
    hist = (
        c.curves(HISTORY_KEYS, list(runs.run_id))
        if len(runs)
        else pd.DataFrame(columns=["run_id", "arm", "seed", "key", "step", "value", "timestamp"])
    )

    newest = runs.start_time.max() if len(runs) else pd.NaT
    date = newest.strftime("%Y-%m-%d %H:%M UTC") if pd.notna(newest) else "n/a"
    n_drop = int(c.dropped.trial_key.isin(set(runs.trial_key.dropna())).sum()) if len(c.dropped) else 0
    dropped = (
        f"; {n_drop} duplicate run(s) of a trial key dropped (kept per key: the finished run, else the newest)"
        if n_drop
        else ""
    )
    others = len(every) - len(runs)
    sections = [
        f"# kimi-bench report: {c.experiment}",
        f"Experiment `{c.experiment}` (MLflow id {c.experiment_id}); newest trial started {date}.  \n"
        f"Trials: {len(runs)} ({status_counts(runs.status) if len(runs) else 'none'}){dropped}"
        + (f"; group(s) {', '.join(groups)}" if groups else "")
        + (f"; {others} trial(s) of other groups not shown (see 'Groups')" if others else "")
        + ".",
    ]
    if runs.empty:
        sections.append("No trial runs (tag `kb.kind=trial`) in this experiment.")
    else:
        fig_dir = out_dir / "figures"
        for g in groups:
            block = runs[runs.group.eq(g)]
            if len(groups) > 1:
                sections.append(f"## Group {g}")
                fd = fig_dir / g
                sections += _block(c, block, hist, out_dir, fd, figures, optuna, "### ")
            else:
                sections += _block(c, block, hist, out_dir, fig_dir, figures, optuna, "## ")
        sections += ["## Groups in this experiment", groups_section(every, groups, all_runs)]
    sections += ["## Reproducibility", repro_section(c, runs, command)]
    path = out_dir / "report.md"
    path.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return path
