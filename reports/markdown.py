"""The kimi-bench report: report.md (GitHub-renderable) + figures/ + summary.csv, from a Collected.

Deterministic: the same runs give a byte-identical report.md (no wall-clock time, everything sorted).
Statistics use finished trials only; every other trial is counted in the status column and listed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from reports import plots
from reports.collect import Collected, strip_credentials
from reports.stats import (
    EQUIVALENCE_MARGIN,
    INCONCLUSIVE,
    VERDICT_RULE,
    Estimate,
    Paired,
    estimate,
    paired_differences,
    paired_verdict,
)

ROUNDING_NOTE = (
    "Numbers: 4 significant digits (whole numbers from 1000 up); `mean ± h` is the mean over finished "
    "seeds and the half-width of its 95% Student-t CI (to the mean's decimals); `(n=1)` means one seed, "
    "so no interval. "
    "Units: params in millions (M), bytes in MB (10^6) or GB (10^9). Full precision: `summary.csv`."
)
NOT_MEASURED = "not measured"

# (metric, column header, divide by)
TABLES: dict[str, list[tuple[str, str, float]]] = {
    "Quality and size": [
        ("params/total", "total params (M)", 1e6),
        ("params/active", "active params (M)", 1e6),
        ("val/ppl_final", "val ppl", 1.0),
        ("val/loss_final", "val loss", 1.0),
        ("ckpt/bytes", "checkpoint (MB)", 1e6),
    ],
    "Speed and memory": [
        ("train/tokens_per_s", "train tok/s", 1.0),
        ("infer/decode_tokens_per_s", "decode tok/s (batch 1)", 1.0),
        ("infer/decode_tokens_per_s_b8", "decode tok/s (batch 8)", 1.0),
        ("mem/peak_bytes", "peak memory (MB)", 1e6),
    ],
    "Gradient stability (lower is more stable)": [
        ("grad/norm_median", "grad-norm median", 1.0),
        ("grad/norm_p99_over_median", "grad-norm p99/median", 1.0),
        ("grad/norm_cv", "grad-norm CV", 1.0),
        ("grad/norm_spikes", "grad-norm spikes", 1.0),
        ("train/loss_spikes", "loss spikes", 1.0),
    ],
}
PAIRED_METRICS: list[tuple[str, str, float]] = [
    ("val/loss_final", "val loss", 1.0),
    ("val/ppl_final", "val ppl", 1.0),
    ("train/tokens_per_s", "train tok/s", 1.0),
    ("infer/decode_tokens_per_s", "decode tok/s (b1)", 1.0),
    ("infer/decode_tokens_per_s_b8", "decode tok/s (b8)", 1.0),
    ("mem/peak_bytes", "peak memory (MB)", 1e6),
    ("grad/norm_cv", "grad-norm CV", 1.0),
    ("grad/norm_p99_over_median", "grad-norm p99/median", 1.0),
]
HISTORY_KEYS = ["val/loss", "train/loss", "grad/norm", "train/tokens", "train/elapsed_s"]
STATUS_ORDER = ["finished", "diverged", "oom", "killed", "failed", "pruned", "running"]


# ----------------------------------------------------------------------------- formatting

def decimals(x: float) -> int | None:
    """Decimal places that show x (already scaled) with 4 significant digits; None: use an exponent."""
    ax = abs(x)
    if ax == 0 or ax >= 1000:
        return 0
    if ax >= 1e-3:
        return max(0, 3 - math.floor(math.log10(ax)))
    return None


def fmt(x: float | None, scale: float = 1.0, places: int | None = None) -> str:
    """4 significant digits, whole numbers from 1000 up, exponent below 1e-3; NaN -> n/a.
    places: force that many decimals (used for a half-width, shown to the precision of its mean)."""
    if x is None or pd.isna(x):
        return "n/a"
    x = float(x) / scale
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    d = decimals(x) if places is None else places
    return f"{x:.3e}" if d is None else f"{x:.{d}f}"


def fmt_pm(e: Estimate, scale: float = 1.0) -> str:
    """'mean ± half-width' of a t interval, the half-width to the mean's decimals; '(n=1)' without an
    interval; 'n/a' without data."""
    if e.n == 0:
        return "n/a"
    if e.n == 1 or math.isnan(e.low):
        return f"{fmt(e.mean, scale)} (n=1)"
    d = decimals(e.mean / scale) if e.mean != 0 else None   # mean 0: the half-width's own 4 digits
    return f"{fmt(e.mean, scale)} ± {fmt(e.high - e.mean, scale, d)}"


def fmt_ci(e: Estimate, scale: float = 1.0, sign: bool = False) -> str:
    """'mean [low, high]'; sign=True prefixes '+' on positive means (differences)."""
    if e.n == 0:
        return "n/a"
    m = fmt(e.mean, scale)
    if sign and e.mean > 0:
        m = "+" + m
    if e.n == 1 or math.isnan(e.low):
        return f"{m} (n=1, no CI)"
    return f"{m} [{fmt(e.low, scale)}, {fmt(e.high, scale)}]"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def status_counts(statuses: pd.Series) -> str:
    """'3 finished, 1 diverged' in STATUS_ORDER (unknown statuses last, alphabetical)."""
    counts = statuses.fillna("unknown").value_counts()
    order = [s for s in STATUS_ORDER if s in counts]
    order += sorted(s for s in counts.index if s not in STATUS_ORDER)
    return ", ".join(f"{counts[s]} {s}" for s in order) or "0"


# ----------------------------------------------------------------------------- grouping helpers

def _group_keys(runs: pd.DataFrame) -> list[str]:
    """Rows are arms; with several size presets in one experiment, (preset, arm)."""
    return ["preset", "arm"] if runs.preset.nunique(dropna=False) > 1 else ["arm"]


def _presets(runs: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """[(label, runs of that preset)]; label is '' when the experiment has a single preset."""
    if runs.preset.nunique(dropna=False) <= 1:
        return [("", runs)]
    return [(str(p), g) for p, g in runs.groupby(runs.preset.fillna("?"), sort=True)]


def _finished(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs.status.eq("finished")]


def arm_of(runs: pd.DataFrame, variant: str, optimizer: str) -> str | None:
    arms = runs.loc[runs.variant.eq(variant) & runs.optimizer.eq(optimizer), "arm"].dropna().unique()
    return sorted(arms)[0] if len(arms) else None


def headline_pair(runs: pd.DataFrame) -> tuple[str | None, str | None]:
    """The paper's table pair: Kimi (muon, else muonclip) vs GPT with AdamW."""
    kimi = arm_of(runs, "kimi", "muon") or arm_of(runs, "kimi", "muonclip")
    return kimi, arm_of(runs, "gpt", "adamw")


def same_optimizer_pairs(runs: pd.DataFrame, a_variant: str = "kimi", b_variant: str = "gpt") -> list:
    out = []
    for opt in sorted(runs.optimizer.dropna().unique()):
        a, b = arm_of(runs, a_variant, opt), arm_of(runs, b_variant, opt)
        if a and b:
            out.append((a, b))
    return out


def optimizer_pairs(runs: pd.DataFrame, a_opt: str, b_opt: str = "adamw") -> list:
    out = []
    for var in sorted(runs.variant.dropna().unique()):
        a, b = arm_of(runs, var, a_opt), arm_of(runs, var, b_opt)
        if a and b:
            out.append((a, b))
    return out


def comparison_pairs(runs: pd.DataFrame) -> list[tuple[str, str]]:
    """The paper's pair (Kimi vs GPT+AdamW), every variant - GPT per optimizer (Kimi - GPT and the
    ablations), then per variant Muon - AdamW, MuonClip - AdamW, MuonClip - Muon."""
    pairs = [headline_pair(runs)] if None not in headline_pair(runs) else []
    for var in sorted(v for v in runs.variant.dropna().unique() if v != "gpt"):
        pairs += same_optimizer_pairs(runs, var, "gpt")
    pairs += optimizer_pairs(runs, "muon") + optimizer_pairs(runs, "muonclip")
    pairs += optimizer_pairs(runs, "muonclip", "muon")
    return list(dict.fromkeys(pairs))


# ----------------------------------------------------------------------------- sections

def summary_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """summary.csv: one row per arm (per preset and arm with several presets), full precision."""
    keys = _group_keys(runs)
    rows = []
    for key, g in runs.groupby(keys, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(keys, key, strict=True))
        row |= {"variant": g.variant.iloc[0], "optimizer": g.optimizer.iloc[0],
                "trials": status_counts(g.status), "n_trials": len(g),
                "n_finished": int(g.status.eq("finished").sum())}
        f = _finished(g)
        for metric, _, _ in [m for table in TABLES.values() for m in table]:
            e = estimate(f[metric])
            row |= {f"{metric}:n": e.n, f"{metric}:mean": e.mean, f"{metric}:std": e.std,
                    f"{metric}:ci_low": e.low, f"{metric}:ci_high": e.high}
        rows.append(row)
    return pd.DataFrame(rows)


def _main_tables(summary: pd.DataFrame, keys: list[str]) -> list[str]:
    out = []
    for i, (title, cols) in enumerate(TABLES.items()):
        header = keys + (["trials"] if i == 0 else []) + [h for _, h, _ in cols]
        rows = []
        for d in summary.to_dict("records"):
            cells = [d[k] for k in keys] + ([d["trials"]] if i == 0 else [])
            for metric, _, scale in cols:
                e = Estimate(int(d[f"{metric}:n"]), d[f"{metric}:mean"], d[f"{metric}:std"],
                             d[f"{metric}:ci_low"], d[f"{metric}:ci_high"])
                cells.append(fmt_pm(e, scale))
            rows.append(cells)
        out.append(f"### {title}\n\n{md_table(header, rows)}")
    return out


def _rel(p: Paired) -> str:
    if p.n == 0 or not p.b_mean or math.isnan(p.b_mean):
        return "n/a"
    return f"{100 * p.diff.mean / abs(p.b_mean):+.1f}%"


def _paired_section(runs: pd.DataFrame) -> str:
    rows = []
    for label, pr in _presets(runs):
        fin = _finished(pr)
        for a, b in comparison_pairs(pr):
            for metric, name, scale in PAIRED_METRICS:
                p = paired_differences(fin, metric, a, b)
                if p.n == 0:
                    continue
                comp = f"{a} − {b}" + (f" [{label}]" if label else "")
                rows.append([comp, name, p.n, fmt_ci(p.diff, scale, sign=True), _rel(p)])
    if not rows:
        return "No pair of arms shares a finished seed."
    header = ["A − B", "metric", "paired seeds", "mean difference [95% CI]", "relative to B"]
    return md_table(header, rows)


@dataclass(frozen=True)
class Claim:
    text: str
    paper: str                      # the paper's numbers "Kimi vs GPT", or "(in words)"
    metric: str
    direction: int                  # +1: A higher, -1: A lower, 0: A equal to B
    scale: float
    pairs: Callable[[pd.DataFrame], list[tuple[str | None, str | None]]]
    needs: str                      # the arms it needs, printed when they are missing


def _headline(runs):
    return [headline_pair(runs)]


def _headline_and_same_opt(runs):
    return list(dict.fromkeys(_headline(runs) + same_optimizer_pairs(runs)))


def _same_opt_only(runs):
    return [p for p in same_optimizer_pairs(runs) if p not in _headline(runs)]


def _muon_vs_adamw(runs):
    return optimizer_pairs(runs, "muon") + optimizer_pairs(runs, "muonclip")


HEADLINE_NEEDS = "kimi+muon (or kimi+muonclip) and gpt+adamw"
OPT_NEEDS = "one variant trained with both muon (or muonclip) and adamw"
SAME_OPT_NEEDS = "kimi and gpt trained with the same optimizer"


IN_WORDS = "(in words)"
CLAIMS: list[Claim] = [
    Claim("Kimi infers faster (decode tokens/s, batch 1)", "45.2 vs 30.3", "infer/decode_tokens_per_s",
          +1, 1.0, _headline, HEADLINE_NEEDS),
    Claim("Kimi has lower perplexity (val ppl)", "18.1 vs 22.8", "val/ppl_final", -1, 1.0, _headline,
          HEADLINE_NEEDS),
    Claim("Same total parameters (M)", "75 vs 74", "params/total", 0, 1e6, _headline, HEADLINE_NEEDS),
    Claim("Kimi is smaller on disk (checkpoint GB)", "0.58 vs 0.62", "ckpt/bytes", -1, 1e9, _headline,
          HEADLINE_NEEDS),
    Claim("Muon reaches lower loss than AdamW (val loss)", IN_WORDS, "val/loss_final", -1, 1.0,
          _muon_vs_adamw, OPT_NEEDS),
    Claim("Muon gives more stable gradients (grad-norm CV)", IN_WORDS, "grad/norm_cv", -1, 1.0,
          _muon_vs_adamw, OPT_NEEDS),
    Claim("Muon gives more stable gradients (grad-norm p99/median)", IN_WORDS,
          "grad/norm_p99_over_median", -1, 1.0, _muon_vs_adamw, OPT_NEEDS),
    Claim("Kimi infers faster than GPT at the same parameters (decode tokens/s, batch 1)", IN_WORDS,
          "infer/decode_tokens_per_s", +1, 1.0, _same_opt_only, SAME_OPT_NEEDS),
    Claim("Kimi infers faster than GPT at the same parameters (decode tokens/s, batch 8)", IN_WORDS,
          "infer/decode_tokens_per_s_b8", +1, 1.0, _headline_and_same_opt, HEADLINE_NEEDS),
    Claim("Kimi trains faster (train tokens/s)", IN_WORDS, "train/tokens_per_s", +1, 1.0,
          _headline_and_same_opt, HEADLINE_NEEDS),
]


def _claim_rows(claim: Claim, runs: pd.DataFrame, label: str) -> list[list[str]]:
    pairs = [(a, b) for a, b in claim.pairs(runs) if a is not None and b is not None]
    text = claim.text + (f" [{label}]" if label else "")
    if not pairs:
        return [[text, claim.paper, NOT_MEASURED, NOT_MEASURED, f"{NOT_MEASURED} (needs {claim.needs})",
                 NOT_MEASURED]]
    rows, fin = [], _finished(runs)
    for a, b in pairs:
        ea, eb = (estimate(fin.loc[fin.arm.eq(arm), claim.metric]) for arm in (a, b))
        p = paired_differences(fin, claim.metric, a, b)
        diff = (f"{fmt_ci(p.diff, claim.scale, sign=True)}, {_rel(p)}, {p.n} paired" if p.n
                else "no paired seeds")
        v = paired_verdict(p, claim.direction) if p.n else INCONCLUSIVE
        rows.append([text, claim.paper, f"{a}: {fmt_ci(ea, claim.scale)}", f"{b}: {fmt_ci(eb, claim.scale)}",
                     diff, f"**{v}**"])
    return rows


def _claims_section(runs: pd.DataFrame) -> str:
    rows = []
    for claim in CLAIMS:
        for label, pr in _presets(runs):
            rows += _claim_rows(claim, pr, label)
    header = ["claim", "paper (Kimi vs GPT)", "A measured (mean [95% CI])", "B measured (mean [95% CI])",
              "A − B [95% CI], relative, n", "verdict"]
    note = ("A = Kimi (kimi+muon, else kimi+muonclip) and B = GPT (gpt+adamw) for the paper's table pair; "
            "optimizer claims compare optimizers within each variant; 'same parameters' rows compare Kimi "
            "and GPT trained with the same optimizer. Paper numbers are from the nanoKimi paper's table.")
    return f"{md_table(header, rows)}\n\n{note}\n\n{VERDICT_RULE} (margin = {EQUIVALENCE_MARGIN:.0%})"


def _figures(c: Collected, out_dir: Path, hist: pd.DataFrame, optuna) -> list[tuple[str, Path]]:
    fig_dir = out_dir / "figures"
    fin = _finished(c.runs)
    h = hist[hist.run_id.isin(fin.run_id)]
    moe = c.moe_load
    moe = moe[moe.run_id.isin(fin.run_id)]
    if len(_group_keys(c.runs)) > 1:
        # several size presets: one curve/bar per (arm, preset), labelled "arm [preset]"
        label = fin.set_index("run_id").apply(lambda r: f"{r.arm} [{r.preset}]", axis=1)
        h, moe = (d.assign(arm=d.run_id.map(label)) for d in (h, moe))
        fin = fin.assign(arm=fin.run_id.map(label).values)
    colors = plots.arm_colors(fin.arm.dropna())
    throughput = {"train/tokens_per_s": ("train tokens/s", 1.0),
                  "infer/decode_tokens_per_s": ("decode tokens/s (batch 1)", 1.0),
                  "infer/decode_tokens_per_s_b8": ("decode tokens/s (batch 8)", 1.0)}
    curve = plots.plot_curves
    todo = [  # (caption, file name, plot(path) -> path | None)
        ("Validation loss vs optimizer steps", "val_loss_vs_step",
         lambda p: curve(h, "val/loss", p, "step", colors=colors)),
        ("Validation loss vs training tokens", "val_loss_vs_tokens",
         lambda p: curve(h, "val/loss", p, "tokens", colors=colors)),
        ("Validation loss vs training wall-clock", "val_loss_vs_seconds",
         lambda p: curve(h, "val/loss", p, "seconds", colors=colors)),
        ("Training loss vs steps", "train_loss_vs_step",
         lambda p: curve(h, "train/loss", p, "step", smooth=_smooth(h), colors=colors)),
        ("Gradient norm (before clipping) vs steps", "grad_norm_vs_step",
         lambda p: curve(h, "grad/norm", p, "step", logy=True, colors=colors)),
        ("Throughput (95% CI over seeds)", "throughput",
         lambda p: plots.plot_bars(fin, throughput, p, "Throughput", colors=colors)),
        ("Peak memory (95% CI over seeds)", "peak_memory",
         lambda p: plots.plot_bars(fin, {"mem/peak_bytes": ("peak memory (MB)", 1e6)}, p, "Peak memory",
                                   colors=colors)),
    ]
    out = []
    for caption, name, fn in todo:
        path = fn(fig_dir / f"{name}.png")
        if path is not None:
            out.append((caption, path))
    if not moe.empty:
        for arm in sorted(moe.arm.dropna().unique()):
            path = plots.plot_moe_heatmap(moe, arm, fig_dir / f"moe_load_{plots.slug(arm)}.png")
            if path is not None:
                out.append((f"MoE expert load over training: {arm}", path))
    studies = optuna if optuna is not None else c.studies()
    if isinstance(studies, tuple):  # one (trials, importances) pair, no arm
        studies = {"": studies}
    for arm, (trials, importances) in sorted(studies.items()):
        prefix = f"optuna_{plots.slug(arm)}" if arm else "optuna"
        for path in plots.plot_optuna(trials, fig_dir, importances, prefix=prefix):
            kind = path.stem.removeprefix(prefix + "_")
            out.append((f"Optuna {kind}{': ' + arm if arm else ''}", path))
    return out


def _smooth(h: pd.DataFrame) -> int:
    """Rolling window for the train-loss figure: about 1/50 of the logged steps."""
    steps = h.loc[h.key.eq("train/loss"), "step"].nunique()
    return max(1, steps // 50)


def _not_finished_section(c: Collected, hist: pd.DataFrame) -> str:
    bad = c.runs[~c.runs.status.eq("finished")]
    parts = []
    if bad.empty:
        parts.append("Every trial finished.")
    else:
        last = hist[hist.key.eq("train/loss")].groupby("run_id").step.max()
        rows = []
        for r in bad.sort_values(["arm", "seed", "run_id"]).itertuples():
            ds = c.runs.loc[c.runs.run_id.eq(r.run_id), "train/diverged_step"].iloc[0]
            step = ds if pd.notna(ds) else last.get(r.run_id, float("nan"))
            rows.append([r.arm, r.seed, r.status, "n/a" if pd.isna(step) else int(step), r.run_id])
        parts.append(md_table(["arm", "seed", "status", "step (diverged at, else last logged)", "run id"],
                              rows))
    if c.n_dropped:
        rows = [[r.arm, r.seed, r.status, r.trial_key, r.run_id] for r in c.dropped.itertuples()]
        parts.append(f"{c.n_dropped} superseded run(s) with the trial key of a kept run (in no statistic):"
                     f"\n\n{md_table(['arm', 'seed', 'status', 'trial key', 'run id'], rows)}")
    return "\n\n".join(parts)


def _uniq(values) -> list[str]:
    return sorted({str(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))})


def _repro_section(c: Collected, command: str | None) -> str:
    runs, m = c.runs, c.matrix_runs
    lines = []
    if command:
        lines.append(f"- Report command: `{command}`")
    run_cmds = _uniq(m.command)
    lines.append("- Run command(s): " + (", ".join(f"`{x}`" for x in run_cmds) if run_cmds
                                         else "not recorded (no `kb.command` tag on the matrix run)"))

    def item(name: str, values: list[str]) -> str:
        if not values:
            return f"- {name}: not recorded"
        warn = " (differ across trials)" if len(values) > 1 else ""
        return f"- {name}{warn}: " + ", ".join(f"`{v}`" for v in values)

    lines.append(item("Git commit(s)", _uniq(list(runs.git_commit) + list(m.git_commit))))
    lines.append(item("torch version(s)", _uniq(runs.torch_version)))
    lines.append(item("Device(s)", _uniq(runs.device)))
    lines.append(item("Data hash(es)", _uniq(runs.data_hash)))
    lines.append(f"- MLflow: tracking URI `{strip_credentials(c.tracking_uri)}`, experiment `{c.experiment}` "
                 f"(id {c.experiment_id})" + (f", matrix run(s) {', '.join(f'`{r}`' for r in m.run_id)}"
                                              if len(m) else ""))
    tuning = c.tuning
    if tuning.empty:
        lines.append("- Tuning provenance: none (no trial has a `kb.tuned_from` tag)")
    else:
        lines.append("- Tuning provenance (`kb.tuned_from`): " +
                     "; ".join(f"{r.arm}: `{r.tuned_from}`" for r in tuning.itertuples()))
    return "\n".join(lines)


def write_report(collected: Collected, out_dir: str | Path, command: str | None = None,
                 optuna: tuple | dict | None = None, figures: bool = True) -> Path:
    """Write out_dir/report.md, out_dir/summary.csv and out_dir/figures/*.png; return report.md's path.

    command: the command that made this report (printed in the reproducibility block).
    optuna: (trials dataframe, param importances), or {arm: that pair}, for the tuning figures; by default
    they come from the experiment's Optuna study runs (kb.kind=study: trials.csv, importances.json).
    figures: False skips the PNGs (tables only, much faster).
    """
    c, out_dir = collected, Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = c.runs
    keys = _group_keys(runs)
    summary = summary_frame(runs)
    summary.to_csv(out_dir / "summary.csv", index=False)
    hist = c.history(HISTORY_KEYS) if len(runs) else pd.DataFrame(
        columns=["run_id", "arm", "seed", "key", "step", "value", "timestamp"])

    newest = runs.start_time.max() if len(runs) else pd.NaT
    date = newest.strftime("%Y-%m-%d %H:%M UTC") if pd.notna(newest) else "n/a"
    dropped = (f"; {c.n_dropped} duplicate run(s) of a trial key dropped (kept per key: the finished run, "
               "else the newest)" if c.n_dropped else "")
    sections = [
        f"# kimi-bench report: {c.experiment}",
        f"Experiment `{c.experiment}` (MLflow id {c.experiment_id}); newest trial started {date}.  \n"
        f"Trials: {len(runs)} ({status_counts(runs.status) if len(runs) else 'none'}){dropped}.",
    ]
    if runs.empty:
        sections.append("No trial runs (tag `kb.kind=trial`) in this experiment.")
    else:
        figs = _figures(c, out_dir, hist, optuna) if figures else []
        fig_md = "\n\n".join(f"**{cap}**\n\n![{cap}]({p.relative_to(out_dir).as_posix()})" for cap, p in figs)
        sections += [
            "## Results per arm", ROUNDING_NOTE, *_main_tables(summary, keys),
            "## Paired differences",
            "Per seed A − B over the seeds both arms finished (same seed = same data order), mean and 95% "
            "Student-t CI of the differences; relative = mean difference / B's mean.",
            _paired_section(runs),
            "## Claims vs measured", _claims_section(runs),
            "## Figures", fig_md or ("No figure: no step metrics logged." if figures else "Figures skipped."),
            "## Trials that did not finish", _not_finished_section(c, hist),
        ]
    sections += ["## Reproducibility", _repro_section(c, command)]
    path = out_dir / "report.md"
    path.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return path
