"""How fair a comparison is: each arm's tuning (its study's budget, search space, where its best lies) and the
tuning status every quality and compute verdict carries.

An untuned baseline manufactures speedups: Wen et al. 2025 ("Fantastic pretraining optimizers and where to find
them") saw ~2x optimizer speedups over untuned AdamW shrink to ~1.1-1.4x once both sides were tuned with the same
budget, and AlgoPerf ranks optimizers only under an equal tuning budget. So:

- per arm: the study its evaluation trials came from (their `kb.tuned_from` tag), its trials by state, the tokens
  and FLOPs those trials trained, its search space, its best params, and whether a best learning rate sits in the
  outer tenth (log scale) of its range (EDGE_FRACTION: the optimum may lie outside the box);
- per claims row between two arms (stat and compute rows; exact facts and speed rows are not about tuning and
  carry nothing): both tuned with equal budgets / one tuned / both on defaults / unequal budgets;
- a row between arms whose optimizers differ (every Muon row, the headline pair) keeps its interval and p, but a
  supported / not supported verdict reads "<verdict>, <why>: provisional" unless both arms were tuned with equal
  budgets and neither best learning rate is at the edge of its range.

Equal budget means the same number of trials that ran to a result (complete, diverged or pruned: what
`[tune].trials` counts); the tokens they trained are shown beside it (pruning makes them differ).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from reports import names
from reports.stats import INCONCLUSIVE

EDGE_FRACTION = 0.1  # a best lr within this share of its log range from either end: "at the edge"
TAG_STUDY, TAG_SEARCH_SPACE, TAG_KIND_TUNE_TRIAL = "kb.study", "kb.search_space", "tune-trial"
TAG_BEST_PARAMS = "kb.best_params"
NO_VERDICT = {INCONCLUSIVE, "not measured", "not matched"}  # verdicts that stay as they are

BOTH_TUNED = "both tuned, equal budgets"
ONE_TUNED = "one tuned"
DEFAULTS = "both on defaults"
UNEQUAL = "unequal budgets"
WIDEN = "optimum at the edge of the range: widen it"
RULE = (
    "Tuning (column `tuning`): whether both arms of a row were tuned by an Optuna study with the same number of "
    "trials (complete, diverged or pruned), one was, or neither (defaults). A row between arms whose optimizers "
    "differ is only plainly **supported** / **not supported** when both were tuned with equal budgets and neither "
    f"best learning rate lies in the outer {EDGE_FRACTION:.0%} (log scale) of its range; otherwise the verdict reads "
    "provisional, its interval and p unchanged (an untuned baseline can manufacture a ~2x optimizer speedup: Wen et "
    "al. 2025). Exact facts and speed rows do not depend on tuning."
)


@dataclass
class ArmTuning:
    """One arm's tuning, as its evaluation trials' `kb.tuned_from` and its study run record it."""

    arm: str
    study: str | None = None  # None: the arm ran on defaults
    seed: int | None = None  # the seed the study tuned at
    counts: dict[str, int] | None = None  # complete (finite), diverged, pruned, fail, running; None: not recorded
    tokens: float = math.nan
    flops: float = math.nan
    space: list[dict] = field(default_factory=list)
    best_params: dict = field(default_factory=dict)
    best_value: float = math.nan
    trials: pd.DataFrame = field(default_factory=pd.DataFrame)  # the study's trials.csv
    edge: list[str] = field(default_factory=list)  # lr dims whose best is at the edge of the range

    @property
    def tuned(self) -> bool:
        return self.study is not None

    @property
    def budget(self) -> int | None:
        """Trials that ran to a result (what [tune].trials counts)."""
        if self.counts is None:
            return None
        return self.counts["complete"] + self.counts["diverged"] + self.counts["pruned"]


# ----------------------------------------------------------------------------- rules


def lr_dims(space: list[dict]) -> list[dict]:
    """The learning-rate dimensions of a search space: numeric, log scale, named *lr."""
    return [d for d in space if d.get("log") and str(d.get("name", "")).endswith("lr") and "low" in d]


def at_edge(value: float, low: float, high: float, fraction: float = EDGE_FRACTION) -> bool:
    """True when value lies in the outer `fraction` of [low, high] on a log scale (either end)."""
    if not (low > 0 and high > low and value > 0):
        return False
    u = (math.log(value) - math.log(low)) / (math.log(high) - math.log(low))
    return u < fraction or u > 1 - fraction


def edge_dims(space: list[dict], best: dict) -> list[str]:
    return [
        d["name"]
        for d in lr_dims(space)
        if d["name"] in best and at_edge(float(best[d["name"]]), float(d["low"]), float(d["high"]))
    ]


def pair_status(ta: ArmTuning, tb: ArmTuning) -> tuple[str, str | None]:
    """(the row's tuning status in words, why a verdict between these arms is provisional or None when fair)."""
    if not ta.tuned and not tb.tuned:
        return DEFAULTS, "untuned"
    if ta.tuned != tb.tuned:
        tuned = ta if ta.tuned else tb
        n = f", {tuned.budget} trials" if tuned.budget is not None else ""
        return f"{ONE_TUNED} ({tuned.arm}{n})", "one arm untuned"
    if ta.budget is None or tb.budget is None:
        return "both tuned, budget not recorded", "budget unknown"
    if ta.budget != tb.budget:
        return f"{UNEQUAL} ({ta.budget} vs {tb.budget} trials)", "unequal budgets"
    text = f"{BOTH_TUNED} ({ta.budget} trials each)"
    edges = [f"{t.arm} {d}" for t in (ta, tb) for d in t.edge]
    if edges:
        return f"{text}; optimum at the edge: {', '.join(edges)}", "optimum at the edge"
    return text, None


def _optimizer(arm: str) -> str:
    return arm.split("+", 1)[1] if "+" in arm else arm


def annotate(rows, tuning: dict[str, ArmTuning]) -> None:
    """Set each row's `tuning` cell; make the verdict provisional where the rule above says so."""
    for r in rows:
        if r.claim.kind in ("exact", "speed") or not r.a or not r.b:
            r.tuning = ""
            continue
        ta, tb = tuning.get(r.a, ArmTuning(r.a)), tuning.get(r.b, ArmTuning(r.b))
        status, why = pair_status(ta, tb)
        r.tuning = status
        if why and _optimizer(r.a) != _optimizer(r.b) and r.verdict not in NO_VERDICT:
            r.verdict = f"{r.verdict}, {why}: provisional"


def banner(tuning: dict[str, ArmTuning], runs: pd.DataFrame) -> str:
    """The scope banner's tuning sentence."""
    arms = sorted(runs.arm.dropna().unique())
    tuned = [a for a in arms if tuning.get(a, ArmTuning(a)).tuned]
    if not tuned:
        return (
            "> **Tuning.** Every arm ran on its default hyperparameters (no study): verdicts between optimizers "
            "are provisional (an untuned baseline can manufacture a speedup)."
        )
    if len(tuned) < len(arms):
        return (
            f"> **Tuning.** Tuned: {', '.join(tuned)}; on defaults: "
            f"{', '.join(a for a in arms if a not in tuned)}. Verdicts between a tuned and an untuned arm with "
            "different optimizers are provisional."
        )
    budgets = {tuning[a].budget for a in arms}
    seeds = sorted({tuning[a].seed for a in arms if tuning[a].seed is not None})
    eval_seeds = sorted({int(s) for s in runs.seed.dropna()})
    held = [s for s in seeds if s in eval_seeds]
    where = (
        f" at seed {', '.join(map(str, seeds))}"
        + (
            ", held out from the evaluation seeds"
            if not held
            else ", which is also an evaluation seed (the best configuration was chosen and scored on the same noise)"
        )
        if seeds
        else ""
    )
    edges = [f"{a} {d}" for a in arms for d in tuning[a].edge]
    text = (
        f"> **Tuning.** Every arm was tuned by its own study{where}, "
        + (
            f"with an equal budget of {budgets.pop()} trials each"
            if len(budgets) == 1 and None not in budgets
            else "with unequal budgets (see Tuning budget)"
        )
        + "."
    )
    if edges:
        text += f" Optimum at the edge of its range ({', '.join(edges)}): widen it; those verdicts are provisional."
    return text


# ----------------------------------------------------------------------------- collecting

_SOURCE = re.compile(r"#(?P<study>.+)/trial\d+ value=")


def study_of(tuned_from: str | None) -> str | None:
    """The study name in a `kb.tuned_from` tag ("optuna:<storage>#<study>/trial<n> value=<v>")."""
    if not isinstance(tuned_from, str):
        return None
    m = _SOURCE.search(tuned_from)
    return m.group("study") if m else tuned_from


def _counts(trials: pd.DataFrame) -> dict[str, int]:
    out = {"complete": 0, "diverged": 0, "pruned": 0, "fail": 0, "running": 0}
    if trials.empty or "state" not in trials:
        return out
    state = trials.state.astype(str).str.upper().str.removeprefix("TRIALSTATE.")
    value = pd.to_numeric(trials.get("value"), errors="coerce") if "value" in trials else pd.Series(np.nan)
    complete = state.eq("COMPLETE")
    diverged = complete & ~np.isfinite(value.fillna(np.inf))
    out["complete"] = int((complete & ~diverged).sum())
    out["diverged"] = int(diverged.sum())
    out["pruned"] = int(state.eq("PRUNED").sum())
    out["fail"] = int(state.eq("FAIL").sum())
    out["running"] = int(state.eq("RUNNING").sum())
    return out


def _spent(client, experiment_id: str, study: str) -> tuple[float, float]:
    """(tokens, FLOPs) trained by the study's trials: each tune-trial run's last logged train/tokens, times the
    arm's FLOPs per token (logged by the trials that finished; the same model for every trial of a study)."""
    runs = client.search_runs(
        [experiment_id],
        f"tags.`kb.kind` = '{TAG_KIND_TUNE_TRIAL}' and tags.`{TAG_STUDY}` = '{study}'",
        max_results=5000,
    )
    tokens = [r.data.metrics.get(names.TRAIN_TOKENS, 0.0) for r in runs]
    fpt = [r.data.metrics[names.FLOPS_PER_TOKEN] for r in runs if names.FLOPS_PER_TOKEN in r.data.metrics]
    total = float(sum(tokens)) if runs else math.nan
    return total, total * fpt[0] if fpt else math.nan


def arm_tuning(c, runs: pd.DataFrame) -> dict[str, ArmTuning]:
    """arm -> ArmTuning for every arm of `runs` (the report's trials), read from the experiment's study runs."""
    out = {a: ArmTuning(a) for a in sorted(runs.arm.dropna().unique())}
    wanted = {}
    for arm in out:
        sources = runs.loc[runs.arm.eq(arm), "tuned_from"].dropna() if "tuned_from" in runs else []
        if len(sources):
            wanted[arm] = study_of(sorted(sources)[-1])
    if not wanted:
        return out
    study_runs = c.client.search_runs(
        [c.experiment_id], f"tags.`{names.KIND}` = '{names.KIND_STUDY}'", max_results=1000
    )
    by_name = {}
    for r in sorted(study_runs, key=lambda r: r.info.start_time):  # the newest run of a study wins
        by_name[r.data.tags.get(TAG_STUDY, "")] = r
    with tempfile.TemporaryDirectory(prefix="kb-fair-") as tmp:
        for arm, study in wanted.items():
            t = out[arm]
            t.study = study
            run = by_name.get(study)
            if run is None:
                continue  # tuned elsewhere (another experiment or store): the budget is not recorded here
            tags = run.data.tags
            t.seed = int(tags[names.TAG_SEED]) if tags.get(names.TAG_SEED, "").isdigit() else None
            t.space = json.loads(tags.get(TAG_SEARCH_SPACE, "[]"))
            t.best_params = json.loads(tags.get(TAG_BEST_PARAMS, "{}"))
            try:
                path = c.client.download_artifacts(run.info.run_id, "trials.csv", tmp)
                t.trials = pd.read_csv(path)
            except Exception:  # no trials.csv (a study never summarized): counts unknown
                continue
            t.counts = _counts(t.trials)
            finite = _finite(t.trials)
            if len(finite):
                best = finite.loc[finite.value.idxmin()]
                t.best_value = float(best.value)
                t.best_params = t.best_params or {
                    k[len("params_") :]: best[k] for k in finite if k.startswith("params_")
                }
            t.edge = edge_dims(t.space, t.best_params)
            t.tokens, t.flops = _spent(c.client, c.experiment_id, study)
    return out


def _finite(trials: pd.DataFrame) -> pd.DataFrame:
    """COMPLETE trials with a finite value (the ones a best can be read from)."""
    if trials.empty or "value" not in trials:
        return trials.iloc[0:0]
    state = trials.state.astype(str).str.upper() if "state" in trials else pd.Series("COMPLETE", index=trials.index)
    value = pd.to_numeric(trials.value, errors="coerce")
    return trials[state.str.endswith("COMPLETE") & np.isfinite(value.fillna(np.inf))].assign(value=value)


# ----------------------------------------------------------------------------- the report section


def _fmt(x: float) -> str:
    from harness.mdformat import fmt

    return fmt(x)


def _range(d: dict) -> str:
    if "choices" in d:
        return "{" + ", ".join(map(str, d["choices"])) + "}"
    return f"[{d['low']:.3g}, {d['high']:.3g}]" + (" log" if d.get("log") else "")


def budget_section(tuning: dict[str, ArmTuning], runs: pd.DataFrame) -> str:
    """The budget table (per arm), the search spaces, and the edge warnings."""
    from harness.mdformat import md_table

    tuned = [t for t in tuning.values() if t.tuned]
    if not tuned:
        return (
            "No arm was tuned: every arm ran on the matrix's hyperparameters. Add a `[tune]` section (e.g. "
            "`[tune]` `trials = 8`) and `kimi-bench run --matrix` tunes every arm with the same budget first."
        )
    rows = []
    for t in tuning.values():
        if not t.tuned:
            rows.append([t.arm, "defaults (no study)", "", "", "", "", "", "", "", ""])
            continue
        c = t.counts
        rows.append(
            [
                t.arm,
                f"`{t.study}`",
                "" if t.seed is None else t.seed,
                "n/a" if c is None else t.budget,
                *(("n/a",) * 4 if c is None else (c["complete"], c["diverged"], c["pruned"], c["fail"])),
                _fmt(t.tokens),
                _fmt(t.flops),
            ]
        )
    dims = {t.arm: len(t.space) for t in tuned if t.space}
    parts = [
        md_table(
            [
                "arm",
                "study",
                "tuned at seed",
                "budget (trials with a result)",
                "complete",
                "diverged",
                "pruned",
                "failed",
                "tokens trained",
                "FLOPs trained",
            ],
            rows,
        )
    ]
    if len(set(dims.values())) > 1:
        parts.append(
            "Search spaces differ in dimension: "
            + ", ".join(f"{a} {n} dims" for a, n in dims.items())
            + " (an equal trial budget spreads thinner over more dimensions)."
        )
    eval_seeds = sorted({int(s) for s in runs.seed.dropna()})
    overlap = sorted({t.seed for t in tuned if t.seed in eval_seeds})
    if overlap:
        parts.append(
            f"Warning: a study tuned at seed {', '.join(map(str, overlap))}, also an evaluation seed: the "
            "best configuration was chosen and scored on the same noise."
        )
    elif any(t.seed is not None for t in tuned):
        parts.append(
            f"The studies tuned at seeds held out from the evaluation seeds ({', '.join(map(str, eval_seeds))})."
        )
    space_rows = []
    for t in tuned:
        for d in t.space:
            best = t.best_params.get(d["name"], "")
            shown = f"{best:.4g}" if isinstance(best, float) else str(best)
            flag = WIDEN if d["name"] in t.edge else ""
            space_rows.append([t.arm, d["name"], _range(d), shown, flag])
    if space_rows:
        parts.append(
            "Search space and best value per arm:\n\n"
            + md_table(["arm", "dimension", "range", "best", "note"], space_rows)
        )
    for t in tuned:
        for d in t.edge:
            parts.append(
                f"**{t.arm} {d}: {WIDEN}** (the best lies in the outer {EDGE_FRACTION:.0%} of the log "
                "range; the arm counts as not fully tuned)."
            )
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- figures


def plot_lr_sweep(t: ArmTuning, path: Path) -> Path | None:
    """Final val loss against each learning-rate dimension over the study's trials: log x, the best marked,
    the range's ends drawn."""
    from matplotlib.ticker import NullFormatter

    from reports.plots import _figure, _save

    dims = [d for d in lr_dims(t.space) if f"params_{d['name']}" in t.trials]
    finite = _finite(t.trials)
    if not dims or finite.empty:
        return None
    fig, _ = _figure(4.2 * len(dims), 3.6)
    fig.clear()
    axes = fig.subplots(1, len(dims), squeeze=False)[0]
    best = finite.loc[finite.value.idxmin()]
    for ax, d in zip(axes, dims, strict=True):
        col = f"params_{d['name']}"
        ax.scatter(finite[col], finite.value, s=16, color="tab:blue", label="trial")
        ax.scatter([best[col]], [best.value], s=120, marker="*", color="tab:red", zorder=3, label="best")
        for end in (d["low"], d["high"]):
            ax.axvline(end, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # narrow ranges: no crowded 2x10^-3 labels
        ax.set_xlim(d["low"] / 1.5, d["high"] * 1.5)
        ax.set_xlabel(f"{d['name']} (dashed: search range)")
        ax.set_ylabel("final val loss")
        ax.set_title(f"{t.arm}: {d['name']}" + (" (at the edge)" if d["name"] in t.edge else ""))
    axes[0].legend(frameon=False)
    return _save(fig, path)


def plot_best_so_far(tuning: dict[str, ArmTuning], path: Path) -> Path | None:
    """Best final val loss so far against trial number, every tuned arm on one axis."""
    from matplotlib.ticker import MaxNLocator

    from reports.plots import _figure, _save, arm_colors, arm_linestyle

    tuned = {a: t for a, t in tuning.items() if t.tuned and not t.trials.empty and "number" in t.trials}
    if not tuned:
        return None
    colors = arm_colors(tuned)
    fig, ax = _figure()
    drawn = False
    for arm, t in sorted(tuned.items()):
        tr = t.trials.sort_values("number")
        value = pd.to_numeric(tr.get("value"), errors="coerce")
        state = tr.state.astype(str).str.upper() if "state" in tr else pd.Series("COMPLETE", index=tr.index)
        ok = state.str.endswith("COMPLETE") & np.isfinite(value.fillna(np.inf))
        best = value.where(ok).cummin()
        if best.notna().any():
            ax.step(
                tr.number + 1,
                best,
                where="post",
                color=colors[arm],
                linestyle=arm_linestyle(arm),
                label=f"{arm} ({len(tr)} trials)",
            )
            drawn = True
    if not drawn:
        return None
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial number (1 = first)")
    ax.set_ylabel("best final val loss so far")
    ax.set_title("Tuning: best so far per study (equal budget: lines of equal length)")
    ax.legend(frameon=False)
    return _save(fig, path)


def tuning_figures(tuning: dict[str, ArmTuning], fig_dir: Path) -> list[tuple[str, Path]]:
    from reports.plots import slug

    out = []
    p = plot_best_so_far(tuning, fig_dir / "tuning_best_so_far.png")
    if p is not None:
        out.append(("Tuning: best val loss so far vs trial number, all arms", p))
    for arm, t in sorted(tuning.items()):
        if t.tuned:
            p = plot_lr_sweep(t, fig_dir / f"tuning_lr_{slug(arm)}.png")
            if p is not None:
                out.append((f"Tuning: final val loss vs learning rate, {arm} (star: best; dashed: range ends)", p))
    return out
