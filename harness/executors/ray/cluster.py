"""The cluster: join one or start a local one (127.0.0.1 only), its machines, the stores and folder every
node must reach, the credential-free task arguments, and what a trial asks for."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.executors.ray.options import LOOPBACK_ENV, NAMESPACE, SECRET_ENV, RayOptions, import_ray
from harness.stores.limits import sqlite_writers_warning
from harness.stores.tracking import strip_credentials


def pin_loopback() -> None:
    """Ray's single-machine mode: the node IP is 127.0.0.1 and every Ray port listens there only. Read by Ray
    at import (driver) and by every process it starts (inherited environment)."""
    os.environ[LOOPBACK_ENV] = "0"
    if "ray" in sys.modules:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False


def connect(opts: RayOptions, secrets: dict[str, str] | None = None) -> bool:
    """Join the cluster opts.address names (or $RAY_ADDRESS), or start a local one bound to 127.0.0.1.
    Returns True when this call started Ray (the caller shuts it down). `secrets` (env name -> value) are
    exported first, so the processes of a local cluster inherit them."""
    for name, value in (secrets or {}).items():
        os.environ[name] = value
    address = opts.address or os.environ.get("RAY_ADDRESS")
    if not address:
        pin_loopback()
    ray = import_ray()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": False, "ignore_reinit_error": True}
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(address="local", include_dashboard=False, num_cpus=opts.local_cpus, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        from harness.stores.tracking import first_line

        raise UserError(
            f"--ray-address {address or 'local'}: cannot reach the Ray cluster ({first_line(e)}); "
            "start it with `ray start --head` or fix the address"
        ) from None
    return True


def cluster_hosts() -> dict[str, list[str]]:
    """Alive nodes grouped by machine address: {address: [node ids]}."""
    ray = import_ray()
    hosts: dict[str, list[str]] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            hosts.setdefault(node["NodeManagerAddress"], []).append(node["NodeID"])
    return hosts


def driver_node():
    """Scheduling on the driver's node (hard; the actors need no CPU, so it always fits): the driver's
    bookkeeping actors are never lost with a worker node, only with the driver's own node (and the driver)."""
    ray = import_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "journal:", "/", ".")) or "://" not in uri


def check_shared_stores(hosts: dict[str, list[str]], **stores: str | None) -> None:
    """On a cluster spanning several machines a local file store cannot be reached by every node: refuse it.
    `stores`: option name -> URI (e.g. tracking_uri=..., storage=...)."""
    if len(hosts) <= 1:
        return
    fixes = {
        "tracking_uri": "--tracking-uri http://MLFLOW-HOST:5000 (an MLflow server every node reaches)",
        "storage": "--storage postgresql://USER@DB-HOST/optuna (an RDB every node reaches)",
    }
    for option, uri in stores.items():
        if uri and is_local_store(uri):
            flag = "--" + option.replace("_", "-")
            raise UserError(
                f"{flag} {strip_credentials(uri)}: a local file store on a Ray cluster of "
                f"{len(hosts)} machines ({', '.join(sorted(hosts))}); the other machines cannot "
                f"reach it; use {fixes.get(option, 'a server every node reaches')}"
            )


def _sees_file(path: str) -> bool:
    return Path(path).is_file()


def check_shared_dir(folder: Path, hosts: dict[str, list[str]]) -> None:
    """The checkpoint folder must be the same folder on every machine: a probe file written here must be
    visible from one node of each machine (a zero-CPU task pinned to it)."""
    if len(hosts) <= 1:
        return
    ray = import_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".kb-probe-{uuid.uuid4().hex}"
    probe.write_text("kimi-bench")
    try:
        task = ray.remote(num_cpus=0)(_sees_file)
        refs = {
            host: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(ids[0], soft=False)).remote(
                str(probe.resolve())
            )
            for host, ids in hosts.items()
        }
        blind = [host for host, ref in refs.items() if not ray.get(ref, timeout=120)]
    finally:
        probe.unlink(missing_ok=True)
    if blind:
        raise UserError(
            f"--out {folder}: not visible from {', '.join(blind)}; checkpoints must be on a folder "
            "every node mounts at the same path (NFS, a cluster filesystem), or set [ray] "
            "checkpoint_dir"
        )


def secret_arg(kind: str, uri: str | None) -> tuple[str | None, dict[str, str]]:
    """(what a task argument may carry, env vars to export). A URI with credentials travels only as its
    credential-free form; the task reads the real one from SECRET_ENV[kind]."""
    if uri is None or strip_credentials(uri) == uri:
        return uri, {}
    return strip_credentials(uri), {SECRET_ENV[kind]: uri}


def resolve_secret(kind: str, shown: str | None, had_credentials: bool) -> str | None:
    """In a task: the real URI behind its credential-free form (from the environment when it had any)."""
    if not had_credentials:
        return shown
    env = os.environ.get(SECRET_ENV[kind])
    if env and strip_credentials(env) == shown:
        return env
    raise RuntimeError(
        f"{SECRET_ENV[kind]} is not set on this node to the URI of {shown}; export it "
        "(with its credentials) before `ray start` on every node"
    )


def where() -> dict:
    ray = import_ray()
    ctx = ray.get_runtime_context()
    return {
        "node_id": ctx.get_node_id(),
        "node": ray.util.get_node_ip_address(),
        "pid": os.getpid(),
        "worker_id": ctx.get_worker_id(),
    }


def slots(ray) -> str:
    res = ray.cluster_resources()
    gpus = res.get("GPU", 0)
    return f"{gpus:g} GPU(s)" if gpus else f"{res.get('CPU', 0):g} CPU slot(s)"


def trial_resources(on_cuda: bool, opts: RayOptions) -> dict[str, float]:
    """num_gpus = processes on CUDA, num_cpus = processes on CPU (the matrix's [ray] table overrides)."""
    if opts.nproc > 1:  # the task only launches TorchTrainer, whose workers hold the resources
        return {"num_cpus": 0, "num_gpus": 0}
    gpus = opts.num_gpus if opts.num_gpus is not None else (1.0 if on_cuda else 0.0)
    cpus = opts.num_cpus if opts.num_cpus is not None else 1.0
    return {"num_cpus": cpus, "num_gpus": gpus}


def warn_sqlite_writers(console, uri: str, writers: int) -> None:
    """Before anything trains: more trials at once than a sqlite store was measured to hold."""
    line = sqlite_writers_warning(uri, writers)
    if line:
        console.print(line, style="yellow", markup=False, highlight=False)
