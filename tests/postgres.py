"""A throwaway PostgreSQL 15 server on 127.0.0.1 for the team-setup tests (initdb + pg_ctl, no extra library).

PostgreSQL refuses to run as root, and CI runs as root: there the server runs as `nobody` (runuser), in a data
folder that user owns. Trust authentication on loopback only: the tests are about the stores, not logins.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import free_port

PG_BIN = Path(os.environ.get("KB_PG_BIN", "/usr/local/bin"))
SUPERUSER = "kb"


def available() -> bool:
    return (PG_BIN / "initdb").is_file() and (PG_BIN / "pg_ctl").is_file()


def _as_server_user(args: list[str]) -> list[str]:
    return ["runuser", "-u", "nobody", "--", *args] if os.geteuid() == 0 else args


@dataclass
class Postgres:
    data: Path
    port: int
    log: Path

    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def pg_ctl(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            _as_server_user([str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args]),
            check=True,
            capture_output=True,
            timeout=timeout,
        )

    def start(self) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data} -c fsync=off"
        self.pg_ctl("-o", opts, "-l", str(self.log), "-w", "-t", "60", "start", timeout=90)

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self.pg_ctl("-m", mode, "-w", "stop")

    def create_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres", autocommit=True
        ) as con:
            con.execute(f'CREATE DATABASE "{name}"')


@contextlib.contextmanager
def postgres_server(*databases: str) -> Iterator[Postgres]:
    """initdb a fresh cluster in a temp folder, start it on a free loopback port, create `databases`; stop and
    delete it at the end (also when the test fails)."""
    root = Path(tempfile.mkdtemp(prefix="kbpg-", dir="/tmp"))
    os.chmod(root, 0o755)
    data = root / "data"
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "nobody")
        shutil.chown(data, "nobody")
    pg = Postgres(data, free_port(), root / "postgres.log")
    try:
        subprocess.run(
            _as_server_user(
                [
                    str(PG_BIN / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    SUPERUSER,
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-instructions",
                ]
            ),
            check=True,
            capture_output=True,
            timeout=120,
        )
        if os.geteuid() == 0:
            shutil.chown(pg.log.parent, "nobody")
        pg.start()
        for name in databases:
            pg.create_database(name)
        yield pg
    finally:
        pg.stop("immediate")
        time.sleep(0.2)
        shutil.rmtree(root, ignore_errors=True)
