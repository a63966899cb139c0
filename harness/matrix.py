"""TOML matrix -> validated list of TrialSpec. Every error is one line naming the field and the fix.

```toml
name = "smoke"                       # the MLflow experiment
[data]                               # harness.data.DataConfig fields
corpus = "python-stdlib"
tokenizer = "byte"
[train]                              # harness.registry.TrainConfig fields (one of steps / tokens / seconds)
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
```
Validation uses pydantic (already a dependency of MLflow): typed fields, unknown keys rejected.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Annotated, Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from arch.optimizers import OPTIMIZERS
from harness.errors import UserError
from harness.registry import (
    PRESETS,
    VARIANTS,
    ModelDims,
    TrainConfig,
    TrialSpec,
    check_choice,
    resolve_dims,
    resolve_optimizer,
    show_key,
    suggest,
)

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class DataSection(_Strict):
    corpus: str = "python-stdlib"
    tokenizer: str = "byte"
    vocab_size: PositiveInt | None = None
    max_chars: PositiveInt | None = None
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1


class TrainSection(_Strict):
    steps: PositiveInt | None = None
    tokens: PositiveInt | None = None
    seconds: Annotated[float, Field(gt=0)] | None = None
    micro_batch_size: PositiveInt = 8
    grad_accum: PositiveInt = 1
    warmup_steps: NonNegInt | None = None
    warmup_frac: Annotated[float, Field(ge=0, lt=1)] = 0.05
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    grad_clip: Annotated[float, Field(ge=0)] = 1.0
    eval_interval: PositiveInt = 50
    eval_tokens: PositiveInt = 65536
    log_interval: PositiveInt = 10
    checkpoint_interval: NonNegInt = 0
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    compile: bool = False
    infer_batch_sizes: list[PositiveInt] = [1, 8]
    infer_new_tokens: PositiveInt = 32

    @model_validator(mode="after")
    def _one_budget(self) -> TrainSection:
        given = [k for k in ("steps", "tokens", "seconds") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one budget of steps / tokens / seconds (got {given or 'none'})")
        return self


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

    @model_validator(mode="after")
    def _budget_or_reference(self) -> MatchSection:
        if (self.budget is None) == (self.reference is None):
            raise ValueError("set exactly one of budget (a parameter count) or reference (a variant name)")
        return self


class MatrixFile(_Strict):
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")]
    description: str = ""
    data: DataSection = DataSection()
    train: TrainSection
    matrix: MatrixSection
    match: MatchSection | None = None
    model: dict[str, Any] = {}
    optim: dict[str, dict[str, Any]] = {}
    ray: dict[str, Any] = {}  # --executor ray scheduling (validated by harness.executors.ray; not in trial keys)


@dataclasses.dataclass
class Matrix:
    """A validated matrix file; `expand` turns it into trials once the vocabulary is known."""

    path: Path
    spec: MatrixFile

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
        fields = self.spec.train.model_dump()
        fields["infer_batch_sizes"] = tuple(fields["infer_batch_sizes"])
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return TrainConfig(**fields)

    def model_overrides(self, variant: str) -> dict[str, Any]:
        common = {k: v for k, v in self.spec.model.items() if k not in VARIANTS}
        per_variant = self.spec.model.get(variant, {})
        return {**common, **per_variant}

    def expand(self, vocab_size: int, tuned: dict[str, dict[str, Any]] | None = None,
               **train_overrides: Any) -> list[TrialSpec]:
        """All trials: presets x arms x seeds, each variant sized to the budget when [match] is given."""
        from harness.matching import match_dims  # matching builds models: import only when expanding

        m = self.spec.matrix
        train = self.train_config(**train_overrides)
        data_seeds = m.data_seeds or [None]
        trials = []
        for preset in m.presets:
            dims = {v: resolve_dims(preset, vocab_size, self.model_overrides(v)) for v, _ in self.arms()}
            if self.spec.match:
                dims = match_dims(dims, self.spec.match.budget, self.spec.match.reference, self.spec.match.by,
                                  self.spec.match.tolerance)
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
                trials.append(TrialSpec(
                    experiment=self.name, variant=variant, optimizer=opt, preset=preset, seed=seed,
                    dims=arm_dims, optim=resolve_optimizer(opt, overrides), train=arm_train,
                    data=self.data_fields(), data_seed=data_seed, tuned_from=tuned_from,
                ))
        return trials


def _format_validation_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(show_key(p) for p in err["loc"] if not str(p).startswith("function-after"))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field; remove it or check its spelling"
    elif err["type"] == "missing":
        msg = "missing; this field is required"
    got = err.get("input")
    suffix = f" (got {got!r})" if err["type"] not in ("missing", "extra_forbidden") and not isinstance(
        got, dict) else ""
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
    known = {f.name for f in dataclasses.fields(ModelDims)}
    for key, value in spec.model.items():
        for field_name in (value if key in VARIANTS else {key: None}):
            if field_name not in known:
                where_ = f"model.{key}.{show_key(field_name)}" if key in VARIANTS else f"model.{show_key(key)}"
                raise UserError(f"{where_}: unknown model field; {suggest(field_name, sorted(known))}")
    for name, table in spec.optim.items():
        check_choice(f"optim.{name}", name, OPTIMIZERS)
        resolve_optimizer(name, table)  # validates the field names
    if spec.match and spec.match.reference is not None:
        check_choice("match.reference", spec.match.reference, VARIANTS)


def load_matrix(path: str | Path) -> Matrix:
    """Read and validate a matrix file; raises UserError (one line) on any problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--matrix: no file at {path}; pass a TOML file such as experiments/smoke.toml")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; a matrix is a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: invalid TOML: {str(e).splitlines()[0]}") from None
    try:
        spec = MatrixFile.model_validate(raw)
    except ValidationError as e:
        raise UserError(f"{path}: {_format_validation_error(e)}") from None
    try:
        _check_names(spec)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    return Matrix(path=path, spec=spec)
