"""harness/data/config.py: DataConfig as typed by the user, directly and as a matrix's [data] section."""

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from harness.data import DataConfig
from harness.errors import UserError
from tests.harness.data.common import folder, make_cfg, one_line_user_error


def test_user_errors_are_one_line_with_suggestions(tmp_path):
    from harness.data import prepare

    with pytest.raises(UserError) as e:
        DataConfig(corpus="python-stdlb")
    one_line_user_error(e, "corpus:", "'python-stdlib'")
    with pytest.raises(UserError) as e:
        DataConfig(tokenizer="bpee")
    one_line_user_error(e, "tokenizer:", "'bpe'")
    with pytest.raises(UserError) as e:
        DataConfig(corpuss="python-stdlib")
    one_line_user_error(e, "corpuss:", "unknown data field", "'corpus'")
    with pytest.raises(UserError) as e:
        prepare(make_cfg(tmp_path, f"text:{tmp_path / 'missing.txt'}"))
    one_line_user_error(e, "corpus:", "missing.txt")
    with pytest.raises(UserError) as e:
        DataConfig(val_fraction=1.5)
    one_line_user_error(e, "val_fraction:", "1.5")
    with pytest.raises(UserError) as e:
        DataConfig(tokenizer="bpe", vocab_size=200)
    one_line_user_error(e, "vocab_size:", "256")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError) as e:
        prepare(DataConfig(corpus=f"text:{folder(tmp_path)}", cache_dir=tmp_path / "afile" / "cache"))
    one_line_user_error(e, "cache_dir:", "KIMI_BENCH_CACHE")
    with pytest.raises(UserError) as e:
        prepare(make_cfg(tmp_path, f"text:{folder(tmp_path)}", tokenizer="char", vocab_size=5))
    one_line_user_error(e, "vocab_size:")


@pytest.mark.parametrize(
    "field,value",
    [
        ("vocab_size", True),
        ("max_chars", "5"),
        ("max_chars", 0),
        ("vocab_size", 2.0),
        ("val_fraction", "0.1"),
        ("corpus", 3),
    ],
)
def test_strict_types(field, value):
    with pytest.raises(UserError, match=f"^{field}: "):
        DataConfig(**{field: value})


def test_same_fields_and_defaults_as_the_matrix_section():
    """model_dump is what enters trial keys and MLflow data.* params: the five fields, never cache_dir."""
    assert DataConfig().model_dump() == {
        "corpus": "python-stdlib",
        "tokenizer": "byte",
        "vocab_size": None,
        "max_chars": None,
        "val_fraction": 0.1,
    }
    assert "cache_dir" not in DataConfig(cache_dir="/tmp/elsewhere").model_dump()
    assert DataConfig(val_fraction=0.25, max_chars=10).model_dump()["val_fraction"] == 0.25


def test_nested_in_a_matrix_model_errors_keep_their_location():
    class File(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        data: DataConfig = Field(default_factory=DataConfig)

    assert File.model_validate({"data": {"tokenizer": "char"}}).data.tokenizer == "char"
    with pytest.raises(ValidationError) as e:
        File.model_validate({"data": {"tokenizer": "bpee"}})
    err = e.value.errors()[0]
    assert err["loc"] == ("data", "tokenizer") and "'bpe'" in err["msg"]
    with pytest.raises(ValidationError) as e:
        File.model_validate({"data": {"step": 3}})
    assert e.value.errors()[0]["type"] == "extra_forbidden"


def test_default_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KIMI_BENCH_CACHE", str(tmp_path / "kc"))
    assert DataConfig().cache_dir == tmp_path / "kc"
    monkeypatch.delenv("KIMI_BENCH_CACHE")
    assert DataConfig().cache_dir.as_posix() == ".kimi-cache"
    assert DataConfig(cache_dir="~/x").cache_dir.as_posix().endswith("/x")  # a string, expanded
