#!/usr/bin/env bash
# The one prepared GPU run of the bench suite (reports/benchmarks/README.md): CUDA tests, then the sections in
# order of value, each step appending its rows to ONE record ($OUT/record.md + .json) as it measures them, so
# a run cut short keeps everything it finished. Every step runs under `timeout`, within an overall budget.
#
#   reports/benchmarks/gpu-run.sh --prepare                                      # HERE, once: .whl/ (wheels, COMMIT)
#   OUT=<dir> reports/benchmarks/gpu-run.sh                                      # the H200 run (~7.5 min)
#   OUT=$(mktemp -d) reports/benchmarks/gpu-run.sh --device cpu --preset tiny    # the CPU rehearsal (~2 min)
#
# First, ~20 s of preflight (harness/measure/preflight.py): one bf16 train step and one decode step per arm the
# steps time, on the run's device; the run stops with one line if any fails. It also prints the MoE dispatch
# that ran (grouped_mm, or the host-syncing loop where torch lacks F.grouped_mm). reports/gpu-common.sh holds
# what this script shares with reports/results/paper-h200-run.sh.
#
# Options:
#   --prepare           here, not on the device: download the wheels the image lacks into .whl/ (ignored by
#                       git; carried by the run) and write .whl/COMMIT, with the active venv's python (PYTHON)
#   --device cuda|cpu   where to measure (default cuda)
#   --preset real|tiny  real: gpt2-124m and paper, as the targets name them; tiny: every step at the tiny preset
#                       with short timings (the code path only; eager only, since torch.compile takes minutes on
#                       a CPU). Default real.
#   --budget SECONDS    wall-clock budget for all steps (default 450); a step gets min(its cap, what is left)
#                       and is skipped when less than its minimum is left
#   --steps LIST        comma-separated subset of: tests,train-gpt2,train-kimi,moe,decode,muon-kimi,muon-gpt2,
#                       optim,attention (default: all, in that order)
#   --no-compile        leave out the compiled train steps
#   --no-preflight      skip the preflight (a rerun of some steps right after a run whose preflight passed)
# Environment: OUT (required), PYTHON (default python3), KIMI_BENCH_GIT_COMMIT (the commit measured; default
# .whl/COMMIT, since the device machine has no git), SITE (where the carried wheels in .whl/ are installed;
# default /tmp/kimi-bench-site).
# Files left in $OUT (the device tool returns at most 8): run.log, test_cuda.log, record.md, record.json.

set -u -o pipefail
cd "$(dirname "$0")/../.."
GC_NAME=gpu-run.sh
. reports/gpu-common.sh

device=cuda preset=real budget=450 steps=all compile=1 preflight=1
while [ $# -gt 0 ]; do
    case "$1" in
        --prepare)
            PY=$(gc_local_python pip) || exit 2
            gc_ignore '/.whl/'
            gc_prepare_wheels .whl || { gc_error "pip download into .whl/ failed (see above)"; exit 3; }
            gc_tree_commit > .whl/COMMIT
            echo "prepared .whl/ with $PY: $(cd .whl && ls | tr '\n' ' ')(commit $(cut -c1-12 .whl/COMMIT)); now the device run (reports/benchmarks/README.md)"
            exit 0 ;;
        --device) device=$2; shift 2 ;;
        --preset) preset=$2; shift 2 ;;
        --budget) budget=$2; shift 2 ;;
        --steps) steps=$2; shift 2 ;;
        --no-compile) compile=0; shift ;;
        --no-preflight) preflight=0; shift ;;
        -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
        *) echo "gpu-run.sh: error: unknown option $1; see --help" >&2; exit 2 ;;
    esac
done
: "${OUT:?gpu-run.sh: error: OUT is not set; set it to the folder the record goes to}"
case "$device" in cuda|cpu) ;; *) echo "gpu-run.sh: error: --device $device; use cuda or cpu" >&2; exit 2 ;; esac
case "$preset" in real|tiny) ;; *) echo "gpu-run.sh: error: --preset $preset; use real or tiny" >&2; exit 2 ;; esac
STEP_NAMES=tests,train-gpt2,train-kimi,moe,decode,muon-kimi,muon-gpt2,optim,attention
if [ "$steps" != all ]; then
    for s in ${steps//,/ }; do
        [[ ",$STEP_NAMES," == *",$s,"* ]] || { echo "gpu-run.sh: error: --steps: unknown step $s; use all or some of $STEP_NAMES" >&2; exit 2; }
    done
fi
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LOG=$OUT/run.log
RECORD=$OUT/record.md
start=$(date +%s)
export PYTHONUNBUFFERED=1
say() { echo "$@" | tee -a "$LOG"; }

# --- what the image lacks, from wheels carried in .whl/ (README: the pip download command) -----------------
# Where pydantic is already there (a rehearsal), the carried set is only checked: would it install on the
# image's CPython 3.12 with nothing else (pip --dry-run for that interpreter and platform)?
SITE=${SITE:-/tmp/kimi-bench-site}
if compgen -G ".whl/*.whl" >/dev/null; then
    if "$PY" -c "import pydantic" 2>/dev/null; then
        gc_check_wheels .whl "$SITE" "$LOG" 2>&1 | tee -a "$LOG"; [ "${PIPESTATUS[0]}" = 0 ] || exit 3
        say "wheels in .whl/ checked (pydantic is already here): $(cd .whl && ls | tr '\n' ' ')"
    else
        gc_install_wheels .whl "$SITE" >>"$LOG" 2>&1 || { say "gpu-run.sh: error: installing .whl/*.whl failed (see $LOG)"; exit 3; }
        say "installed from .whl/: $(cd .whl && ls | tr '\n' ' ')"
    fi
fi
if ! "$PY" -c "import torch, typer, rich, numpy, pydantic, pytest, harness.measure.bench.suite" >>"$LOG" 2>&1; then
    if [ "$device" = cuda ] && ! compgen -G ".whl/*.whl" >/dev/null; then gc_require_carry .whl "bash $0 --prepare"; fi
    say "gpu-run.sh: error: a package the suite imports is missing (see $LOG); carry its wheel in .whl/"; exit 3
fi
if [ -z "${KIMI_BENCH_GIT_COMMIT:-}" ] && [ -f .whl/COMMIT ]; then export KIMI_BENCH_GIT_COMMIT=$(cut -c1-12 .whl/COMMIT); fi

# --- environment --------------------------------------------------------------------------------------------
{
    echo "== gpu-run.sh --device $device --preset $preset --budget $budget --steps $steps (compile=$compile)"
    date -u '+%Y-%m-%d %H:%M:%S UTC'
    echo "commit: ${KIMI_BENCH_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
    if [ "$device" = cuda ]; then nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv; fi
    "$PY" -c "import torch, torch.nn.functional as F; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'available', torch.cuda.is_available(), 'grouped_mm', hasattr(F, 'grouped_mm'))"
} 2>&1 | tee -a "$LOG"

SUMMARY=()
if [ "$preset" = tiny ]; then
    GPT2=tiny PAPER=tiny DECODE=1,2,4 compile=0
    TIMING=(--repeats 2 --warmup 1 --rounds 1 --min-run-time 0.01 --vocab-size 512 --micro-batch 2)
else
    GPT2=gpt2-124m PAPER=paper DECODE=1,32,128
    TIMING=(--repeats 30 --warmup 5 --rounds 5 --min-run-time 0.1)
fi

# --- preflight: one bf16 train step + one decode step per arm the steps time; stops the run when one fails ---
if [ "$preflight" = 1 ]; then
    PRE_OPTS=()
    [ "$preset" != tiny ] || PRE_OPTS=(--vocab-size 512 --micro-batch 2 --decode-batch 4)
    t0=$(date +%s)
    gc_preflight 120 "$LOG" "$PY" -m harness.measure.preflight --device "$device" "${PRE_OPTS[@]}" \
        --arms "gpt@$GPT2:adamw,gpt@$GPT2:muon,kimi@$PAPER:adamw,kimi@$PAPER:muon,gpt@$PAPER:adamw,gpt-mla@$PAPER:adamw"
    SUMMARY+=("preflight: ok, $(( $(date +%s) - t0 ))s; $(grep -m1 '^preflight: MoE dispatch' "$LOG" | sed 's/^preflight: //' || echo 'MoE dispatch: not seen')")
fi

MODES=(--eager --compile)
[ "$compile" = 1 ] || MODES=(--eager --no-compile)

# step NAME CAP MIN COMMAND...: run COMMAND under timeout min(CAP, budget left); skip it below MIN seconds left.
# Output goes to run.log (and to $STEP_LOG too, where set).
step() {
    local name=$1 cap=$2 min=$3; shift 3
    if [ "$steps" != all ] && [[ ",$steps," != *",$name,"* ]]; then return; fi
    local left=$(( budget - ($(date +%s) - start) )) limit
    limit=$(( cap < left ? cap : left ))
    if [ "$limit" -lt "$min" ]; then
        SUMMARY+=("$name: skipped (${left}s of the budget left, needs ${min}s)"); say "== $name: skipped"; return
    fi
    say "== $name (limit ${limit}s): $*"
    local t0 rc
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG" ${STEP_LOG:+"$STEP_LOG"}
    rc=${PIPESTATUS[0]}
    local took=$(( $(date +%s) - t0 ))
    case $rc in
        0) SUMMARY+=("$name: ok, ${took}s") ;;
        124|137) SUMMARY+=("$name: CUT at its ${limit}s limit (rows finished before are in the record)") ;;
        *) SUMMARY+=("$name: FAILED rc=$rc after ${took}s (see run.log)") ;;
    esac
}

# one suite invocation appending to the record, with the preset's timing; each step adds its sections' options
suite=("$PY" -m harness.measure.bench.suite --device "$device" "${TIMING[@]}" --profile --out "$RECORD" --append)

XDIST=()  # the CUDA tests compile a dozen tiny models: 4 pytest workers share the 16 CPUs' compile work
if [ "$device" = cuda ] && "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 4); fi
STEP_LOG=$OUT/test_cuda.log step tests 150 30 \
    "$PY" -m pytest -m cuda tests/test_cuda.py -q -ra --durations=10 -p no:cacheprovider "${XDIST[@]}"

step train-gpt2 130 40 "${suite[@]}" --presets "$GPT2" --variants gpt --sections train --optimizers adamw "${MODES[@]}"
step train-kimi 150 40 "${suite[@]}" --presets "$PAPER" --variants kimi --sections train --optimizers adamw "${MODES[@]}"
step moe 45 15 "${suite[@]}" --presets "$PAPER" --variants kimi --sections moe
step decode 60 20 "${suite[@]}" --presets "$PAPER" --variants gpt,gpt-mla --sections decode --decode-batches "$DECODE"
step muon-kimi 40 15 "${suite[@]}" --presets "$PAPER" --variants kimi --sections train --optimizers muon --no-compile
step muon-gpt2 40 15 "${suite[@]}" --presets "$GPT2" --variants gpt --sections train --optimizers muon --no-compile
step optim 40 15 "${suite[@]}" --presets "$PAPER" --variants gpt,kimi --sections optim
ATTENTION=$PAPER,$GPT2
[ "$PAPER" != "$GPT2" ] || ATTENTION=$PAPER
step attention 40 15 "${suite[@]}" --presets "$ATTENTION" --sections attention

{
    echo "== summary ($(( $(date +%s) - start ))s of a ${budget}s budget)"
    printf '  %s\n' "${SUMMARY[@]}"
    # the targets table alone (the record has the kernel tables): the lines of the first table after its heading
    if [ -f "$RECORD" ]; then awk '/^## Targets/{on=1; next} on && /^\|/{print; seen=1; next} seen{exit}' "$RECORD"; fi
    echo "files: $(cd "$OUT" && ls | tr '\n' ' ')"
} 2>&1 | tee -a "$LOG"
