"""The tuning lines of `kimi-bench status`: per study, trials done of the budget, by state, and the best value.

Read from the experiment's tune-trial runs (kb.kind=tune-trial, one per Optuna trial, harness/tune/objective.py),
so status stays fast (no Optuna import, no storage to open). The budget comes from the matrix's [tune].trials.
"""

from __future__ import annotations

import math
from pathlib import Path

import tomllib

from harness import schema


def _budget(matrix: Path | None) -> int | None:
    if matrix is None:
        return None
    try:
        trials = tomllib.loads(matrix.read_text(encoding="utf-8")).get("tune", {}).get("trials")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, AttributeError):
        return None
    return trials if isinstance(trials, int) else None


def _state(tags: dict[str, str]) -> str:
    """COMPLETE | PRUNED | FAIL from the trial's Optuna state tag; RUNNING while it trains (or was killed)."""
    state = tags.get(schema.TAG_OPTUNA_STATE)
    if state:
        return state
    status = tags.get(schema.TAG_STATUS, schema.RUNNING)
    return "RUNNING" if status == schema.RUNNING else "FAIL"


def tuning_caption(records, matrix: Path | None = None) -> str | None:
    """'tuning: study 1/2 gpt+adamw 3/8 trials (3 complete, 1 running), best 2.6612; ...' or None."""
    by_study: dict[str, list] = {}
    for r in records:
        by_study.setdefault(r.tags.get(schema.TAG_STUDY, "?"), []).append(r)
    if not by_study:
        return None
    budget = _budget(matrix)
    parts = []
    for k, (study, runs) in enumerate(sorted(by_study.items()), 1):
        states = [_state(r.tags) for r in runs]
        counts = {s: states.count(s) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING") if s in states}
        done = counts.get("COMPLETE", 0) + counts.get("PRUNED", 0)
        values = [float(r.tags[schema.TAG_OPTUNA_VALUE]) for r in runs if r.tags.get(schema.TAG_OPTUNA_VALUE)]
        finite = [v for v in values if math.isfinite(v)]
        shown = ", ".join(f"{n} {s.lower()}" for s, n in counts.items())
        parts.append(f"study {k}/{len(by_study)} {study}: {done}" + (f"/{budget}" if budget else "")
                     + f" trials ({shown})" + (f", best {min(finite):.4f}" if finite else ""))
    return "tuning: " + "; ".join(parts)
