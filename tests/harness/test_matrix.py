"""Matrix files: valid ones expand to the right trials; malformed ones fail with one line naming the field."""

import textwrap

import pytest

from harness.errors import UserError
from harness.matrix import load_matrix

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
    text = VALID.replace('variants = ["gpt", "kimi"]\noptimizers = ["adamw", "muon"]',
                         'arms = [{variant = "gpt-moe", optimizer = "muonclip"}]')
    text += '[model]\nn_layer = 3\n[model.gpt-moe]\nmoe_inter_dim = 48\n[optim.muonclip]\nqk_clip_tau = 30.0\n'
    trials = load_matrix(write(tmp_path, text)).expand(vocab_size=256)
    assert len(trials) == 2
    t = trials[0]
    assert (t.variant, t.optimizer, t.dims.n_layer, t.dims.moe_inter_dim) == ("gpt-moe", "muonclip", 3, 48)
    assert t.optim.qk_clip_tau == 30.0


def test_matching_sizes_arms_within_one_percent(tmp_path):
    from harness.matching import param_count

    text = VALID + '[match]\nreference = "kimi"\nby = "total"\n'
    trials = load_matrix(write(tmp_path, text)).expand(vocab_size=256)
    kimi = next(t for t in trials if t.variant == "kimi")
    gpt = next(t for t in trials if t.variant == "gpt")
    target = param_count("kimi", kimi.dims, "total")
    got = param_count("gpt", gpt.dims, "total")
    assert gpt.dims.dim != 64 and abs(got - target) <= 0.01 * target


BAD = [
    # (replace this, with that, the field the one-line error must name)
    ('variants = ["gpt", "kimi"]', 'variants = ["gpt", "kimmi"]',
     "matrix.variants[1]: unknown name 'kimmi'; did you mean 'kimi'"),
    ('optimizers = ["adamw", "muon"]', 'optimizers = ["adamw", "moun"]', "matrix.optimizers[1]"),
    ("steps = 10", "steps = -5", "train.steps"),
    ("steps = 10", 'steps = "ten"', "train.steps"),
    ("steps = 10", "micro_batch_size = 4", "train: "),  # no budget at all
    ("steps = 10", "steps = 10\ntokens = 100", "train: "),  # two budgets
    ('name = "t"', "", "name: missing"),
    ('seeds = [0, 1]', 'seeds = [0, 0]', "matrix.seeds"),
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

    files = sorted((Path(__file__).parents[2] / "experiments").glob("*.toml"))
    assert files
    for path in files:
        load_matrix(path)
