"""Claims: no two drivers train one trial (a named detached actor for every driver of a cluster, and a file
lock per trial for drivers on this machine)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from harness.executors.ray.cluster import driver_node
from harness.executors.ray.options import NAMESPACE, import_ray

CLAIMS_ACTOR = "kb-claims"
CLAIM_TTL_S = 120.0  # a driver renews its claims every CLAIM_TTL_S / 4; a dead driver's expire after this


class ClaimBoard:
    """Named detached actor: claims by id with an owner and a lease. Its methods run one at a time, so a claim
    is atomic for every driver on the cluster."""

    def __init__(self) -> None:
        self.claims: dict[str, tuple[str, float]] = {}

    def claim(self, key: str, owner: str, ttl: float) -> str:
        """The owner of key after this call (the caller when it was free or expired)."""
        now = time.time()
        holder = self.claims.get(key)
        if holder is None or holder[0] == owner or holder[1] < now:
            self.claims[key] = (owner, now + ttl)
            return owner
        return holder[0]

    def renew(self, owner: str, ttl: float) -> int:
        until = time.time() + ttl
        mine = [k for k, (o, _) in self.claims.items() if o == owner]
        for k in mine:
            self.claims[k] = (owner, until)
        return len(mine)

    def release(self, key: str, owner: str) -> None:
        if self.claims.get(key, ("",))[0] == owner:
            del self.claims[key]


class Claims:
    """This driver's claims: the cluster's ClaimBoard and a file lock per trial on this machine."""

    def __init__(self, scope: str, lock_dir: Path):
        ray = import_ray()
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.scope = hashlib.sha256(scope.encode()).hexdigest()[:16]
        self.board = (
            ray.remote(ClaimBoard)
            .options(
                name=CLAIMS_ACTOR,
                namespace=NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
                scheduling_strategy=driver_node(),
            )
            .remote()
        )
        self.lock_dir = lock_dir / self.scope
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        self.locks: dict[str, Any] = {}
        self.stop = threading.Event()
        self.renewer = threading.Thread(target=self._renew, daemon=True, name="kb-claims")
        self.renewer.start()

    def _renew(self) -> None:
        ray = import_ray()
        while not self.stop.wait(CLAIM_TTL_S / 4):
            with contextlib.suppress(Exception):
                ray.get(self.board.renew.remote(self.owner, CLAIM_TTL_S), timeout=30)

    def claim(self, key: str) -> bool:
        ray = import_ray()
        f = open(self.lock_dir / f"{key}.lock", "a+")  # noqa: SIM115 (held open while the trial runs)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return False
        if ray.get(self.board.claim.remote(f"{self.scope}/{key}", self.owner, CLAIM_TTL_S)) != self.owner:
            f.close()
            return False
        self.locks[key] = f
        return True

    def release(self, key: str) -> None:
        ray = import_ray()
        with contextlib.suppress(Exception):
            ray.get(self.board.release.remote(f"{self.scope}/{key}", self.owner), timeout=30)
        f = self.locks.pop(key, None)
        if f is not None:
            f.close()

    def close(self) -> None:
        self.stop.set()
        for key in list(self.locks):
            self.release(key)


def claims_lock_dir(tracking_uri: str) -> Path:
    """Beside a sqlite store (every driver of it is on this machine); else a per-user temp folder."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return db.with_name(db.name + ".claims")
    return Path(tempfile.gettempdir()) / f"kimi-bench-claims-{os.getuid()}"
