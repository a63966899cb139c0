"""Bad input and a bad environment give one clear line: `kimi-bench: error: <field>: <what>; <fix>`, exit 2,
no traceback, and no MLflow run (never a partial one).

Errors found before any tracking or training run in-process (`cli.app`, stderr captured): fast. Those that
reach the tracking store or the trainer run the real `kimi-bench` in a subprocess (slow), so a hang or a
background thread cannot leak into the test session.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers import assert_one_line_error, free_port, run_cli, write_matrix


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def kb(args: list[str], capsys) -> SimpleNamespace:
    """`kimi-bench ARGS` in this process: exit code, stdout, stderr (what App.__call__ prints)."""
    import cli

    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "200"  # rich reads it at each print: tables are not cut to 80 columns
    try:
        cli.app(args, prog_name="kimi-bench")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        if columns is None:
            os.environ.pop("COLUMNS")
        else:
            os.environ["COLUMNS"] = columns
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def _run_args(tmp_path: Path, matrix: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [
        "run",
        "--matrix",
        str(matrix),
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--out",
        str(tmp_path / "runs"),
        "--cache-dir",
        str(cache_dir),
        *extra,
    ]


def _assert_nothing_created(tmp_path: Path) -> None:
    assert not (tmp_path / "mlflow.db").exists(), "an MLflow store was created for input that fails"
    assert not (tmp_path / "runs").exists(), "a trial folder was created for input that fails"


# --------------------------------------------------------------------------- names: closest suggestions
@pytest.mark.parametrize(
    ("field", "bad", "suggested"),
    [
        ("variants", "kimmi", "kimi"),
        ("variants", "gpt_mla", "gpt-mla"),
        ("optimizers", "muonclp", "muonclip"),
        ("optimizers", "adam", "adamw"),
        ("presets", "tiy", "tiny"),
    ],
)
def test_unknown_name_suggests_the_closest(tmp_path, cache_dir, capsys, field, bad, suggested):
    m = tmp_path / "m.toml"
    write_matrix(m, "names")
    m.write_text(
        m.read_text().replace(
            {"variants": 'variants = ["gpt"]', "optimizers": 'optimizers = ["adamw"]', "presets": 'presets = ["tiny"]'}[
                field
            ],
            f'{field} = ["{bad}"]',
        )
    )
    proc = kb(_run_args(tmp_path, m, cache_dir), capsys)
    line = assert_one_line_error(proc, f"did you mean '{suggested}'", repr(bad))
    assert f"matrix.{field}[0]" in line
    _assert_nothing_created(tmp_path)


# --------------------------------------------------------------------------- data and folders
def test_missing_text_corpus(tmp_path, cache_dir, capsys):
    m = write_matrix(tmp_path / "m.toml", "corpus", data={"corpus": "text:/nope", "max_chars": None})
    proc = kb(_run_args(tmp_path, m, cache_dir), capsys)
    assert_one_line_error(proc, "corpus", "text:/nope", "does not exist")
    _assert_nothing_created(tmp_path)


def test_unknown_corpus_and_tokenizer(tmp_path, cache_dir, capsys):
    m = write_matrix(tmp_path / "m.toml", "corpus", data={"corpus": "python-stdlb"})
    assert_one_line_error(kb(_run_args(tmp_path, m, cache_dir), capsys), "corpus", "python-stdlib")
    m = write_matrix(tmp_path / "m.toml", "corpus", data={"tokenizer": "bytes"})
    assert_one_line_error(kb(_run_args(tmp_path, m, cache_dir), capsys), "tokenizer", "byte")
    _assert_nothing_created(tmp_path)


def _not_writable(tmp_path: Path, how: str) -> Path:
    """A folder that cannot be created or written, also for root (who ignores chmod): a path under a file."""
    if how == "under-a-file":
        blocker = tmp_path / "a-file"
        blocker.write_text("a regular file, not a folder")
        return blocker / "cache"
    if os.geteuid() == 0:
        pytest.skip(
            "running as root: a read-only folder does not stop root's writes (the under-a-file case covers root)"
        )
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder / "cache"


@pytest.mark.parametrize("how", ["under-a-file", "read-only-folder"])
def test_unwritable_cache_dir(tmp_path, capsys, how):
    m = write_matrix(tmp_path / "m.toml", "cache")
    bad = _not_writable(tmp_path, how)
    proc = kb(_run_args(tmp_path, m, bad), capsys)
    assert_one_line_error(proc, "cache_dir", str(bad))
    _assert_nothing_created(tmp_path)


@pytest.mark.slow
def test_unwritable_out_dir(tmp_path, cache_dir):
    """--out under a regular file: one line naming --out, and no MLflow run left behind (subprocess: the
    failure happens after tracking starts today)."""
    m = write_matrix(tmp_path / "m.toml", "outdir")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    db = tmp_path / "store.db"
    proc = run_cli(
        [
            "run",
            "--matrix",
            str(m),
            "--tracking-uri",
            f"sqlite:///{db}",
            "--out",
            str(blocker / "runs"),
            "--cache-dir",
            str(cache_dir),
        ],
        cwd=tmp_path,
        timeout=180,
    )
    assert_one_line_error(proc, "--out")
    if db.exists():
        from mlflow import MlflowClient
        from mlflow.entities import ViewType

        client = MlflowClient(f"sqlite:///{db}")
        runs = [
            r
            for e in client.search_experiments()
            for r in client.search_runs([e.experiment_id], run_view_type=ViewType.ALL)
        ]
        assert runs == [], [(r.info.run_name, r.info.status) for r in runs]


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("args", "words"),
    [(["--steps", "0"], ["--steps"]), (["--steps", "-3"], ["--steps"]), (["--device", "tpu"], ["--device", "tpu"])],
)
def test_bad_options(tmp_path, cache_dir, capsys, args, words):
    m = write_matrix(tmp_path / "m.toml", "options")
    proc = kb(_run_args(tmp_path, m, cache_dir, "--dry-run", *args), capsys)
    assert_one_line_error(proc, *words)
    _assert_nothing_created(tmp_path)


def test_missing_matrix_file(tmp_path, capsys):
    proc = kb(["run", "--matrix", str(tmp_path / "nope.toml"), "--dry-run"], capsys)
    assert_one_line_error(proc, "--matrix", "nope.toml")


def test_tracking_folder_missing(tmp_path, cache_dir, capsys):
    m = write_matrix(tmp_path / "m.toml", "store")
    proc = kb(
        [
            "run",
            "--matrix",
            str(m),
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'no-such-dir' / 'x.db'}",
            "--out",
            str(tmp_path / "runs"),
            "--cache-dir",
            str(cache_dir),
        ],
        capsys,
    )
    assert_one_line_error(proc, "--tracking-uri", "no-such-dir")
    assert not (tmp_path / "no-such-dir").exists()


# --------------------------------------------------------------------------- dry run
def test_dry_run_validates_and_matches_without_training(tmp_path, cache_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = write_matrix(tmp_path / "m.toml", "dry", variants=("gpt", "kimi"), seeds=(0, 1))
    m.write_text(m.read_text() + '\n[match]\nreference = "gpt"\nby = "total"\ntolerance = 0.05\n')
    proc = kb(_run_args(tmp_path, m, cache_dir, "--dry-run"), capsys)
    assert proc.returncode == 0, proc.stderr
    flat = " ".join(proc.stdout.split())
    assert "4 trials (dry run, nothing trained)" in flat, proc.stdout
    assert "gpt+adamw" in flat and "kimi+adamw" in flat and "0,1" in flat, proc.stdout
    _assert_nothing_created(tmp_path)
    assert not (tmp_path / "mlruns").exists()


def test_dry_run_reports_an_impossible_budget(tmp_path, cache_dir, capsys):
    m = write_matrix(tmp_path / "m.toml", "dry", variants=("gpt", "kimi"))
    m.write_text(m.read_text() + "\n[match]\nbudget = 1000\n")
    proc = kb(_run_args(tmp_path, m, cache_dir, "--dry-run"), capsys)
    assert_one_line_error(proc, "match")
    _assert_nothing_created(tmp_path)


# --------------------------------------------------------------------------- an unreachable tracking server
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["run", "dry-run", "env"])
def test_unreachable_tracking_server_fails_fast(tmp_path, cache_dir, mode):
    """Nothing listens on the port: one line naming the URI within a minute (MLflow's default HTTP retries
    take ~4 minutes), exit 2, nothing trained. --dry-run checks the store too: it validates everything."""
    from tests.helpers import child_env

    m = write_matrix(tmp_path / "m.toml", "unreachable")
    url = f"http://127.0.0.1:{free_port()}"
    args = ["run", "--matrix", str(m), "--out", str(tmp_path / "runs"), "--cache-dir", str(cache_dir)]
    env = child_env({"MLFLOW_TRACKING_URI": url}) if mode == "env" else None
    if mode != "env":
        args += ["--tracking-uri", url]
    if mode == "dry-run":
        args.append("--dry-run")
    t0 = time.monotonic()
    proc = run_cli(args, cwd=tmp_path, timeout=90, env=env)
    elapsed = time.monotonic() - t0
    assert_one_line_error(proc, url, "cannot reach")
    assert elapsed < 60, f"took {elapsed:.0f}s to report an unreachable server"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
