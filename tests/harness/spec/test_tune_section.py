"""The [tune] section of a matrix: its checks (one line naming the field) and the held-out tuning seed."""

from __future__ import annotations

import pytest

from harness.errors import UserError
from harness.spec.matrix import load_matrix
from harness.spec.tune_section import TuneSection, seed_note, tuning_seed
from harness.tune.spaces import arm_search_space, search_space

BASE = """
name = "t"
[train]
steps = 5
[matrix]
variants = ["gpt", "kimi"]
optimizers = ["adamw", "muon"]
seeds = [0, 1, 2]
"""


def _load(tmp_path, tune: str):
    path = tmp_path / "m.toml"
    path.write_text(BASE + tune)
    return load_matrix(path)


@pytest.mark.parametrize(
    ("tune", "message"),
    [
        ("[tune]\ntrails = 4\n", "tune.trails: unknown field; did you mean 'trials'"),
        ("[tune]\ntrials = 0\n", "tune.trials: Input should be greater than 0 (got 0)"),
        ("[tune]\ntrials = -3\n", "tune.trials: Input should be greater than 0 (got -3)"),
        ("[tune]\nseed = 3\n", "tune.trials: missing"),
        ('[tune]\ntrials = 2\npruner = "medain"\n', "tune.pruner:"),
        (
            '[tune]\ntrials = 2\n[tune.ranges."gpt+adamw"]\nlr = [1e-2, 1e-3]\n',
            "tune.ranges.gpt+adamw.lr: low 0.01 is above high 0.001; write [low, high]",
        ),
        (
            '[tune]\ntrials = 2\n[tune.ranges."gpt+adam"]\nlr = [1e-4, 1e-3]\n',
            "tune.ranges.gpt+adam: 'gpt+adam' is not an arm of this matrix; did you mean 'gpt+adamw'",
        ),
        (
            '[tune]\ntrials = 2\n[tune.ranges."gpt+adamw"]\nmuon_lr = [1e-4, 1e-3]\n',
            "tune.ranges.gpt+adamw.muon_lr: gpt+adamw does not search 'muon_lr'",
        ),
        (
            '[tune]\ntrials = 2\n[tune.ranges."gpt+adamw"]\nlr = [0, 1e-3]\n',
            "tune.ranges.gpt+adamw.lr: searched on a log scale, so low must be > 0",
        ),
        ('[tune]\ntrials = 2\n[tune.ranges."gpt+adamw"]\nlr = [1e-4]\n', "tune.ranges.gpt+adamw.lr:"),
    ],
)
def test_bad_tune_sections_are_one_line_naming_the_field(tmp_path, tune, message):
    with pytest.raises(UserError) as e:
        _load(tmp_path, tune)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(f"{tmp_path / 'm.toml'}: tune.")


def test_range_override_reaches_that_arm_only(tmp_path):
    m = _load(tmp_path, '[tune]\ntrials = 2\n[tune.ranges."kimi+muon"]\nmuon_lr = [3e-3, 3e-2]\n')
    kimi = {d.name: d for d in arm_search_space(m, "kimi", "muon")}
    assert (kimi["muon_lr"].low, kimi["muon_lr"].high, kimi["muon_lr"].log) == (3e-3, 3e-2, True)
    assert arm_search_space(m, "gpt", "muon") == search_space("gpt", "muon")


def test_tuning_seed_is_held_out_unless_given():
    assert tuning_seed(TuneSection(trials=2), [0, 1, 2]) == 1000
    assert tuning_seed(TuneSection(trials=2), [1000, 1001, 5]) == 1002
    assert tuning_seed(TuneSection(trials=2, seed=7), [0]) == 7
    text, overlap = seed_note(TuneSection(trials=2), [0, 1])
    assert not overlap and "seed 1000, held out from the evaluation seeds (0, 1)" in text
    text, overlap = seed_note(TuneSection(trials=2, seed=1), [0, 1])
    assert overlap and text.startswith("warning: the studies tune at seed 1")
