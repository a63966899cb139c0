"""Size every variant to one parameter budget (total or active), within a tolerance (1% by default).

Each variant has one free dimension, chosen so that the rest of its shape stays the preset's:

| variant | free dimension  | why |
|---------|-----------------|-----|
| gpt     | dim (n_embd), in steps of n_heads | nanoGPT scales width; depth stays the preset's |
| gpt-mla | dim, in steps of n_heads          | same backbone as gpt |
| gpt-moe | moe_inter_dim (expert width), steps of 8 | keeps the expert count and top-k of the preset |
| kimi    | moe_inter_dim, steps of 8         | same |

Counts come from building the model on the meta device (no memory, exact shapes) and `arch.counting`.
"""

from __future__ import annotations

import dataclasses

import torch

from arch.counting import count_params
from harness.errors import UserError
from harness.registry import ModelDims, build_model

FREE_DIM: dict[str, tuple[str, str | int]] = {
    "gpt": ("dim", "n_heads"),
    "gpt-mla": ("dim", "n_heads"),
    "gpt-moe": ("moe_inter_dim", 8),
    "kimi": ("moe_inter_dim", 8),
}


def param_count(variant: str, dims: ModelDims, by: str) -> int:
    with torch.device("meta"):
        model = build_model(variant, dims)
    counts = count_params(model)
    return counts.total if by == "total" else counts.active


def _step(dims: ModelDims, step: str | int) -> int:
    return getattr(dims, step) if isinstance(step, str) else step


def solve(variant: str, dims: ModelDims, budget: int, by: str) -> ModelDims:
    """The dims whose count is closest to the budget, moving only the variant's free dimension."""
    field, step_spec = FREE_DIM[variant]
    step = _step(dims, step_spec)

    def count_at(units: int) -> int:
        return param_count(variant, dataclasses.replace(dims, **{field: units * step}), by)

    lo, hi = 1, max(2, 2 * getattr(dims, field) // step)
    while count_at(hi) < budget:  # grow the bracket until it covers the budget
        lo, hi = hi, hi * 2
        if hi > 1 << 20:
            break
    while hi - lo > 1:  # the count grows with the free dimension: bisect
        mid = (lo + hi) // 2
        if count_at(mid) < budget:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda u: abs(count_at(u) - budget))
    return dataclasses.replace(dims, **{field: best * step})


def match_dims(dims: dict[str, ModelDims], budget: int | None, reference: str | None, by: str,
               tolerance: float = 0.01) -> dict[str, ModelDims]:
    """Solve each variant's free dimension to the budget (or to the reference variant's own count)."""
    if budget is None:
        if reference not in dims:
            raise UserError(f"match.reference: {reference!r} is not among the matrix's variants "
                            f"({', '.join(dims)}); add it to the arms or give match.budget")
        budget = param_count(reference, dims[reference], by)
    out = {}
    for variant, d in dims.items():
        solved = d if variant == reference else solve(variant, d, budget, by)
        got = param_count(variant, solved, by)
        if abs(got - budget) > tolerance * budget:
            field, _ = FREE_DIM[variant]
            raise UserError(
                f"match: {variant} reaches {got:,} {by} params at best ({field}={getattr(solved, field)}), "
                f"not within {tolerance:.0%} of {budget:,}; change the budget, the preset or match.tolerance")
        out[variant] = solved
    return out
