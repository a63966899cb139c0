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

Aligned matching (`[match] align = 64`, for GPU matrices): the step-1 solution gives shapes no GPU kernel likes
(the paper preset's gpt: dim 725 in 5 heads of 145). With `align`, the free dimension moves in multiples of
`align` and an MHA width is split into heads of a multiple of `align` (at most MAX_HEAD_DIM, the head count
nearest the preset's). Steps of 64 are far too coarse for 1% (one step of gpt's width at the paper preset
moves ~10M of 75M), so a second dimension closes the gap (SECOND_DIM): depth for the dense variants (gpt's
MLP is 4x its width by construction), the shared expert's width (in multiples of `align`) for the MoE ones.
Among the shapes within the tolerance the one that moves the second dimension least (relative to the
preset's) wins, then the one nearest the step-1 width, then the nearest count: deterministic, and the
shape stays as close to the preset's as 1% allows. Both second dimensions are affine in the count (every
layer, every shared-expert column adds the same parameters), so each width costs two model builds and the
chosen shape is then counted exactly.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from arch.counting import count_params
from harness.errors import UserError
from harness.spec.registry import ModelDims, build_model, dense_swiglu_width

FREE_DIM: dict[str, tuple[str, int]] = {
    "gpt": ("dim", 1),
    "gpt-mla": ("dim", 1),
    "gpt-moe": ("moe_inter_dim", 1),
    "kimi": ("moe_inter_dim", 1),
}


MAX_HEAD_DIM = 128  # FlashAttention / cuDNN SDPA kernels are built for head dims 64 and 128


@functools.lru_cache(maxsize=4096)
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
        return param_count(
            variant,
            dataclasses.replace(
                dims, **{field: value}, **({"n_heads": 1} if field == "dim" and variant != "gpt-mla" else {})
            ),
            by,
        )

    lo, hi = step, max(2 * step, 2 * getattr(dims, field))
    while count_at(hi) < budget and hi < 1 << 20:  # grow the bracket until it covers the budget
        lo, hi = hi, hi * 2
    while hi - lo > step:  # the count grows with the free dimension: bisect
        mid = (lo + hi) // 2 // step * step
        if count_at(mid) < budget:
            lo = mid
        else:
            hi = mid
    candidates = [
        c
        for v in range(max(step, lo - 3 * step), hi + 4 * step, step)
        if (c := _with(variant, dims, field, v)) is not None
    ]
    return min(candidates, key=lambda c: abs(param_count(variant, c, by) - budget))


# ----------------------------------------------------------------------------------------------- aligned


def second_dim(variant: str, dims: ModelDims) -> str:
    """The dimension that closes the gap an aligned free dimension leaves (see the module docstring)."""
    if variant in ("gpt-moe", "kimi") and dims.n_shared_experts > 0:
        return "shared_inter_dim"
    return "n_layer"


def _shared_width(dims: ModelDims) -> int:
    return dims.shared_inter_dim or dims.n_shared_experts * dims.moe_inter_dim


def aligned_heads(dim: int, preset_heads: int, align: int) -> int | None:
    """The head count whose head dim is a multiple of align (<= MAX_HEAD_DIM when one is) nearest the
    preset's; ties go to the larger head dim. None when dim has no such split."""
    head_dims = [h for h in range(align, dim + 1, align) if dim % h == 0]
    small = [h for h in head_dims if h <= MAX_HEAD_DIM] or head_dims[:1]
    if not small:
        return None
    best = min(small, key=lambda h: (abs(dim // h - preset_heads), -h))
    return dim // best


def _with_first(variant: str, dims: ModelDims, field: str, value: int, align: int) -> ModelDims | None:
    if field == "dim" and variant != "gpt-mla":
        heads = aligned_heads(value, dims.n_heads, align)
        return None if heads is None else dataclasses.replace(dims, dim=value, n_heads=heads)
    changes: dict = {field: value}
    if field == "moe_inter_dim" and dims.n_shared_experts > 0 and dims.shared_inter_dim is None:
        changes["shared_inter_dim"] = _shared_width(dims)  # keep the shared expert's width explicit
    return dataclasses.replace(dims, **changes)


def _best_second(
    variant: str, dims: ModelDims, second: str, step: int, lowest: int, highest: int, budget: int, by: str
) -> tuple[int, int]:
    """(value, predicted count) of `second` nearest the budget, from two counts (the count is affine in it)."""
    base = getattr(dims, second) if second == "n_layer" else _shared_width(dims)
    base = max(lowest, base // step * step)
    c0 = param_count(variant, dataclasses.replace(dims, **{second: base}), by)
    c1 = param_count(variant, dataclasses.replace(dims, **{second: base + step}), by)
    slope = c1 - c0
    k = round((budget - c0) / slope) if slope else 0
    value = min(highest, max(lowest, base + k * step))
    return value, c0 + (value - base) // step * slope


def solve_aligned(variant: str, dims: ModelDims, budget: int, by: str, align: int, tolerance: float) -> ModelDims:
    """The aligned shape within tolerance that moves the second dimension least (module docstring)."""
    field, _ = FREE_DIM[variant]
    if variant == "gpt-moe":  # its width stays the preset's, but MHA heads still split it in aligned head dims
        heads = aligned_heads(dims.dim, dims.n_heads, align)
        if heads is None:
            raise UserError(
                f"match: gpt-moe's dim {dims.dim} is not a multiple of match.align {align}; set "
                f"model.dim to one or lower match.align"
            )
        dims = dataclasses.replace(dims, n_heads=heads)
    second = second_dim(variant, dims)
    step = 1 if second == "n_layer" else align
    lowest = (dims.n_dense_layers + 1 if variant == "kimi" else 1) if second == "n_layer" else align
    preset_second = dims.n_layer if second == "n_layer" else _shared_width(dims)
    highest = 4 * preset_second
    nearest = getattr(solve(variant, dims, budget, by), field)  # the step-1 solution at the preset's depth
    first_values = range(max(align, nearest // 2 // align * align), 2 * nearest + align, align)
    ranked = []
    for value in first_values:
        candidate = _with_first(variant, dims, field, value, align)
        if candidate is None:
            continue
        s, predicted = _best_second(variant, candidate, second, step, lowest, highest, budget, by)
        if abs(predicted - budget) <= tolerance * budget:
            ranked.append(
                (
                    (abs(s - preset_second) / preset_second, abs(value - nearest), abs(predicted - budget)),
                    dataclasses.replace(candidate, **{second: s}),
                )
            )
    for _, candidate in sorted(ranked, key=lambda r: r[0]):
        if abs(param_count(variant, candidate, by) - budget) <= tolerance * budget:  # exact count
            return candidate
    raise UserError(
        f"match: {variant} has no shape with {field} in multiples of {align} (and {second} free) "
        f"within {tolerance:.0%} of {budget:,} {by} params; raise match.tolerance, lower "
        f"match.align or change the preset"
    )


def describe_shape(variant: str, dims: ModelDims) -> str:
    """The solved shape in one line, for the dry-run table and the report (e.g. `6L d768 6x128h mlp3072`)."""
    parts = [f"{dims.n_layer}L", f"d{dims.dim}"]
    if variant in ("gpt", "gpt-moe"):
        parts.append(f"{dims.n_heads}x{dims.dim // dims.n_heads}h")
    else:
        parts.append(
            f"{dims.n_heads}h(qk {dims.qk_nope_head_dim}+{dims.qk_rope_head_dim} v {dims.v_head_dim}) "
            f"kv{dims.kv_lora_rank} q{dims.q_lora_rank or '-'}"
        )
    if variant in ("gpt", "gpt-mla"):
        parts.append(f"mlp{4 * dims.dim}")
    else:
        moe = f"moe {dims.n_routed_experts}x{dims.moe_inter_dim} top{dims.n_activated_experts}"
        parts.append(moe + (f" shared{_shared_width(dims)}" if dims.n_shared_experts else ""))
        if variant == "kimi" and dims.n_dense_layers:
            parts.append(f"dense{dims.n_dense_layers}x{dims.dense_inter_dim or dense_swiglu_width(dims.dim)}")
    return " ".join(parts)


def match_dims(
    dims: dict[str, ModelDims],
    budget: int | None,
    reference: str | None,
    by: str,
    tolerance: float = 0.01,
    align: int | None = None,
) -> dict[str, ModelDims]:
    """Solve each variant's free dimension to the budget (or to the reference variant's own count);
    with align, in hardware-friendly multiples of align (solve_aligned)."""
    if budget is None:
        if reference not in dims:
            raise UserError(
                f"match.reference: {reference!r} is not among the matrix's variants "
                f"({', '.join(dims)}); add it to the arms or give match.budget"
            )
        budget = param_count(reference, dims[reference], by)
    out = {}
    for variant, d in dims.items():
        if variant == reference:
            solved = d
        elif align:
            solved = solve_aligned(variant, d, budget, by, align, tolerance)
        else:
            solved = solve(variant, d, budget, by)
        got = param_count(variant, solved, by)
        if abs(got - budget) > tolerance * budget:
            field, _ = FREE_DIM[variant]
            raise UserError(
                f"match: {variant} reaches {got:,} {by} params at best ({field}={getattr(solved, field)}), "
                f"not within {tolerance:.0%} of {budget:,}; change the budget, the preset or match.tolerance"
            )
        out[variant] = solved
    return out
