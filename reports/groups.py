"""Which runs a report may compare: runs whose resolved configuration differs only in the seed.

Every trial gets
- `config_id`: hash of its resolved config minus the seed (params minus seed and cosmetic ones, plus data hash,
  code version (git commit) and tuning provenance). The seeds of one arm share it.
- `budget_id`: the part every arm of a comparison shares (train.*, data.*, data hash, code version): the
  config minus what names the arm (variant, optimizer, preset, model.*, optim.*, tuning).
- `group`: G1, G2, ... (G1 newest). Runs of one budget form a group; where one (preset, arm) holds several
  configurations in a budget (a retuned learning rate, say), its newest configuration stays in the budget's
  first group and each older one opens the next group, so no statistic ever averages two configurations.
By default a report shows the group(s) of the newest matrix invocation; `all_runs=True` shows every group.
"""

from __future__ import annotations

import hashlib
import json

import pandas as pd

from reports import names

GROUP_COLUMNS = ["group", "config_id", "budget_id"]


def _is_missing(v) -> bool:
    return v is None or (isinstance(v, float) and pd.isna(v))


def config_fields(row: pd.Series) -> dict[str, str]:
    """The run's resolved configuration minus the seed: its params and the provenance tags that change what it
    computes."""
    params = {c[len("param.") :]: row[c] for c in row.index if c.startswith("param.") and not _is_missing(row[c])}
    seed = params.get("seed", row.get("seed"))
    for k in (*names.SEED_PARAMS, *names.COSMETIC_PARAMS):
        params.pop(k, None)
    if names.DATA_SEED_PARAM in params and str(params[names.DATA_SEED_PARAM]) == str(seed):
        params.pop(names.DATA_SEED_PARAM)  # the default: data order follows the seed
    out = {f"param:{k}": str(v) for k, v in params.items()}
    for col in ("variant", "optimizer", "preset", "data_hash", "git_commit", "tuned_from"):
        v = row.get(col)
        out[f"tag:{col}"] = "" if _is_missing(v) else str(v)
    return out


def _arm_field(name: str) -> bool:
    key = name.split(":", 1)[1]
    return (
        name.startswith("param:") and (key.startswith(names.ARM_PARAM_PREFIXES) or key in names.ARM_PARAMS)
    ) or name in ("tag:variant", "tag:optimizer", "tag:preset", "tag:tuned_from")


def budget_fields(fields: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in fields.items() if not _arm_field(k)}


def _digest(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def assign_groups(runs: pd.DataFrame) -> pd.DataFrame:
    """runs + config_id, budget_id, group (G1 = the group holding the newest run)."""
    if runs.empty:
        return runs.assign(**{c: pd.Series(dtype=object) for c in GROUP_COLUMNS})
    fields = [config_fields(r) for _, r in runs.iterrows()]
    df = runs.assign(config_id=[_digest(f) for f in fields], budget_id=[_digest(budget_fields(f)) for f in fields])
    # rank the configurations of each (budget, preset, arm) by their newest run: 0 = newest
    newest = df.groupby("config_id").start_time.max()
    cells = df[["budget_id", "preset", "arm", "config_id"]].drop_duplicates().copy()
    cells["newest"] = cells.config_id.map(newest)
    cells = cells.sort_values(
        ["budget_id", "preset", "arm", "newest", "config_id"],
        ascending=[True, True, True, False, True],
        na_position="last",
    )
    cells["rank"] = cells.groupby(["budget_id", "preset", "arm"], dropna=False).cumcount()
    df = df.merge(
        cells[["config_id", "budget_id", "rank"]].drop_duplicates("config_id"),
        on=["config_id", "budget_id"],
        how="left",
    )
    key = df.budget_id + "/" + df["rank"].astype(str)
    order = df.assign(_key=key).groupby("_key").start_time.max().sort_values(ascending=False, kind="stable")
    label = {k: f"G{i + 1}" for i, k in enumerate(order.index)}
    return df.assign(group=key.map(label)).drop(columns=["rank"])


def default_groups(runs: pd.DataFrame, matrix_runs: pd.DataFrame) -> list[str]:
    """The group(s) of the newest matrix invocation that started trials; without matrix runs, the newest
    group."""
    if runs.empty:
        return []
    for parent in reversed(list(matrix_runs.run_id)):  # matrix_runs: oldest first
        mine = runs.loc[runs.parent_run_id.eq(parent), "group"].dropna().unique()
        if len(mine):
            return sorted(mine, key=_group_number)
    return ["G1"]


def _group_number(g: str) -> int:
    return int(g[1:]) if g[1:].isdigit() else 10**9


def differing_fields(runs: pd.DataFrame, groups: list[str]) -> dict[str, list[str]]:
    """Per budget field that differs between the groups: its values per group (for the 'groups' table)."""
    per = {}
    for g in groups:
        sub = runs[runs.group.eq(g)]
        per[g] = {k: v for k, v in budget_fields(config_fields(sub.iloc[0])).items()} if len(sub) else {}
    keys = sorted({k for d in per.values() for k in d})
    return {k: [per[g].get(k, "") for g in groups] for k in keys if len({per[g].get(k, "") for g in groups}) > 1}


def describe_groups(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per group: arms, trials, newest start, and the budget fields that set it apart."""
    groups = sorted(runs.group.dropna().unique(), key=_group_number)
    diffs = differing_fields(runs, groups)
    rows = []
    for i, g in enumerate(groups):
        sub = runs[runs.group.eq(g)]
        first = sub.iloc[0]
        steps = first.get("param.train.steps")
        tokens = first.get("param.train.tokens")
        budget = (
            f"{steps} steps"
            if not _is_missing(steps) and str(steps) != "null"
            else f"{tokens} tokens"
            if not _is_missing(tokens) and str(tokens) != "null"
            else "?"
        )
        differs = "; ".join(f"{k.split(':', 1)[1]}={v[i]}" for k, v in diffs.items()) or "-"
        rows.append(
            {
                "group": g,
                "arms": ", ".join(sorted(sub.arm.dropna().unique())),
                "trials": len(sub),
                "budget": budget,
                "code": str(first.get("git_commit") or "?")[:10],
                "newest trial": sub.start_time.max(),
                "differs in": differs,
            }
        )
    return pd.DataFrame(rows, columns=["group", "arms", "trials", "budget", "code", "newest trial", "differs in"])


def row_keys(runs: pd.DataFrame) -> list[str]:
    """Rows are arms; with several size presets in one experiment, (preset, arm)."""
    return ["preset", "arm"] if runs.preset.nunique(dropna=False) > 1 else ["arm"]


def finished_runs(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs.status.eq(names.FINISHED)]
