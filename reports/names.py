"""Every MLflow tag, param and metric name the reports read, in one place.

harness/schema.py (helper "house") will hold the project's names; until it is merged these constants are the
reports' copy, so pointing them at harness.schema is a one-file change. No logic here.
"""

from __future__ import annotations

# ---------------------------------------------------------------- run kinds (tag kb.kind)
KIND = "kb.kind"
KIND_TRIAL, KIND_MATRIX, KIND_SPEED, KIND_STUDY = "trial", "matrix", "speed", "study"

# ---------------------------------------------------------------- tags
TAG_TRIAL_KEY = "kb.trial_key"
TAG_ARM, TAG_VARIANT, TAG_OPTIMIZER = "kb.arm", "kb.variant", "kb.optimizer"
TAG_PRESET, TAG_SEED = "kb.preset", "kb.seed"
TAG_STATUS, TAG_GIT, TAG_DEVICE, TAG_TORCH = "kb.status", "kb.git_commit", "kb.device", "kb.torch_version"
TAG_DATA_HASH, TAG_TUNED_FROM, TAG_PARENT = "kb.data_hash", "kb.tuned_from", "mlflow.parentRunId"
TAG_COMMAND, TAG_SHAPE, TAG_THREADS = "kb.command", "kb.shape", "kb.threads"
TAG_SPEED_PARENT, TAG_SPEED_OPTIMIZERS = "kb.parent_run", "kb.optimizers"

# ---------------------------------------------------------------- params that do not make a configuration
# (the seed and what the trial key also ignores); data_seed counts only when it differs from the seed
SEED_PARAMS = ("seed", "train.seed")
DATA_SEED_PARAM = "data_seed"
COSMETIC_PARAMS = ("train.device", "train.compile", "train.log_interval", "train.checkpoint_interval")
# params that name the arm rather than the budget: they may differ between arms of one comparison
ARM_PARAM_PREFIXES = ("model.", "optim.")
ARM_PARAMS = ("variant", "optimizer", "preset")
# the [match] section of a matrix, as params of the matrix (parent) run or of the trials, when logged
MATCH_BY, MATCH_REFERENCE, MATCH_TOLERANCE = "match.by", "match.reference", "match.tolerance"

# ---------------------------------------------------------------- metrics of a trial
VAL_LOSS, VAL_PPL, VAL_BPB = "val/loss", "val/ppl", "val/bpb"
VAL_LOSS_FINAL, VAL_PPL_FINAL = "val/loss_final", "val/ppl_final"
TRAIN_LOSS, GRAD_NORM = "train/loss", "grad/norm"
TRAIN_TOKENS, TRAIN_ELAPSED = "train/tokens", "train/elapsed_s"
TRAIN_TOKENS_PER_S = "train/tokens_per_s"           # observed during training (not a benchmark)
FLOPS_PER_TOKEN = "train/flops_per_token"
PARAMS_TOTAL, PARAMS_ACTIVE, PARAMS_EMBEDDING = "params/total", "params/active", "params/embedding"
CKPT_BYTES = "ckpt/bytes"
MEM_PEAK = "mem/peak_bytes"                          # CUDA trials only (max_memory_allocated)
MEM_PARAM, MEM_GRAD, MEM_OPTIM = "mem/param_bytes", "mem/grad_bytes", "mem/optim_state_bytes"
INFER_KV_BYTES = "infer/kv_bytes_per_token"          # older trials; speed runs log SPEED_KV_BYTES

# ---------------------------------------------------------------- metrics of a speed run (kb.kind=speed)
SPEED_PREFILL = "speed/prefill_tokens_per_s"
SPEED_TTFT = "speed/ttft_s"
SPEED_DECODE = "speed/decode_tokens_per_s_b{batch}"
SPEED_KV_BYTES = "speed/kv_bytes_per_token"
SPEED_OPT = "speed/{optimizer}/{what}"               # what: step_s, fwd_bwd_s, optim_s, train_tokens_per_s, peak_bytes
IQR_SUFFIX, N_SUFFIX = "_iqr", "_n"


def speed_decode(batch: int) -> str:
    return SPEED_DECODE.format(batch=batch)


def speed_opt(optimizer: str, what: str) -> str:
    return SPEED_OPT.format(optimizer=optimizer, what=what)
