"""A matrix's `[tune]` section: equal tuning declared with the matrix, run by `kimi-bench run --matrix`.

```toml
[tune]
trials = 8                 # per arm: every arm's study gets the same budget (trials that ran to a result)
seed = 1000                # the seed the studies train at; default: the first seed >= 1000 not evaluated
pruner = "median"          # median | hyperband | none
sampler_seed = 0           # TPE's random stream (harness.tune.sampler)
storage = "optuna.db"      # the Optuna storage; default ./optuna.db (run --study-storage wins)
[tune.ranges."kimi+muon"]  # optional: one arm's search range of a numeric dimension, [low, high]
muon_lr = [3e-3, 3e-2]
```

The study tunes on a seed that is not an evaluation seed, so the best configuration is chosen on one noise
draw and scored on others (choosing and scoring on the same seed flatters the tuned arm). This module holds
the data and its checks only; harness/tune/declared.py runs the studies.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from harness.errors import UserError, show_key, suggest
from harness.spec.registry import NonNegInt, PositiveInt
from harness.spec.search_spaces import search_space

HELD_OUT_FROM = 1000  # default tuning seed: the first seed from here that is not an evaluation seed
Range = Annotated[list[float], Field(min_length=2, max_length=2)]


class TuneSection(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    trials: PositiveInt
    seed: NonNegInt | None = None
    pruner: Literal["median", "hyperband", "none"] = "median"
    sampler_seed: NonNegInt = 0
    storage: Annotated[str, Field(min_length=1)] | None = None
    ranges: dict[str, dict[str, Range]] = {}


def tuning_seed(tune: TuneSection, eval_seeds: list[int]) -> int:
    """The seed the studies tune at: [tune].seed, else the first seed >= HELD_OUT_FROM not evaluated."""
    if tune.seed is not None:
        return tune.seed
    seed = HELD_OUT_FROM
    while seed in eval_seeds:
        seed += 1
    return seed


def seed_note(tune: TuneSection, eval_seeds: list[int]) -> tuple[str, bool]:
    """(one sentence on where the studies tune and where the arms are evaluated, True when they overlap)."""
    seed = tuning_seed(tune, eval_seeds)
    shown = ", ".join(map(str, eval_seeds))
    if seed in eval_seeds:
        return (
            f"warning: the studies tune at seed {seed}, which is also an evaluation seed ({shown}): the best "
            "configuration is chosen and scored on the same noise; pick a [tune].seed outside them"
        ), True
    return f"the studies tune at seed {seed}, held out from the evaluation seeds ({shown})", False


def check_tune(tune: TuneSection, arms: list[tuple[str, str]]) -> None:
    """Range overrides name an arm of the matrix and a numeric searched dimension, with low <= high."""
    names = {f"{v}+{o}": (v, o) for v, o in arms}
    for arm, table in tune.ranges.items():
        where = f"tune.ranges.{show_key(arm)}"
        if arm not in names:
            raise UserError(f"{where}: {arm!r} is not an arm of this matrix; {suggest(arm, tuple(names))}")
        dims = {d.name: d for d in search_space(*names[arm])}
        for dim, (low, high) in table.items():
            field = f"{where}.{show_key(dim)}"
            if dim not in dims:
                raise UserError(f"{field}: {arm} does not search {dim!r}; {suggest(dim, tuple(dims))}")
            if dims[dim].choices:
                raise UserError(
                    f"{field}: a categorical dimension ({', '.join(dims[dim].choices)}); only "
                    "numeric ranges can be overridden"
                )
            if low > high:
                raise UserError(f"{field}: low {low:g} is above high {high:g}; write [low, high]")
            if dims[dim].log and low <= 0:
                raise UserError(f"{field}: searched on a log scale, so low must be > 0 (got {low:g})")


def range_overrides(tune: TuneSection | None, arm: str) -> dict[str, Any]:
    """{dim name: (low, high)} for one arm."""
    if tune is None:
        return {}
    return {k: (float(lo), float(hi)) for k, (lo, hi) in tune.ranges.get(arm, {}).items()}
