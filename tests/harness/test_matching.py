"""Parameter matching: every variant within 1% of the budget, counted by building the model."""

import dataclasses

import pytest
import torch

from arch.counting import count_params
from harness.errors import UserError
from harness.matching import FREE_DIM, match_dims, param_count
from harness.registry import VARIANTS, build_model, resolve_dims


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
