"""Size every variant to one parameter budget (total or active), within a tolerance (1% by default).

Each variant has one free dimension, chosen so that the rest of its shape stays the preset's:

| variant | free dimension  | why |
|---------|-----------------|-----|
| gpt     | dim (n_embd)                  | nanoGPT scales width; depth stays the preset's |
| gpt-mla | dim                           | same backbone as gpt (MLA head dims stay the preset's) |
| gpt-moe | moe_inter_dim (expert width)  | keeps the expert count and top-k of the preset |
| kimi    | moe_inter_dim                 | same |

All in steps of 1: at small sizes a step of 8 in expert width moves a 12M MoE model by ~3.5%.

Counts come from building the model on the meta device (no memory, exact shapes) and `arch.counting`.
An MHA width must divide into heads, and steps of n_heads are too coarse for 1% at small sizes (one step of
5 moves a 3M model by ~4%); MHA's parameter count does not depend on the head count, so gpt's width is solved
in steps of 1 and its head count then moves by at most one (n_heads - 1 .. n_heads + 1) to divide it. MLA's
head count sets its projection sizes and needs no divisibility, so gpt-mla keeps n_heads.
"""

from __future__ import annotations

import dataclasses

import torch

from arch.counting import count_params
from harness.errors import UserError
from harness.registry import ModelDims, build_model

FREE_DIM: dict[str, tuple[str, int]] = {
    "gpt": ("dim", 1),
    "gpt-mla": ("dim", 1),
    "gpt-moe": ("moe_inter_dim", 1),
    "kimi": ("moe_inter_dim", 1),
}


def param_count(variant: str, dims: ModelDims, by: str) -> int:
    with torch.device("meta"):
        model = build_model(variant, dims)
    counts = count_params(model)
    return counts.total if by == "total" else counts.active


def _with(variant: str, dims: ModelDims, field: str, value: int) -> ModelDims | None:
    """dims with field=value; an MHA width takes the head count nearest the preset's that divides it,
    None when none of n_heads - 1 .. n_heads + 1 does."""
    if field != "dim" or variant == "gpt-mla":
        return dataclasses.replace(dims, **{field: value})
    for heads in sorted(range(max(1, dims.n_heads - 1), dims.n_heads + 2), key=lambda h: abs(h - dims.n_heads)):
        if value % heads == 0:
            return dataclasses.replace(dims, dim=value, n_heads=heads)
    return None


def solve(variant: str, dims: ModelDims, budget: int, by: str) -> ModelDims:
    """The dims whose count is closest to the budget, moving only the variant's free dimension."""
    field, step = FREE_DIM[variant]

    def count_at(value: int) -> int:
        # MHA parameters do not depend on the head count: measure any width with one head
        return param_count(variant, dataclasses.replace(dims, **{field: value}, **(
            {"n_heads": 1} if field == "dim" and variant != "gpt-mla" else {})), by)

    lo, hi = step, max(2 * step, 2 * getattr(dims, field))
    while count_at(hi) < budget and hi < 1 << 20:  # grow the bracket until it covers the budget
        lo, hi = hi, hi * 2
    while hi - lo > step:  # the count grows with the free dimension: bisect
        mid = (lo + hi) // 2 // step * step
        if count_at(mid) < budget:
            lo = mid
        else:
            hi = mid
    candidates = [c for v in range(max(step, lo - 3 * step), hi + 4 * step, step)
                  if (c := _with(variant, dims, field, v)) is not None]
    return min(candidates, key=lambda c: abs(param_count(variant, c, by) - budget))


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
