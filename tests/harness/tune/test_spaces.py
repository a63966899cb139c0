"""harness/tune/spaces.py: the same kind of search space per family; params reach optimizer, train, model."""

from arch.optimizers import OPTIMIZERS
from harness.spec.matrix import load_matrix
from harness.spec.registry import VARIANTS
from harness.tune import FAMILY, MOE_SPACE, SEARCH_SPACES, apply_params, search_space
from tests.harness.tune.common import write_matrix


def test_search_space_same_kind_for_every_arm():
    by_family: dict[str, set[frozenset]] = {}
    for variant in VARIANTS:
        for opt in OPTIMIZERS:
            names = [d.name for d in search_space(variant, opt)]
            assert len(names) == len(set(names))
            moe = {d.name for d in MOE_SPACE}
            assert moe <= set(names) if variant in ("gpt-moe", "kimi") else not moe & set(names)
            by_family.setdefault(FAMILY[opt], set()).add(frozenset(set(names) - moe))
    assert by_family == {
        "adamw": {frozenset({"lr", "weight_decay", "warmup_frac", "beta2"})},
        "muon": {frozenset({"muon_lr", "lr", "weight_decay", "warmup_frac", "momentum", "muon_scaling"})},
    }
    for dim in (d for space in SEARCH_SPACES.values() for d in space):
        assert dim.choices or (dim.low < dim.high and (not dim.log or dim.low > 0)), dim


def test_apply_params_reaches_optimizer_train_and_model(env, tmp_path):
    matrix = load_matrix(write_matrix(env, tmp_path, "apply", extra="[optim.adamw]\nbetas = [0.8, 0.99]"))
    base = {s.arm: s for s in matrix.expand(256)}
    a = apply_params(
        base["gpt+adamw"],
        matrix,
        {"lr": 2e-3, "weight_decay": 0.05, "warmup_frac": 0.1, "beta2": 0.95},
        experiment="apply/gpt+adamw",
    )
    assert (a.optim.lr, a.optim.weight_decay, a.optim.betas) == (2e-3, 0.05, (0.8, 0.95))
    assert (a.train.warmup_frac, a.train.warmup_steps) == (0.1, None)
    assert a.key("h") != base["gpt+adamw"].key("h")  # the study name is the experiment: no key collision
    k = apply_params(
        base["kimi+muon"],
        matrix,
        {
            "muon_lr": 0.03,
            "lr": 1e-3,
            "weight_decay": 0.0,
            "warmup_frac": 0.0,
            "momentum": 0.9,
            "muon_scaling": "match_rms_adamw",
            "bias_update_speed": 5e-3,
        },
        experiment="apply/kimi+muon",
    )
    assert (k.optim.muon_lr, k.optim.momentum, k.optim.muon_scaling) == (0.03, 0.9, "match_rms_adamw")
    assert k.dims.bias_update_speed == 5e-3 and k.optim.betas == base["kimi+muon"].optim.betas
