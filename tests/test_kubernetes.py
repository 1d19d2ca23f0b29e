"""deploy/kubernetes/: the manifests validate offline against the Kubernetes schemas, and say
what vsup relies on (vsup is PID 1, the probes, the pod's own /dev/shm, read-only root)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate import utils as kv

from vsup import config

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


def test_only_root_step_fixes_the_emptydir_modes(pod: dict[str, Any], container: dict[str, Any]) -> None:
    """The one init container (root, CHOWN and FOWNER only) gives vsup's directories to its uid
    (emptyDir roots are 0777, which vsup's path check refuses) and mounts nothing else."""
    (init,) = pod["initContainers"]
    sc = init["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]}
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in init["volumeMounts"]}
    assert mounts == {"/var/lib/vsup", "/run/vsup", "/var/log/vsup", "/tmp"}
    uid = pod["securityContext"]["runAsUser"]
    assert f"chown {uid}:{uid} /var/lib/vsup /run/vsup /var/log/vsup" in init["command"][-1]


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
