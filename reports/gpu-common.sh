# What the two prepared GPU runs share (reports/benchmarks/gpu-run.sh, reports/results/paper-h200-run.sh):
# sourced from the repository root, never run. Each script sets GC_NAME (its name in messages) first.
#
#   gc_local_python MODULES...   this machine's interpreter for --prepare and the rehearsals
#   gc_prepare_wheels DEST       the wheels the GPU image lacks, into an ignored, carried folder
#   gc_require_carry DIR HOW     on the device: one line when a carried folder did not travel
#   gc_install_wheels DIR SITE   on the device: install the carried wheels, SITE onto PYTHONPATH
#   gc_check_wheels DIR SITE LOG in a rehearsal: would the carried wheels install on CPython 3.12?
#   gc_preflight LIMIT LOG CMD   the preflight (harness/measure/preflight.py); ends the run when it fails
#   gc_pack SRC DEST             SRC packed into DEST atomically; a failed pack is a warning
#   gc_pack_loop SRC DEST SECS   gc_pack every SECS seconds, for as long as the run lasts

# What the image lacks (KINDS.md's package list): pydantic, which harness.spec.registry imports, and its needs.
GC_WHEELS="pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0"

gc_error() { echo "${GC_NAME:-gpu}: error: $*" >&2; }

# gc_local_python MODULES...: $PY (or $PYTHON) when set, else the active virtual environment's python, else
# ./.venv/bin/python; it must import MODULES. Prints the path, or one line on stderr and returns 2.
gc_local_python() {
    local py=${PY:-${PYTHON:-}} mods
    if [ -z "$py" ] && [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then py=$VIRTUAL_ENV/bin/python; fi
    if [ -z "$py" ] && [ -x .venv/bin/python ]; then py=.venv/bin/python; fi
    if [ -z "$py" ]; then
        gc_error "no Python environment: none is active and .venv/bin/python is missing; activate the project's venv (. VENV/bin/activate) or set PY=/path/to/python"
        return 2
    fi
    mods=$(IFS=,; echo "$*")
    if ! "$py" -c "import ${mods:-sys}" 2>/dev/null; then
        gc_error "$py cannot import ${mods// /}; activate the venv the project is installed in, or set PY=/path/to/python"
        return 2
    fi
    echo "$py"
}

# gc_ignore PATTERN: keep a carried folder out of git (it travels through the run's `carry`, untracked)
gc_ignore() {
    local exclude
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qx "$1" "$exclude" 2>/dev/null || echo "$1" >> "$exclude"
}

# gc_prepare_wheels DEST: GC_WHEELS for the image's CPython 3.12 on x86-64, with $PY's pip (the registry)
gc_prepare_wheels() {
    mkdir -p "$1"
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$1" $GC_WHEELS
}

# gc_tree_commit: the commit a carry is prepared from (the device copy has no git); warns when the tree has
# uncommitted changes, since those travel too but are in no commit
gc_tree_commit() {
    if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
        echo "${GC_NAME:-gpu}: warning: uncommitted changes: the device runs them, the record names $(git rev-parse --short HEAD)" >&2
    fi
    git rev-parse HEAD
}

# gc_require_carry DIR HOW: DIR holds files, else one line saying how to make it and to carry it; returns 3
gc_require_carry() {
    if [ -d "$1" ] && [ -n "$(ls -A "$1" 2>/dev/null)" ]; then return 0; fi
    gc_error "$1 is missing or empty here: it is ignored by git and travels only through carry; on the session's machine run '$2', then name ${1%%/*} in the run's carry"
    return 3
}

gc_install_wheels() {  # gc_install_wheels DIR SITE: on the device (no network), into SITE, which goes first on PYTHONPATH
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$2" "$1"/*.whl \
        || { gc_error "installing $1/*.whl into $2 failed"; return 3; }
    export PYTHONPATH=$2${PYTHONPATH:+:$PYTHONPATH}
}

gc_check_wheels() {  # gc_check_wheels DIR SITE LOG: where pydantic is already installed (a rehearsal), only check
    "$PY" -m pip install -q --dry-run --no-index --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 --target "$2" "$1"/*.whl >>"$3" 2>&1 \
        || { gc_error "the wheels in $1 would not install on CPython 3.12 (see $3)"; return 3; }
}

# gc_preflight LIMIT LOG COMMAND...: COMMAND (a preflight) under `timeout LIMIT`, its output teed to LOG; when
# it fails, one line and `exit 4` (call it from the script's own shell, not a pipeline: it ends the run)
gc_preflight() {
    local limit=$1 log=$2 rc=0 t0=$SECONDS
    shift 2
    timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$log" || rc=${PIPESTATUS[0]}  # `||`: set -e must not end it first
    if [ "$rc" -ne 0 ]; then
        local why="rc=$rc"
        [ "$rc" -ne 124 ] && [ "$rc" -ne 137 ] || why="cut at its ${limit}s limit"
        echo "${GC_NAME:-gpu}: stopped: the preflight failed ($why, after $(( SECONDS - t0 ))s; the line above names the check); nothing timed has run" | tee -a "$log"
        exit 4
    fi
}

# gc_pack SRC DEST: SRC (a folder) as one .tgz at DEST, replaced atomically (mv). Each call packs into its own
# temp file (DEST.<pid>.tmp: the background loop and the foreground never share one), calls are serialized by
# a lock beside SRC where flock exists (so the pack that ends last holds the newest state), and a failed pack
# (GNU tar exits 1 when a file changed while it read it: the trial loop appends to events.jsonl all the time)
# is a warning: DEST keeps the previous pack and the next call retries. Always returns 0.
gc_pack() {
    local src=${1%/} dest=$2
    [ -d "$src" ] || return 0
    (
        set +e
        if command -v flock >/dev/null 2>&1; then flock 9; fi
        tmp="$dest.$BASHPID.tmp"
        err=$(tar -czf "$tmp" -C "$(dirname "$src")" "$(basename "$src")" 2>&1)
        rc=$?
        if [ "$rc" -eq 0 ] && mv -f "$tmp" "$dest"; then exit 0; fi
        rm -f "$tmp"
        echo "${GC_NAME:-gpu}: warning: packing $src failed (tar rc=$rc: $(echo "$err" | head -1)); $(basename "$dest") keeps the previous pack, the next one retries" >&2
    ) 9>"$src.pack.lock" || true
    return 0
}

# gc_pack_loop SRC DEST SECONDS: gc_pack every SECONDS until killed (run it with &; a failed pack never ends it)
gc_pack_loop() {
    while sleep "$3"; do gc_pack "$1" "$2" || true; done
}
