"""TOML matrix -> validated list of TrialSpec. Every error is one line naming the field and the fix.

```toml
name = "smoke"                       # the MLflow experiment
[data]                               # harness.data.DataConfig fields
corpus = "python-stdlib"
tokenizer = "byte"
[train]                              # harness.spec.registry.TrainConfig (exactly one of steps / tokens / seconds)
steps = 100
[matrix]                             # the cartesian product presets x variants x optimizers x seeds ...
presets = ["tiny"]
variants = ["gpt", "kimi"]
optimizers = ["adamw", "muon"]
seeds = [0, 1, 2]
# arms = [{variant = "gpt", optimizer = "adamw"}, ...]   # ... or an explicit list of arms (x presets x seeds)
[match]                              # optional: size every variant to one parameter budget
budget = 75_000_000                  # or reference = "kimi": the budget is that variant's size at the preset
by = "total"                         # "total" | "active"
[model]                              # ModelDims overrides for every variant; [model.kimi] for one variant
[optim.adamw]                        # OptimizerConfig overrides per optimizer name
lr = 1e-3
[verdicts]                           # optional: how the report judges (docs/verdicts.md); not in trial keys
target_loss = 2.5                    # compute to target reads this val loss (set before the runs)
```
Validation uses pydantic (already a dependency of MLflow): typed fields, unknown keys rejected with a suggestion.
Every error is one line, `<file>: <section.field>: problem`, or `--set <section.field>: problem` for an override.

`load_matrix(path, sets=["train.steps=5", "optim.adamw.lr=3e-4"])` applies `--set` overrides to the TOML table
before validation: the value is read as a TOML value (`5`, `3e-4`, `[0, 1]`, `true`, `"x"`), or taken as a
string when it is not one (`train.device=cuda`). Overrides change the spec, so they change the trial keys.
Setting one budget (`train.steps`, `train.tokens`, `train.seconds`) replaces the file's budget.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from arch.optimizers import OPTIMIZERS
from harness.data import DataConfig
from harness.errors import UserError, show_key, suggest
from harness.spec.registry import (
    BUDGET_FIELDS,
    PRESETS,
    VARIANTS,
    ModelDims,
    NonNegInt,
    PositiveInt,
    TrainConfig,
    TrialSpec,
    check_choice,
    check_fields,
    resolve_dims,
    resolve_optimizer,
)
from harness.spec.tune_section import TuneSection, check_tune


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Arm(_Strict):
    variant: str
    optimizer: str


class MatrixSection(_Strict):
    presets: list[str] = ["tiny"]
    variants: list[str] = []
    optimizers: list[str] = []
    seeds: list[NonNegInt] = [0]
    arms: list[Arm] = []
    data_seeds: list[NonNegInt] | None = None  # None: data order follows the seed

    @field_validator("presets", "variants", "optimizers", "seeds", "arms")
    @classmethod
    def _no_duplicates(cls, v: list) -> list:
        keys = [repr(x) for x in v]
        if len(set(keys)) != len(keys):
            raise ValueError("duplicate entries")
        return v

    @model_validator(mode="after")
    def _arms_or_product(self) -> MatrixSection:
        if self.arms and (self.variants or self.optimizers):
            raise ValueError("give either arms = [...] or variants + optimizers, not both")
        if not self.arms and not (self.variants and self.optimizers):
            raise ValueError("give variants and optimizers (lists of names) or arms = [{variant, optimizer}]")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        return self


class MatchSection(_Strict):
    budget: PositiveInt | None = None
    reference: str | None = None
    by: Literal["total", "active"] = "total"
    tolerance: Annotated[float, Field(gt=0, le=0.2)] = 0.01
    align: PositiveInt | None = None  # paper-h200: widths and head dims in multiples of this (harness.spec.matching)

    @model_validator(mode="after")
    def _budget_or_reference(self) -> MatchSection:
        if (self.budget is None) == (self.reference is None):
            raise ValueError("set exactly one of budget (a parameter count) or reference (a variant name)")
        return self


class VerdictsSection(_Strict):
    """How the report judges the claims, fixed before the runs (not in trial keys: changing it retrains nothing).
    Unset fields take the report's defaults (reports/stats.py; reasons in docs/verdicts.md)."""

    target_loss: Annotated[float, Field(gt=0)] | None = None  # val loss (nats) the compute-to-target claims read
    loss_margin: Annotated[float, Field(gt=0)] | None = None  # equivalence margin for losses, nats (default 0.02)
    ratio_margin: Annotated[float, Field(gt=0, lt=1)] | None = None  # for ratios, relative (default 0.10)


class MatrixFile(BaseModel):
    # not strict as a whole: TrainConfig is a pydantic dataclass that a strict model accepts only as an instance;
    # its fields, the sections' and these are strict one by one
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Strict(), Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")]
    description: Annotated[str, Strict()] = ""
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig
    matrix: MatrixSection
    match: MatchSection | None = None
    model: dict[str, Any] = {}
    optim: dict[str, dict[str, Any]] = {}
    ray: dict[str, Any] = {}  # --executor ray scheduling (validated by harness.executors.ray; not in trial keys)
    verdicts: VerdictsSection = Field(default_factory=VerdictsSection)  # the report's rule settings (not in keys)
    tune: TuneSection | None = None  # tuning declared with the matrix: harness/spec/tune_section.py


@dataclasses.dataclass
class Matrix:
    """A validated matrix file; `expand` turns it into trials once the vocabulary is known."""

    path: Path
    spec: MatrixFile
    sets: tuple[str, ...] = ()  # the --set overrides applied, as given

    @property
    def name(self) -> str:
        return self.spec.name

    def data_fields(self) -> dict[str, Any]:
        return self.spec.data.model_dump()

    def arms(self) -> list[tuple[str, str]]:
        m = self.spec.matrix
        if m.arms:
            return [(a.variant, a.optimizer) for a in m.arms]
        return list(itertools.product(m.variants, m.optimizers))

    def train_config(self, **overrides: Any) -> TrainConfig:
        """The [train] table with overrides (None values ignored); a budget override replaces the file's."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if any(k in given for k in BUDGET_FIELDS):
            given = {**dict.fromkeys(BUDGET_FIELDS), **given}
        try:
            return dataclasses.replace(self.spec.train, **given)
        except ValidationError as e:
            raise UserError(_format_validation_error(e, prefix=("train",))) from None

    def model_overrides(self, variant: str) -> dict[str, Any]:
        common = {k: v for k, v in self.spec.model.items() if k not in VARIANTS}
        per_variant = self.spec.model.get(variant, {})
        return {**common, **per_variant}

    def expand(
        self, vocab_size: int, tuned: dict[str, dict[str, Any]] | None = None, **train_overrides: Any
    ) -> list[TrialSpec]:
        """All trials: presets x arms x seeds, each variant sized to the budget when [match] is given."""
        from harness.spec.matching import match_dims  # matching builds models: import only when expanding

        m = self.spec.matrix
        train = self.train_config(**train_overrides)
        data_seeds = m.data_seeds or [None]
        trials = []
        for preset in m.presets:
            dims = {v: resolve_dims(preset, vocab_size, self.model_overrides(v)) for v, _ in self.arms()}
            if self.spec.match:
                dims = match_dims(
                    dims,
                    self.spec.match.budget,
                    self.spec.match.reference,
                    self.spec.match.by,
                    self.spec.match.tolerance,
                    align=self.spec.match.align,
                )
            for (variant, opt), seed, data_seed in itertools.product(self.arms(), m.seeds, data_seeds):
                overrides = dict(self.spec.optim.get(opt, {}))
                tuned_from, arm_train, arm_dims = None, train, dims[variant]
                if tuned is not None and f"{variant}+{opt}" in tuned:
                    entry = tuned[f"{variant}+{opt}"]
                    overrides.update(entry["params"])
                    # tuned schedule (warmup_frac) and model fields (router bias_update_speed): harness.tune
                    arm_train = dataclasses.replace(train, **entry.get("train", {}))
                    arm_dims = dataclasses.replace(arm_dims, **entry.get("model", {}))
                    tuned_from = entry["source"]
                trials.append(
                    TrialSpec(
                        experiment=self.name,
                        variant=variant,
                        optimizer=opt,
                        preset=preset,
                        seed=seed,
                        dims=arm_dims,
                        optim=resolve_optimizer(opt, overrides),
                        train=arm_train,
                        data=self.data_fields(),
                        data_seed=data_seed,
                        tuned_from=tuned_from,
                    )
                )
        return trials


# the model at each path of the file (list indices dropped), for the "did you mean" of an unknown field
_SECTIONS: dict[tuple[str, ...], type] = {
    (): MatrixFile,
    ("data",): DataConfig,
    ("train",): TrainConfig,
    ("matrix",): MatrixSection,
    ("matrix", "arms"): Arm,
    ("match",): MatchSection,
    ("verdicts",): VerdictsSection,
    ("tune",): TuneSection,
}


def _field_names(cls: type) -> list[str]:
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    return list(cls.model_fields)


_UNKNOWN_FIELD = ("extra_forbidden", "unexpected_keyword_argument")


def _format_validation_error(e: ValidationError, prefix: tuple[str, ...] = ()) -> str:
    """The first problem as one line; an unknown field first, since it often explains a "missing" one (nmae)."""
    errors = e.errors()
    err = next((x for x in errors if x["type"] in _UNKNOWN_FIELD), errors[0])
    parts = [*prefix, *(p for p in err["loc"] if not str(p).startswith("function-after"))]
    loc = ".".join(show_key(p) for p in parts)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] in _UNKNOWN_FIELD:
        section = _SECTIONS.get(tuple(str(p) for p in parts[:-1] if not isinstance(p, int)))
        choices = _field_names(section) if section is not None else []
        msg = f"unknown field; {suggest(str(parts[-1]), choices)}" if choices else "unknown field; remove it"
    elif err["type"] == "missing":
        msg = "missing; this field is required"
    got = err.get("input")
    suffix = f" (got {got!r})" if err["type"] not in ("missing", *_UNKNOWN_FIELD) and not isinstance(got, dict) else ""
    return f"{loc or 'matrix'}: {msg}{suffix}"


def _check_names(spec: MatrixFile) -> None:
    m = spec.matrix
    for i, p in enumerate(m.presets):
        check_choice(f"matrix.presets[{i}]", p, PRESETS)
    variants = [a.variant for a in m.arms] or m.variants
    optimizers = [a.optimizer for a in m.arms] or m.optimizers
    where = "matrix.arms" if m.arms else "matrix"
    for i, v in enumerate(variants):
        check_choice(f"{where}.variants[{i}]" if not m.arms else f"{where}[{i}].variant", v, VARIANTS)
    for i, o in enumerate(optimizers):
        check_choice(f"{where}.optimizers[{i}]" if not m.arms else f"{where}[{i}].optimizer", o, OPTIMIZERS)
    for key, value in spec.model.items():
        if key in VARIANTS and not isinstance(value, dict):
            raise UserError(f"model.{key}: must be a table of overrides for variant {key!r}")
    for key, value in spec.model.items():  # names and types of the dims (the values are checked again per preset)
        if key in VARIANTS:
            check_fields(ModelDims, value, f"model.{key}", "model")
        else:
            check_fields(ModelDims, {key: value}, "model", "model")
    for name, table in spec.optim.items():
        check_choice(f"optim.{show_key(name)}", name, OPTIMIZERS)
        resolve_optimizer(name, table)  # validates the field names
    if spec.match and spec.match.reference is not None:
        check_choice("match.reference", spec.match.reference, VARIANTS)
    if spec.tune is not None:
        check_tune(
            spec.tune,
            list(zip(variants, optimizers, strict=True)) if m.arms else list(itertools.product(variants, optimizers)),
        )


def parse_set(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value): the value as TOML reads it, else the raw string."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise UserError(f"--set: {text!r} is not section.key=value; write e.g. --set train.steps=100")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return [p.strip() for p in parts], value


def apply_sets(raw: dict[str, Any], sets: Sequence[str]) -> list[str]:
    """Apply --set overrides to the raw TOML table in place; returns the dotted keys set."""
    keys = []
    for text in sets:
        parts, value = parse_set(text)
        table = raw
        for i, part in enumerate(parts[:-1]):
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise UserError(f"--set {'.'.join(parts)}: {'.'.join(parts[: i + 1])} is a value, not a table")
        if parts[:-1] == ["train"] and parts[-1] in BUDGET_FIELDS:  # one budget replaces the file's
            for other in BUDGET_FIELDS:
                table.pop(other, None)
        table[parts[-1]] = value
        keys.append(".".join(parts))
    return keys


def _label(message: str, path: Path, set_keys: list[str]) -> str:
    """`--set` when the problem is in a field an override set, else the file."""
    where = message.split(":", 1)[0]
    from_set = any(where == k or where.startswith(k + ".") or k.startswith(where + ".") for k in set_keys)
    return f"--set {message}" if from_set else f"{path}: {message}"


def load_matrix(path: str | Path, sets: Sequence[str] = ()) -> Matrix:
    """Read and validate a matrix file with --set overrides; raises UserError (one line) on any problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--matrix: no file at {path}; pass a TOML file such as experiments/smoke.toml")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; a matrix is a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: invalid TOML: {str(e).splitlines()[0]}") from None
    set_keys = apply_sets(raw, sets)
    try:
        spec = MatrixFile.model_validate(raw)
    except ValidationError as e:
        raise UserError(_label(_format_validation_error(e), path, set_keys)) from None
    try:
        _check_names(spec)
    except UserError as e:
        raise UserError(_label(str(e), path, set_keys)) from None
    return Matrix(path=path, spec=spec, sets=tuple(sets))
