"""Bad matrix files get clear errors: property tests over random and malformed TOML.

The property: `load_matrix` either returns a Matrix or raises UserError whose message is ONE line that starts
with the file's path (then the field); never any other exception. A matrix that loads must also expand and
build (on the meta device, as `--dry-run` does) or fail with a one-line UserError: a bad value must not
pass validation and crash later as a traceback or a failed trial.
Plus the CLI end to end on a few bad files: one stderr line `kimi-bench: error: ...`, exit 2, no MLflow run.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import tomllib
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from harness.data import DataConfig
from harness.errors import UserError
from harness.spec.matrix import Matrix, load_matrix
from harness.spec.registry import build_model
from tests.helpers import REPO, assert_one_line_error, matrix_text, run_cli

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
SMOKE = tomllib.loads((REPO / "experiments" / "smoke.toml").read_text())
TINY = tomllib.loads(
    matrix_text(
        "fuzz-tiny",
        optimizers=("adamw", "muonclip"),
        variants=("gpt", "kimi"),
        optim={"adamw": {"lr": 3e-3}, "muonclip": {"muon_lr": 0.02}},
    )
)
_DIR = Path(tempfile.mkdtemp(prefix="kb-fuzz-"))
PATH = _DIR / "matrix.toml"  # rewritten by every example (hypothesis runs them one at a time)


# --------------------------------------------------------------------------- a TOML writer for any value
def _toml_str(s: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's, plus DEL, which TOML forbids raw."""
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, dt.datetime | dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_str(str(k))} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def toml_document(doc: dict[str, Any]) -> str:
    """Top-level `key = value` lines; tables as inline tables (valid TOML for any nesting)."""
    return "".join(f"{_toml_str(str(k))} = {toml_value(v)}\n" for k, v in doc.items())


# --------------------------------------------------------------------------- the property
def check_load(text: str | bytes) -> Matrix | None:
    """load_matrix returns a Matrix or raises a one-line UserError naming the file; nothing else."""
    if isinstance(text, bytes):
        PATH.write_bytes(text)
    else:
        PATH.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        matrix = load_matrix(PATH)
    except UserError as e:
        msg = str(e)
        assert len(msg.splitlines()) == 1 and "\n" not in msg and "\r" not in msg, repr(msg)
        assert msg.startswith(f"{PATH}: ") and len(msg) > len(f"{PATH}: "), repr(msg)
        return None
    assert isinstance(matrix, Matrix)
    return matrix


def check_expand(matrix: Matrix) -> None:
    """What --dry-run does after loading: data config, expand, build each arm; only one-line UserErrors."""
    try:
        DataConfig(**matrix.data_fields(), cache_dir=_DIR / "cache")
        trials = matrix.expand(256)
        for t in {(t.variant, t.dims): t for t in trials}.values():
            with torch.device("meta"):
                build_model(t.variant, t.dims)
            t.optim.validate()
    except UserError as e:
        assert len(str(e).splitlines()) == 1, repr(str(e))


# --------------------------------------------------------------------------- strategies
NAMES = [
    "name",
    "description",
    "data",
    "train",
    "matrix",
    "match",
    "model",
    "optim",
    "corpus",
    "tokenizer",
    "vocab_size",
    "max_chars",
    "val_fraction",
    "steps",
    "tokens",
    "seconds",
    "micro_batch_size",
    "grad_accum",
    "eval_interval",
    "eval_tokens",
    "checkpoint_interval",
    "infer_batch_sizes",
    "presets",
    "variants",
    "optimizers",
    "seeds",
    "arms",
    "variant",
    "optimizer",
    "budget",
    "reference",
    "by",
    "lr",
    "muon_lr",
    "betas",
    "dim",
    "n_layer",
    "n_heads",
    "kimi",
    "gpt",
    "adamw",
    "muon",
    "muonclip",
    "tiny",
]
keys = st.one_of(st.sampled_from(NAMES), st.text(min_size=1, max_size=12))
scalars = st.one_of(
    st.integers(),
    st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=20),
    st.sampled_from(["tiny", "gpt", "kimi", "kimmi", "adamw", "muon", "byte", "", "-1"]),
    st.dates(),
    st.datetimes(),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12,
)


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path in a nested dict (tables and leaves), and every list index."""
    out = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    for k, v in items:
        out.append((*prefix, k))
        out += _paths(v, (*prefix, k))
    return out


def _get_parent(doc: Any, path: tuple) -> Any:
    for k in path[:-1]:
        doc = doc[k]
    return doc


@st.composite
def mutated(draw, base: dict[str, Any], small: bool = False) -> dict[str, Any]:
    """1-3 mutations of a valid matrix: delete a field, set a wrong type, a negative or zero number, an
    unknown name, an unknown key."""
    doc = copy.deepcopy(base)
    number = st.integers(-3, 300) if small else st.one_of(st.integers(), st.floats())
    wrong = st.one_of(
        number,
        st.booleans(),
        st.text(max_size=8),
        st.lists(st.integers(-2, 64), max_size=3),
        st.dictionaries(st.sampled_from(NAMES), st.integers(-2, 64), max_size=2),
        st.dates(),
    )
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        kind = draw(st.sampled_from(["delete", "wrong", "negate", "unknown-name", "unknown-key", "zero"]))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, leaf = _get_parent(doc, path), path[-1]
        if kind == "delete":
            if isinstance(parent, dict):
                del parent[leaf]
            else:
                parent.pop(leaf)
        elif kind == "wrong":
            parent[leaf] = draw(wrong)
        elif kind == "negate" and type(parent[leaf]) in (int, float):
            parent[leaf] = -parent[leaf] if parent[leaf] else -1
        elif kind == "zero" and isinstance(parent[leaf], int | float):
            parent[leaf] = 0
        elif kind == "unknown-name" and isinstance(parent[leaf], str):
            parent[leaf] = draw(st.sampled_from(["kimmi", "gtp", "adam", "muonclp", "tiy", "bytes", "x"]))
        elif kind == "unknown-key" and isinstance(parent[leaf], dict):
            parent[leaf][draw(keys)] = draw(st.one_of(scalars, wrong))
    return doc


# --------------------------------------------------------------------------- properties
@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes(data):
    check_load(data)


@FUZZ
@given(st.text(max_size=600))
def test_random_text(text):
    check_load(text)


@FUZZ
@given(st.dictionaries(keys, values, max_size=8))
def test_random_valid_toml(doc):
    text = toml_document(doc)
    tomllib.loads(text)  # the writer produced valid TOML (else the test itself is wrong)
    check_load(text)


@FUZZ
@given(st.dictionaries(keys, values, max_size=6), st.data())
def test_smoke_with_random_sections(extra, data):
    """The smoke matrix with random top-level keys or whole sections replaced."""
    doc = copy.deepcopy(SMOKE)
    doc.update(extra)
    check_load(toml_document(doc))


@FUZZ
@given(mutated(SMOKE))
def test_mutations_of_smoke(doc):
    check_load(toml_document(doc))


@pytest.mark.slow
@settings(FUZZ, max_examples=80)
@given(mutated(TINY, small=True))
def test_mutations_that_load_also_expand(doc):
    matrix = check_load(toml_document(doc))
    assume(matrix is not None)
    check_expand(matrix)


# --------------------------------------------------------------------------- known bad inputs, by name
def _with(section: str, fields: dict[str, Any], base: dict[str, Any] = TINY) -> str:
    doc = copy.deepcopy(base)
    table = doc
    for part in section.split("."):
        table = table.setdefault(part, {})
    table.update(fields)
    return toml_document(doc)


BAD = {
    "optim lr negative": _with("optim.adamw", {"lr": -1.0}),
    "optim lr a string": _with("optim.adamw", {"lr": "fast"}),
    "optim betas a number": _with("optim.adamw", {"betas": 5}),
    "optim momentum 2": _with("optim.muonclip", {"momentum": 2.0}),
    "model dim a string": _with("model", {"dim": "abc"}),
    "model n_layer negative": _with("model", {"n_layer": -2}),
    "model kimi dim zero": _with("model.kimi", {"dim": 0}),
    "model score_func unknown": _with("model", {"score_func": "relu"}),
    "model dropout 2": _with("model", {"dropout": 2.0}),
    "model bias a string": _with("model", {"bias": "no"}),
    "key with a newline": _with("train", {"ste\nps": 3}),
    "train steps a date": _with("train", {"steps": dt.date(2024, 1, 1)}),
    "seeds negative": _with("matrix", {"seeds": [-1]}),
    "variant misspelled": _with("matrix", {"variants": ["kimmi"]}),
}


@pytest.mark.parametrize("text", list(BAD.values()), ids=list(BAD))
def test_known_bad_inputs(text):
    matrix = check_load(text)
    if matrix is not None:
        check_expand(matrix)


def test_messages_name_the_field():
    cases = {
        _with("train", {"steps": "ten"}): "train.steps",
        _with("matrix", {"variants": ["kimmi"]}): "did you mean 'kimi'",
        _with("train", {"micro_batch_size": -4}): "train.micro_batch_size",
        _with("optim.adamw", {"lr": -1.0}): "lr",
        _with("model", {"dim": "abc"}): "model.dim",
        _with("model", {"n_layer": -2}): "model.n_layer",
        _with("train", {"ste\nps": 3}): "ste\\nps",  # a key with a line break is shown escaped
    }
    for text, words in cases.items():
        PATH.write_text(text)
        with pytest.raises(UserError) as e:
            m = load_matrix(PATH)
            m.expand(256)
        assert words in str(e.value), str(e.value)


# --------------------------------------------------------------------------- the CLI end to end
CLI_BAD = {
    "random bytes": b"\x00\xff\xfe name = [[[",
    "not toml": b"name = smoke\n[train\nsteps = 1\n",
    "train missing": toml_document({k: v for k, v in TINY.items() if k != "train"}).encode(),
    "steps a string": _with("train", {"steps": "ten"}).encode(),
    "unknown variant": _with("matrix", {"variants": ["kimmi"]}).encode(),
    "optim lr negative": _with("optim.adamw", {"lr": -1.0}).encode(),
}


@pytest.mark.slow
@pytest.mark.parametrize("content", list(CLI_BAD.values()), ids=list(CLI_BAD))
def test_cli_bad_matrix_is_one_line_and_creates_no_run(tmp_path, content):
    (tmp_path / "bad.toml").write_bytes(content)
    db = tmp_path / "mlflow.db"
    proc = run_cli(
        [
            "run",
            "--matrix",
            "bad.toml",
            "--tracking-uri",
            f"sqlite:///{db}",
            "--out",
            "runs",
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        cwd=tmp_path,
        timeout=120,
    )
    assert_one_line_error(proc, "bad.toml")
    assert not db.exists(), "an MLflow store was created for a matrix that does not validate"
    assert not (tmp_path / "runs").exists()
