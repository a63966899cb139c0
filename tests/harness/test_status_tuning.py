"""The tuning caption of `kimi-bench status`: trials done of the [tune] budget per study, by state."""

from __future__ import annotations

from harness import schema
from harness.status import RunRecord, tuning_caption


def _rec(study: str, state: str | None, value: str | None = None, status: str = schema.FINISHED) -> RunRecord:
    tags = {schema.TAG_STUDY: study, schema.TAG_STATUS: status}
    if state:
        tags[schema.TAG_OPTUNA_STATE] = state
    if value:
        tags[schema.TAG_OPTUNA_VALUE] = value
    return RunRecord("t", "r", 0, 0, tags, {}, None)


def test_caption_counts_states_against_the_budget(tmp_path):
    matrix = tmp_path / "m.toml"
    matrix.write_text("name = 'x'\n[tune]\ntrials = 4\n")
    records = [
        _rec("x/gpt+adamw", "COMPLETE", "2.7"),
        _rec("x/gpt+adamw", "COMPLETE", "inf"),
        _rec("x/gpt+adamw", "PRUNED"),
        _rec("x/gpt+adamw", None, status=schema.RUNNING),
        _rec("x/kimi+muon", "FAIL"),
        _rec("x/kimi+muon", None, status=schema.KILLED),
    ]
    assert tuning_caption(records, matrix) == (
        "tuning: study 1/2 x/gpt+adamw: 3/4 trials (2 complete, 1 pruned, 1 running), best 2.7000; "
        "study 2/2 x/kimi+muon: 0/4 trials (2 fail)"
    )
    assert tuning_caption([], matrix) is None
