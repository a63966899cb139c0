"""harness/executors/ray/ on a local multi-node Ray cluster (ray.cluster_utils.Cluster), loopback only.

One cluster per module: a head with no CPU (the drivers and their bookkeeping actors) and two worker nodes of
one CPU slot each; the fault test removes worker nodes and adds new ones. Ray is pinned to 127.0.0.1 (its
single-machine mode) before it is imported, and the first test checks that every Ray port listens there.
"""

from __future__ import annotations

import io
import ipaddress
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.executors.ray.claim_board import ClaimBoard
from harness.executors.ray.cluster import check_shared_stores, pin_loopback, resolve_secret, secret_arg
from harness.executors.ray.options import LOOPBACK_ENV, RayOptions
from harness.executors.ray.tuning import worker_quotas, worker_results

pin_loopback()  # before `import ray`: Ray reads it at import, and every process it starts inherits it

import psutil  # noqa: E402
import ray  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from rich.console import Console  # noqa: E402

from harness.errors import UserError  # noqa: E402
from tests.helpers import (  # noqa: E402
    REPO,
    assert_one_line_error,
    child_env,
    duplicate_steps,
    finish,
    kill_group,
    metric_steps,
    popen_cli,
    run_cli,
    trial_runs,
    write_matrix,
)

FAST_HEALTH = {"health_check_period_ms": 1000, "health_check_timeout_ms": 3000, "health_check_failure_threshold": 5}


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            "node_ip_address": "127.0.0.1",
            "_system_config": FAST_HEALTH,
        },
    )
    for _ in range(2):
        c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    ray.init(address=c.address, namespace="kimi-bench", log_to_driver=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A migrated sqlite MLflow store and a token cache shared by the module's tests (one machine)."""
    root = tmp_path_factory.mktemp("ray")
    uri = f"sqlite:///{root}/mlflow.db"
    MlflowClient(uri).search_experiments()
    return {"root": root, "uri": uri, "cache": str(root / "cache")}


def _console() -> Console:
    return Console(file=io.StringIO(), width=160)


def drive(
    matrix_path: Path,
    store: dict,
    out: Path,
    cluster,
    observer=None,
    max_retries: int = 3,
    executor: str = "ray",
    nproc: int = 1,
):
    """One in-process driver of a matrix (the CLI's run, minus argument parsing)."""
    from harness.data.bar import prepare_data
    from harness.executors import run_matrix
    from harness.spec.matrix import load_matrix

    matrix = load_matrix(matrix_path)
    console = _console()
    data = prepare_data(matrix.data_fields(), store["cache"], console)
    trials = matrix.expand(data.vocab_size)
    opts = RayOptions(address=cluster.address, observer=observer, max_retries=max_retries, poll_s=0.2, nproc=nproc)
    outcome = run_matrix(
        matrix, trials, data, store["uri"], out, console, executor=executor, ray_options=opts, cache_dir=store["cache"]
    )
    return outcome, console.file.getvalue()


def in_thread(fn, *args, **kwargs):
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # re-raised in the test thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def joined(t: threading.Thread, box: dict, timeout: float):
    t.join(timeout)
    assert not t.is_alive(), f"driver still running after {timeout}s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def listening_addresses(pids: list[int]) -> set[str]:
    out = set()
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out |= {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}
    return out


# ----------------------------------------------------------------------------------------------- the cluster


@pytest.mark.slow
def test_cluster_is_pinned_to_loopback(cluster):
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 3
    assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
    ray_pids = [p.pid for p in psutil.Process().children(recursive=True)] + [os.getpid()]
    addresses = listening_addresses(ray_pids)
    assert addresses, "no Ray process listens at all: the check would be empty"
    outside = {a for a in addresses if not _loopback(a)}
    assert not outside, f"Ray listens beyond loopback: {outside}"
    assert os.environ[LOOPBACK_ENV] == "0"


# ----------------------------------------------------------------------------------------------- a matrix


@pytest.mark.slow
def test_four_trials_on_two_nodes_overlap_and_a_second_driver_trains_nothing_twice(cluster, store, tmp_path):
    matrix = write_matrix(
        tmp_path / "m.toml",
        "ray-four",
        variants=("gpt", "kimi"),
        optimizers=("adamw", "muon"),
        train={"steps": 30, "checkpoint_interval": 10},
    )
    out = tmp_path / "runs"
    seen: dict[str, dict] = {}

    def observe(snapshot: dict) -> None:
        for key, row in snapshot.items():
            seen.setdefault(key, {}).update(row)

    t, box = in_thread(drive, matrix, store, out, cluster, observe)
    wait_for(lambda: any(r.get("step", 0) > 0 for r in seen.values()), 180, "a trial to train")
    # a second driver, another process, on the same matrix, store and cluster, while the first one trains
    second = run_cli(
        [
            "run",
            "--matrix",
            str(matrix),
            "--executor",
            "ray",
            "--ray-address",
            cluster.address,
            "--tracking-uri",
            store["uri"],
            "--out",
            str(out),
            "--cache-dir",
            store["cache"],
        ],
        cwd=tmp_path,
        timeout=240,
        env=child_env({LOOPBACK_ENV: "0"}),
    )
    outcome, _ = joined(t, box, 300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    skipped = [ln for ln in second.stdout.splitlines() if "claimed by another driver" in ln or "already" in ln]
    assert len(skipped) == 4 and "claimed by another driver" in second.stdout, second.stdout[-3000:]
    assert " at step " not in second.stdout, "the second driver trained a trial"

    assert [r.status for _, r in outcome.results] == ["finished"] * 4
    client = MlflowClient(store["uri"])
    runs = trial_runs(client, "ray-four")
    assert len(runs) == 4 and len({r.data.tags["kb.trial_key"] for r in runs}) == 4
    assert {r.data.tags["kb.status"] for r in runs} == {"finished"}
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {outcome.parent_run_id}
    for run in runs:
        assert metric_steps(client, run.info.run_id, "train/loss") == list(range(1, 31))
        assert duplicate_steps(client, run) == {}
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    overlapping = sum(1 for a, b in zip(spans, spans[1:], strict=False) if b[0] < a[1])
    assert overlapping >= 1, f"no two trials ran at once: {spans}"
    assert len({row["node_id"] for row in seen.values()}) == 2, "the trials did not use both worker nodes"


@pytest.mark.slow
def test_ray_and_local_executor_leave_the_same_keys(cluster, store, tmp_path):
    """One trial through each executor: the same metric, param, tag and artifact names, the same report keys."""
    from reports.collect import collect

    names = {}
    for executor in ("ray", "local"):
        name = f"keys-{executor}"
        matrix = write_matrix(tmp_path / f"{name}.toml", name, train={"steps": 10, "eval_interval": 5})
        outcome, _ = drive(matrix, store, tmp_path / "runs", cluster, executor=executor)
        assert [r.status for _, r in outcome.results] == ["finished"]
        names[executor] = name
    client = MlflowClient(store["uri"])

    def keys(name: str) -> dict[str, set]:
        (run,) = trial_runs(client, name)
        return {
            "metrics": {k for k in run.data.metrics if not k.startswith("system/")},
            "params": set(run.data.params),
            "tags": set(run.data.tags),
            "artifacts": {a.path for a in client.list_artifacts(run.info.run_id)},
        }

    assert keys(names["ray"]) == keys(names["local"])
    frames = {e: collect(store["uri"], n).runs for e, n in names.items()}
    # MLflow's system-metrics sampler logs on a timer: whether a 10-step run got a sample is timing, not executor
    columns = {e: {c for c in f.columns if not str(c).startswith("system/")} for e, f in frames.items()}
    assert columns["ray"] == columns["local"]


@pytest.mark.slow
def test_a_trial_of_two_processes_runs_ddp_through_torch_trainer_across_the_nodes(cluster, store, tmp_path):
    """--nproc 2 on Ray: Ray Train's TorchTrainer sets up the (gloo) process group on one CPU slot of each node;
    rank 0 logs into the trial's run, the same layout as one process."""
    matrix = write_matrix(tmp_path / "d.toml", "ray-ddp", train={"steps": 8, "eval_interval": 4})
    outcome, log = drive(matrix, store, tmp_path / "runs", cluster, nproc=2)
    ((spec, result),) = outcome.results
    assert result.status == "finished" and result.step == 8, log[-3000:]
    assert result.metrics["train/tokens"] == 8 * 2 * 4 * spec.dims.block_size  # 2 ranks x micro_batch 4
    client = MlflowClient(store["uri"])
    (run,) = trial_runs(client, "ray-ddp")
    assert run.data.tags["kb.status"] == "finished"
    assert metric_steps(client, run.info.run_id, "train/loss") == list(range(1, 9))
    assert duplicate_steps(client, run) == {}


# ----------------------------------------------------------------------------------------------- faults


def _kill_node(cluster, node_id: str) -> None:
    (node,) = [n for n in cluster.worker_nodes if n.node_id == node_id]
    cluster.remove_node(node, allow_graceful=False)
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")  # keep two worker nodes for the next kill


def _kill_worker(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)  # the Ray worker process running the trial (started by this test's cluster)


@pytest.mark.slow
def test_lost_node_or_worker_is_retried_and_resumes_from_checkpoint(cluster, store, tmp_path):
    steps = 150  # micro-batches of 32 rows: ~10 steps/s here, so a kill lands within a few steps of its moment
    matrix = write_matrix(
        tmp_path / "f.toml",
        "ray-faults",
        train={
            "steps": steps,
            "micro_batch_size": 32,
            "checkpoint_interval": 5,
            "log_interval": 5,
            "eval_interval": 50,
        },
    )
    latest: dict[str, dict] = {}
    t, box = in_thread(drive, matrix, store, tmp_path / "runs", cluster, lambda s: latest.update(s), 3)
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    moments = [rng.randint(lo, hi) for lo, hi in ((10, 40), (55, 90), (105, 135))]
    kills = []
    for attempt, (moment, kind) in enumerate(zip(moments, ("node", "worker", "node"), strict=True), 1):

        def at_moment(attempt=attempt, moment=moment):
            rows = list(latest.values())
            return rows and rows[0].get("attempts") == attempt and rows[0].get("step", 0) >= moment and rows[0]

        row = wait_for(at_moment, 240, f"attempt {attempt} to reach step {moment} (seed {seed})", 0.05)
        kills.append((kind, row["step"], row["node_id"][:8]))
        if kind == "node":
            _kill_node(cluster, row["node_id"])
        else:
            _kill_worker(row["pid"])
    outcome, log = joined(t, box, 300)
    ((spec, result),) = outcome.results
    client = MlflowClient(store["uri"])
    runs = trial_runs(client, "ray-faults")
    (run,) = runs
    logged = metric_steps(client, run.info.run_id, "train/loss")
    dups = duplicate_steps(client, run)
    attempts = list(latest.values())[0]["attempts"]
    n_dups = sum(map(len, dups.values()))
    print(
        f"\nfault test (seed {seed}): kills {kills}, attempts {attempts} (retries {attempts - 1}), runs "
        f"{len(runs)}, train/loss steps logged {len(logged)} of {steps}, duplicate steps {n_dups}"
    )
    assert all(step < steps for _, step, _ in kills), f"a kill came after training ended: {kills}"
    assert result.status == "finished" and result.step == steps, log[-3000:]
    assert attempts == 4, f"expected 3 retries, got {attempts - 1}"
    assert logged == list(range(1, steps + 1))
    assert dups == {}
    assert int(run.data.tags["kb.resumed_from_step"]) > 0
    assert run.data.tags["kb.status"] == "finished"


@pytest.mark.slow
def test_ctrl_c_on_the_driver_cancels_the_trials_and_marks_them_killed(cluster, store, tmp_path):
    # far more steps than the test waits for: on idle cores 400 steps ended before the Ctrl-C (a clean exit 0)
    matrix = write_matrix(
        tmp_path / "c.toml", "ray-ctrl-c", variants=("gpt", "kimi"), train={"steps": 20_000, "checkpoint_interval": 20}
    )
    client = MlflowClient(store["uri"])
    log = tmp_path / "driver.log"
    proc = popen_cli(
        [
            "run",
            "--matrix",
            str(matrix),
            "--executor",
            "ray",
            "--ray-address",
            cluster.address,
            "--tracking-uri",
            store["uri"],
            "--out",
            str(tmp_path / "runs"),
            "--cache-dir",
            store["cache"],
        ],
        cwd=tmp_path,
        env=child_env({LOOPBACK_ENV: "0"}),
        log=log,
    )
    try:

        def training() -> bool:
            if client.get_experiment_by_name("ray-ctrl-c") is None:
                return False
            runs = trial_runs(client, "ray-ctrl-c")
            return len(runs) == 2 and all(metric_steps(client, r.info.run_id, "train/loss") for r in runs)

        wait_for(training, 240, "both trials to log steps", 0.5)
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C: the driver process this test started
        assert finish(proc, 120) == 130, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            kill_group(proc)
    runs = trial_runs(client, "ray-ctrl-c")
    assert {r.data.tags["kb.status"] for r in runs} == {"killed"}, log.read_text()[-3000:]
    assert {r.info.status for r in runs} == {"KILLED"}
    (parent_id,) = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert client.get_run(parent_id).info.status == "KILLED"
    assert "interrupted" in log.read_text()


# ----------------------------------------------------------------------------------------------- studies


@pytest.mark.slow
def test_tune_two_workers_adds_exactly_four_per_arm_two_at_once(cluster, store, tmp_path):
    import optuna
    from optuna.trial import TrialState

    from harness.executors.ray.tuning import tune_ray

    matrix = write_matrix(
        tmp_path / "t.toml",
        "ray-tune",
        variants=("gpt",),
        optimizers=("adamw", "muon"),
        train={"steps": 6, "eval_interval": 3, "log_interval": 3},
    )
    storage = f"journal:{tmp_path}/study.journal"
    outcome = tune_ray(
        matrix,
        n_workers=2,
        opts=RayOptions(address=cluster.address, poll_s=0.5),
        n_trials=4,
        total_trials=None,
        storage=storage,
        tracking_uri=store["uri"],
        console=_console(),
        cache_dir=store["cache"],
        out=tmp_path / "runs",
        pruner="none",
        system_metrics=False,
    )
    assert set(outcome.studies) == {"gpt+adamw", "gpt+muon"}
    from harness.tune import open_storage

    st = open_storage(storage)
    intervals = []
    for name in ("ray-tune/gpt+adamw", "ray-tune/gpt+muon"):
        trials = optuna.load_study(study_name=name, storage=st.storage).get_trials()
        assert len(trials) == 4 and {t.state for t in trials} == {TrialState.COMPLETE}, name
        intervals += [(t.datetime_start, t.datetime_complete) for t in trials]
    intervals.sort()
    assert any(b[0] < a[1] for a, b in zip(intervals, intervals[1:], strict=False)), "no two trials at once"
    assert sum(s.added for s in outcome.studies.values()) == 8


# ----------------------------------------------------------------------------------------------- rules


def test_without_the_extra_run_fails_in_one_line(tmp_path):
    fake = tmp_path / "no-ray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    matrix = write_matrix(tmp_path / "m.toml", "no-ray")
    env = child_env({"PYTHONPATH": f"{fake.parent}{os.pathsep}{REPO}"})
    proc = run_cli(["run", "--matrix", str(matrix), "--executor", "ray"], cwd=tmp_path, timeout=120, env=env)
    assert_one_line_error(proc, "--executor ray", "pip install -e '.[ray]'")


def test_the_local_path_never_imports_ray(tmp_path):
    import subprocess

    code = "import sys, cli, harness.executors.local, harness.tune, harness.executors; assert 'ray' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_local_stores_are_refused_on_several_machines_in_one_line(monkeypatch, cluster, store, tmp_path):
    import harness.executors.ray.cluster as rx

    two = {"127.0.0.1": ["a"], "10.0.0.2": ["b"]}  # what ray.nodes() gives for a cluster of two machines
    monkeypatch.setattr(rx, "cluster_hosts", lambda: two)
    matrix = write_matrix(tmp_path / "m.toml", "ray-refused")
    with pytest.raises(UserError) as e:
        drive(matrix, store, tmp_path / "runs", cluster)
    message = str(e.value)
    assert "\n" not in message and message.startswith("--tracking-uri sqlite:///") and "MLflow server" in message
    with pytest.raises(UserError, match=r"^--storage journal:/shared/s.journal: .*an RDB every node reaches"):
        check_shared_stores(two, storage="journal:/shared/s.journal")
    check_shared_stores(two, tracking_uri="http://mlflow:5000", storage="postgresql://db/optuna")  # servers: fine
    check_shared_stores({"127.0.0.1": ["a", "b"]}, tracking_uri=store["uri"])  # one machine: its file is shared
    assert MlflowClient(store["uri"]).get_experiment_by_name("ray-refused") is None  # refused before any run


def test_claims_are_exclusive_until_released_or_expired(monkeypatch):
    board = ClaimBoard()
    assert board.claim("k", "a", ttl=60) == "a"
    assert board.claim("k", "b", ttl=60) == "a"
    board.release("k", "b")  # not b's: no effect
    assert board.claim("k", "b", ttl=60) == "a"
    board.release("k", "a")
    assert board.claim("k", "b", ttl=60) == "b"
    assert board.claim("j", "a", ttl=-1) == "a"  # already expired: the next driver takes it
    assert board.claim("j", "b", ttl=60) == "b"
    assert board.renew("b", 60) == 2


def test_worker_quotas_add_up_to_the_trials_per_arm():
    assert worker_quotas(4, 2) == [2, 2]
    assert worker_quotas(5, 2) == [3, 2]
    assert worker_quotas(2, 3) == [1, 1]
    assert worker_quotas(None, 2) == [None, None]
    for n in range(1, 12):
        for w in range(1, 5):
            assert sum(worker_quotas(n, w)) == n


def test_a_tuning_worker_that_raised_is_reported_not_dropped():
    """A worker whose task failed (the team setup lost one to an experiment-creation race: 2 of 4 trials,
    exit 0) is one line naming the worker and its own error; the finished workers' results are kept."""

    class TaskError(Exception):  # ray.exceptions.RayTaskError's shape: the worker's exception as .cause
        def __init__(self, cause):
            super().__init__("ray.exceptions.RayTaskError(...): a page of traceback\n...")
            self.cause = cause

    class FakeRay:
        def get(self, ref, timeout=None):
            if isinstance(ref, Exception):
                raise ref
            return ref

    done = {"added": {"gpt+adamw": 2}}
    lost = TaskError(UserError("--tracking-uri http://u:secret@h:5000: cannot reach the tracking store (x)"))
    results, failures = worker_results(FakeRay(), [done, lost])
    assert results == [done]
    assert failures == [
        "tuning worker 1 on Ray: UserError: --tracking-uri http://h:5000: cannot reach the tracking store (x)"
    ]


def test_credentials_reach_tasks_through_the_environment_only(monkeypatch):
    uri = "http://alice:s3cret@mlflow.lan:5000"
    shown, env = secret_arg("tracking", uri)
    assert shown == "http://mlflow.lan:5000" and "s3cret" not in shown
    assert env == {"MLFLOW_TRACKING_URI": uri}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert resolve_secret("tracking", shown, True) == uri
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(RuntimeError, match="MLFLOW_TRACKING_URI is not set"):
        resolve_secret("tracking", shown, True)
    assert secret_arg("storage", "sqlite:///x.db") == ("sqlite:///x.db", {})


def test_the_matrix_ray_table_is_validated_in_one_line():
    opts = RayOptions.from_matrix({"num_cpus": 2, "max_retries": 1, "checkpoint_dir": "/shared/runs"}, "m.toml")
    assert (opts.num_cpus, opts.max_retries, opts.checkpoint_dir) == (2, 1, "/shared/runs")
    with pytest.raises(UserError, match=r"^m.toml: ray.num_gpu: unknown field; use num_cpus, num_gpus"):
        RayOptions.from_matrix({"num_gpu": 1}, "m.toml")
    with pytest.raises(UserError, match=r"^m.toml: ray.max_retries: "):
        RayOptions.from_matrix({"max_retries": -1}, "m.toml")
