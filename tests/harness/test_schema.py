"""harness.schema: one correct strip_credentials, names defined once, no heavy imports."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness import schema
from harness.schema import strip_credentials

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        # userinfo goes, host and port stay
        ("http://user:pass@h:5000", "http://h:5000"),
        ("https://u:p@mlflow.example.com/path?x=1", "https://mlflow.example.com/path?x=1"),
        ("https://ghp_abc123@github.com/o/r.git", "https://github.com/o/r.git"),  # a token as the user name
        ("http://u:p@ss@h:5000/x", "http://h:5000/x"),  # unencoded "@" in the password: the last "@" ends it
        # the case both old versions got wrong: "@" in the query is not userinfo
        ("http://h:5000?token=x@y", "http://h:5000?token=***"),
        ("http://h:5000/api?access_token=abc&experiment=3", "http://h:5000/api?access_token=***&experiment=3"),
        ("https://h/x?X-Amz-Signature=deadbeef&X-Amz-Date=1#frag", "https://h/x?X-Amz-Signature=***&X-Amz-Date=1#frag"),
        ("http://h:5000/?api_key=k;mode=fast", "http://h:5000/?api_key=***;mode=fast"),
        # database URLs: the password (and the user) go, host, port and database stay
        ("postgresql://u:pw@h:5432/db", "postgresql://h:5432/db"),
        ("mysql+pymysql://root:secret@127.0.0.1:3306/optuna", "mysql+pymysql://127.0.0.1:3306/optuna"),
        (
            "postgresql://h:5432/db?user=u&password=pw&sslmode=require",
            "postgresql://h:5432/db?user=u&password=***&sslmode=require",
        ),
        ("postgresql://u:pw@[::1]:5432/db", "postgresql://[::1]:5432/db"),
        # a token in the fragment (OAuth's implicit flow); MLflow UI fragments have no pairs and stay
        ("https://h/cb#access_token=T&token_type=bearer", "https://h/cb#access_token=***&token_type=***"),
        ("https://h/cb?state=1#id_token=T", "https://h/cb?state=1#id_token=***"),
        ("http://h:5000/#/experiments/1/runs/ab12", "http://h:5000/#/experiments/1/runs/ab12"),
        # ODBC connect strings, percent-encoded inside odbc_connect and raw
        (
            "mssql+pyodbc:///?odbc_connect=DRIVER%3D%7BODBC%7D%3BSERVER%3Dh%3BUID%3Du%3BPWD%3DSECRET%3BEncrypt%3Dyes",
            "mssql+pyodbc:///?odbc_connect=DRIVER%3D%7BODBC%7D%3BSERVER%3Dh%3BUID%3Du%3BPWD%3D***%3BEncrypt%3Dyes",
        ),
        (
            "mssql+pyodbc:///?odbc_connect=SERVER%3Dh%3bPassword%3d%7Bse%3Bcret%7D",
            "mssql+pyodbc:///?odbc_connect=SERVER%3Dh%3bPassword%3d***",
        ),
        (
            "Driver={ODBC Driver 18};Server=h;Uid=u;Pwd=SECRET;Encrypt=yes",
            "Driver={ODBC Driver 18};Server=h;Uid=u;Pwd=***;Encrypt=yes",
        ),
        ("Server=h;Password={a;b}}c};Database=d", "Server=h;Password=***;Database=d"),  # }} escapes a brace
        ("Server=h;sslpassword_file=/x;UidPwd=1", "Server=h;sslpassword_file=/x;UidPwd=1"),  # not a password key
        # nothing to strip: unchanged
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        ("sqlite:///rel/optuna.db?timeout=30", "sqlite:///rel/optuna.db?timeout=30"),
        ("sqlite:///C@t/mlflow.db", "sqlite:///C@t/mlflow.db"),  # "@" in a path is not userinfo
        ("file:///home/me/mlruns", "file:///home/me/mlruns"),
        ("journal:/tmp/optuna.log", "journal:/tmp/optuna.log"),
        ("/home/me/runs/a@b", "/home/me/runs/a@b"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("python-stdlib", "python-stdlib"),
        ("", ""),
    ],
)
def test_strip_credentials(uri, expected):
    assert strip_credentials(uri) == expected
    assert strip_credentials(expected) == expected  # idempotent


def test_strip_credentials_inside_text():
    """Tags such as kb.command hold URIs inside a command line: each one is cleaned, the rest kept."""
    cmd = "kimi-bench run --tracking-uri http://u:p@h:5000 --study-storage postgresql://a:b@db:5432/o --steps 5"
    assert strip_credentials(cmd) == (
        "kimi-bench run --tracking-uri http://h:5000 --study-storage postgresql://db:5432/o --steps 5"
    )
    assert strip_credentials('"http://u:p@h"') == '"http://h"'


@pytest.mark.parametrize("secret", ["hunter2", "ghp_abc123", "pw"])
def test_no_secret_survives(secret):
    for uri in (
        f"http://user:{secret}@h:1/x",
        f"http://{secret}@h:1",
        f"http://h:1/?token={secret}",
        f"postgresql://u:{secret}@h:5432/db",
        f"http://h:1?password={secret}@evil",
        f"https://h:1/cb#access_token={secret}&x=1",
        f"mssql+pyodbc://h:1/?odbc_connect=PWD%3D{secret}",
        f"Server=h:1;PWD={secret}",
    ):
        out = strip_credentials(uri)
        assert secret not in out and "h:" in out, out


def test_callers_use_the_one_function():
    from harness.stores import tracking
    from reports import collect

    assert tracking.strip_credentials is schema.strip_credentials
    assert collect.strip_credentials is schema.strip_credentials


def test_param_value_and_flatten():
    assert schema.param_value("x") == "x"
    assert schema.param_value((0.9, 0.99)) == "[0.9, 0.99]"
    assert schema.param_value(None) == "null"
    assert schema.param_value("http://u:p@h:1") == "http://h:1"
    assert len(schema.param_value("a" * 10_000)) == schema.MAX_PARAM_CHARS
    flat = schema.flatten_params({"seed": 1}, {"model": {"dim": 8}, "train": {"steps": 3}})
    assert flat == {"seed": 1, "model.dim": 8, "train.steps": 3}


def test_trial_key_ignores_cosmetic_params_only():
    base = {"seed": 0, "train.steps": 10, "train.device": "cpu"}
    key = schema.trial_key(base, "d", "1", "e")
    assert re.fullmatch(r"[0-9a-f]{16}", key)
    assert schema.trial_key({**base, "train.device": "cuda", "train.log_interval": 7}, "d", "1", "e") == key
    for changed in ({**base, "train.steps": 11}, base):
        assert schema.trial_key(changed, "d2" if changed is base else "d", "1", "e") != key


def test_names_are_unique_and_well_formed():
    assert len(set(schema.TAGS)) == len(schema.TAGS) >= 35
    assert all(re.fullmatch(r"kb\.[a-z_]+", t) for t in schema.TAGS)
    metrics = schema.STEP_METRICS + schema.FINAL_METRICS
    assert all(re.fullmatch(r"[a-z]+/[a-z0-9_]+", m) for m in metrics)
    assert len(set(schema.FINAL_METRICS)) == len(schema.FINAL_METRICS)
    assert set(schema.TERMINAL) <= set(schema.STATUSES)
    assert set(schema.MLFLOW_RUN_STATUS) == set(schema.STATUSES) - {schema.RUNNING}
    assert schema.speed_opt("muon", "step_s") == "speed/muon/step_s"
    assert schema.iqr_of(schema.speed_decode(8)) == "speed/decode_tokens_per_s_b8_iqr"
    assert schema.n_of(schema.SPEED_PREFILL) == "speed/prefill_tokens_per_s_n"
    assert schema.infer_decode(1) == "infer/decode_tokens_per_s" and schema.infer_decode(8).endswith("_b8")
    with pytest.raises(ValueError, match="unknown 'step'"):
        schema.speed_opt("muon", "step")


def test_every_kb_tag_in_the_tree_is_in_the_schema():
    """A tag written anywhere in harness/, reports/ or cli.py must be named in harness.schema."""
    found = set()
    for path in [*ROOT.glob("harness/**/*.py"), *ROOT.glob("reports/**/*.py"), ROOT / "cli.py"]:
        found |= set(re.findall(r"\bkb\.[a-z_]+\b", path.read_text(encoding="utf-8")))
    assert found - set(schema.TAGS) == set()


def test_imports_neither_torch_nor_mlflow():
    code = "import sys, harness.schema; print(sorted(m for m in ('torch', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_every_cited_doc_exists():
    """Docstrings cite docs/*.md for design notes and sourced facts: each cited file is in the repository."""
    cited = set()
    for path in [*ROOT.glob("arch/*.py"), *ROOT.glob("harness/**/*.py"), *ROOT.glob("reports/*.py")]:
        cited |= set(re.findall(r"docs/[a-z_\-]+\.md", path.read_text(encoding="utf-8")))
    assert {"docs/design.md", "docs/references.md"} <= cited
    assert [c for c in sorted(cited) if not (ROOT / c).is_file()] == []
