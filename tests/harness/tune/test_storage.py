"""harness/tune/storage.py: the MLflow store is refused (by URL, name, path or tables), before any work."""

import shutil

import pytest

from harness.errors import UserError
from harness.tune import open_storage
from tests.harness.tune.common import write_matrix


def test_refuses_the_mlflow_store(env, tmp_path):
    path = write_matrix(env, tmp_path, "refuse")
    for bad in (env["uri"], f"sqlite:///{tmp_path}/mlflow.db", f"journal:{tmp_path}/mlflow.db"):
        with pytest.raises(UserError, match=r"^--storage: .* is the MLflow store") as e:
            open_storage(bad, env["uri"])
        assert "\n" not in str(e.value)
    renamed = tmp_path / "renamed.db"  # MLflow's tables under another name are still MLflow's
    shutil.copy(env["uri"].removeprefix("sqlite:///"), renamed)
    with pytest.raises(UserError, match="MLflow store"):
        open_storage(str(renamed), env["uri"])
    # through the CLI command's signature (as cli.py registers it)
    from typer.testing import CliRunner

    from cli import app

    argv = ["tune", "--matrix", str(path), "--storage", env["uri"], "--tracking-uri", env["uri"]]
    result = CliRunner().invoke(app, argv)
    assert isinstance(result.exception, UserError) and "MLflow store" in str(result.exception)
    assert not (tmp_path / "runs").exists()  # refused before any work
