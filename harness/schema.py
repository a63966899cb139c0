"""What kimi-bench writes to MLflow, named once: tags, run kinds, statuses, metric and param names, the trial
key, parameter flattening and credential stripping.

harness/ writes these names and reports/ reads them, so both import this module; it imports neither torch nor
mlflow (nothing here runs a trial). docs/design.md describes the runs and what each name means.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

# ----------------------------------------------------------------------------- run kinds (tag kb.kind)
TAG_KIND = KIND = "kb.kind"  # KIND: the name reports/ uses
KIND_TRIAL = "trial"  # one training run of a matrix (child of the matrix run)
KIND_MATRIX = "matrix"  # the parent run of one `kimi-bench run` invocation
KIND_STUDY = "study"  # one Optuna study of one arm (`kimi-bench tune`)
KIND_TUNE_TRIAL = "tune-trial"  # one Optuna trial: trained like a matrix trial, child of its study run
KIND_SPEED = "speed"  # controlled speed/memory measurements of one model shape (child of the matrix run)
KINDS = (KIND_TRIAL, KIND_MATRIX, KIND_STUDY, KIND_TUNE_TRIAL, KIND_SPEED)

# ----------------------------------------------------------------------------- tags
KB_PREFIX = "kb."  # every kimi-bench tag starts with it
# identity of a trial
TAG_TRIAL_KEY = "kb.trial_key"  # trial_key() below: reruns of the same spec share it
TAG_ARM = "kb.arm"  # "{variant}+{optimizer}"
TAG_VARIANT = "kb.variant"
TAG_OPTIMIZER = "kb.optimizer"
TAG_PRESET = "kb.preset"
TAG_SEED = "kb.seed"
TAG_EXPERIMENT = "kb.experiment"
TAG_SHAPE = "kb.shape"  # 12-hex hash of {variant, model.* params}: trials and speed runs of one shape share it
TAG_TUNED_FROM = "kb.tuned_from"  # the study a trial's hyperparameters came from
# outcome of a trial
TAG_STATUS = "kb.status"  # one of STATUSES
TAG_FINAL_STEP = "kb.final_step"
TAG_ERROR = "kb.error"  # first line of the error, at most 500 characters
TAG_RESUMED_FROM_STEP = "kb.resumed_from_step"
# liveness of a RUNNING trial (harness/status.py shows one whose process is gone as `stale`)
TAG_HOST = "kb.host"  # the machine of the process that logs the run (os.uname().nodename)
TAG_PID = "kb.pid"  # that process's id on TAG_HOST
TAG_HEARTBEAT = "kb.heartbeat"  # unix seconds, renewed with the metric batches at most every HEARTBEAT_S
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0  # no heartbeat for this long (a long eval or checkpoint fits well within it): stale
TAG_MODEL_PATH = "kb.model_path"  # absolute path of the finished trial's model.pt (kimi-bench export --run)
TAG_CURVES = "kb.curves"  # set once the run's curves artifact (ARTIFACT_CURVES, harness/stores/curves.py) is logged
# environment, on every run of a matrix
TAG_GIT = "kb.git_commit"  # commit + "-dirty" with uncommitted changes
TAG_TORCH = "kb.torch_version"
TAG_DEVICE = "kb.device"  # "cpu" or the CUDA device name
TAG_DATA_HASH = "kb.data_hash"
TAG_THREADS = "kb.threads"  # torch threads of a trial or speed run (CPU results depend on it)
# matrix (parent) runs
TAG_COMMAND = "kb.command"  # the command line that started the matrix
TAG_MATRIX_FILE = "kb.matrix_file"
TAG_N_TRIALS = "kb.n_trials"
# speed runs
TAG_SPEED_PARENT = "kb.parent_run"  # the matrix run id
TAG_MATRIX_RUN = "kb.matrix_run"  # the parent run (matrix) of the invocation that last ran or reused this run
TAG_SPEED_OPTIMIZERS = "kb.optimizers"  # comma-separated optimizer names measured with this shape
TAG_SPEED_CPUS = "kb.cpus"  # CPUs the measuring thread was pinned to ("0,1"), or "unpinned" (CUDA, or no OS support)
# Optuna study runs and their trials
TAG_STUDY = "kb.study"
TAG_MATRIX = "kb.matrix"
TAG_OBJECTIVE = "kb.objective"
TAG_SAMPLER = "kb.sampler"
TAG_SAMPLER_SEED = "kb.sampler_seed"
TAG_PRUNER = "kb.pruner"
TAG_SEARCH_SPACE = "kb.search_space"
TAG_OPTUNA_STORAGE = "kb.optuna_storage"  # credentials stripped
TAG_OPTUNA_TRIAL = "kb.optuna_trial"
TAG_OPTUNA_STATE = "kb.optuna_state"
TAG_OPTUNA_VALUE = "kb.optuna_value"
TAG_BEST_TRIAL = "kb.best_trial"
TAG_BEST_VALUE = "kb.best_value"
TAG_BEST_PARAMS = "kb.best_params"
TAG_BEST_RUN_ID = "kb.best_run_id"
# MLflow's own tags that kimi-bench sets or reads
TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"  # MLflow 3's UI opens an untagged experiment in its GenAI view
EXPERIMENT_KIND_TRAINING = "custom_model_development"
TAG_SOURCE_GIT = "mlflow.source.git.commit"
TAG_SOURCE_NAME = "mlflow.source.name"
TAG_SOURCE_TYPE = "mlflow.source.type"
TAG_NOTE = "mlflow.note.content"  # the run or experiment page's "Description"

TAG_RECORD_RUN_ID = "kb.record_run_id"  # harness.stores.runrecord: the id a recorded (offline) run was written under
TAG_RECORD_IMPORT = "kb.record_import"  # harness.stores.runrecord: set on a run imported from a record

TAGS = tuple(v for k, v in dict(globals()).items() if k.startswith("TAG_") and v.startswith("kb."))

# tag -> column of the reports' trial frame (reports.collect)
TRIAL_TAG_COLUMNS = {
    TAG_TRIAL_KEY: "trial_key",
    TAG_ARM: "arm",
    TAG_VARIANT: "variant",
    TAG_OPTIMIZER: "optimizer",
    TAG_PRESET: "preset",
    TAG_SEED: "seed",
    TAG_STATUS: "status",
    TAG_GIT: "git_commit",
    TAG_DEVICE: "device",
    TAG_TORCH: "torch_version",
    TAG_DATA_HASH: "data_hash",
    TAG_TUNED_FROM: "tuned_from",
    TAG_PARENT: "parent_run_id",
    TAG_SHAPE: "shape",
    TAG_CURVES: "curves_artifact",
    TAG_THREADS: "threads",
}
# tag -> column of the reports' speed frame
SPEED_TAG_COLUMNS = {
    TAG_SHAPE: "shape",
    TAG_VARIANT: "variant",
    TAG_PRESET: "preset",
    TAG_DEVICE: "device",
    TAG_THREADS: "threads",
    TAG_SPEED_PARENT: "parent_run_id",
    TAG_SPEED_OPTIMIZERS: "optimizers",
    TAG_GIT: "git_commit",
    TAG_SPEED_CPUS: "cpus",
}
ERROR_CHARS = 500  # kb.error holds at most this many characters
ARTIFACT_CURVES = "curves.json"  # a trial's thinned learning curves (harness/stores/curves.py), read by reports
ARTIFACT_MOE_LOAD = "moe_load.csv"  # a MoE trial's expert loads at each eval: step, layer, expert, load

# ----------------------------------------------------------------------------- trial statuses (tag kb.status)
FINISHED = "finished"
RUNNING = "running"  # set when a run starts; left behind by a process that died
DIVERGED = "diverged"  # non-finite training loss (the step is logged as train/diverged_step)
OOM = "oom"
KILLED = "killed"  # Ctrl-C
FAILED = "failed"  # any other error (kb.error, error.txt artifact)
PRUNED = "pruned"  # stopped early by Optuna
STATUSES = (FINISHED, RUNNING, DIVERGED, OOM, KILLED, FAILED, PRUNED)
# A rerun skips these (they would repeat); killed, running (a dead process) and failed (e.g. a bug fixed since)
# are resumed into the same run.
TERMINAL = frozenset({FINISHED, DIVERGED, OOM, PRUNED})
# kb.status -> MLflow's run status
MLFLOW_RUN_STATUS = {
    FINISHED: "FINISHED",
    DIVERGED: "FAILED",
    OOM: "FAILED",
    FAILED: "FAILED",
    PRUNED: "FINISHED",
    KILLED: "KILLED",
}
# MLflow's run status -> kb.status, for a run that died before it was tagged
STATUS_FROM_MLFLOW = {
    "FINISHED": FINISHED,
    "FAILED": FAILED,
    "KILLED": KILLED,
    "RUNNING": RUNNING,
    "SCHEDULED": RUNNING,
}

# ----------------------------------------------------------------------------- step metrics of a trial
TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
TRAIN_LR_FACTOR = "train/lr_factor"  # warmup + cosine factor in [min_lr_ratio, 1]
TRAIN_TOKENS = "train/tokens"
TRAIN_ELAPSED = "train/elapsed_s"
TRAIN_TOKENS_PER_S = "train/tokens_per_s"  # observed during training (evals excluded), not a benchmark
GRAD_NORM = "grad/norm"  # before clipping
VAL_LOSS = "val/loss"  # mean token NLL (nats) over the fixed validation set
VAL_PPL = "val/ppl"  # exp(val/loss)
VAL_BPB = "val/bpb"  # bits per byte: mean NLL * n_tokens / n_bytes / ln 2
MOE_LOAD_CV = "moe/load_cv"  # coefficient of variation of the tokens per expert, averaged over MoE layers
MOE_MAX_LOAD = "moe/max_load"  # max over layers of (busiest expert's tokens / mean tokens per expert)
ATTN_MAX_LOGIT = "attn/max_logit"  # the largest pre-softmax attention score (what QK-Clip caps)
STEP_METRICS = (
    TRAIN_LOSS,
    TRAIN_LR,
    TRAIN_LR_FACTOR,
    TRAIN_TOKENS,
    TRAIN_ELAPSED,
    TRAIN_TOKENS_PER_S,
    GRAD_NORM,
    VAL_LOSS,
    VAL_PPL,
    VAL_BPB,
    MOE_LOAD_CV,
    MOE_MAX_LOAD,
    ATTN_MAX_LOGIT,
)

# ----------------------------------------------------------------------------- final metrics of a trial
PARAMS_TOTAL = "params/total"
PARAMS_ACTIVE = "params/active"  # per token: shared + top-k routed experts
PARAMS_EMBEDDING = "params/embedding"
FLOPS_PER_TOKEN = "train/flops_per_token"
TRAIN_SECONDS = "train/seconds"
TRAIN_MFU = "train/mfu"  # CUDA only
TRAIN_LOSS_SPIKES = "train/loss_spikes"
TRAIN_DIVERGED_STEP = "train/diverged_step"
GRAD_NORM_MEDIAN = "grad/norm_median"
GRAD_NORM_P99_OVER_MEDIAN = "grad/norm_p99_over_median"
GRAD_NORM_CV = "grad/norm_cv"
GRAD_NORM_SPIKES = "grad/norm_spikes"  # norms above SPIKE_FACTOR x the rolling median (harness.trial.metrics)
VAL_LOSS_FINAL = "val/loss_final"
VAL_PPL_FINAL = "val/ppl_final"
VAL_BPB_FINAL = "val/bpb_final"
MOE_DROPPED = "moe/dropped"  # always 0: dropless dispatch
CKPT_BYTES = "ckpt/bytes"
MEM_PEAK = "mem/peak_bytes"  # CUDA: max_memory_allocated of the trial
MEM_PARAM = "mem/param_bytes"
MEM_GRAD = "mem/grad_bytes"
MEM_OPTIM = "mem/optim_state_bytes"
TRACK_LOG_S = "track/log_s"  # time the training thread spent in logging calls
TRACK_OVERHEAD_FRAC = "track/overhead_frac"
# single-shot inference figures of trial runs before the speed runs existed (reports still read old stores)
INFER_PREFIX = "infer/"
INFER_PREFILL = "infer/prefill_tokens_per_s"
INFER_DECODE = "infer/decode_tokens_per_s"  # batch 1; other batches: infer_decode(b)
INFER_TTFT = "infer/ttft_s"
INFER_KV_BYTES = "infer/kv_bytes_per_token"
LEGACY_INFER_METRICS = (INFER_PREFILL, INFER_DECODE, "infer/decode_tokens_per_s_b8", INFER_TTFT, INFER_KV_BYTES)
FINAL_METRICS = (
    PARAMS_TOTAL,
    PARAMS_ACTIVE,
    PARAMS_EMBEDDING,
    CKPT_BYTES,
    MEM_PEAK,
    MEM_PARAM,
    MEM_GRAD,
    MEM_OPTIM,
    FLOPS_PER_TOKEN,
    TRAIN_TOKENS_PER_S,
    TRAIN_MFU,
    GRAD_NORM_MEDIAN,
    GRAD_NORM_P99_OVER_MEDIAN,
    GRAD_NORM_CV,
    GRAD_NORM_SPIKES,
    TRAIN_LOSS_SPIKES,
    VAL_LOSS_FINAL,
    VAL_PPL_FINAL,
    VAL_BPB,
    MOE_LOAD_CV,
    MOE_MAX_LOAD,
    MOE_DROPPED,
    ATTN_MAX_LOGIT,
    TRAIN_DIVERGED_STEP,
)


def infer_decode(batch: int) -> str:
    """Legacy per-trial decode throughput at one batch size (batch 1 has no suffix)."""
    return INFER_DECODE if batch == 1 else f"{INFER_DECODE}_b{batch}"


# final metrics as columns of the reports' trial frame, in table order: FINAL_METRICS plus the training totals
# and the legacy inference figures that older stores hold
REPORTED_FINAL_METRICS = (
    PARAMS_TOTAL,
    PARAMS_ACTIVE,
    PARAMS_EMBEDDING,
    CKPT_BYTES,
    MEM_PEAK,
    MEM_PARAM,
    MEM_GRAD,
    MEM_OPTIM,
    FLOPS_PER_TOKEN,
    TRAIN_TOKENS_PER_S,
    TRAIN_TOKENS,
    TRAIN_SECONDS,
    TRAIN_MFU,
    INFER_PREFILL,
    INFER_DECODE,
    infer_decode(8),
    INFER_TTFT,
    INFER_KV_BYTES,
    GRAD_NORM_MEDIAN,
    GRAD_NORM_P99_OVER_MEDIAN,
    GRAD_NORM_CV,
    GRAD_NORM_SPIKES,
    TRAIN_LOSS_SPIKES,
    VAL_LOSS_FINAL,
    VAL_PPL_FINAL,
    VAL_BPB,
    MOE_LOAD_CV,
    MOE_MAX_LOAD,
    MOE_DROPPED,
    ATTN_MAX_LOGIT,
    TRAIN_DIVERGED_STEP,
)


# ----------------------------------------------------------------------------- study runs (kb.kind=study)
STUDY_COUNT = "study/n_{state}"  # trials of the study per state: complete, pruned, fail, diverged
STUDY_BEST_VALUE = "study/best_value"


def study_count(state: str) -> str:
    return STUDY_COUNT.format(state=state)


# ----------------------------------------------------------------------------- speed runs (kb.kind=speed)
SPEED_PREFIX = "speed/"  # every speed-run metric starts with it
NOISY_REL_IQR = 0.10  # a timing whose IQR / median exceeds this is noisy: Timing.noisy and the report's verdicts
SPEED_PREFILL = "speed/prefill_tokens_per_s"
SPEED_TTFT = "speed/ttft_s"
SPEED_DECODE = "speed/decode_tokens_per_s_b{batch}"
SPEED_KV_BYTES = "speed/kv_bytes_per_token"  # exact: no _iqr / _n siblings
SPEED_OPT = "speed/{optimizer}/{what}"
SPEED_OPT_WHATS = ("step_s", "fwd_bwd_s", "optim_s", "train_tokens_per_s", "peak_bytes")
IQR_SUFFIX = "_iqr"  # same unit; for a throughput: tokens / q1_time - tokens / q3_time
N_SUFFIX = "_n"  # number of measurements (of a ratio: paired rounds)
# paired ratios (harness/measure/bench/ratios.py): this run's rate `what` over shape `shape`'s rate `other`, computed in
# each interleaved round; the value is the median over rounds, with _lo / _hi (95% interval) and _n siblings.
# `what` and `other` are speed metrics without the "speed/" prefix ("decode_tokens_per_s_b1",
# "muon/train_tokens_per_s"); `shape` is the other speed run's kb.shape.
SPEED_RATIO = "speed/ratio/{what}/vs/{shape}/{other}"
LO_SUFFIX = "_lo"
HI_SUFFIX = "_hi"
SPEED_ROUNDS = "speed/rounds"  # interleaved rounds timed in this invocation (all shapes together)
SPEED_TIMING_S = "speed/timing_s"  # wall seconds of that timing (warm-up included, building excluded)


def speed_decode(batch: int) -> str:
    return SPEED_DECODE.format(batch=batch)


def speed_opt(optimizer: str, what: str) -> str:
    if what not in SPEED_OPT_WHATS:
        raise ValueError(f"speed metric: unknown {what!r}; choices: {', '.join(SPEED_OPT_WHATS)}")
    return SPEED_OPT.format(optimizer=optimizer, what=what)


def speed_ratio(metric: str, shape: str, other_metric: str) -> str:
    """The ratio key of this run's `metric` over shape `shape`'s `other_metric` (full speed metric names)."""
    return SPEED_RATIO.format(
        what=metric.removeprefix(SPEED_PREFIX), shape=shape, other=other_metric.removeprefix(SPEED_PREFIX)
    )


def iqr_of(metric: str) -> str:
    return metric + IQR_SUFFIX


def n_of(metric: str) -> str:
    return metric + N_SUFFIX


# ----------------------------------------------------------------------------- params and the trial key
PARAM_SECTIONS = ("model", "optim", "train", "data")  # params are "<section>.<field>" plus the top-level ones
TOP_LEVEL_PARAMS = ("variant", "optimizer", "preset", "seed", "data_seed")
# params that do not change what a trial computes: left out of the trial key (a rerun on another device or
# with other logging intervals is the same trial)
COSMETIC_PARAMS = ("train.device", "train.compile", "train.log_interval", "train.checkpoint_interval")
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
# what the reports read from params: the seed and what the trial key also ignores do not make a configuration;
# data_seed counts only when it differs from the seed
SEED_PARAMS = ("seed", "train.seed")
DATA_SEED_PARAM = "data_seed"
# params that name the arm rather than the budget: they may differ between arms of one comparison
ARM_PARAM_PREFIXES = ("model.", "optim.")
# the warmup is tuned per arm (harness.tune.spaces: warmup_frac, warmup_steps unset): part of the arm's recipe,
# not of the budget every arm shares, so tuned arms stay in one group (reports/groups.py)
ARM_PARAMS = ("variant", "optimizer", "preset", "train.warmup_frac", "train.warmup_steps")
# the [match] section of a matrix, as params of the matrix (parent) run or of the trials, when logged
MATCH_BY, MATCH_REFERENCE, MATCH_TOLERANCE = "match.by", "match.reference", "match.tolerance"


def flatten_params(top: Mapping[str, Any], sections: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """{"seed": 0, ...} + {"model": {"dim": 64}} -> {"seed": 0, ..., "model.dim": 64} (values untouched)."""
    out = dict(top)
    for section, fields in sections.items():
        out.update({f"{section}.{k}": v for k, v in fields.items()})
    return out


def param_value(value: Any) -> str:
    """A param as MLflow stores it: strings as they are, anything else as JSON; credentials stripped."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return strip_credentials(text)[:MAX_PARAM_CHARS]


def trial_key(params: Mapping[str, Any], data_hash: str, code_version: str, experiment: str) -> str:
    """16 hex of sha256 over the params (cosmetic ones dropped), the data hash, code version and experiment."""
    spec = {k: v for k, v in params.items() if k not in COSMETIC_PARAMS}
    blob = json.dumps(
        {"spec": spec, "data": data_hash, "code": code_version, "exp": experiment}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- credentials
REDACTED = "***"
# query parameters whose value is a secret (substring match, any case): token, access_token, password,
# sslpassword, secret, api_key, sig, X-Amz-Signature, ...
_SECRET_QUERY_KEY = re.compile(r"token|pass(word|wd)?|pwd|secret|key|auth|credential|signature|sig", re.I)
_URI = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)([^\s\"'<>]*)")
_QUERY_PAIR = re.compile(r"([^&;=#]+)=([^&;#]*)")
# ODBC connect strings: `...;PWD=secret;...` or `Password={se;cret}`, raw or percent-encoded (`%3BPWD%3D...`);
# the name starts the text or follows a non-word character or an encoded `;`
_ODBC_PASSWORD = re.compile(
    r"((?:(?<=%3[Bb])|(?<![A-Za-z0-9_]))(?:PWD|Password))(=|%3[Dd])"
    r"(\{(?:[^}]|\}\})*\}|%7[Bb].*?%7[Dd]|[^;&\s\"'#]*?)(?=;|%3[Bb]|&|[\s\"'#]|$)",
    re.I,
)


def strip_credentials(text: str) -> str:
    """Remove secrets from every `scheme://...` URI in `text` so it can be printed, tagged or logged.

    - userinfo (`user:password@`, `token@`) is removed entirely: the user name alone can be a token (as in
      `https://<token>@host`), and which account logged in is not needed to read a run;
    - values of secret-looking query parameters (`token`, `password`, `key`, `secret`, `sig`, ...) become `***`;
    - the same for `name=value` pairs in the fragment (OAuth's implicit flow: `#access_token=T&...`);
    - host, port, path and every other query parameter are kept;
    - anywhere in the text, ODBC-style `PWD=...` / `Password=...` pairs (`;`-separated, a value may be
      `{braced}`), also percent-encoded as inside `odbc_connect=` (`%3BPWD%3DSECRET`), become `***`.
    `postgresql://u:pw@h:5432/db` -> `postgresql://h:5432/db`; `http://h:5000?token=x@y` ->
    `http://h:5000?token=***`. Text without `://` (file paths, `journal:PATH`, names) keeps everything but
    ODBC passwords; `sqlite:///path` has no authority and keeps its path. A password must percent-encode
    `/`, `?` and `#` (RFC 3986), otherwise its tail is read as the path.
    """
    return _ODBC_PASSWORD.sub(_redact_odbc, _URI.sub(_strip_one, text)) if text else text


def _redact_odbc(match: re.Match) -> str:
    return match.group(1) + match.group(2) + REDACTED


def _strip_one(match: re.Match) -> str:
    scheme, rest = match.group(1), match.group(2)
    end = next((i for i, c in enumerate(rest) if c in "/?#"), len(rest))
    authority, tail = rest[:end], rest[end:]
    host = authority.rpartition("@")[2]  # the last "@" ends the userinfo (an unencoded "@" in a password)
    return scheme + host + _redact_query(tail)


def _redact_query(tail: str) -> str:
    """Secret-looking `name=value` pairs of the query and of the fragment (`#access_token=...`)."""
    before, hash_sep, fragment = tail.partition("#")
    path, sep, query = before.partition("?")

    def redact(pair: re.Match) -> str:
        name = pair.group(1)
        return f"{name}={REDACTED}" if _SECRET_QUERY_KEY.search(name) else pair.group(0)

    return path + sep + _QUERY_PAIR.sub(redact, query) + hash_sep + _QUERY_PAIR.sub(redact, fragment)
