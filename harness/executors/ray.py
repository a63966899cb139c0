"""The Ray executor: one trial = one Ray task, on every GPU (or CPU slot) of a node or of a cluster.

    kimi-bench run --matrix experiments/paper.toml --executor ray                     # a local cluster
    kimi-bench run --matrix experiments/paper.toml --executor ray --ray-address auto  # a running cluster
    kimi-bench tune --matrix experiments/tune-smoke.toml --executor ray --n-workers 4

Decisions (docs/ray.md says the same for users):

- The same trial. A task runs `harness.trial.run_trial` with the MLflow layout of the local executor: the
  driver makes the parent run, the task finds or makes the trial's child run by its trial key, and resumes a
  run that is not terminal from its last checkpoint, logging only steps after the last one logged.
- Resources. A trial asks for `num_gpus` = its processes on CUDA, else `num_cpus` = its processes (both
  settable in the matrix's `[ray]` table, which is not part of any trial key). A trial of several processes
  runs DDP through Ray Train's TorchTrainer (Ray sets up the process group), launched from its task.
- Faults. A lost worker process or node is a system failure: Ray retries the task (`max_retries`, default 3)
  and the new attempt resumes the same run from its checkpoint. A trial's own failure (NaN, OOM, a bug) is a
  status returned by run_trial, not an exception, so Ray never retries it (`retry_exceptions=False`).
- Two drivers. Trials are claimed before they are submitted, in two places: a named detached actor
  (`kb-claims`, namespace `kimi-bench`) that serializes claims for every driver on one Ray cluster (a lease
  the driver renews; a dead driver's claims expire), and an exclusive file lock per trial on this machine
  (released by the OS when the driver dies) for drivers that each started their own local cluster. A claimed
  trial is skipped by the other driver ("claimed by another driver").
- Nobody else gets in. The local cluster binds 127.0.0.1 only (Ray's single-machine mode), dashboard off.
  Tracking / storage URIs with credentials never travel as task arguments: a tracking server's login is in
  MLflow's MLFLOW_TRACKING_USERNAME / _PASSWORD (harness/credentials.py, inherited by a local cluster); a
  database URL's password is read by the task from its environment (MLFLOW_TRACKING_URI / KB_OPTUNA_STORAGE).
- Shared stores. On a cluster that spans several machines, a sqlite or file store is refused (point at an
  MLflow server and an Optuna RDB), and the checkpoint folder must be visible from every node (checked).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from harness import schema
from harness.errors import UserError
from harness.schema import MLFLOW_RUN_STATUS, TERMINAL
from harness.store_limits import parallel_slots, sqlite_writers_warning
from harness.tracking import strip_credentials

INSTALL_HINT = "pip install -e '.[ray]'  (or: pip install 'ray[default]>=2.40')"
NAMESPACE = "kimi-bench"
CLAIMS_ACTOR = "kb-claims"
CLAIM_TTL_S = 120.0  # a driver renews its claims every CLAIM_TTL_S / 4; a dead driver's expire after this
SECRET_ENV = {"tracking": "MLFLOW_TRACKING_URI", "storage": "KB_OPTUNA_STORAGE"}
DDP_RESULT = "ddp_result.json"  # rank 0's TrialResult, in the trial folder
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's single-machine mode, every port on 127.0.0.1


# -----------------------------------------------------------------------------------------------------------
# configuration


class RaySection(BaseModel):
    """The matrix's optional `[ray]` table: how a trial is scheduled, never what it computes (no trial key)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    num_cpus: float | None = Field(default=None, gt=0)  # per trial; default: its processes on CPU, else 1
    num_gpus: float | None = Field(default=None, ge=0)  # per trial; default: its processes on CUDA, else 0
    max_retries: int = Field(default=3, ge=0)  # task retries after a lost worker or node
    checkpoint_dir: str | None = None  # shared folder for checkpoints (default: --out)


@dataclass
class RayOptions:
    address: str | None = None  # None: $RAY_ADDRESS, else a local cluster started here (127.0.0.1 only)
    nproc: int = 1  # processes per trial (DDP through TorchTrainer when > 1)
    num_cpus: float | None = None
    num_gpus: float | None = None
    max_retries: int = 3
    checkpoint_dir: str | None = None
    local_cpus: int | None = None  # slots of a local cluster (default: every CPU)
    observer: Callable[[dict], None] | None = None  # tests: each poll's progress snapshot
    poll_s: float = 0.5

    @classmethod
    def from_matrix(cls, raw: dict[str, Any] | None, path: str = "matrix", **kwargs: Any) -> RayOptions:
        try:
            section = RaySection.model_validate(raw or {})
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            msg = "unknown field; use num_cpus, num_gpus, max_retries or checkpoint_dir" \
                if err["type"] == "extra_forbidden" else err["msg"]
            raise UserError(f"{path}: ray.{where}: {msg}") from None
        return cls(num_cpus=section.num_cpus, num_gpus=section.num_gpus, max_retries=section.max_retries,
                   checkpoint_dir=section.checkpoint_dir, **kwargs)


def import_ray():
    """Ray, or one line saying how to install it (it is an optional extra)."""
    try:
        import ray
    except ImportError:
        raise UserError(f"--executor ray: Ray is not installed; install the extra: {INSTALL_HINT}") from None
    return ray


# -----------------------------------------------------------------------------------------------------------
# the cluster


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
        from harness.tracking import first_line

        raise UserError(f"--ray-address {address or 'local'}: cannot reach the Ray cluster ({first_line(e)}); "
                        "start it with `ray start --head` or fix the address") from None
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
    fixes = {"tracking_uri": "--tracking-uri http://MLFLOW-HOST:5000 (an MLflow server every node reaches)",
             "storage": "--storage postgresql://USER@DB-HOST/optuna (an RDB every node reaches)"}
    for option, uri in stores.items():
        if uri and is_local_store(uri):
            flag = "--" + option.replace("_", "-")
            raise UserError(f"{flag} {strip_credentials(uri)}: a local file store on a Ray cluster of "
                            f"{len(hosts)} machines ({', '.join(sorted(hosts))}); the other machines cannot "
                            f"reach it; use {fixes.get(option, 'a server every node reaches')}")


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
        refs = {host: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(ids[0], soft=False))
                .remote(str(probe.resolve())) for host, ids in hosts.items()}
        blind = [host for host, ref in refs.items() if not ray.get(ref, timeout=120)]
    finally:
        probe.unlink(missing_ok=True)
    if blind:
        raise UserError(f"--out {folder}: not visible from {', '.join(blind)}; checkpoints must be on a folder "
                        "every node mounts at the same path (NFS, a cluster filesystem), or set [ray] "
                        "checkpoint_dir")


def _warn_sqlite_writers(console: Console, uri: str, writers: int) -> None:
    """Before anything trains: more trials at once than a sqlite store was measured to hold."""
    line = sqlite_writers_warning(uri, writers)
    if line:
        console.print(line, style="yellow", markup=False, highlight=False)


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
    raise RuntimeError(f"{SECRET_ENV[kind]} is not set on this node to the URI of {shown}; export it "
                       "(with its credentials) before `ray start` on every node")


# -----------------------------------------------------------------------------------------------------------
# claims: no two drivers train one trial


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
        self.board = ray.remote(ClaimBoard).options(name=CLAIMS_ACTOR, namespace=NAMESPACE, lifetime="detached",
                                                    get_if_exists=True, num_cpus=0,
                                                    scheduling_strategy=driver_node()).remote()
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


# -----------------------------------------------------------------------------------------------------------
# progress: tasks report, the driver draws


class ProgressBoard:
    """Actor holding each trial's latest progress; tasks report fire-and-forget, the driver polls."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}

    def start(self, key: str, info: dict) -> int:
        row = self.rows.setdefault(key, {"attempts": 0, "step": 0})
        row.update(info, attempts=row["attempts"] + 1, started=time.time())
        return row["attempts"]

    def update(self, key: str, info: dict) -> None:
        self.rows.setdefault(key, {"attempts": 1}).update(info)

    def snapshot(self) -> dict[str, dict]:
        return self.rows


class BoardReporter:
    """In a task: the run_trial progress callback that reports to the driver's ProgressBoard."""

    def __init__(self, board, key: str):
        self.board, self.key = board, key

    def __call__(self, step: int, total: int | None, info: dict) -> None:
        with contextlib.suppress(Exception):  # fire-and-forget; a lost board costs the driver's view only
            self._send(step, total, info)

    def _send(self, step: int, total: int | None, info: dict) -> None:
        self.board.update.remote(self.key, {"step": step, "total": total, "loss": info.get("loss"),
                                            "tok_s": info.get("tok/s"), "time": time.time()})


def _board_start(board, key: str, info: dict) -> int:
    """This attempt's number (1, 2, ...) from the driver's board; 0 when the board cannot be reached (progress
    is a nicety: the trial runs all the same)."""
    if board is None:
        return 0
    try:
        return int(import_ray().get(board.start.remote(key, info), timeout=60))
    except Exception:
        return 0


def _where() -> dict:
    ray = import_ray()
    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "node": ray.util.get_node_ip_address(), "pid": os.getpid(),
            "worker_id": ctx.get_worker_id()}


# -----------------------------------------------------------------------------------------------------------
# one trial, in a task


@dataclass
class TrialJob:
    """Everything a task needs, credential-free (Ray's dashboard and logs show task arguments)."""

    spec: Any  # TrialSpec
    index: int
    data_fields: dict
    cache_dir: str | None
    tracking_uri: str | None  # credential-free; the real one comes from the environment when it had any
    tracking_secret: bool
    experiment_id: str
    parent_run_id: str | None
    common_tags: dict[str, str]
    out_dir: str
    nproc: int = 1
    peak_tflops: float | None = None
    board: Any = None


def _prepare_quietly(fields: dict, cache_dir: str | None):
    from harness.data import DataConfig, prepare

    return prepare(DataConfig(**fields, **({"cache_dir": Path(cache_dir)} if cache_dir else {})))


def open_trial_run(job: TrialJob, tracker, key: str):
    """The trial's child run: the one a lost attempt (or an earlier driver) left, resumed, or a new one.
    Mirrors harness.runner._run_one so both executors leave the same runs. None: the trial already ended."""
    from harness.runner import last_logged_step, trial_tags

    spec = job.spec
    existing = tracker.find_trial(job.experiment_id, key)
    if existing is not None and existing.data.tags.get(schema.TAG_STATUS) in TERMINAL:
        return None
    resume_id = existing.info.run_id if existing is not None else None
    run = tracker.start_trial(job.experiment_id, job.parent_run_id, spec.name,
                              {**job.common_tags, **trial_tags(spec, key)}, spec.flat_params(),
                              resume_run_id=resume_id)
    if resume_id:
        run.min_step = last_logged_step(tracker, resume_id)
    return run


def train_trial(job: TrialJob) -> dict:
    """The body of one trial's Ray task (every attempt): same code and MLflow layout as the local executor."""
    from harness.tracking import Tracker
    from harness.trial import run_trial

    data = _prepare_quietly(job.data_fields, job.cache_dir)
    key = job.spec.key(data.data_hash)
    where = _where()
    attempt = _board_start(job.board, key, {**where, "arm": job.spec.arm})
    tracker = Tracker(resolve_secret("tracking", job.tracking_uri, job.tracking_secret))
    if job.nproc > 1:  # rank 0 of the DDP workers opens (or resumes) the run and logs
        existing = tracker.find_trial(job.experiment_id, key)
        if existing is not None and existing.data.tags.get(schema.TAG_STATUS) in TERMINAL:
            return {"status": "skipped", "trial_key": key, "attempt": attempt, **where}
        result = _train_ddp(job, key)
    else:
        run = open_trial_run(job, tracker, key)
        if run is None:
            return {"status": "skipped", "trial_key": key, "attempt": attempt, **where}
        run.log_dataset(data.corpus_name, data.data_hash, str(data.path))
        progress = BoardReporter(job.board, key) if job.board else None
        result = run_trial(job.spec, data, Path(job.out_dir), run, progress=progress, peak_tflops=job.peak_tflops)
    return {"status": result.status, "trial_key": key, "step": result.step, "metrics": result.metrics,
            "run_id": result.run_id, "error": result.error, "out_dir": str(result.out_dir), "attempt": attempt,
            **where}


def _ddp_worker_loop(config: dict) -> None:
    """A TorchTrainer worker: Ray Train has set up the process group; rank 0 reopens the run and logs."""
    import ray.train

    from harness.dist import DistInfo
    from harness.tracking import Tracker
    from harness.trial import run_trial

    job: TrialJob = config["job"]
    ctx = ray.train.get_context()
    info = DistInfo(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank())
    data = _prepare_quietly(job.data_fields, job.cache_dir)
    key = job.spec.key(data.data_hash)
    run = None
    if info.is_main:
        run = open_trial_run(job, Tracker(resolve_secret("tracking", job.tracking_uri, job.tracking_secret)), key)
        if run is not None:
            run.log_dataset(data.corpus_name, data.data_hash, str(data.path))
    progress = BoardReporter(job.board, key) if job.board and info.is_main else None
    result = run_trial(job.spec, data, Path(job.out_dir), run, info, progress=progress,
                       peak_tflops=job.peak_tflops)
    if info.is_main:  # the trial folder is shared: the task that launched the trainer reads it back
        out = {"status": result.status, "step": result.step, "error": result.error, "run_id": result.run_id,
               "metrics": result.metrics}
        (Path(job.out_dir) / DDP_RESULT).write_text(json.dumps(out, default=float))
    ray.train.report({"status": result.status})  # every rank: a collective in Ray Train


def _train_ddp(job: TrialJob, key: str):
    """A trial on several GPUs (or CPU processes): DDP through Ray Train's TorchTrainer."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from harness.trial import TrialResult, resolve_device

    use_gpu = resolve_device(job.spec.train.device).type == "cuda"
    trainer = TorchTrainer(
        _ddp_worker_loop, train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=job.nproc, use_gpu=use_gpu),
        run_config=RunConfig(name=f"kb-{key}", storage_path=str(Path(job.out_dir).parent.resolve()),
                             failure_config=FailureConfig(max_failures=0)))
    result_file = Path(job.out_dir) / DDP_RESULT
    result_file.unlink(missing_ok=True)
    trainer.fit()
    out = json.loads(result_file.read_text()) if result_file.is_file() else {
        "status": schema.FAILED, "step": 0, "error": "the DDP workers ended without a result", "run_id": None,
        "metrics": {}}
    status, step, error, run_id, numeric = out["status"], out["step"], out["error"], out["run_id"], out["metrics"]
    return TrialResult(status, key, step, numeric, run_id, error, Path(job.out_dir))


# -----------------------------------------------------------------------------------------------------------
# the driver


@dataclass
class Running:
    spec: Any
    key: str
    ref: Any
    index: int
    experiment_id: str
    started: float = field(default_factory=time.time)


def trial_resources(on_cuda: bool, opts: RayOptions) -> dict[str, float]:
    """num_gpus = processes on CUDA, num_cpus = processes on CPU (the matrix's [ray] table overrides)."""
    if opts.nproc > 1:  # the task only launches TorchTrainer, whose workers hold the resources
        return {"num_cpus": 0, "num_gpus": 0}
    gpus = opts.num_gpus if opts.num_gpus is not None else (1.0 if on_cuda else 0.0)
    cpus = opts.num_cpus if opts.num_cpus is not None else 1.0
    return {"num_cpus": cpus, "num_gpus": gpus}


def _remote_trial(ray, opts: RayOptions, resources: dict[str, float]):
    return ray.remote(train_trial).options(max_retries=opts.max_retries, retry_exceptions=False, **resources)


def run_matrix_ray(matrix, trials: list, data, tracking_uri: str | None, out_root: Path, console: Console,
                   opts: RayOptions, peak_tflops: float | None = None, cache_dir: str | None = None):
    """run_matrix on Ray: every trial a task, as many at once as the cluster has slots. Same MatrixOutcome."""
    from harness.runner import MatrixOutcome, matrix_params, run_tags, trial_list
    from harness.tracking import Tracker, resolve_tracking_uri
    from harness.trial import resolve_device

    uri = resolve_tracking_uri(tracking_uri)
    shown_uri, secrets = secret_arg("tracking", uri)
    started = connect(opts, secrets)
    ray = import_ray()
    try:
        hosts = cluster_hosts()
        check_shared_stores(hosts, tracking_uri=uri)
        _warn_sqlite_writers(console, uri, min(len(trials), parallel_slots(
            ray.cluster_resources(), trial_resources(bool(trials) and resolve_device(
                trials[0].train.device).type == "cuda", opts))))
        out_root = Path(opts.checkpoint_dir) if opts.checkpoint_dir else Path(out_root)
        check_shared_dir(out_root, hosts)
        tracker = Tracker(uri)
        experiment_id = tracker.ensure_experiment(matrix.name, matrix.spec.description)
        device = resolve_device(trials[0].train.device) if trials else None
        common_tags = run_tags(data, device) if device is not None else {}
        command = " ".join(shlex.quote(a) for a in ["kimi-bench", *sys.argv[1:]])
        parent = tracker.start_parent(experiment_id, matrix.name, strip_credentials(command), {
            **common_tags, schema.TAG_MATRIX_FILE: str(matrix.path), schema.TAG_N_TRIALS: str(len(trials))},
            matrix.spec.description)
        tracker.log_matrix(parent, matrix.path.read_text(encoding="utf-8"), matrix_params(matrix),
                           trial_list(trials, data.data_hash))
        outcome = MatrixOutcome(experiment_id, parent, [])
        claims = Claims(f"{strip_credentials(uri)}|{experiment_id}", claims_lock_dir(uri))
        board = ray.remote(ProgressBoard).options(num_cpus=0, scheduling_strategy=driver_node()).remote()
        console.print(f"ray: {sum(len(v) for v in hosts.values())} node(s) on {len(hosts)} machine(s), "
                      f"{_slots(ray)}; {len(trials)} trial(s)")
        try:
            _drive(ray, trials, data, tracker, experiment_id, parent, common_tags, out_root, console, opts,
                   peak_tflops, cache_dir, shown_uri, bool(secrets), claims, board, outcome)
            if device is not None:  # the controlled speed runs, on the driver, as the local executor does
                from harness.measure import measure_matrix_speed

                measure_matrix_speed(trials, data, device, tracker, experiment_id, parent, common_tags, console)
        except KeyboardInterrupt:
            outcome.interrupted = True
            from harness.signals import interrupt_name

            console.print(f"[yellow]interrupted ({interrupt_name()})[/]: running trials are cancelled and marked "
                          "killed; finished trials are kept. Resume with the same command: "
                          f"kimi-bench run --matrix {matrix.path}")
        finally:
            claims.close()
            tracker.end_parent(parent, schema.KILLED if outcome.interrupted else schema.FINISHED)
            with contextlib.suppress(Exception):
                ray.kill(board)
        return outcome
    finally:
        if started:
            ray.shutdown()


def _slots(ray) -> str:
    res = ray.cluster_resources()
    gpus = res.get("GPU", 0)
    return f"{gpus:g} GPU(s)" if gpus else f"{res.get('CPU', 0):g} CPU slot(s)"


def _drive(ray, trials, data, tracker, experiment_id, parent, common_tags, out_root, console, opts, peak_tflops,
           cache_dir, shown_uri, secret: bool, claims: Claims, board, outcome) -> None:
    """Claim and submit every trial, then wait for them with live progress; Ctrl-C cancels them."""
    from harness.runner import TrialResult
    from harness.trial import resolve_device

    n = len(trials)
    results: dict[int, TrialResult | None] = {}
    running: list[Running] = []
    for i, spec in enumerate(trials, 1):
        key = spec.key(data.data_hash)
        existing = tracker.find_trial(experiment_id, key)
        if existing is not None and existing.data.tags.get(schema.TAG_STATUS) in TERMINAL:
            console.print(f"[dim][{i}/{n}] {spec.name}: already {existing.data.tags[schema.TAG_STATUS]} "
                          f"(run {existing.info.run_id[:8]}), skipped[/]")
            results[i] = None
            continue
        if not claims.claim(key):
            console.print(f"[dim][{i}/{n}] {spec.name}: claimed by another driver, skipped[/]")
            results[i] = None
            continue
        job = TrialJob(spec, i, data_fields=dict(spec.data), cache_dir=cache_dir, tracking_uri=shown_uri,
                       tracking_secret=secret,
                       experiment_id=experiment_id, parent_run_id=parent, common_tags=common_tags,
                       out_dir=str((out_root / spec.experiment / key).resolve()), nproc=opts.nproc,
                       peak_tflops=peak_tflops, board=board)
        on_cuda = resolve_device(spec.train.device).type == "cuda"
        ref = _remote_trial(ray, opts, trial_resources(on_cuda, opts)).remote(job)
        running.append(Running(spec, key, ref, i, experiment_id))
    try:
        _wait_all(ray, running, results, board, console, opts, n, tracker, claims)
    except KeyboardInterrupt:
        _cancel(ray, running, board, tracker, console)
        raise
    finally:
        outcome.results.extend((trials[i - 1], results.get(i)) for i in sorted(results))


def _progress_view(n: int, console: Console) -> tuple[Progress, Any]:
    bar = Progress(TextColumn("[bold]matrix[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("trials"),
                   TimeElapsedColumn(), TextColumn("remaining"), TimeRemainingColumn(), console=console)
    return bar, bar.add_task("matrix", total=n)


def running_table(rows: list[tuple[Running, dict]]) -> Table:
    table = Table(header_style="bold", box=None, pad_edge=False)
    for col in ("trial", "arm", "node", "step", "loss", "tokens/s", "attempt"):
        table.add_column(col, justify="left" if col in ("trial", "arm", "node") else "right")
    for r, row in rows:
        step = f"{row.get('step', 0)}/{row.get('total') or '?'}"
        loss = f"{row['loss']:.3f}" if row.get("loss") is not None else "-"
        tps = f"{row['tok_s']:,.0f}" if row.get("tok_s") else "-"
        table.add_row(f"[{r.index}] {r.spec.name}", r.spec.arm, str(row.get("node", "queued")), step, loss, tps,
                      str(row.get("attempts", 0)))
    return table


def _wait_all(ray, running: list[Running], results: dict, board, console: Console, opts: RayOptions, n: int,
              tracker, claims: Claims) -> None:
    bar, task = _progress_view(n, console)
    done_before = sum(1 for v in results.values() if v is None)
    bar.update(task, completed=done_before)
    last_line = 0.0
    with Live(Group(bar), console=console, refresh_per_second=4, transient=False,
              redirect_stdout=False, redirect_stderr=False) as live:
        while running:
            ready, _ = ray.wait([r.ref for r in running], num_returns=1, timeout=opts.poll_s)
            snapshot = _snapshot(ray, board)
            if opts.observer is not None:
                opts.observer(snapshot)
            for r in [r for r in running if r.ref in ready]:
                running.remove(r)
                results[r.index] = _collect(ray, r, snapshot.get(r.key, {}), tracker, console)
                claims.release(r.key)
                bar.advance(task)
            rows = [(r, snapshot.get(r.key, {})) for r in running]
            live.update(Group(bar, running_table(rows)) if rows else Group(bar))
            if not console.is_terminal and time.time() - last_line > 30 and running:
                last_line = time.time()  # a log file gets a line every 30 s instead of a live view
                for r in running:
                    row = snapshot.get(r.key, {})
                    console.print(f"[{r.index}/{n}] {r.spec.name} on {row.get('node', 'queued')} step "
                                  f"{row.get('step', 0)}/{row.get('total') or '?'}")


def _snapshot(ray, board) -> dict:
    try:
        return ray.get(board.snapshot.remote(), timeout=10)
    except Exception:  # the board's node was lost: progress only, the trials go on
        return {}


def _collect(ray, r: Running, row: dict, tracker, console: Console):
    """One finished task -> TrialResult (a task that failed for good: failed, its run marked failed)."""
    from harness.trial import TrialResult

    try:
        out = ray.get(r.ref)
    except Exception as e:  # retries exhausted (system failure) or an error outside run_trial
        from harness.tracking import first_line

        error = f"{type(e).__name__}: {first_line(e)}"
        _end_if_running(tracker, r.experiment_id, r.key, schema.FAILED, error)
        console.print(f"[red]failed[/] {r.spec.name} on Ray: {error}")
        return TrialResult(schema.FAILED, r.key, error=error)
    if out["status"] == "skipped":
        console.print(f"[dim]{r.spec.name}: already ended, skipped[/]")
        return None
    result = TrialResult(out["status"], out["trial_key"], out["step"], out["metrics"], out["run_id"],
                         out["error"], Path(out["out_dir"]))
    style = {schema.FINISHED: "green", schema.DIVERGED: "red", schema.OOM: "red", schema.FAILED: "red"}.get(
        result.status, "yellow")
    ppl = result.metrics.get(schema.VAL_PPL_FINAL)
    detail = f"val ppl {ppl:.3f}" if ppl else (result.error or "")
    n_retries = out["attempt"] - 1
    retried = f" after {n_retries} retr{'y' if n_retries == 1 else 'ies'}" if n_retries > 0 else ""
    console.print(f"[{style}]{result.status}[/] {r.spec.name} at step {result.step} on {out['node']}{retried}: "
                  f"{detail}")
    return result


def _end_if_running(tracker, experiment_id: str, key: str, status: str, error: str) -> None:
    """Mark a trial's run ended when its task could not (lost for good, cancelled before run_trial)."""

    with contextlib.suppress(Exception):
        run = tracker.find_trial(experiment_id, key)
        if run is not None and run.data.tags.get(schema.TAG_STATUS) == schema.RUNNING:
            run_id = run.info.run_id
            tracker.client.set_tag(run_id, schema.TAG_STATUS, status)
            tracker.client.set_tag(run_id, schema.TAG_ERROR, error[:schema.ERROR_CHARS])
            tracker.client.set_terminated(run_id, MLFLOW_RUN_STATUS.get(status, "FAILED"))


def _cancel(ray, running: list[Running], board, tracker, console: Console, grace_s: float = 30.0) -> None:
    """Ctrl-C: KeyboardInterrupt in every task (run_trial marks its run killed), then force what is left."""
    for r in running:
        with contextlib.suppress(Exception):
            ray.cancel(r.ref, force=False)
    deadline = time.time() + grace_s
    pending = [r.ref for r in running]
    while pending and time.time() < deadline:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
    for r in running:
        if r.ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(r.ref, force=True)
    for r in running:
        _end_if_running(tracker, r.experiment_id, r.key, schema.KILLED, "interrupted (Ctrl-C)")
    console.print(f"cancelled {len(running)} trial(s)")


# -----------------------------------------------------------------------------------------------------------
# studies: N Optuna workers as Ray tasks on one shared storage (Optuna's distributed pattern)


def worker_quotas(n_trials: int | None, n_workers: int) -> list[int | None]:
    """Each worker's --n-trials so that the workers add exactly n_trials per arm together (None: no cap)."""
    if n_trials is None:
        return [None] * n_workers
    return [q for q in (n_trials // n_workers + (i < n_trials % n_workers) for i in range(n_workers)) if q > 0]


def run_tune_worker(config: dict, worker_id: int):
    """One Optuna worker, the same entry a hand-started `kimi-bench tune` uses; the one place a Ray study
    worker calls the tuner (worker_id: which of the N; today's tune() needs none)."""
    from harness.tune import tune

    return tune(config["matrix"], **config["kwargs"])


def _tune_task(config: dict, worker_id: int, secret_storage: bool, secret_tracking: bool) -> dict:
    """A study worker's Ray task: the real URIs from this node's environment, then run_tune_worker."""
    from rich.console import Console as _Console

    kwargs = dict(config["kwargs"])
    kwargs["storage"] = resolve_secret("storage", kwargs.get("storage"), secret_storage)
    kwargs["tracking_uri"] = resolve_secret("tracking", kwargs.get("tracking_uri"), secret_tracking)
    kwargs["console"] = _Console(quiet=True)
    outcome = run_tune_worker({**config, "kwargs": kwargs}, worker_id)
    return {"added": {arm: s.added for arm, s in outcome.studies.items()}, "interrupted": outcome.interrupted,
            **_where()}


def tune_ray(matrix, *, n_workers: int, opts: RayOptions, n_trials: int | None, total_trials: int | None,
             storage: str | None, tracking_uri: str | None, console: Console, arms: list[str] | None = None,
             study_prefix: str | None = None, **tune_kwargs: Any):
    """`kimi-bench tune --executor ray --n-workers N`: N workers share the studies; together they add exactly
    --n-trials per arm (split between them; --total-trials caps every worker, retried ones included)."""
    from harness.matrix import Matrix, load_matrix
    from harness.tracking import resolve_tracking_uri
    from harness.tune import TuneConfig, TuneOutcome
    from harness.tune.run import _parse_arms
    from harness.tune.storage import _storage_url

    if n_workers < 1:
        raise UserError(f"--n-workers: must be >= 1, got {n_workers}")
    matrix = matrix if isinstance(matrix, Matrix) else load_matrix(matrix)
    checked = TuneConfig(matrix, n_trials=n_trials, total_trials=total_trials,  # one-line errors, the defaults
                         timeout=tune_kwargs.get("timeout"), heartbeat_s=tune_kwargs.get("heartbeat_s", 60))
    n_trials, total_trials = checked.n_trials, checked.total_trials
    selected = _parse_arms(matrix, arms)
    url = _storage_url(storage)
    uri = resolve_tracking_uri(tracking_uri)
    shown_storage, env_storage = secret_arg("storage", url)
    shown_uri, env_uri = secret_arg("tracking", uri)
    started = connect(opts, {**env_storage, **env_uri})
    ray = import_ray()
    try:
        hosts = cluster_hosts()
        check_shared_stores(hosts, tracking_uri=uri, storage=url)
        _warn_sqlite_writers(console, uri, n_workers)
        quotas = worker_quotas(n_trials, n_workers)
        cap = total_trials if total_trials is not None else n_trials
        from harness.trial import resolve_device

        resources = trial_resources(resolve_device(matrix.train_config().device).type == "cuda", opts)
        task = ray.remote(_tune_task).options(max_retries=opts.max_retries, retry_exceptions=False, **resources)
        refs = []
        for worker_id, quota in enumerate(quotas):
            kwargs = {**tune_kwargs, "n_trials": quota, "total_trials": cap, "storage": shown_storage,
                      "tracking_uri": shown_uri, "arms": arms, "study_prefix": study_prefix}
            refs.append(task.remote({"matrix": matrix, "kwargs": kwargs}, worker_id, bool(env_storage),
                                    bool(env_uri)))
        console.print(f"ray: {len(refs)} Optuna worker(s) on {sum(len(v) for v in hosts.values())} node(s); "
                      f"{n_trials or total_trials} trial(s) per arm; storage {strip_credentials(url)}")
        prefix = study_prefix or matrix.name
        names = [f"{prefix}/{v}+{o}" for v, o in selected]
        interrupted = _wait_tune(ray, refs, names, url, tracking_uri, (n_trials or total_trials) * len(names),
                                 console, opts)
        outcome = _tune_outcome(names, url, tracking_uri, matrix, refs, ray, interrupted)
        return outcome if outcome is not None else TuneOutcome(strip_credentials(url), {}, interrupted)
    finally:
        if started:
            ray.shutdown()


def _study_counts(url: str, tracking_uri: str | None, names: list[str]) -> dict[str, dict[str, int]]:
    import optuna

    from harness.tune import open_storage

    st = open_storage(url, tracking_uri)
    out = {}
    for name in names:
        try:
            trials = optuna.load_study(study_name=name, storage=st.storage).get_trials(deepcopy=False)
        except KeyError:  # not created yet
            trials = []
        counts: dict[str, int] = {}
        for t in trials:
            counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
        out[name] = counts
    return out


def _wait_tune(ray, refs: list, names: list[str], url: str, tracking_uri: str | None, total: int,
               console: Console, opts: RayOptions) -> bool:
    """Wait for the workers with one bar (trials that ended, all arms) and a row per study; Ctrl-C cancels."""
    bar = Progress(TextColumn("[bold]study[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("trials"),
                   TimeElapsedColumn(), TextColumn("remaining"), TimeRemainingColumn(), console=console)
    task = bar.add_task("study", total=total)
    pending = list(refs)
    try:
        with Live(Group(bar), console=console, refresh_per_second=2, redirect_stdout=False,
                  redirect_stderr=False) as live:
            while pending:
                _, pending = ray.wait(pending, num_returns=len(pending), timeout=max(opts.poll_s, 1.0))
                with contextlib.suppress(Exception):
                    counts = _study_counts(url, tracking_uri, names)
                    if opts.observer is not None:
                        opts.observer(counts)
                    ended = sum(c.get("complete", 0) + c.get("pruned", 0) + c.get("fail", 0) for c in counts.values())
                    bar.update(task, completed=min(ended, total))
                    table = Table(header_style="bold", box=None)
                    for col in ("study", "running", "complete", "pruned", "fail"):
                        table.add_column(col, justify="left" if col == "study" else "right")
                    for name, c in counts.items():
                        table.add_row(name, *(str(c.get(k, 0)) for k in ("running", "complete", "pruned", "fail")))
                    live.update(Group(bar, table))
        return False
    except KeyboardInterrupt:
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=False)  # KeyboardInterrupt in tune(): its trial FAIL, its run killed
        with contextlib.suppress(Exception):
            ray.wait(pending, num_returns=len(pending), timeout=30)
        console.print("[yellow]interrupted[/]: the workers' current trials are failed in Optuna and killed in "
                      "MLflow; run the same command to go on")
        return True


def _tune_outcome(names: list[str], url: str, tracking_uri: str | None, matrix, refs: list, ray,
                  interrupted: bool):
    """The workers' studies, read back from the storage, for the CLI's summary (added = all workers)."""
    import optuna

    from harness.tune import ArmStudy, TuneOutcome, open_storage

    added: dict[str, int] = {}
    for ref in refs:
        try:
            out = ray.get(ref, timeout=0)
        except Exception:  # lost for good or cancelled: its trials are in the storage all the same
            continue
        for arm, n in out["added"].items():
            added[arm] = added.get(arm, 0) + n
    st = open_storage(url, tracking_uri)
    studies = {}
    for name in names:
        arm = name.rsplit("/", 1)[-1]
        with contextlib.suppress(KeyError):
            study = optuna.load_study(study_name=name, storage=st.storage)
            studies[arm] = ArmStudy(arm, name, None, study, (), matrix, added=added.get(arm, 0))
    return TuneOutcome(st.display, studies, interrupted)
