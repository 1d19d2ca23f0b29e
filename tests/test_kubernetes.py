"""deploy/kubernetes/: the manifests validate offline against the Kubernetes schemas, every pod
spec meets the "restricted" Pod Security Standard, and they say what vsup relies on (vsup is
PID 1, the probes, the pod's own /dev/shm, read-only root, directories vsup can trust)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate import utils as kv

from vsup import config
from vsup.proctree import untrusted_dir

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "kubernetes"
MANIFESTS = sorted(K8S.glob("*.yaml"))
# The oldest Kubernetes still commonly run, and the newest the package ships schemas for.
VERSIONS = ("1.29", kv.latest_version())


def load_all() -> dict[str, dict[str, Any]]:
    out = {}
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            out[doc["kind"]] = doc
    return out


@pytest.fixture(scope="module")
def objs() -> dict[str, dict[str, Any]]:
    return load_all()


@pytest.fixture(scope="module")
def pod(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return objs["Deployment"]["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod: dict[str, Any]) -> dict[str, Any]:
    (c,) = pod["containers"]
    return c


@pytest.fixture(scope="module")
def vsup_cfg(objs: dict[str, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> config.Config:
    text = objs["ConfigMap"]["data"]["vsup.toml"]
    path = tmp_path_factory.mktemp("cm") / "vsup.toml"
    path.write_text(text)
    return config.parse(tomllib.loads(text), path, check_python=False)


# ---- the "restricted" Pod Security Standard, as data ----------------------------------------
# https://kubernetes.io/docs/concepts/security/pod-security-standards/ (v1.29 and later; the
# baseline's controls are part of it). No Python library checks a manifest against it offline
# (the admission plugin is Go), so the controls are written here, one predicate each.
RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
SECCOMP_OK = {"RuntimeDefault", "Localhost"}


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """Every control of the restricted profile this pod spec breaks (empty: it passes)."""
    out: list[str] = []
    psc = spec.get("securityContext") or {}
    containers = [
        *spec.get("containers", []),
        *spec.get("initContainers", []),
        *spec.get("ephemeralContainers", []),
    ]

    def csc(c: dict[str, Any]) -> dict[str, Any]:
        return c.get("securityContext") or {}

    def each(what: str, bad: Callable[[dict[str, Any]], bool]) -> None:
        out.extend(f"{c['name']}: {what}" for c in containers if bad(csc(c)))

    # baseline
    for ns in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(ns):
            out.append(f"{ns} is true")
    for sc in (psc, *map(csc, containers)):
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append("windowsOptions.hostProcess is true")
    each("privileged", lambda sc: bool(sc.get("privileged")))
    out.extend(
        f"{c['name']}: hostPort {p['hostPort']}"
        for c in containers
        for p in c.get("ports", [])
        if p.get("hostPort")
    )
    for sc in (psc, *map(csc, containers)):
        ap = (sc.get("appArmorProfile") or {}).get("type")
        if ap not in (None, "RuntimeDefault", "Localhost"):
            out.append(f"appArmorProfile {ap}")
        se = sc.get("seLinuxOptions") or {}
        if se.get("type", "") not in SELINUX_TYPES or se.get("user") or se.get("role"):
            out.append(f"seLinuxOptions {se}")
    each("procMount is not Default", lambda sc: sc.get("procMount", "Default") != "Default")
    out.extend(f"sysctl {s['name']}" for s in psc.get("sysctls", []) if s["name"] not in SAFE_SYSCTLS)
    # restricted
    for v in spec.get("volumes", []):
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            out.append(f"volume {v['name']}: type {sorted(kinds)}")
    each("allowPrivilegeEscalation is not false", lambda sc: sc.get("allowPrivilegeEscalation") is not False)
    if psc.get("runAsNonRoot") is False:
        out.append("the pod's runAsNonRoot is false")
    each("runAsNonRoot is false", lambda sc: sc.get("runAsNonRoot") is False)
    if psc.get("runAsNonRoot") is not True:
        each("runAsNonRoot is not true (nor the pod's)", lambda sc: sc.get("runAsNonRoot") is not True)
    if psc.get("runAsUser") == 0:
        out.append("the pod's runAsUser is 0")
    each("runAsUser is 0", lambda sc: sc.get("runAsUser") == 0)
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_seccomp is not None and pod_seccomp not in SECCOMP_OK:
        out.append(f"the pod's seccompProfile is {pod_seccomp}")
    each(
        "seccompProfile is not RuntimeDefault or Localhost",
        lambda sc: (sc.get("seccompProfile") or {}).get("type", pod_seccomp) not in SECCOMP_OK,
    )
    each(
        "capabilities do not drop ALL", lambda sc: "ALL" not in (sc.get("capabilities") or {}).get("drop", [])
    )
    each(
        "capabilities add more than NET_BIND_SERVICE",
        lambda sc: not set((sc.get("capabilities") or {}).get("add", [])) <= {"NET_BIND_SERVICE"},
    )
    return out


def pod_specs(objs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod spec the manifests carry, by kind: a Pod's, a workload's template's."""
    out = {}
    for kind, o in objs.items():
        spec = o.get("spec") or {}
        if kind == "Pod":
            out[kind] = spec
        elif "template" in spec:
            out[kind] = spec["template"]["spec"]
        elif "jobTemplate" in spec:
            out[kind] = spec["jobTemplate"]["spec"]["template"]["spec"]
    return out


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_strictly(path: Path, version: str) -> None:
    """Each object passes the strict schema (unknown fields are errors) of both versions."""
    for doc in yaml.safe_load_all(path.read_text()):
        kv.validate(doc, version, strict=True)


def test_validation_is_not_vacuous(objs: dict[str, dict[str, Any]]) -> None:
    """A misspelt probe field and a wrong type are caught by the same validation."""
    import copy

    bad = copy.deepcopy(objs["Deployment"])
    c = bad["spec"]["template"]["spec"]["containers"][0]
    c["livenessProbe"]["perodSeconds"] = 10
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, VERSIONS[-1], strict=True)
    bad = copy.deepcopy(objs["Service"])
    bad["spec"]["ports"][0]["port"] = "eight thousand"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, VERSIONS[-1], strict=True)


def test_schemas_ship_with_the_package_and_validation_needs_no_network() -> None:
    """kubernetes-validate carries its schemas; the CLI passes every manifest inside a network
    namespace with no interface up (nothing could be fetched)."""
    root = Path(kv.__file__).parent / "kubernetes-json-schema"
    assert (root / f"v{kv.latest_version()}-local-strict" / "deployment-apps-v1.json").is_file()
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.fail("needs root and util-linux unshare to cut the network (this machine has both)")
    cli = Path(sys.executable).parent / "kubernetes-validate"
    proc = subprocess.run(
        ["unshare", "--net", str(cli), "--strict", *map(str, MANIFESTS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("passed") == len(MANIFESTS), proc.stdout


def test_vsup_is_the_entrypoint_and_pid1(pod: dict[str, Any], container: dict[str, Any]) -> None:
    """The image's entrypoint (vsup) runs `run`; no shared process namespace (vsup stays PID 1),
    no host IPC (the host's /dev/shm)."""
    assert container["args"][:1] == ["run"] and "command" not in container
    assert pod["shareProcessNamespace"] is False and pod["hostIPC"] is False
    assert len(pod["containers"]) == 1


def test_every_pod_spec_meets_the_restricted_pod_security_standard(objs: dict[str, dict[str, Any]]) -> None:
    """Every pod spec passes each control of the "restricted" profile: no root step, no
    escalation, capabilities dropped, RuntimeDefault seccomp, allowed volume types only."""
    specs = pod_specs(objs)
    assert specs, "no pod spec found"
    for kind, spec in specs.items():
        assert restricted_violations(spec) == [], kind


def test_the_restricted_check_is_not_vacuous(pod: dict[str, Any]) -> None:
    """The same check catches what the manifests once had (a root init step with CHOWN and
    FOWNER) and each control broken on its own."""
    import copy

    root_init = {
        "name": "dirs",
        "image": "x",
        "securityContext": {
            "runAsNonRoot": False,
            "runAsUser": 0,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]},
        },
    }
    bad = copy.deepcopy(pod)
    bad["initContainers"] = [root_init]
    found = " | ".join(restricted_violations(bad))
    assert "runAsNonRoot is false" in found and "runAsUser is 0" in found and "add more than" in found
    breaks: list[Callable[[dict[str, Any]], object]] = [
        lambda p: [
            p["securityContext"].pop("seccompProfile"),
            p["containers"][0]["securityContext"].pop("seccompProfile"),
        ],
        lambda p: p["containers"][0]["securityContext"].update(seccompProfile={"type": "Unconfined"}),
        lambda p: p["securityContext"].update(runAsNonRoot=False),
        lambda p: p["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
        lambda p: p["containers"][0]["securityContext"].pop("capabilities"),
        lambda p: p["containers"][0]["securityContext"].update(privileged=True),
        lambda p: p.update(hostIPC=True),
        lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/dev/shm"}}),
        lambda p: p["containers"][0]["ports"][0].update(hostPort=8000),
        lambda p: p["securityContext"].update(sysctls=[{"name": "kernel.shmmax", "value": "1"}]),
    ]
    for brk in breaks:
        bad = copy.deepcopy(pod)
        brk(bad)
        assert restricted_violations(bad), breaks.index(brk)


def test_vsups_directories_sit_below_sticky_memory_emptydirs(
    pod: dict[str, Any], container: dict[str, Any], vsup_cfg: config.Config, tmp_path: Path
) -> None:
    """With no root in the pod, nobody can chown an emptyDir: vsup's state, socket and log
    directories are one level below a Memory emptyDir, whose root is a tmpfs root (1777, here
    for real) that the kubelet's fsGroup change keeps sticky, so vsup's directory check accepts
    the directory vsup makes there. A disk emptyDir's root (0777, not sticky) it refuses."""
    vols = {v["name"]: v for v in pod["volumes"]}
    d = vsup_cfg.daemon
    for path in (d.state_dir, str(Path(d.socket).parent), str(Path(vsup_cfg.vllm.log_file).parent)):
        (m,) = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
        assert vols[m["name"]]["emptyDir"].get("medium") == "Memory", path
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.fail("needs root and util-linux unshare to mount a tmpfs (this machine has both)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # the kubelet's mount of a Memory emptyDir: tmpfs with size= only (pkg/volume/emptydir)
    mode = subprocess.run(
        ["unshare", "--mount", "sh", "-c", f"mount -t tmpfs -o size=1048576 tmpfs {mnt} && stat -c %a {mnt}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    assert mode == "1777"
    uid, gid = pod["securityContext"]["runAsUser"], pod["securityContext"]["fsGroup"]

    def kubelet_root(name: str, mode: int) -> Path:
        """An emptyDir root after the kubelet's fsGroup change (pkg/volume/volume_linux.go:
        chown to the group, chmod mode | rw for the group | setgid | x)."""
        root = tmp_path / name
        root.mkdir()
        os.chown(root, 0, gid)
        os.chmod(root, mode | 0o2000 | 0o660 | 0o110)
        return root

    mem, disk = kubelet_root("memory", int(mode, 8)), kubelet_root("disk", 0o777)
    assert untrusted_dir(mem / "state", uid) == "does not exist"  # vsup may make it
    (mem / "state").mkdir()
    os.chmod(mem / "state", 0o750)  # as the Ledger makes it, as uid 10001
    os.chown(mem / "state", uid, gid)
    assert untrusted_dir(mem / "state", uid) is None
    assert "writable by others" in (untrusted_dir(disk / "state", uid) or "")
    assert "writable by others" in (untrusted_dir(disk, uid) or "")


def test_gpu_requested(container: dict[str, Any]) -> None:
    """The GPU is both requested and limited (extended resources need them equal)."""
    r = container["resources"]
    assert r["limits"]["nvidia.com/gpu"] == r["requests"]["nvidia.com/gpu"] >= 1


def test_dev_shm_is_a_capped_memory_emptydir_of_this_container_only(
    pod: dict[str, Any], container: dict[str, Any], vsup_cfg: config.Config
) -> None:
    """/dev/shm: emptyDir medium Memory with a sizeLimit, mounted in this one container, which
    is what `shm_private = true` in the ConfigMap declares."""
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert vol["emptyDir"]["medium"] == "Memory" and vol["emptyDir"]["sizeLimit"]
    users = [
        c["name"]
        for c in pod["containers"] + pod.get("initContainers", []) + pod.get("ephemeralContainers", [])
        if any(m["name"] == mount["name"] for m in c.get("volumeMounts", []))
    ]
    assert users == [container["name"]]
    assert vsup_cfg.daemon.shm_private


def test_three_probes_on_vsups_port_with_sane_timeouts(
    container: dict[str, Any], vsup_cfg: config.Config
) -> None:
    """/startupz, /livez, /readyz on the proxy's port (never vLLM's /health), timeouts well
    above 1 s, liveness slower than readiness, startup long enough for start_s."""
    assert vsup_cfg.proxy is not None
    port = int(vsup_cfg.proxy.listen.rpartition(":")[2])
    (http,) = [p for p in container["ports"] if p["name"] == "http"]
    assert http["containerPort"] == port and port != vsup_cfg.vllm.port
    paths = {}
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container[kind]
        assert probe["httpGet"]["port"] == "http"
        assert probe["timeoutSeconds"] >= 5
        paths[kind] = probe["httpGet"]["path"]
    assert paths == {"startupProbe": "/startupz", "livenessProbe": "/livez", "readinessProbe": "/readyz"}
    s = container["startupProbe"]
    assert s["periodSeconds"] * s["failureThreshold"] >= vsup_cfg.timeouts.start_s
    live, ready = container["livenessProbe"], container["readinessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 30
    assert ready["periodSeconds"] <= vsup_cfg.probes.canary_interval_s


def test_grace_period_covers_vsups_shutdown(pod: dict[str, Any], vsup_cfg: config.Config) -> None:
    """The kubelet's SIGKILL comes after vsup's whole shutdown: drain, teardown, cleanup, GPU wait."""
    t = vsup_cfg.timeouts
    own = t.shutdown_drain_s + t.stop_grace_s + t.kill_wait_s + t.cleanup_grace_s + t.gpu_release_s
    assert pod["terminationGracePeriodSeconds"] > own


def test_non_root_read_only_root_and_no_privileges(pod: dict[str, Any], container: dict[str, Any]) -> None:
    """Non-root (the image's uid), read-only root file system, no escalation, no capabilities."""
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0 and "runAsUser" not in container.get(
        "securityContext", {}
    )
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]


def test_everything_written_lands_on_a_writable_volume(
    container: dict[str, Any], vsup_cfg: config.Config
) -> None:
    """With a read-only root, vsup's state, socket and log, /tmp and every cache variable point
    into a writable mount; the config and the models are mounted read-only."""
    writable = [m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")]

    def on_writable(path: str) -> bool:
        return any(path == w or path.startswith(w.rstrip("/") + "/") for w in writable)

    d = vsup_cfg.daemon
    for path in (d.state_dir, str(Path(d.socket).parent), str(Path(vsup_cfg.vllm.log_file).parent), "/tmp"):
        assert on_writable(path), path
    env = {e["name"]: e["value"] for e in container["env"]}
    for name in (
        "HOME",
        "XDG_CACHE_HOME",
        "HF_HOME",
        "VLLM_CACHE_ROOT",
        "TRITON_CACHE_DIR",
        "CUDA_CACHE_PATH",
    ):
        assert on_writable(env[name]), name
    ro = {m["mountPath"] for m in container["volumeMounts"] if m.get("readOnly")}
    assert str(vsup_cfg.path.name) and "/etc/vsup" in ro and "/models" in ro


def test_configmap_is_a_pod_config(vsup_cfg: config.Config) -> None:
    """exit_on_failed on (the kubelet restarts), readiness 'serving' (two replicas), the
    termination log where the container says, vLLM on loopback behind the proxy."""
    d = vsup_cfg.daemon
    assert d.exit_on_failed and d.readiness == "serving"
    assert d.termination_log == "/dev/termination-log"
    assert vsup_cfg.vllm.host == "127.0.0.1"


def test_service_and_budget_select_the_pods(
    objs: dict[str, dict[str, Any]], container: dict[str, Any]
) -> None:
    """The Service targets the proxy's named port of these pods; the PDB lets one go at a time
    and the Deployment has more replicas than that, so a drain never empties the Service."""
    labels = objs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    svc, pdb = objs["Service"], objs["PodDisruptionBudget"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert objs["Deployment"]["spec"]["replicas"] > pdb["spec"]["maxUnavailable"]
    assert container["terminationMessagePath"] == "/dev/termination-log"
