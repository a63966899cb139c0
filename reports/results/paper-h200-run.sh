#!/usr/bin/env bash
# The one prepared command of the paper-scale H200 run (reports/results/README.md says how and when to call it).
#
#   bash reports/results/paper-h200-run.sh --prepare    # HERE, once, no device time: .carry/ (wheels, data, commit)
#   bash reports/results/paper-h200-run.sh              # ON THE H200 (device `run`, carry [".carry"])
#   bash reports/results/paper-h200-run.sh --rehearse   # HERE, CPU: the whole path at the tiny preset, then
#                                                       # import into a temp sqlite MLflow and `kimi-bench report`
# Here, PY (default: the active venv's python, else .venv/bin/python) runs --prepare and --rehearse.
# Env: SEEDS="0 1" (a rerun after a cut-short run: SEEDS=1 STEPS=<the first run's>), WINDOW_S (training seconds the sizing aims at),
#      DEADLINE_S (no new seed starts when its predicted time would end past it), OUT.
#
# On the device everything lands in $OUT as it goes: run.log (the whole output), size.json (measured tokens/s
# per arm and the budget), env.txt, and record.tgz (the portable record, re-packed every 20 s and after each
# seed: $OUT brings back 8 files at most, 2 folders down, so the record folder travels packed; a pack that
# fails, say on a file appended while tar read it, is a warning and the next one retries).
# Before the sizing, the preflight (harness/measure/preflight.py): one bf16 train step and one decode step per
# arm, ~20 s; the run stops with one line if any fails. reports/gpu-common.sh holds what gpu-run.sh shares.
set -euo pipefail
cd "$(dirname "$0")/../.."
GC_NAME=paper-h200-run.sh
. reports/gpu-common.sh
MODE=${1:-device}
START=$(date +%s)
MATRIX=experiments/paper-h200.toml
CARRY=.carry
TRAIN_TOKENS=${TRAIN_TOKENS:-28000000}  # carried train tokens: 56 MB of uint16, inside the 64 MiB the working tree may take
VAL_TOKENS=${VAL_TOKENS:-600000}      # eval_tokens (524,288) + margin

log() { echo "[paper-h200 $(( $(date +%s) - START ))s] $*"; }

# make_bin CORPUS TOKENIZER VOCAB|- MAX_CHARS CACHE DEST N_TRAIN N_VAL: prepare the corpus (harness.data), then
# keep the first N tokens of each split as a bin: folder (its meta.json names no tokenizer: the run needs ids)
make_bin() {
  "$PY" - "$@" <<'PYEOF'
import json, sys
from pathlib import Path
import numpy as np
from harness.data import DataConfig, prepare
corpus, tokenizer, vocab, max_chars, cache, dest, n_train, n_val = sys.argv[1:]
data = prepare(DataConfig(corpus=corpus, tokenizer=tokenizer, vocab_size=None if vocab == "-" else int(vocab),
                          max_chars=int(max_chars), cache_dir=Path(cache)))
dest, counts = Path(dest), {}
dest.mkdir(parents=True, exist_ok=True)
for split, array, n in (("train", data.train, int(n_train)), ("val", data.val, int(n_val))):
    if len(array) < n:
        sys.exit(f"make_bin: {split} has {len(array):,} tokens, fewer than {n:,}; raise max_chars")
    np.asarray(array[:n]).tofile(dest / f"{split}.bin")
    counts[split] = n
(dest / "meta.json").write_text(json.dumps({
    "vocab_size": data.vocab_size, "dtype": str(data.train.dtype), "source_data_hash": data.data_hash,
    "corpus": corpus, "source_tokenizer": data.tokenizer.identity, "n_train_tokens": counts["train"],
    "n_val_tokens": counts["val"], "source_n_train_tokens": data.n_train_tokens,
    "source_n_val_tokens": data.n_val_tokens, "tokenizer_json": str((data.path / "tokenizer.json").resolve())},
    indent=1))
# the tokenizer (3.6 MB at 50257) stays in the cache here: the run needs ids only, and the carry is tight
print(f"bin: {dest}: {counts['train']:,} train + {counts['val']:,} val tokens of {corpus} "
      f"(of {data.n_train_tokens:,} + {data.n_val_tokens:,}; data hash {data.data_hash[:12]})")
PYEOF
}

pack_record() { gc_pack "$REC" "$OUT/record.tgz"; }  # the record as one file in $OUT (never fails the run)

preflight() {  # preflight MATRIX DEVICE: one bf16 train step + one decode step per arm; ends the run on a failure
  log "preflight on $2: one bf16 train step and one decode step per arm"
  gc_preflight 120 /dev/null "$PY" harness/measure/paper_h200.py preflight --matrix "$1" --device "$2" --cache-dir "$CACHE"
}

run_matrix() {  # run_matrix MATRIX DEVICE: size the budget, then one seed at a time into the record
  local matrix=$1 device=$2 steps per_seed seed elapsed
  if [ -n "${STEPS:-}" ]; then  # a rerun of missing seeds: the first run's step count, so the trials match
    steps=$STEPS per_seed=${PER_SEED_S:-90}
    log "budget given: $steps steps per trial (STEPS)"
  else
    log "sizing the budget on $device (window ${WINDOW_S}s of training)"
    steps=$("$PY" harness/measure/paper_h200.py size --matrix "$matrix" --window-s "$WINDOW_S" --device "$device" \
            --cache-dir "$CACHE" --out "$OUT/size.json" | tail -1)
    per_seed=$("$PY" -c "import json,sys; s=json.load(open(sys.argv[1])); print(int(s['predicted_train_s'] / int(sys.argv[2])) + 1)" \
               "$OUT/size.json" "$(echo $SEEDS | wc -w)")
  fi
  log "budget: $steps steps per trial; ~${per_seed}s of training per seed"
  for seed in $SEEDS; do
    elapsed=$(( $(date +%s) - START ))
    if [ $(( elapsed + per_seed * 2 )) -gt "$DEADLINE_S" ]; then  # x2: evals, inference benchmark, saves
      log "seed $seed not started: ${elapsed}s elapsed + ~$(( per_seed * 2 ))s > deadline ${DEADLINE_S}s; rerun with SEEDS=$seed"
      continue
    fi
    "$PY" harness/measure/paper_h200.py derive "$matrix" "$WORK/seed$seed.toml" --seed "$seed"
    log "seed $seed: kimi-bench run"
    "$PY" -m cli run --matrix "$WORK/seed$seed.toml" --tracking-uri "record:$REC" --out "$WORK/runs" \
      --cache-dir "$CACHE" --device "$device" --steps "$steps"
    pack_record
  done
}

case "$MODE" in
--prepare)  # here: wheels for what the GPU image lacks, the data as a bin: folder, the commit
  PY=$(gc_local_python pip harness.data numpy) || exit 2
  log "preparing $CARRY with $PY"
  gc_ignore '/.carry/'
  gc_prepare_wheels "$CARRY/wheels"
  # python-site (harness/data): this machine's stdlib + installed packages' .py files, split by file; BPE at
  # the paper's vocabulary trained on the train split; 130M characters give ~30M train tokens (3.9 chars/token)
  make_bin "${CORPUS:-python-site}" bpe 50257 130000000 "${CACHE:-.kimi-cache}" "$CARRY/paper-data" \
    "$TRAIN_TOKENS" "$VAL_TOKENS"
  gc_tree_commit > "$CARRY/COMMIT"
  du -sh "$CARRY"
  du -sb --exclude=.git --exclude=.venv --exclude=.kimi-cache --exclude=runs --exclude=mlflow.db . | \
    awk '{ if ($1 > 64 * 1048576) { print "working tree + .carry over 64 MiB: carry less"; exit 1 } }'
  log "prepared $CARRY; now the device run (reports/results/README.md)"
  ;;
--rehearse)  # here, CPU: the device path at the tiny preset, then import + report from MLflow
  PY=$(gc_local_python harness torch) || exit 2
  WORK=$(mktemp -d /tmp/kb-rehearse.XXXXXX)
  OUT=${OUT:-$WORK/out} CACHE="$WORK/cache" REC="$WORK/record"
  SEEDS=${SEEDS:-"0 1"} WINDOW_S=${WINDOW_S:-5} DEADLINE_S=${DEADLINE_S:-900}
  mkdir -p "$OUT"
  export OMP_NUM_THREADS=1 MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false PYTHONUNBUFFERED=1 KB_GIT_COMMIT=rehearsal
  make_bin python-stdlib byte - 400000 "$CACHE" "$WORK/bin" 300000 30000
  "$PY" harness/measure/paper_h200.py derive "$MATRIX" "$WORK/rehearse.toml" --rehearse --corpus "bin:$WORK/bin"
  preflight "$WORK/rehearse.toml" cpu
  run_matrix "$WORK/rehearse.toml" cpu
  mkdir -p "$WORK/unpacked" && tar -xzf "$OUT/record.tgz" -C "$WORK/unpacked"
  log "import into a temp sqlite MLflow, twice (the second adds nothing), then report"
  URI="sqlite:///$WORK/mlflow.db"
  "$PY" -m cli import "$WORK/unpacked/record" --tracking-uri "$URI"
  "$PY" -m cli import "$WORK/unpacked/record" --tracking-uri "$URI"
  "$PY" -m cli report --experiment paper-h200 --tracking-uri "$URI" --out "$WORK/report" --no-log
  cp "$WORK/report/report.md" "$OUT/report.md"
  log "rehearsal done: $WORK (report $OUT/report.md)"
  ;;
device)  # on the H200: python3 of the image, wheels from .carry, record under $OUT
  PY=python3 WORK=/tmp/kb CACHE=/tmp/kb/cache REC=/tmp/kb/record OUT=${OUT:-/tmp/kb-out}
  SEEDS=${SEEDS:-"0 1"} WINDOW_S=${WINDOW_S:-180} DEADLINE_S=${DEADLINE_S:-450}
  mkdir -p "$OUT"
  exec > >(tee -a "$OUT/run.log") 2>&1
  for carried in "$CARRY/wheels" "$CARRY/paper-data"; do gc_require_carry "$carried" "bash $0 --prepare" || exit 3; done
  mkdir -p "$WORK"
  export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 KB_GIT_COMMIT=$(cat "$CARRY/COMMIT" 2>/dev/null || echo unknown)
  gc_install_wheels "$CARRY/wheels" /tmp/site
  { nvidia-smi; python3 -c "import torch, pydantic, numpy; print('torch', torch.__version__, 'pydantic',
pydantic.VERSION, 'numpy', numpy.__version__, 'grouped_mm', hasattr(torch.nn.functional, 'grouped_mm'))"; } \
    > "$OUT/env.txt" 2>&1 || true
  log "$(tail -1 "$OUT/env.txt")"  # torch and F.grouped_mm in the first seconds (no grouped_mm: the MoE loops)
  # the trial path must import nothing the image lacks (mlflow above all)
  python3 -c "import sys, cli, harness.executors.local, harness.stores.runrecord, harness.trial.loop; assert 'mlflow' not in sys.modules; print('imports ok')"
  preflight "$MATRIX" cuda
  gc_pack_loop "$REC" "$OUT/record.tgz" 20 &
  packer=$!
  run_matrix "$MATRIX" cuda
  kill "$packer" 2>/dev/null || true  # the last pack is the foreground's, with nothing writing
  wait "$packer" 2>/dev/null || true
  pack_record
  log "done: $OUT/record.tgz; here: tar -xzf record.tgz && kimi-bench import record && kimi-bench report --experiment paper-h200"
  ;;
*) echo "usage: $0 [--prepare | --rehearse]  (no argument: the device run)"; exit 2 ;;
esac
