"""Matrix files: valid ones expand to the right trials; malformed ones fail with one line naming the field."""

import json
import textwrap
from pathlib import Path

import pytest

from harness.errors import UserError
from harness.spec.matrix import load_matrix

ROOT = Path(__file__).resolve().parents[3]

VALID = """
name = "t"
[data]
corpus = "python-stdlib"
[train]
steps = 10
[matrix]
presets = ["tiny"]
variants = ["gpt", "kimi"]
optimizers = ["adamw", "muon"]
seeds = [0, 1]
"""


def write(tmp_path, text: str):
    path = tmp_path / "m.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_valid_matrix_expands_product(tmp_path):
    m = load_matrix(write(tmp_path, VALID))
    trials = m.expand(vocab_size=256)
    assert len(trials) == 2 * 2 * 2
    assert {t.arm for t in trials} == {"gpt+adamw", "gpt+muon", "kimi+adamw", "kimi+muon"}
    assert {t.seed for t in trials} == {0, 1}
    assert all(t.dims.vocab_size == 256 and t.train.steps == 10 for t in trials)
    keys = {t.key("h") for t in trials}
    assert len(keys) == len(trials)  # every trial has its own key
    assert trials[0].key("h") != trials[0].key("other-data")  # the data hash enters the key


def test_explicit_arms_and_overrides(tmp_path):
    text = VALID.replace(
        'variants = ["gpt", "kimi"]\noptimizers = ["adamw", "muon"]',
        'arms = [{variant = "gpt-moe", optimizer = "muonclip"}]',
    )
    text += "[model]\nn_layer = 3\n[model.gpt-moe]\nmoe_inter_dim = 48\n[optim.muonclip]\nqk_clip_tau = 30.0\n"
    trials = load_matrix(write(tmp_path, text)).expand(vocab_size=256)
    assert len(trials) == 2
    t = trials[0]
    assert (t.variant, t.optimizer, t.dims.n_layer, t.dims.moe_inter_dim) == ("gpt-moe", "muonclip", 3, 48)
    assert t.optim.qk_clip_tau == 30.0


def test_matching_sizes_arms_within_one_percent(tmp_path):
    from harness.spec.matching import param_count

    text = VALID + '[match]\nreference = "kimi"\nby = "total"\n'
    trials = load_matrix(write(tmp_path, text)).expand(vocab_size=256)
    kimi = next(t for t in trials if t.variant == "kimi")
    gpt = next(t for t in trials if t.variant == "gpt")
    target = param_count("kimi", kimi.dims, "total")
    got = param_count("gpt", gpt.dims, "total")
    assert gpt.dims.dim != 64 and abs(got - target) <= 0.01 * target


BAD = [
    # (replace this, with that, the field the one-line error must name)
    (
        'variants = ["gpt", "kimi"]',
        'variants = ["gpt", "kimmi"]',
        "matrix.variants[1]: unknown name 'kimmi'; did you mean 'kimi'",
    ),
    ('optimizers = ["adamw", "muon"]', 'optimizers = ["adamw", "moun"]', "matrix.optimizers[1]"),
    ("steps = 10", "steps = -5", "train.steps"),
    ("steps = 10", 'steps = "ten"', "train.steps"),
    ("steps = 10", "micro_batch_size = 4", "train: "),  # no budget at all
    ("steps = 10", "steps = 10\ntokens = 100", "train: "),  # two budgets
    ('name = "t"', "", "name: missing"),
    ("seeds = [0, 1]", "seeds = [0, 0]", "matrix.seeds"),
    ('presets = ["tiny"]', 'presets = ["huge"]', "matrix.presets[0]"),
    ("[train]", "[train]\nlearning_rate = 1", "train.learning_rate: unknown field"),
    ('corpus = "python-stdlib"', "corpus = 3", "data.corpus"),
    ("steps = 10", "steps = 10\nwarmup_frac = 1.5", "train.warmup_frac"),
]


@pytest.mark.parametrize("old,new,needle", BAD)
def test_malformed_matrix_one_line_error(tmp_path, old, new, needle):
    assert old in VALID
    with pytest.raises(UserError) as e:
        load_matrix(write(tmp_path, VALID.replace(old, new, 1)))
    message = str(e.value)
    assert "\n" not in message
    assert needle in message, message


def test_unknown_model_and_optimizer_fields(tmp_path):
    with pytest.raises(UserError, match=r"model.kimi.n_expert: unknown model field; did you mean"):
        load_matrix(write(tmp_path, VALID + "[model.kimi]\nn_expert = 4\n"))
    with pytest.raises(UserError, match=r"optim.muon.learning_rate: unknown optimizer field"):
        load_matrix(write(tmp_path, VALID + "[optim.muon]\nlearning_rate = 4\n"))


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="invalid TOML"):
        load_matrix(write(tmp_path, "name = [unclosed"))
    with pytest.raises(UserError, match="--matrix: no file"):
        load_matrix(tmp_path / "nope.toml")


def test_shipped_experiments_validate():
    from pathlib import Path

    files = sorted((Path(__file__).parents[3] / "experiments").glob("*.toml"))
    assert files
    for path in files:
        load_matrix(path)


def test_fair_cpu_defaults_is_fair_cpu_without_its_tuning():
    # the committed tuned-vs-defaults comparison holds only while the two files differ in [tune] alone
    import tomllib

    tuned, untuned = (
        tomllib.loads((ROOT / "experiments" / f).read_text()) for f in ("fair-cpu.toml", "fair-cpu-defaults.toml")
    )
    assert "tune" in tuned and "tune" not in untuned
    for doc in (tuned, untuned):
        for key in ("name", "description", "tune"):
            doc.pop(key, None)
    assert tuned == untuned


# ----------------------------------------------------------------------------- one definition per field

FROZEN = Path(__file__).parent / "frozen"


def _trial_records(name: str) -> list[dict]:
    """Every trial of one shipped matrix as (name, key, params as JSON text), at a fixed vocabulary and data
    hash. tests/harness/spec/frozen/trials.json holds this for every shipped matrix, written by this function on
    main at e042480, before TrainConfig/OptimizerConfig became single definitions: keys must never move.
    (smoke.toml later gained seeds and a shorter budget: its entry was recomputed by e042480's code from the
    new file, so it still compares the old definitions with the new ones.)"""
    vocab = {"byte": 256, "char": 66, "gpt2": 50257}
    m = load_matrix(ROOT / "experiments" / f"{name}.toml")
    return [
        {
            "name": s.name,
            "key": s.key("frozen-data-hash"),
            "params": {k: json.dumps(v, default=str) for k, v in s.flat_params().items()},
        }
        for s in m.expand(vocab[m.spec.data.tokenizer])
    ]


@pytest.mark.parametrize("name", ["smoke", "tune-smoke", "ablation", "nanogpt-shakespeare-char", "paper", "scaling"])
def test_trial_keys_and_params_unchanged(name):
    frozen = json.loads((FROZEN / "trials.json").read_text())[name]
    assert _trial_records(name) == frozen


def test_arch_configs_derived_from_dims_unchanged():
    """MLA/MoE/GPT/Kimi configs come from ModelDims by field name; the values equal the former hand copies
    (tests/harness/spec/frozen/arch_configs.json, written on e042480 from registry._gpt_config/_kimi_config).
    Fields an arch config gained since are ignored: only the frozen ones are compared."""
    import dataclasses

    from harness.spec import registry as r

    frozen = json.loads((FROZEN / "arch_configs.json").read_text())
    cases = {
        "plain": {},
        "overrides": {
            "shared_inter_dim": 48,
            "dense_inter_dim": 40,
            "tie_embeddings": True,
            "dropout": 0.1,
            "score_func": "softmax",
            "aux_loss_alpha": 0.01,
            "bias": False,
        },
    }

    def subset(now, then):
        if isinstance(then, dict) and isinstance(now, dict):
            return {k: subset(now.get(k), v) for k, v in then.items()}
        return now

    for key, then in frozen.items():
        preset, case, variant = key.split("/")
        d = r.resolve_dims(preset, 256, cases[case])
        config = (
            r._kimi_config(d)
            if variant == "kimi"
            else r._gpt_config(d, "mla" if variant == "gpt-mla" else "mha", "moe" if variant == "gpt-moe" else "dense")
        )
        assert subset(json.loads(json.dumps(dataclasses.asdict(config))), then) == then, key


def test_optimizer_defaults_live_on_the_dataclass():
    """The registry adds no defaults of its own: a resolved arm is OptimizerConfig(name=...) itself."""
    import dataclasses

    from arch.optimizers import OptimizerConfig
    from harness.spec.registry import OPTIMIZER_DEFAULTS, resolve_optimizer

    for name in ("adamw", "muon", "muonclip"):
        assert resolve_optimizer(name) == OptimizerConfig(name=name)
        assert OPTIMIZER_DEFAULTS[name] == {
            k: v for k, v in dataclasses.asdict(OptimizerConfig(name=name)).items() if k != "name"
        }
    assert resolve_optimizer("adamw").betas == (0.9, 0.99) and resolve_optimizer("adamw").lr == 1e-3
    assert resolve_optimizer("muon").muon_weight_decay == 0.0


def test_train_table_is_the_trial_config(tmp_path):
    """[train] is validated as registry.TrainConfig itself: the trial gets the same object type and values."""
    from harness.spec.registry import TrainConfig

    m = load_matrix(write(tmp_path, VALID.replace("steps = 10", "steps = 10\ninfer_batch_sizes = [1, 4]")))
    assert isinstance(m.spec.train, TrainConfig)
    train = m.expand(vocab_size=256)[0].train
    assert train == TrainConfig(steps=10, infer_batch_sizes=(1, 4))
    assert m.train_config(steps=3).steps == 3 and m.train_config(tokens=640).steps is None  # budget replaced


@pytest.mark.parametrize(
    ("old", "new", "suggestion"),
    [
        ("steps = 10", "stpes = 10", "train.stpes: unknown field; did you mean 'steps'"),
        ('corpus = "python-stdlib"', 'corpsu = "python-stdlib"', "data.corpsu: unknown field; did you mean 'corpus'?"),
        (
            "seeds = [0, 1]",
            "seeds = [0, 1]\n[match]\nreference = 'kimi'\nbyy = 'total'",
            "match.byy: unknown field; did you mean 'by'?",
        ),
        ('name = "t"', 'nmae = "t"', "nmae: unknown field; did you mean 'name'"),
        (
            "seeds = [0, 1]",
            "seeds = [0, 1]\n[optim.adamw]\nlrr = 1e-3",
            "optim.adamw.lrr: unknown optimizer field; did you mean 'lr'?",
        ),
        (
            "seeds = [0, 1]",
            "seeds = [0, 1]\n[optim.muon]\nmuon_scaling = 'match_rms'",
            "optim.muon.muon_scaling: unknown name 'match_rms'; did you mean 'match_rms_adamw'?",
        ),
        (
            "seeds = [0, 1]",
            "seeds = [0, 1]\n[optim.adamw]\nlr = '1e-3'",
            "optim.adamw.lr: input should be a valid number (got '1e-3')",
        ),
        (
            "seeds = [0, 1]",
            "seeds = [0, 1]\n[model]\nn_layer = true",
            "model.n_layer: input should be a valid integer (got True)",
        ),
        (
            "seeds = [0, 1]",
            "seeds = [0, 1]\n[model.kimi]\nn_layr = 3",
            "model.kimi.n_layr: unknown model field; did you mean 'n_layer'",
        ),
    ],
)
def test_unknown_or_mistyped_fields_suggest(tmp_path, old, new, suggestion):
    path = write(tmp_path, VALID.replace(old, new))
    with pytest.raises(UserError) as e:
        load_matrix(path)
    assert str(e.value).startswith(f"{path}: {suggestion}"), str(e.value)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- --set


def test_set_changes_the_trial_and_its_key(tmp_path):
    path = write(tmp_path, VALID)
    before = load_matrix(path).expand(vocab_size=256)
    m = load_matrix(
        path,
        sets=["train.steps=5", "optim.adamw.lr=3e-4", "model.kimi.n_layer=3", "matrix.seeds=[0]", "train.device=cpu"],
    )
    after = m.expand(vocab_size=256)
    assert m.sets == (
        "train.steps=5",
        "optim.adamw.lr=3e-4",
        "model.kimi.n_layer=3",
        "matrix.seeds=[0]",
        "train.device=cpu",
    )
    assert len(after) == 4 and all(t.train.steps == 5 and t.train.device == "cpu" for t in after)
    assert {t.optim.lr for t in after if t.optimizer == "adamw"} == {3e-4}
    assert {t.dims.n_layer for t in after if t.variant == "kimi"} == {3}
    assert {t.dims.n_layer for t in after if t.variant == "gpt"} == {2}
    old = {(t.arm, t.seed): t.key("h") for t in before}
    assert all(t.key("h") != old[(t.arm, t.seed)] for t in after)
    # a cosmetic override (device) alone keeps the key; a budget override replaces the file's budget
    same = load_matrix(path, sets=["train.device=cpu"]).expand(vocab_size=256)
    assert [t.key("h") for t in same] == [t.key("h") for t in before]
    tokens = load_matrix(path, sets=["train.tokens=6400"]).spec.train
    assert (tokens.steps, tokens.tokens) == (None, 6400)


def test_set_budget_and_match(tmp_path):
    m = load_matrix(write(tmp_path, VALID), sets=["match.reference=kimi", "name=renamed", "match.tolerance=0.05"])
    assert m.name == "renamed" and m.spec.match.reference == "kimi" and m.spec.match.tolerance == 0.05


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (["train.stpes=5"], "--set train.stpes: unknown field; did you mean 'steps'"),
        (["train.steps=five"], "--set train.steps: Input should be a valid integer (got 'five')"),
        (["train.steps=0"], "--set train.steps: Input should be greater than 0"),
        (["optim.adamw.lrr=1"], "--set optim.adamw.lrr: unknown optimizer field; did you mean 'lr'?"),
        (["optim.adamw.lr=fast"], "--set optim.adamw.lr: input should be a valid number (got 'fast')"),
        (["model.kimi.n_layr=3"], "--set model.kimi.n_layr: unknown model field; did you mean 'n_layer'"),
        (["matrix.seeds=0"], "--set matrix.seeds: Input should be a valid list"),
        (["train.steps"], "--set: 'train.steps' is not section.key=value"),
        (["=5"], "--set: '=5' is not section.key=value"),
        (["train..steps=5"], "--set: 'train..steps=5' is not section.key=value"),
        (["train.steps.x=5"], "--set train.steps.x: train.steps is a value, not a table"),
    ],
)
def test_bad_set_is_one_line_naming_set(tmp_path, sets, needle):
    with pytest.raises(UserError) as e:
        load_matrix(write(tmp_path, VALID), sets=sets)
    assert str(e.value).startswith(needle), str(e.value)
    assert "\n" not in str(e.value)


def test_an_optimizer_table_named_with_a_control_character_is_one_line(tmp_path):
    """Found by test_matrix_fuzz (extra={'optim': {'\\r': {}}}): the name is quoted, so the error stays one line."""
    from tests.helpers import matrix_text

    path = tmp_path / "m.toml"
    path.write_text(matrix_text("ctl") + '\n[optim."\\r"]\n', encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_matrix(path)
    assert str(e.value).endswith("optim.'\\r': unknown name '\\r'; (choices: adamw, muon, muonclip)")
    assert len(str(e.value).splitlines()) == 1


def test_verdicts_section_and_wsd_schedule(tmp_path):
    """[verdicts] holds the report's settings (not in trial keys); train.schedule = "wsd" is in the key, and a
    cosine schedule logs no schedule params, so trials from before the option keep their keys."""
    plain = load_matrix(write(tmp_path, VALID)).expand(256)
    judged = load_matrix(write(tmp_path, VALID + "[verdicts]\ntarget_loss = 2.5\nloss_margin = 0.01\n"))
    assert judged.spec.verdicts.target_loss == 2.5 and judged.spec.verdicts.ratio_margin is None
    assert [t.key("h") for t in judged.expand(256)] == [t.key("h") for t in plain]
    assert "train.schedule" not in plain[0].flat_params()
    wsd = load_matrix(write(tmp_path, VALID.replace("steps = 10", 'steps = 10\nschedule = "wsd"'))).expand(256)
    assert wsd[0].flat_params()["train.schedule"] == "wsd" and wsd[0].flat_params()["train.cooldown_frac"] == 0.2
    assert wsd[0].key("h") != plain[0].key("h")
    with pytest.raises(UserError) as e:
        load_matrix(write(tmp_path, VALID + "[verdicts]\ntarget_los = 2.5\n"))
    assert "verdicts.target_los: unknown field" in str(e.value) and "target_loss" in str(e.value)
    with pytest.raises(UserError, match="verdicts.ratio_margin"):
        load_matrix(write(tmp_path, VALID + "[verdicts]\nratio_margin = 1.5\n"))
