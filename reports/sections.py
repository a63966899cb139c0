"""The report's sections below the claims: the controlled speed and memory measurement, trials that did not finish,
the groups of runs in the experiment and the reproducibility block."""

from __future__ import annotations

import math

import pandas as pd

from harness.mdformat import fmt, md_table
from reports import names
from reports.collect import Collected, strip_credentials


def speed_section(speed_rows: pd.DataFrame) -> str:
    from reports.speed import SPEED_RULE, decode_batches, fmt_measured, measured, noisy_threshold

    if speed_rows.empty:
        return (
            "No controlled speed run (kb.kind=speed) for these shapes: inference speed, the controlled train "
            "step and CPU memory are not measured. The throughput observed during training is in the per-arm "
            "tables above; it is not a benchmark."
        )
    thr = noisy_threshold()
    batches = decode_batches(speed_rows)
    header = (
        ["variant", "preset", "shape", "device, threads", "prefill tok/s", "TTFT (ms)"]
        + [f"decode tok/s (batch {b})" for b in batches]
        + ["KV bytes/token (exact)"]
    )
    rows = []
    for r in speed_rows.to_dict("records"):
        rows.append(
            [
                r["label"],
                r.get("preset"),
                r.get("shape") or "?",
                f"{r.get('device') or '?'}, {r.get('threads') or '?'}"
                + (f" (CPU {r['cpus']})" if r.get("cpus") and r.get("cpus") != "unpinned" else ""),
                fmt_measured(measured(r, names.SPEED_PREFILL), threshold=thr),
                fmt_measured(measured(r, names.SPEED_TTFT), 1e-3, threshold=thr),
            ]
            + [fmt_measured(measured(r, names.speed_decode(b)), threshold=thr) for b in batches]
            + [fmt(r.get(names.SPEED_KV_BYTES))]
        )
    parts = [md_table(header, rows)]
    step_rows = []
    for r in speed_rows.to_dict("records"):
        opts = [o for o in str(r.get("optimizers") or "").split(",") if o] or sorted(
            {arm.split("+")[-1] for arm in str(r.get("arms") or "").split(",") if arm}
        )
        for o in opts:
            step_rows.append(
                [
                    f"{r.get('variant')}+{o}",
                    r.get("preset"),
                    fmt_measured(measured(r, names.speed_opt(o, "step_s")), 1e-3, threshold=thr),
                    fmt_measured(measured(r, names.speed_opt(o, "fwd_bwd_s")), 1e-3, threshold=thr),
                    fmt_measured(measured(r, names.speed_opt(o, "optim_s")), 1e-3, threshold=thr),
                    fmt_measured(measured(r, names.speed_opt(o, "train_tokens_per_s")), threshold=thr),
                    fmt_measured(measured(r, names.speed_opt(o, "peak_bytes")), 1e6, threshold=thr),
                ]
            )
    if step_rows:
        parts.append(
            "Controlled training step per shape and optimizer (forward+backward and optimizer step timed "
            "apart), and the peak memory of one step measured independently of run order:\n\n"
            + md_table(
                ["arm", "preset", "step (ms)", "fwd+bwd (ms)", "optimizer (ms)", "train tok/s", "peak memory (MB)"],
                step_rows,
            )
        )
    from reports.speed import ratio_table_rows

    ratio_rows = ratio_table_rows(speed_rows)
    if ratio_rows:
        parts.append(
            "Paired ratios between shapes (A/B of the rates, taken within each interleaved round; median "
            "and 95% interval over the rounds; what the speed claims are judged on):\n\n"
            + md_table(["A", "B", "measure", "A/B"], ratio_rows)
        )
    parts.append(
        "Median (IQR = p25 to p75, n = measurements) of interleaved rounds in one process, all shapes "
        "alike; measured once per model shape, so optimizers of one architecture share the inference "
        f"figures. **noisy**: IQR above {thr:.0%} of the median. " + SPEED_RULE.format(noisy=thr)
    )
    return "\n\n".join(parts)


def not_finished_section(c: Collected, runs: pd.DataFrame, hist: pd.DataFrame) -> str:
    bad = runs[~runs.status.eq(names.FINISHED)]
    parts = []
    if bad.empty:
        parts.append("Every trial finished.")
    else:
        last = hist[hist.key.eq(names.TRAIN_LOSS)].groupby("run_id").step.max()
        rows = []
        for r in bad.sort_values(["arm", "seed", "run_id"]).itertuples():
            ds = runs.loc[runs.run_id.eq(r.run_id), names.TRAIN_DIVERGED_STEP].iloc[0]
            step = ds if pd.notna(ds) else last.get(r.run_id, float("nan"))
            rows.append([r.arm, r.seed, r.status, "n/a" if pd.isna(step) else int(step), r.run_id])
        parts.append(md_table(["arm", "seed", "status", "step (diverged at, else last logged)", "run id"], rows))
    dropped = c.dropped[c.dropped.trial_key.isin(set(runs.trial_key.dropna()))] if len(c.dropped) else c.dropped
    if len(dropped):
        rows = [[r.arm, r.seed, r.status, r.trial_key, r.run_id] for r in dropped.itertuples()]
        parts.append(
            f"{len(dropped)} superseded run(s) with the trial key of a kept run (in no statistic):"
            f"\n\n{md_table(['arm', 'seed', 'status', 'trial key', 'run id'], rows)}"
        )
    return "\n\n".join(parts)


def groups_section(all_runs: pd.DataFrame, shown: list[str], all_shown: bool) -> str:
    from reports.groups import describe_groups

    d = describe_groups(all_runs)
    rows = [
        [
            r["group"] + (" (shown)" if r["group"] in shown else ""),
            r["arms"],
            r["trials"],
            r["budget"],
            r["code"],
            r["newest trial"].strftime("%Y-%m-%d %H:%M UTC") if pd.notna(r["newest trial"]) else "n/a",
            r["differs in"],
        ]
        for r in d.to_dict("records")
    ]
    text = (
        "Runs are compared only within a group: the same resolved configuration (budget, model dims, data "
        "hash, tokenizer, code version, tuned params) except the seed. Statistics never average across "
        "groups."
    )
    if len(d) > 1 and not all_shown:
        text += " This report shows the newest matrix invocation; `kimi-bench report --all-runs` shows every group."
    return md_table(["group", "arms", "trials", "budget", "code", "newest trial", "differs in"], rows) + "\n\n" + text


def _uniq(values) -> list[str]:
    return sorted({str(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))})


def repro_section(c: Collected, runs: pd.DataFrame, command: str | None) -> str:
    m = c.matrix_runs
    mine = m[m.run_id.isin(set(runs.parent_run_id.dropna()))] if len(runs) else m
    m = mine if len(mine) else m
    lines = []
    if command:
        lines.append(f"- Report command: `{strip_credentials(command)}`")
    run_cmds = [strip_credentials(x) for x in _uniq(m.command)]
    lines.append(
        "- Run command(s): "
        + (
            ", ".join(f"`{x}`" for x in run_cmds)
            if run_cmds
            else "not recorded (no `kb.command` tag on the matrix run)"
        )
    )

    def item(name: str, values: list[str]) -> str:
        if not values:
            return f"- {name}: not recorded"
        warn = " (differ across trials)" if len(values) > 1 else ""
        return f"- {name}{warn}: " + ", ".join(f"`{v}`" for v in values)

    lines.append(item("Git commit(s)", _uniq(list(runs.git_commit) + list(m.git_commit))))
    lines.append(item("torch version(s)", _uniq(runs.torch_version)))
    lines.append(item("Device(s)", _uniq(runs.device)))
    lines.append(item("Data hash(es)", _uniq(runs.data_hash)))
    lines.append(
        f"- MLflow: tracking URI `{strip_credentials(c.tracking_uri)}`, experiment `{c.experiment}` "
        f"(id {c.experiment_id})" + (f", matrix run(s) {', '.join(f'`{r}`' for r in m.run_id)}" if len(m) else "")
    )
    t = runs.loc[runs.tuned_from.notna(), ["arm", "tuned_from"]].drop_duplicates().sort_values(["arm", "tuned_from"])
    if t.empty:
        lines.append("- Tuning provenance: none (no trial has a `kb.tuned_from` tag)")
    else:
        lines.append(
            "- Tuning provenance (`kb.tuned_from`): " + "; ".join(f"{r.arm}: `{r.tuned_from}`" for r in t.itertuples())
        )
    return "\n".join(lines)
