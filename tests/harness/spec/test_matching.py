"""Parameter matching: every variant within 1% of the budget, counted by building the model."""

import dataclasses

import pytest
import torch

from arch.counting import count_params
from harness.errors import UserError
from harness.spec.matching import FREE_DIM, aligned_heads, describe_shape, match_dims, param_count
from harness.spec.registry import VARIANTS, build_model, resolve_dims


@pytest.mark.parametrize("by", ["total", "active"])
@pytest.mark.parametrize("budget", [3_000_000, 12_000_000, 40_000_000])
def test_every_variant_within_one_percent(budget, by):
    dims = {v: resolve_dims("small", 256) for v in VARIANTS}
    matched = match_dims(dims, budget, None, by)
    for variant, d in matched.items():
        with torch.device("meta"):
            counts = count_params(build_model(variant, d))  # independent of param_count's code path
        got = counts.total if by == "total" else counts.active
        assert abs(got - budget) <= 0.01 * budget, (variant, got)
        # only the documented free dimension moved (and, for a width, the head count by at most one)
        field, _ = FREE_DIM[variant]
        restored = dataclasses.replace(d, **{field: getattr(dims[variant], field), "n_heads": dims[variant].n_heads})
        assert restored == dims[variant]
        assert abs(d.n_heads - dims[variant].n_heads) <= 1
        if variant in ("gpt", "gpt-moe"):  # MHA splits the width into heads; MLA's head dims are its own
            assert d.dim % d.n_heads == 0
        if variant in ("gpt-mla", "gpt-moe", "kimi"):
            assert d.n_heads == dims[variant].n_heads


def test_reference_variant_keeps_its_shape():
    dims = {v: resolve_dims("small", 256) for v in ("gpt", "kimi")}
    matched = match_dims(dims, None, "kimi", "active")
    assert matched["kimi"] == dims["kimi"]
    target = param_count("kimi", dims["kimi"], "active")
    assert abs(param_count("gpt", matched["gpt"], "active") - target) <= 0.01 * target


def test_unreachable_budget_is_one_line_error():
    dims = {"gpt": resolve_dims("tiny", 256)}
    with pytest.raises(UserError) as e:
        match_dims(dims, 10, None, "total")
    assert "\n" not in str(e.value) and "match: gpt" in str(e.value)


# ---------------------------------------------------------------------------------------------- aligned (GPU)


def test_step_one_matching_unchanged_without_align():
    """The issue's record of today's solver at the paper preset: gpt at dim 725 in 5 heads of 145."""
    dims = {v: resolve_dims("paper", 50257) for v in ("gpt", "kimi")}
    matched = match_dims(dims, None, "kimi", "total")
    assert (matched["gpt"].dim, matched["gpt"].n_heads, matched["gpt"].n_layer) == (725, 5, 6)


def _mha_head_dim(variant, d):
    return d.dim // d.n_heads if variant in ("gpt", "gpt-moe") else None


@pytest.mark.slow
def test_every_variant_at_the_paper_budget_aligned_within_one_percent():
    dims = {v: resolve_dims("paper", 50257) for v in VARIANTS}
    matched = match_dims(dims, None, "kimi", "total", align=64)
    with torch.device("meta"):
        budget = count_params(build_model("kimi", dims["kimi"])).total
    assert matched["kimi"] == dims["kimi"]  # the reference keeps the paper's shape
    for variant, d in matched.items():
        with torch.device("meta"):
            got = count_params(build_model(variant, d)).total  # built again: independent of the solver's cache
        assert abs(got - budget) <= 0.01 * budget, (variant, got, budget)
        assert d.dim % 64 == 0 and d.moe_inter_dim % 64 == 0, (variant, d)
        if variant in ("gpt", "gpt-moe"):
            assert d.dim % d.n_heads == 0 and _mha_head_dim(variant, d) % 64 == 0, (variant, d)
            assert _mha_head_dim(variant, d) <= 128
        if variant in ("gpt-moe", "kimi"):
            assert d.shared_inter_dim % 64 == 0
        assert describe_shape(variant, d).startswith(f"{d.n_layer}L d{d.dim} ")
    gpt = matched["gpt"]
    assert "x" in describe_shape("gpt", gpt) and f"mlp{4 * gpt.dim}" in describe_shape("gpt", gpt)


def test_aligned_gpt_moves_depth_only_as_far_as_one_percent_needs():
    """No aligned width at the preset's depth reaches 1% (so depth had to move), and the solution is one of the
    shapes nearest the preset's depth: checked by brute force over every aligned width."""
    dims = {v: resolve_dims("paper", 50257) for v in ("gpt", "kimi")}
    budget = param_count("kimi", dims["kimi"], "total")
    solved = match_dims(dims, None, "kimi", "total", align=64)["gpt"]
    preset = dims["gpt"]

    def reachable(n_layer):
        return [
            w
            for w in range(64, 1537, 64)
            if abs(param_count("gpt", dataclasses.replace(preset, dim=w, n_heads=1, n_layer=n_layer), "total") - budget)
            <= 0.01 * budget
        ]

    assert not reachable(preset.n_layer)
    assert abs(solved.n_layer - preset.n_layer) == 1 and solved.dim in reachable(solved.n_layer)
    assert match_dims(dims, None, "kimi", "total", align=64)["gpt"] == solved  # deterministic


def test_aligned_heads_prefers_kernel_head_dims_near_the_preset_count():
    assert aligned_heads(768, 4, 64) == 6  # 128-wide heads: 6 is nearer 4 than 12 (64-wide) is
    assert aligned_heads(704, 4, 64) == 11  # 704 = 11 x 64: only 64-wide heads divide it
    assert aligned_heads(384, 4, 64) == 3
    assert aligned_heads(725, 5, 64) is None


def test_aligned_unreachable_is_one_line_error():
    dims = {"gpt": resolve_dims("tiny", 256)}
    with pytest.raises(UserError) as e:
        match_dims(dims, 10, None, "total", align=64)
    assert "\n" not in str(e.value) and "multiples of 64" in str(e.value)
