"""The report's figures: the first-screen val-loss figure and the others (curves, throughput, MoE load heatmaps,
Optuna), each written under figures/ and returned with its caption for reports/markdown.py to place."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from reports import names
from reports.collect import Collected
from reports.groups import finished_runs, row_keys


def _labelled(c_runs: pd.DataFrame, fin: pd.DataFrame, h: pd.DataFrame):
    if len(row_keys(c_runs)) > 1:
        label = fin.set_index("run_id").apply(lambda r: f"{r.arm} [{r.preset}]", axis=1)
        h = h.assign(arm=h.run_id.map(label))
        fin = fin.assign(arm=fin.run_id.map(label).values)
    return fin, h


def first_figure(runs: pd.DataFrame, hist: pd.DataFrame, fig_dir: Path, out_dir: Path) -> str:
    from reports import plots

    fin = finished_runs(runs)
    fin, h = _labelled(runs, fin, hist[hist.run_id.isin(fin.run_id)])
    colors = plots.arm_colors(fin.arm.dropna())
    p = plots.plot_curves(
        h, names.VAL_LOSS, fig_dir / "val_loss_vs_tokens.png", "tokens", colors=colors, markers=True, crop=True
    )
    if p is None:
        return "No figure: no val/loss logged."
    cap = "Validation loss vs training tokens (markers: evals; colour: variant; line style: optimizer)"
    return f"**{cap}**\n\n![{cap}]({p.relative_to(out_dir).as_posix()})"


def other_figures(
    c: Collected, runs: pd.DataFrame, out_dir: Path, fig_dir: Path, hist: pd.DataFrame, optuna
) -> list[tuple[str, Path]]:
    from reports import plots

    fin = finished_runs(runs)
    moe = c.moe_load
    moe = moe[moe.run_id.isin(fin.run_id)]
    fin, h = _labelled(runs, fin, hist[hist.run_id.isin(fin.run_id)])
    if len(row_keys(runs)) > 1:
        label = dict(zip(fin.run_id, fin.arm, strict=True))
        moe = moe.assign(arm=moe.run_id.map(label))
    colors = plots.arm_colors(fin.arm.dropna())
    curve = plots.plot_curves
    todo = [  # (caption, file name, plot(path) -> path | None)
        (
            "Validation loss vs optimizer steps",
            "val_loss_vs_step",
            lambda p: curve(h, names.VAL_LOSS, p, "step", colors=colors, markers=True, crop=True),
        ),
        (
            "Validation loss vs training wall-clock (shared host: other processes slow some runs)",
            "val_loss_vs_seconds",
            lambda p: curve(h, names.VAL_LOSS, p, "seconds", colors=colors, markers=True, crop=True),
        ),
        (
            "Training loss vs steps",
            "train_loss_vs_step",
            lambda p: curve(h, names.TRAIN_LOSS, p, "step", smooth=_smooth(h), colors=colors, crop=True),
        ),
        (
            "Gradient norm (before clipping) vs steps",
            "grad_norm_vs_step",
            lambda p: curve(h, names.GRAD_NORM, p, "step", logy=True, colors=colors),
        ),
        (
            "Train throughput observed during training (95% CI over seeds where n > 1; shared host)",
            "throughput",
            lambda p: plots.plot_bars(
                fin,
                {names.TRAIN_TOKENS_PER_S: ("train tokens/s (observed)", 1.0)},
                p,
                "Observed during training",
                colors=colors,
            ),
        ),
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
    """Rolling window for the train-loss figure: about 1/50 of the logged points."""
    steps = h.loc[h.key.eq(names.TRAIN_LOSS), "step"].nunique()
    return max(1, steps // 50)
