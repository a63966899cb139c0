"""harness.stores.credentials: a tracking server's login leaves the URI for MLflow's own variables."""

from __future__ import annotations

import pytest

from harness.stores import credentials
from harness.stores.credentials import (
    PASSWORD_ENV,
    TOKEN_ENV,
    URI_ENV,
    USER_ENV,
    move_tracking_credentials,
    split_userinfo,
)

ENV = (USER_ENV, PASSWORD_ENV, TOKEN_ENV, URI_ENV)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("uri", "clean", "env"),
    [
        ("http://kbuser:s3cret@127.0.0.1:5000", "http://127.0.0.1:5000", {USER_ENV: "kbuser", PASSWORD_ENV: "s3cret"}),
        ("https://u:p%40ss%3Aw@h/mlflow?x=1", "https://h/mlflow?x=1", {USER_ENV: "u", PASSWORD_ENV: "p@ss:w"}),
        ("https://u:p@ss@h:1/x", "https://h:1/x", {USER_ENV: "u", PASSWORD_ENV: "p@ss"}),  # unencoded "@"
        ("https://dapi123@h", "https://h", {TOKEN_ENV: "dapi123"}),  # a bare token
        ("http://h:5000", "http://h:5000", {}),
        ("http://h:5000/?token=x@y", "http://h:5000/?token=x@y", {}),  # "@" in the query is not userinfo
        ("postgresql://u:pw@db/mlflow", "postgresql://u:pw@db/mlflow", {}),  # SQLAlchemy needs it in the URL
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db", {}),
    ],
)
def test_split_userinfo(uri, clean, env):
    assert split_userinfo(uri) == (clean, env)


def test_move_exports_the_login_and_cleans_the_inherited_uri(monkeypatch):
    import os

    uri = "http://kbuser:s3cret@127.0.0.1:5000"
    monkeypatch.setenv(URI_ENV, uri)
    monkeypatch.setenv(TOKEN_ENV, "stale")
    assert move_tracking_credentials(uri) == "http://127.0.0.1:5000"
    assert (os.environ[USER_ENV], os.environ[PASSWORD_ENV]) == ("kbuser", "s3cret")
    assert TOKEN_ENV not in os.environ  # a token left from before would be sent instead of the password
    assert os.environ[URI_ENV] == "http://127.0.0.1:5000"  # children inherit no password in a URI
    assert "s3cret" not in " ".join(v for k, v in os.environ.items() if k != PASSWORD_ENV)


def test_move_leaves_a_clean_uri_and_the_environment_alone(monkeypatch):
    import os

    monkeypatch.setenv(USER_ENV, "set-by-user")
    assert move_tracking_credentials("http://h:5000") == "http://h:5000"
    assert os.environ[USER_ENV] == "set-by-user"


def test_resolve_tracking_uri_goes_through_it(monkeypatch):
    """The one resolver every command uses (run, status, report, tune, the Ray driver) cleans the URI."""
    import os

    from harness.stores.tracking import resolve_tracking_uri

    monkeypatch.setenv(URI_ENV, "http://a:b@h:1")
    assert resolve_tracking_uri(None) == "http://h:1"
    assert (os.environ[USER_ENV], os.environ[PASSWORD_ENV]) == ("a", "b")
    assert credentials.move_tracking_credentials is move_tracking_credentials
