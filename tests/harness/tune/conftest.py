"""Fixtures of the harness/tune tests: a small corpus, its token cache and one migrated MLflow store.

Trials are tiny (1 layer, block 32, 6 steps, eval every 3); every test uses its own experiment (matrix name).
"""

from __future__ import annotations

import optuna
import pytest
from mlflow.tracking import MlflowClient

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """A corpus folder, its token cache and a migrated MLflow store shared by the tests."""
    from harness.data import DataConfig, prepare

    root = tmp_path_factory.mktemp("tune")
    corpus = root / "corpus"
    corpus.mkdir()
    words = ["def", "return", "self", "x", "y", "lambda", "(", ")", ":", "\n", "    ", "import", "for"]
    for i in range(6):
        (corpus / f"f{i}.py").write_text(" ".join(words[(j * 7 + i * 3) % len(words)] for j in range(2500)))
    uri = f"sqlite:///{root}/mlflow.db"
    MlflowClient(uri).search_experiments()  # creates and migrates the store once
    prepare(DataConfig(corpus=f"text:{corpus}", tokenizer="byte", cache_dir=root / "cache"))
    return {"root": root, "corpus": corpus, "uri": uri, "cache": str(root / "cache")}
