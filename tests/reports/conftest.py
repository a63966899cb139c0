"""A real MLflow sqlite store following the names of harness/schema.py, built once per test session.

Experiment "paper-test": one matrix (parent) run; trials gpt+adamw and kimi+muon x seeds 0, 1, 2 (finished),
gpt+adamw seed 3 diverged at step 12, and a killed earlier run of kimi+muon seed 1 with the same trial key
(must be dropped). Plus a study run and a tune-trial run (kb.kind study / tune-trial) that are not trials.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

T0 = 1_750_000_000_000  # ms, 2025-06-15 15:06:40 UTC
STEPS = 20
EVAL_EVERY = 5
SEEDS = (0, 1, 2)
EXPERIMENT = "paper-test"
COMMAND = "kimi-bench run --matrix experiments/paper.toml"
GIT = "0123456789abcdef0123456789abcdef01234567"
NOISE = {0: -0.01, 1: 0.0, 2: 0.015, 3: 0.02}  # per-seed relative offsets

# Final metrics per arm (seed noise applied to the ones listed in NOISY)
FINALS = {
    "gpt+adamw": {
        "params/total": 74_000_000.0,
        "params/active": 74_000_000.0,
        "params/embedding": 19_300_000.0,
        "ckpt/bytes": 0.62e9,
        "mem/peak_bytes": 2.1e9,
        "train/flops_per_token": 4.4e8,
        "train/tokens_per_s": 1000.0,
        "infer/prefill_tokens_per_s": 9000.0,
        "infer/decode_tokens_per_s": 30.3,
        "infer/decode_tokens_per_s_b8": 200.0,
        "infer/ttft_s": 0.02,
        "infer/kv_bytes_per_token": 36864.0,
        "grad/norm_median": 0.8,
        "grad/norm_p99_over_median": 3.0,
        "grad/norm_cv": 0.5,
        "grad/norm_spikes": 2.0,
        "train/loss_spikes": 1.0,
        "val/loss_final": 3.127,
        "val/ppl_final": 22.8,
        "val/bpb": 1.70,
        "mem/param_bytes": 296e6,
        "mem/grad_bytes": 296e6,
        "mem/optim_state_bytes": 592e6,
    },
    "kimi+muon": {
        "params/total": 75_351_936.0,
        "params/active": 40_000_000.0,
        "params/embedding": 19_300_000.0,
        "ckpt/bytes": 0.58e9,
        "mem/peak_bytes": 2.5e9,
        "train/flops_per_token": 2.4e8,
        "train/tokens_per_s": 800.0,
        "infer/prefill_tokens_per_s": 8000.0,
        "infer/decode_tokens_per_s": 45.2,
        "infer/decode_tokens_per_s_b8": 201.0,
        "infer/ttft_s": 0.03,
        "infer/kv_bytes_per_token": 4608.0,
        "grad/norm_median": 0.6,
        "grad/norm_p99_over_median": 2.0,
        "grad/norm_cv": 0.3,
        "grad/norm_spikes": 0.0,
        "train/loss_spikes": 0.0,
        "val/loss_final": 2.896,
        "val/ppl_final": 18.1,
        "val/bpb": 1.55,
        "mem/param_bytes": 301e6,
        "mem/grad_bytes": 301e6,
        "mem/optim_state_bytes": 301e6,
        "moe/load_cv": 0.1,
        "moe/max_load": 0.3,
        "moe/dropped": 0.0,
        "attn/max_logit": 12.5,
    },
}
NOISY = {
    "val/bpb",
    "train/tokens_per_s",
    "infer/decode_tokens_per_s",
    "infer/decode_tokens_per_s_b8",
    "grad/norm_cv",
    "grad/norm_p99_over_median",
    "val/loss_final",
    "val/ppl_final",
    "mem/peak_bytes",
}
# decode b8 gets a seed pattern of opposite sign per arm so that the Kimi - GPT CI straddles zero
B8_NOISE = {"gpt+adamw": {0: 0.03, 1: -0.02, 2: 0.0, 3: 0.0}, "kimi+muon": {0: -0.03, 1: 0.02, 2: 0.01}}


# Controlled speed runs (kb.kind=speed), one per model shape: (median, iqr, n) per metric. gpt's decode at batch 8
# is noisy (IQR 25% of the median); kimi decodes faster at batch 1 with bands apart; train step per optimizer.
SPEED = {
    "gpt": {
        "speed/prefill_tokens_per_s": (9000.0, 300.0, 20),
        "speed/ttft_s": (0.02, 0.001, 20),
        "speed/decode_tokens_per_s_b1": (30.0, 1.0, 20),
        "speed/decode_tokens_per_s_b8": (200.0, 50.0, 20),
        "speed/adamw/step_s": (0.5, 0.01, 15),
        "speed/adamw/fwd_bwd_s": (0.4, 0.01, 15),
        "speed/adamw/optim_s": (0.1, 0.005, 15),
        "speed/adamw/train_tokens_per_s": (2048.0, 40.0, 15),
        "speed/adamw/peak_bytes": (2.0e9, 1.0e7, 2),
    },
    "kimi": {
        "speed/prefill_tokens_per_s": (8000.0, 200.0, 20),
        "speed/ttft_s": (0.03, 0.001, 20),
        "speed/decode_tokens_per_s_b1": (45.0, 1.5, 20),
        "speed/decode_tokens_per_s_b8": (210.0, 5.0, 20),
        "speed/muon/step_s": (0.6, 0.01, 15),
        "speed/muon/fwd_bwd_s": (0.45, 0.01, 15),
        "speed/muon/optim_s": (0.15, 0.005, 15),
        "speed/muon/train_tokens_per_s": (1700.0, 30.0, 15),
        "speed/muon/peak_bytes": (2.2e9, 1.0e7, 2),
    },
}
KV_BYTES = {"gpt": 36864.0, "kimi": 4608.0}
# Paired ratios between the two shapes' speed runs (median, lo, hi, n rounds), on the run of the ratio's A:
# kimi decodes 1.5x faster at batch 1 (interval above 1), batch 8 straddles 1; the train-step ratio is logged
# on gpt's run only (gpt+adamw / kimi+muon = 1.2), so kimi/gpt is read inverted (0.833: not supported)
RATIOS = {
    "kimi": {
        "speed/ratio/decode_tokens_per_s_b1/vs/shape-gpt/decode_tokens_per_s_b1": (1.5, 1.45, 1.55, 20),
        "speed/ratio/decode_tokens_per_s_b8/vs/shape-gpt/decode_tokens_per_s_b8": (1.05, 0.95, 1.15, 20),
    },
    "gpt": {"speed/ratio/adamw/train_tokens_per_s/vs/shape-kimi/muon/train_tokens_per_s": (1.2, 1.16, 1.25, 15)},
}


@dataclass
class Store:
    uri: str
    root: Path
    experiment: str
    experiment_id: str
    parent_id: str
    finals: dict = field(default_factory=dict)  # run_id -> {metric: value} logged as final
    runs: dict = field(default_factory=dict)  # (arm, seed, status) -> run_id
    steps: dict = field(default_factory=dict)  # run_id -> {key: [steps]}


def final_value(arm: str, seed: int, key: str) -> float:
    base = FINALS[arm][key]
    if key == "infer/decode_tokens_per_s_b8":
        return base * (1 + B8_NOISE[arm][seed])
    return base * (1 + NOISE[seed]) if key in NOISY else base


def _history(arm: str, seed: int, last: int, t0: int, diverge: bool) -> list[Metric]:
    speed = 0.05 if arm.startswith("gpt") else 0.0625
    gn = 0.8 if arm.startswith("gpt") else 0.4
    ms = []
    for s in range(last + 1):
        ts = t0 + 1000 * (s + 1)
        loss = 4.0 * math.exp(-s / 8) + (1.6 if arm.startswith("gpt") else 1.4) + 0.05 * math.sin(s + seed)
        if diverge and s > last - 4:
            loss = 5.0 * 2 ** (s - last + 4)
        ms += [
            Metric("train/loss", loss, ts, s),
            Metric("grad/norm", gn * (1 + 0.3 * math.cos(s * (seed + 1))), ts, s),
            Metric("train/lr", 1e-3, ts, s),
            Metric("train/tokens", 1024.0 * (s + 1), ts, s),
            Metric("train/elapsed_s", speed * (s + 1) * (1 + NOISE[seed]), ts, s),
            Metric("train/tokens_per_s", 1024 / speed, ts, s),
        ]
        if s % EVAL_EVERY == 0 or s == STEPS - 1:
            val = loss + 0.1
            ms += [Metric("val/loss", val, ts, s), Metric("val/ppl", math.exp(val), ts, s)]
    return ms


def _moe_csv(path: Path, seed: int) -> Path:
    lines = ["step,layer,expert,load"]
    for step in (0, 10, 19):
        raw = [1.0 + ((e + step + seed) % 4) * (0.5 if step == 0 else 0.1) for e in range(4)]
        for layer in (1, 2):
            for e, r in enumerate(raw):
                lines.append(f"{step},{layer},{e},{r / sum(raw):.6f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _trial(client: MlflowClient, st: Store, arm: str, seed: int, status: str, start: int, last: int = STEPS - 1) -> str:
    variant, optimizer = arm.split("+")
    tags = {
        "kb.kind": "trial",
        "mlflow.parentRunId": st.parent_id,
        "kb.trial_key": f"key-{arm}-{seed}",
        "kb.arm": arm,
        "kb.variant": variant,
        "kb.optimizer": optimizer,
        "kb.preset": "tiny",
        "kb.seed": str(seed),
        "kb.status": status,
        "kb.git_commit": GIT,
        "kb.device": "cpu",
        "kb.torch_version": "2.13.0",
        "kb.data_hash": "d00dfeed",
        "kb.shape": f"shape-{variant}",
    }
    if arm == "kimi+muon":
        tags["kb.tuned_from"] = "study=kimi-tune trial=7"
    run = client.create_run(st.experiment_id, start_time=start, tags=tags, run_name=f"{arm}-s{seed}")
    rid = run.info.run_id
    metrics = _history(arm, seed, last, start, diverge=status == "diverged")
    finals = {}
    end_ts = start + 1000 * (last + 2)
    if status == "finished":
        finals = {k: final_value(arm, seed, k) for k in FINALS[arm]}
    elif status == "diverged":
        finals = {"params/total": FINALS[arm]["params/total"], "train/diverged_step": float(last)}
    metrics += [Metric(k, v, end_ts, last) for k, v in finals.items()]
    params = [
        Param("model.n_layer", "4"),
        Param("optim.lr", "0.001"),
        Param("train.steps", str(STEPS)),
        Param("data.corpus", "python-stdlib"),
        Param("train.seed", str(seed)),
    ]
    client.log_batch(rid, metrics=metrics, params=params, tags=[RunTag("note", "fixture")])
    if variant == "kimi" and status == "finished":
        client.log_artifact(rid, str(_moe_csv(st.root / f"moe_load_{rid}" / "moe_load.csv", seed)))
    mlflow_status = {"finished": "FINISHED", "killed": "KILLED"}.get(status, "FAILED")
    client.set_terminated(rid, mlflow_status, end_time=end_ts)
    st.finals[rid] = finals
    st.runs[(arm, seed, status)] = rid
    st.steps[rid] = {"train/loss": list(range(last + 1))}
    return rid


def build_store(root: Path) -> Store:
    root.mkdir(parents=True, exist_ok=True)
    (root / "art").mkdir(exist_ok=True)
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "art").as_uri())
    client.create_experiment("another-experiment", artifact_location=(root / "art2").as_uri())
    parent = client.create_run(
        exp_id, start_time=T0, tags={"kb.kind": "matrix", "kb.command": COMMAND, "kb.git_commit": GIT}
    )
    st = Store(uri, root, EXPERIMENT, exp_id, parent.info.run_id)
    t = T0 + 60_000
    # the killed first attempt of kimi+muon seed 1 (same trial key as its finished rerun)
    _trial(client, st, "kimi+muon", 1, "killed", t, last=7)
    for i, (arm, seed) in enumerate((a, s) for a in FINALS for s in SEEDS):
        _trial(client, st, arm, seed, "finished", t + 60_000 * (i + 1))
    _trial(client, st, "gpt+adamw", 3, "diverged", t + 60_000 * 10, last=12)
    # not trials: must be ignored
    study = client.create_run(exp_id, start_time=T0 + 3_600_000, tags={"kb.kind": "study"})
    client.create_run(
        exp_id,
        start_time=T0 + 3_600_001,
        tags={
            "kb.kind": "tune-trial",
            "mlflow.parentRunId": study.info.run_id,
            "kb.arm": "gpt+adamw",
            "kb.seed": "0",
            "kb.trial_key": "key-gpt+adamw-0",
        },
    )
    for i, (variant, metrics) in enumerate(SPEED.items()):
        opt = "adamw" if variant == "gpt" else "muon"
        run = client.create_run(
            exp_id,
            start_time=T0 + 3_000_000 + i,
            tags={
                "kb.kind": "speed",
                "kb.shape": f"shape-{variant}",
                "kb.variant": variant,
                "kb.preset": "tiny",
                "kb.device": "cpu",
                "kb.threads": "1",
                "kb.parent_run": parent.info.run_id,
                "kb.optimizers": opt,
                "mlflow.parentRunId": parent.info.run_id,
            },
        )
        ms = [Metric("speed/kv_bytes_per_token", KV_BYTES[variant], T0, 0)]
        for k, (med, iqr, n) in metrics.items():
            ms += [Metric(k, med, T0, 0), Metric(k + "_iqr", iqr, T0, 0), Metric(k + "_n", float(n), T0, 0)]
        for k, (med, lo, hi, n) in RATIOS[variant].items():
            ms += [
                Metric(k, med, T0, 0),
                Metric(k + "_lo", lo, T0, 0),
                Metric(k + "_hi", hi, T0, 0),
                Metric(k + "_n", float(n), T0, 0),
            ]
        client.log_batch(run.info.run_id, metrics=ms, params=[Param("model.n_layer", "4")])
        client.set_terminated(run.info.run_id, "FINISHED")
        st.runs[("speed", variant)] = run.info.run_id
    client.set_terminated(parent.info.run_id, "FINISHED", end_time=T0 + 7_200_000)
    return st


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Store:
    return build_store(tmp_path_factory.mktemp("mlflow"))


@pytest.fixture(scope="session")
def collected(store):
    from reports.collect import collect

    return collect(store.uri, store.experiment)
