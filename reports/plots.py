"""Report figures (matplotlib Agg via Figure objects, seaborn palette and style). Deterministic file names;
every function returns the path it wrote, or None when there is no data to plot."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from reports import names
from reports.stats import summarize

DPI = 120
# PNG metadata without the matplotlib version: same data -> same bytes across installs
_SAVE = {"dpi": DPI, "metadata": {"Software": None}}
# x axis -> (metric holding it, axis label, short name for titles)
X_AXES = {
    "step": ("step", "optimizer step", "steps"),
    "tokens": (names.TRAIN_TOKENS, "training tokens", "tokens"),
    "seconds": (names.TRAIN_ELAPSED, "training wall-clock (s, excluding eval)", "wall-clock"),
}


def slug(text: str) -> str:
    """File-name-safe: 'kimi+muon' -> 'kimi_muon', 'val/loss' -> 'val_loss'."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


LINESTYLES = {"adamw": "-", "muon": "--", "muonclip": ":"}
WALL_CLOCK_CAVEAT = "wall-clock on a shared host: other processes slow some runs; compare with care"


def _variant_optimizer(label: str) -> tuple[str, str]:
    """'kimi+muon [tiny]' -> ('kimi', 'muon'); a label without '+' is its own variant."""
    base = label.split(" [")[0]
    variant, _, optimizer = base.partition("+")
    preset = label.split(" [")[1].rstrip("]") if " [" in label else ""
    return variant + (f" [{preset}]" if preset else ""), optimizer


def arm_colors(arms) -> dict[str, tuple]:
    """A fixed colour per variant (sorted; with several presets, per variant and preset), so the same model
    has the same colour in every figure; the optimizer is told apart by line style (`arm_linestyle`)."""
    arms = sorted(set(arms))
    variants = sorted({_variant_optimizer(a)[0] for a in arms})
    palette = sns.color_palette("colorblind", max(len(variants), 1))
    by_variant = {v: palette[i % len(palette)] for i, v in enumerate(variants)}
    return {a: by_variant[_variant_optimizer(a)[0]] for a in arms}


def arm_linestyle(arm: str) -> str:
    return LINESTYLES.get(_variant_optimizer(arm)[1], "-.")


def _crop_y(ax, values: pd.Series, x: pd.Series) -> None:
    """Crop the y axis to the part that matters: from just below the lowest value to the highest value after
    the first 10% of the x range (the initial drop from the untrained loss would flatten everything else)."""
    v, xs = values.to_numpy(float), x.to_numpy(float)
    if len(v) < 4 or not np.isfinite(v).any():
        return
    late = v[xs >= np.nanmin(xs) + 0.1 * (np.nanmax(xs) - np.nanmin(xs))]
    lo, hi = float(np.nanmin(v)), float(np.nanmax(late)) if len(late) else float(np.nanmax(v))
    if hi > lo:
        pad = 0.05 * (hi - lo)
        ax.set_ylim(lo - pad, hi + pad)


def _figure(w: float = 7.0, h: float = 4.2) -> tuple[Figure, object]:
    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
        ax = fig.add_subplot()
    return fig, ax


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, **_SAVE)
    return path


def _plain_log_labels(ax) -> None:
    """Log y axis labelled 0.3, 0.5, 1, 2 (not 3x10^-1); minor ticks labelled at 2, 3, 5 x 10^k only while
    the axis spans less than two decades, so wide ranges stay uncluttered."""

    def minor(v: float, _pos) -> str:
        lo, hi = ax.get_ylim()
        if v <= 0 or lo <= 0 or math.log10(hi / lo) >= 2:
            return ""
        mant = round(v / 10 ** math.floor(math.log10(v)), 6)
        return f"{v:g}" if mant in (2.0, 3.0, 5.0) else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _with_x(history: pd.DataFrame, key: str, x: str) -> pd.DataFrame:
    """Rows of `key` with an `x` column: the step itself, or train/tokens / train/elapsed_s at that step
    (interpolated per run over the steps where those were logged; both are 0 at step 0, before training,
    which is where the first eval usually is)."""
    h = history[history.key.eq(key)].copy()
    if x == "step":
        h["x"] = h.step.astype(float)
        return h
    src = history[history.key.eq(X_AXES[x][0])]
    parts = []
    for run_id, g in h.groupby("run_id", sort=True):
        s = src[src.run_id.eq(run_id)].sort_values("step")
        if s.empty:
            continue
        steps, values = s.step.to_numpy(float), s.value.to_numpy(float)
        if steps[0] > 0:
            steps, values = np.r_[0.0, steps], np.r_[0.0, values]
        parts.append(g.assign(x=np.interp(g.step, steps, values)))
    return pd.concat(parts) if parts else h.iloc[0:0].assign(x=[])


def plot_curves(
    history: pd.DataFrame,
    key: str,
    path: Path,
    x: str = "step",
    band: str = "minmax",
    logy: bool = False,
    smooth: int = 1,
    title: str | None = None,
    colors: dict | None = None,
    markers: bool = False,
    crop: bool = False,
) -> Path | None:
    """Mean of `key` over seeds per arm against step/tokens/seconds, with a min-max band over seeds.

    `history` is Collected.history(...) output (must include train/tokens or train/elapsed_s for those
    x axes). smooth > 1: rolling mean over that many logged points per run first (noisy train loss).
    For x != step the x position is the mean over seeds at each step (seeds differ in wall-clock).
    """
    h = _with_x(history, key, x)
    h = h[np.isfinite(h.value)]
    if h.empty:
        return None
    if smooth > 1:
        h = h.sort_values(["run_id", "step"])
        h["value"] = h.groupby("run_id").value.transform(lambda v: v.rolling(smooth, min_periods=1).mean())
    colors = colors or arm_colors(h.arm)
    fig, ax = _figure()
    for arm, g in h.groupby("arm", sort=True):
        agg = (
            g.groupby("step")
            .agg(x=("x", "mean"), y=("value", "mean"), lo=("value", "min"), hi=("value", "max"), n=("value", "size"))
            .sort_index()
        )
        n_seeds = g.run_id.nunique()
        ax.plot(
            agg.x,
            agg.y,
            color=colors[arm],
            lw=1.6,
            ls=arm_linestyle(arm),
            marker="o" if markers else None,
            ms=3,
            label=f"{arm} (n={n_seeds})",
        )
        if band == "minmax" and n_seeds > 1:
            ax.fill_between(agg.x, agg.lo, agg.hi, color=colors[arm], alpha=0.2, lw=0)
    if logy:
        ax.set_yscale("log")
        _plain_log_labels(ax)
    elif crop:
        _crop_y(ax, h.value, h.x)
    if x == "seconds":
        fig.text(0.01, 0.005, WALL_CLOCK_CAVEAT, fontsize=7, color="0.4")
    if x == "step":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(X_AXES[x][1])
    ax.set_ylabel(key + (f" (rolling mean of {smooth})" if smooth > 1 else ""))
    ax.set_title(title or f"{key} vs {X_AXES[x][2]} (mean over seeds; band: min to max)")
    ax.legend(frameon=False)
    return _save(fig, path)


def plot_bars(
    runs: pd.DataFrame, metrics: dict[str, tuple[str, float]], path: Path, title: str, colors: dict | None = None
) -> Path | None:
    """One panel per metric: mean per arm with 95% t-CI error bars (none where n == 1).

    metrics: {metric: (label, scale)}; values are divided by scale (e.g. 1e6 for MB).
    """
    metrics = {m: v for m, v in metrics.items() if m in runs and runs[m].notna().any()}
    if not metrics:
        return None
    colors = colors or arm_colors(runs.arm)
    n_arms = runs.arm.nunique()
    rotate = n_arms > 4
    with sns.axes_style("whitegrid"):
        fig = Figure(
            figsize=(max(3.4, 1.1 * n_arms) * len(metrics) + 0.6, 4.4 if rotate else 4.0), dpi=DPI, layout="constrained"
        )
        axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, (metric, (label, scale)) in zip(axes, metrics.items(), strict=True):
        s = summarize(runs, metric).dropna(subset=["mean"])
        y = s["mean"] / scale
        err = np.vstack([(s["mean"] - s.ci_low) / scale, (s.ci_high - s["mean"]) / scale])
        err = np.nan_to_num(err, nan=0.0)
        pos = np.arange(len(s))
        y = y.to_numpy()
        ax.bar(pos, y, color=[colors[a] for a in s.arm])
        multi = (s.n > 1).to_numpy()  # no error bar where n == 1: there is no interval
        if multi.any():
            ax.errorbar(pos[multi], y[multi], yerr=err[:, multi], fmt="none", ecolor="black", capsize=4)
        labels = [
            f"{a} (n={n})" if rotate else f"{a}\n(n={n})".replace(" [", "\n[") for a, n in zip(s.arm, s.n, strict=True)
        ]
        ax.set_xticks(pos, labels, fontsize=8, rotation=35 if rotate else 0, ha="right" if rotate else "center")
        ax.set_title(label, fontsize=10)
    fig.suptitle(title)
    return _save(fig, path)


def plot_moe_heatmap(moe_load: pd.DataFrame, arm: str, path: Path) -> Path | None:
    """Expert load over training for one arm: x = step, y = layer/expert, colour = load fraction
    (mean over seeds). Uniform routing is 1/n_experts everywhere."""
    d = moe_load[moe_load.arm.eq(arm)]
    # a (step, layer) whose loads sum to 0 routed no token yet (e.g. step 0): not a distribution, skip it
    d = d[d.groupby(["run_id", "step", "layer"]).load.transform("sum") > 0]
    if d.empty:
        return None
    grid = d.groupby(["layer", "expert", "step"]).load.mean().unstack("step").sort_index()
    fig, ax = _figure(max(6.0, 0.25 * grid.shape[1] + 3), max(3.0, 0.18 * grid.shape[0] + 1.5))
    # diverging colours centred on uniform routing: red = overloaded expert, blue = starved
    uniform = 1 / d.expert.nunique()
    dev = max(float(np.nanmax(np.abs(grid.to_numpy() - uniform))), 1e-6)
    norm = TwoSlopeNorm(vcenter=uniform, vmin=uniform - dev, vmax=uniform + dev)
    im = ax.imshow(grid.to_numpy(), aspect="auto", interpolation="nearest", cmap="coolwarm", norm=norm)
    steps = list(grid.columns)
    ticks = sorted(set(np.linspace(0, len(steps) - 1, min(8, len(steps))).round().astype(int)))
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
    labels = [f"L{layer}/E{e}" for layer, e in grid.index]
    every = max(1, math.ceil(len(labels) / 32))
    ax.set_yticks(range(0, len(labels), every), labels[::every], fontsize=7)
    ax.grid(False)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("layer / expert")
    ax.set_title(f"{arm}: fraction of routed tokens per expert (uniform = {uniform:.3g})")
    fig.colorbar(im, ax=ax, label="load fraction")
    return _save(fig, path)


def plot_optuna(
    trials: pd.DataFrame,
    out_dir: Path,
    importances: dict[str, float] | None = None,
    direction: str = "minimize",
    prefix: str = "optuna",
) -> list[Path]:
    """Optimization history (+ best so far) and parameter importances from plain frames/dicts
    (`study.trials_dataframe()`, `optuna.importance.get_param_importances(study)`). Optional."""
    out_dir = Path(out_dir)
    paths = []
    done = (
        trials[
            trials.get("state", pd.Series("COMPLETE", index=trials.index))
            .astype(str)
            .str.upper()
            .str.endswith("COMPLETE")
        ]
        if len(trials)
        else trials
    )
    if "value" in done and done.value.notna().any():
        done = done.sort_values("number")
        best = done.value.cummin() if direction.startswith("min") else done.value.cummax()
        fig, ax = _figure()
        ax.scatter(done.number, done.value, s=14, color="tab:blue", label="trial")
        ax.step(done.number, best, where="post", color="tab:red", label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel("objective")
        ax.set_title("Optuna optimization history (completed trials)")
        ax.legend(frameon=False)
        paths.append(_save(fig, out_dir / f"{prefix}_history.png"))
    if importances:
        items = sorted(importances.items(), key=lambda kv: (kv[1], kv[0]))
        fig, ax = _figure(6.0, 0.4 * len(items) + 1.5)
        ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
        ax.set_xlabel("importance")
        ax.set_title("Optuna parameter importances")
        paths.append(_save(fig, out_dir / f"{prefix}_importances.png"))
    return paths
