"""Tracking credentials travel in MLflow's own variables, never inside a URI.

A tracking URI such as `http://kbuser:SECRET@host:5000` works with MLflow's client, but MLflow then prints it
whole in every "View run ... at: URI" line, and every child process that inherits it (torchrun ranks, Ray
workers) can print it again. So the userinfo is moved, once, into the variables MLflow documents for a
tracking server (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN for a bare
`token@host`), in this process's environment, which every worker it starts inherits (local subprocesses,
tune workers, the processes of a local Ray cluster). MLflow then only ever sees `http://host:5000`.
Database URIs (`postgresql://u:pw@...`) keep their password: SQLAlchemy has no other way to receive it.
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit, urlunsplit

USER_ENV, PASSWORD_ENV, TOKEN_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"
URI_ENV = "MLFLOW_TRACKING_URI"


def split_userinfo(uri: str) -> tuple[str, dict[str, str]]:
    """(the URI without userinfo, MLflow's credential variables for it). Only http(s) URIs are split:
    `http://u:p@h:5000/x` -> (`http://h:5000/x`, {USERNAME: u, PASSWORD: p}); `https://tok@h` ->
    (`https://h`, {TOKEN: tok}); anything else -> (uri, {})."""
    if not uri.startswith(("http://", "https://")):
        return uri, {}
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, {}
    userinfo, _, host = parts.netloc.rpartition("@")  # the last "@" ends the userinfo
    user, colon, password = userinfo.partition(":")
    env = {USER_ENV: unquote(user), PASSWORD_ENV: unquote(password)} if colon else {TOKEN_ENV: unquote(user)}
    return urlunsplit(parts._replace(netloc=host)), env


def move_tracking_credentials(uri: str) -> str:
    """The URI to hand to MLflow; its userinfo (if any) is exported as MLflow's credential variables, and an
    inherited MLFLOW_TRACKING_URI holding it is replaced by the clean form, so no child process sees it."""
    clean, env = split_userinfo(uri)
    if not env:
        return uri
    if TOKEN_ENV in env:  # one way of logging in at a time: a stale user/password would be sent instead
        os.environ.pop(USER_ENV, None)
        os.environ.pop(PASSWORD_ENV, None)
    else:
        os.environ.pop(TOKEN_ENV, None)
    os.environ.update(env)
    if os.environ.get(URI_ENV) == uri:
        os.environ[URI_ENV] = clean
    return clean
