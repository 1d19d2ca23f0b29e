"""Configuration: one TOML file, validated up front, immutable afterwards.

Every problem is reported as ``ConfigError(file, key, problem)`` and turned into one line and
exit code 2 by the CLI; the daemon never starts half-configured. Each section is a frozen
dataclass whose fields carry their default and a one-line explanation (``doc``) that
``vsup check-config --explain`` prints, so the documentation cannot drift from the code.

Lookup order for every subcommand: ``--config PATH`` > ``$VSUP_CONFIG`` > ``/etc/vsup/vsup.toml``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PATH = Path("/etc/vsup/vsup.toml")
VLLM_MODULE = "vllm.entrypoints.openai.api_server"


class ConfigError(Exception):
    """A config problem, naming the file, the key and what is wrong."""

    def __init__(self, path: Path | str, key: str | None, problem: str) -> None:
        self.path, self.key, self.problem = str(path), key, problem
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.path}: {self.key}" if self.key else self.path
        return f"{where}: {self.problem}"


def _f(default: Any, doc: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(type(default), default), metadata={"doc": doc, **kw})
    return field(default=default, metadata={"doc": doc, **kw})


@dataclass(frozen=True)
class VllmConfig:
    python: str = _f(None, "interpreter that has vLLM installed; vsup never imports vLLM", required=True)
    model: str = _f(None, "model path or id served at start-up", required=True)
    served_model_name: str | None = _f(None, "name clients use (--served-model-name); default: model")
    args: list[str] = _f([], "extra arguments after --model/--host/--port, e.g. -tp 2")
    env: dict[str, str] = _f({}, "added to the inherited environment of vLLM")
    host: str = _f("127.0.0.1", "address vLLM listens on (and vsup probes)")
    port: int = _f(8000, "TCP port of the OpenAI server", min=1, max=65535)
    log_file: str = _f("/var/log/vsup/vllm.log", "vLLM stdout+stderr, opened for append; vsup tails it")
    module: str = _f(VLLM_MODULE, "module started with `python -m`; tests point it at a fake server")
    # vLLM's CPU workers spin on their cores while they serve (shm_broadcast's busy loop). With
    # no core to spare (2 cores, TP=2, measured here) a client on the host waited 2.0-3.2 s median
    # and 4.5-8.4 s at worst for a 4-token completion, direct or through the proxy, beside a tree
    # at nice 0, and 0.08-0.09 s median, 0.15 s at worst, at nice 10: the tree's own work is
    # unchanged, what it starved (the client, vsup, its proxy, `vsup reload`) gets the CPU first.
    nice: int | None = _f(
        None,
        "CPU priority of vLLM's process tree (its session's autogroup nice and its processes' "
        "nice, set at spawn): unset = 10 on a host without NVML GPUs (vLLM's spinning CPU workers "
        "then yield to vsup, its proxy and the host), 0 (untouched) with GPUs; below 0 needs root",
        min=-20,
        max=19,
    )


@dataclass(frozen=True)
class DaemonConfig:
    state_dir: str = _f("/var/lib/vsup", "ledger.json, events.jsonl and incidents/")
    socket: str = _f("/run/vsup/vsup.sock", "control socket (JSON lines), created 0660")
    socket_group: str | None = _f(None, "group that owns the socket; members may connect")
    admin_users: list[str] = _f([], "users allowed lifecycle commands (root and vsup's own user always are)")
    admin_groups: list[str] = _f([], "groups allowed lifecycle commands")
    read_users: list[str] = _f([], "users allowed status/events/diagnose only")
    read_groups: list[str] = _f([], "groups allowed status/events/diagnose only")
    metrics_host: str = _f("127.0.0.1", "address of the Prometheus endpoint")
    metrics_port: int | None = _f(None, "Prometheus endpoint port; unset = no endpoint", min=1, max=65535)
    # Hang forensics (stacks.py): py-spy needs same-user ptrace (Yama ptrace_scope 0 or absent);
    # faulthandler (SIGABRT) kills what it dumps, so it serves only before a hung tree's teardown.
    stacks: str = _f(
        "auto",
        "stacks of a hung tree before its teardown, and `vsup stacks`: auto (py-spy where ptrace is "
        "allowed, else faulthandler), py-spy, faulthandler, off",
        choices=("auto", "py-spy", "faulthandler", "off"),
    )
    py_spy: str | None = _f(
        None, "py-spy binary for stack dumps; unset = beside vsup's interpreter, else PATH"
    )
    # Under systemd vsup stays up in `failed` (the unit relies on it: status, operator commands).
    # In a pod nobody runs `vsup start`: exiting makes the kubelet restart the container.
    exit_on_failed: bool = _f(
        False, "exit non-zero when the server ends `failed` (Kubernetes restarts the pod); off: stay up"
    )
    termination_log: str = _f(
        "/dev/termination-log",
        "on a non-zero exit the reason is written here if it exists (Kubernetes' terminationMessagePath)",
    )
    readiness: str = _f(
        "serving",
        "/readyz: 'serving' = 200 only while a proven-ready server is routed (several replicas); "
        "'hold' = also while a server is coming and requests are held (one replica); both 200 "
        "while the model is off-loaded (a request loads it)",
        choices=("serving", "hold"),
    )
    shm_private: bool = _f(
        False,
        "the shm root is this container's own (an emptyDir mounted in no other container): at start, "
        "unlink what no live process holds; vsup also proves it is a tmpfs of its own in a container",
    )


@dataclass(frozen=True)
class TimeoutsConfig:
    # Measured on 2-core CPU machines: the tiny model is ready in 40-45 s; real GPU models load
    # for minutes, so the default is generous and operators shorten it.
    start_s: float = _f(
        600.0, "from spawn to ready (health + model listed + canary), else the start failed", min=1
    )
    stop_grace_s: float = _f(
        20.0,
        "stop, reload: SIGTERM to the API server, then this long before SIGKILL of the tree "
        "(failed server: 3 s at most)",
        min=0,
    )
    # A hung worker keeps the API server in "Waiting for connections to close" forever, so
    # a stop never waits for clients beyond the grace.
    # A SIGKILLed process still exiting (the kernel freeing its memory, CPU time moving) is
    # waited for longer, up to cleanup.EXIT_WAIT_S in all: on a busy 2-core machine a vLLM
    # worker's exit took 20-43 s (issue 18).
    kill_wait_s: float = _f(
        10.0,
        "after SIGKILL, how long to wait for a process to be gone while its exit makes no progress",
        min=0.1,
    )
    # A stopped worker leaves /health at 200 and num_requests_running at 0 (the stats only move
    # when a step finishes), so at idle the canary's deadline is what sees the hang. A canary
    # late is one strike, not a verdict: the stack check that follows decides (issue 17), so the
    # deadline can be short. The tiny CPU model's 4-token canary takes 0.05-0.3 s here.
    canary_s: float = _f(
        5.0, "one canary chat completion (a few tokens) must finish within this, else one strike", min=0.1
    )
    # The first completion after a start also warms the engine up (18 s measured on a cold CPU
    # start, seconds after), so it gets its own, longer deadline. An engine that dies at its first
    # request answers 500 at once; only a hang at the first request waits this long.
    first_canary_s: float = _f(
        120.0, "the readiness canary (the first completion after a start) must finish within this", min=0.1
    )
    drain_s: float = _f(60.0, "reload: wait this long for running requests to finish before stopping", min=0)
    shutdown_drain_s: float = _f(
        20.0,
        "SIGTERM to vsup: requests in flight get this long to finish before the teardown "
        "(terminationGracePeriodSeconds and TimeoutStopSec must cover it plus the teardown)",
        min=0,
    )
    cleanup_grace_s: float = _f(5.0, "cleanup of orphans: SIGTERM to SIGKILL", min=0)
    probe_s: float = _f(5.0, "one HTTP probe (health, models, metrics) must answer within this", min=0.1)
    gpu_release_s: float = _f(30.0, "after teardown, wait this long for GPU memory to be released", min=0)
    # The stack dump of a hung tree comes before its teardown: it must never delay a recovery by
    # more than this (py-spy takes 0.05-0.3 s a process here, plus a 1 s CPU-use window).
    stacks_s: float = _f(3.0, "hang forensics: all stacks of a hung tree within this, in total", min=0.1)


@dataclass(frozen=True)
class RestartConfig:
    backoff_initial_s: float = _f(1.0, "first delay before an automatic restart", min=0)
    backoff_max_s: float = _f(60.0, "ceiling of the exponential backoff", min=0)
    backoff_factor: float = _f(2.0, "each consecutive failure multiplies the delay by this", min=1)
    max_failures: int = _f(
        5, "this many failures within window_s -> state failed (until an operator acts)", min=1
    )
    window_s: float = _f(600.0, "the window for max_failures", min=1)
    stable_s: float = _f(
        300.0, "ready this long without a failure: the failure count and backoff start over", min=0
    )


@dataclass(frozen=True)
class ProbesConfig:
    # Issue 17's bounds with these defaults: a hung worker is torn down <= 15 s after the fault
    # at idle (canary_interval_s + canary_s + a ~2-4 s stack check), <= 10 s while requests
    # run (stall_s + interval_s, or the proxy's stall_s + its 1 s look, + the check). Reading
    # /metrics every second while requests run costs ~0.1 % of a core then, nothing at idle.
    interval_s: float = _f(
        1.0,
        "progress (/metrics) probe period while requests run; an idle engine is looked at before each canary "
        "(with the proxy, which counts requests in flight, not at all)",
        min=0.1,
    )
    canary_interval_s: float = _f(
        4.0,
        "periodic canary completion while ready, skipped when real requests proved the engine since "
        "the last one (0 = only at start)",
        min=0,
    )
    stall_s: float = _f(
        4.0,
        "requests running but no generated token for this long = one strike (a stack check decides)",
        min=1,
    )
    startup_grace_s: float = _f(
        0.0, "extra time after ready during which stall lines are only warnings", min=0
    )
    confirm: int = _f(
        2,
        "strikes that confirm a hang without stack proof (no py-spy; with it, only strikes its checks "
        "could not prove, after 20 s)",
        min=1,
    )
    canary_prompt: str = _f("Say OK.", "the canary's user message (never a real prompt)")
    canary_max_tokens: int = _f(4, "tokens the canary asks for", min=1)


@dataclass(frozen=True)
class Remedy:
    name: str
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


DEFAULT_LADDER = (
    Remedy("disable-custom-all-reduce", args=["--disable-custom-all-reduce"]),
    Remedy("nccl-p2p-disable", env={"NCCL_P2P_DISABLE": "1"}),
)


@dataclass(frozen=True)
class RemediesConfig:
    enabled: bool = _f(True, "apply the remedy ladder on repeated failures of the same kind")
    after: int = _f(
        1, "failures of one kind (engine death or stall soon after start) before the next remedy", min=1
    )
    only_tp: bool = _f(True, "apply the ladder only with tensor parallelism > 1 (what the ladder fixes)")
    ladder: tuple[Remedy, ...] = _f(DEFAULT_LADDER, "[[remedies.ladder]] name/args/env, tried in order")


@dataclass(frozen=True)
class ProxyConfig:
    """[proxy]: the HTTP proxy in front of vLLM (proxy.py). Absent = no proxy, nothing changes."""

    listen: str = _f(
        None, "HOST:PORT clients connect to (IPv4, [IPv6] or a name); vLLM stays on [vllm]", required=True
    )
    # A held request waits while a server loads: the default matches timeouts.start_s, the time
    # vsup itself gives a start before calling it failed (a 70B model in bf16 reads ~140 GB and
    # then captures graphs: minutes), and the openai client's own default timeout (600 s).
    hold_timeout_s: float = _f(
        600.0, "a held request waits at most this long for a ready server, then 503 + Retry-After", min=0.1
    )
    # Ollama's OLLAMA_MAX_QUEUE is 512; each held request keeps its body in memory.
    max_held: int = _f(512, "requests waiting for a server at most; one more gets 503 at once", min=1)
    replay: bool = _f(True, "re-send once a request whose client got nothing when its server died or hung")
    max_body_bytes: int = _f(
        32 << 20, "largest request body (kept in memory for replay); larger gets 413", min=1024
    )
    # vsup acts on an engine death from its log line or SIGCHLD within milliseconds; the window
    # covers a loaded 2-core machine. A 5xx from a healthy server reaches its client this late.
    replay_window_s: float = _f(
        3.0,
        "a 5xx counts as nothing sent if vsup withdraws its server within this; a connection "
        "closed unanswered by a server that stays up this long is re-sent to it once",
        min=0,
    )
    retry_after_s: float = _f(5.0, "Retry-After of the proxy's own 503s (hold timeout, too many held)", min=1)
    connect_timeout_s: float = _f(5.0, "connecting to vLLM (loopback) must succeed within this", min=0.1)
    # vLLM closes a connection idle for VLLM_HTTP_TIMEOUT_KEEP_ALIVE (5 s). A POST sent on one it
    # is closing that moment fails with nothing received (aiohttp retries only idempotent methods
    # there, aio-libs/aiohttp#2682), as nginx's upstream keepalive_timeout is kept below the
    # server's: vsup closes its idle connections to vLLM first.
    upstream_keepalive_s: float = _f(
        4.0,
        "an idle connection to vLLM is closed after this; must be below vLLM's "
        "VLLM_HTTP_TIMEOUT_KEEP_ALIVE (5 s), so no request is sent on one vLLM is closing",
        min=0.1,
    )
    idle_timeout_s: float = _f(
        60.0, "a client connection's request headers, and its idle keep-alive, end after this", min=1
    )
    body_timeout_s: float = _f(60.0, "a request body must be received within this, else 408", min=1)
    max_connections: int = _f(
        4096, "client connections at most (also capped at half the fd limit, minus a reserve)", min=1
    )
    # As probes.stall_s: a healthy engine sends every running stream a token far more often
    # (a GPU step is 10-100 ms); a strike only starts a stack check, which a progressing engine passes.
    stall_s: float = _f(
        4.0,
        "every stream in flight without a byte this long: tell the owner (one strike, as a canary)",
        min=1,
    )
    # Issue 16. Off by default: an off-load frees the GPUs, and the next request then waits a cold
    # start (held, never refused). Ollama's keep_alive is 5 min; llama-swap's ttl is off by default.
    idle_unload_s: float | None = _f(
        None,
        "off-load (drain, stop, clean, GPU memory freed) after no request for this long; the next "
        "request loads the last model again, held meanwhile; unset = never",
        min=1,
    )
    swap_on_request: bool = _f(
        False,
        "a request naming the served_model_name of another configured model ([vllm] or [models.NAME]) "
        "swaps to it (a reload), held meanwhile; GET /v1/models lists every configured model",
    )
    # Against thrashing: a cold start costs ~25-45 s here (minutes for a large model); a model that
    # was worth loading serves at least this long while its clients keep asking for it.
    min_resident_s: float = _f(
        30.0,
        "swap_on_request: no swap away from a model ready for less than this while requests for it "
        "keep arriving; the other model's requests wait (oldest waiting model first)",
        min=0,
    )
    # Issue 23. "never" by default: on 2 shared cores a second TP=2 tree loads 3-4x slower beside
    # the first (78-89 s instead of ~22 s, its CPU capped so the serving one keeps a core; the cap
    # needs root and cgroup v1, else the serving tree only yields and clients wait seconds); "auto"
    # is for a machine with the room (spare GPUs, or cores to spare), where clients wait for nothing.
    overlap: str = _f(
        "never",
        "reload: 'auto' = start the new server beside the old one when vsup can show both fit (NVML "
        "free memory vs --gpu-memory-utilization; on CPU MemAvailable vs KV cache + weights), switch "
        "the route once the canary proves it, then drain and stop the old; else (and 'never') sequential",
        choices=("auto", "never"),
    )


@dataclass(frozen=True)
class ModelConfig:
    name: str
    model: str
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    served_model_name: str | None = None


@dataclass(frozen=True)
class Config:
    path: Path
    vllm: VllmConfig
    daemon: DaemonConfig
    timeouts: TimeoutsConfig
    restart: RestartConfig
    probes: ProbesConfig
    remedies: RemediesConfig
    models: dict[str, ModelConfig]
    proxy: ProxyConfig | None = None  # [proxy] present

    @property
    def state_dir(self) -> Path:
        return Path(self.daemon.state_dir)

    @property
    def socket(self) -> Path:
        return Path(self.daemon.socket)

    def model_spec(self, name_or_path: str | None = None) -> ModelConfig:
        """The model to run: a configured [models.NAME], a path/id, or the [vllm] default."""
        if name_or_path is None:
            v = self.vllm
            return ModelConfig(
                name=v.served_model_name or v.model, model=v.model, served_model_name=v.served_model_name
            )
        if name_or_path in self.models:
            return self.models[name_or_path]
        return ModelConfig(name=name_or_path, model=name_or_path)


_SECTIONS: dict[str, type] = {
    "vllm": VllmConfig,
    "daemon": DaemonConfig,
    "timeouts": TimeoutsConfig,
    "restart": RestartConfig,
    "probes": ProbesConfig,
    "remedies": RemediesConfig,
}


def resolve_path(explicit: str | os.PathLike[str] | None, environ: Mapping[str, str] = os.environ) -> Path:
    if explicit:
        return Path(explicit)
    if environ.get("VSUP_CONFIG"):
        return Path(environ["VSUP_CONFIG"])
    return DEFAULT_PATH


def load(path: str | os.PathLike[str] | None = None, *, check_python: bool = True) -> Config:
    """Read and validate the config; raises ConfigError on the first problem."""
    p = resolve_path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(p, None, "file not found (give --config PATH or set VSUP_CONFIG)") from None
    except OSError as e:
        raise ConfigError(p, None, f"cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(p, None, "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(p, None, f"TOML syntax error: {e}") from None
    return parse(data, p, check_python=check_python)


def parse(data: Mapping[str, Any], path: Path, *, check_python: bool = True) -> Config:
    for key in data:
        if key not in _SECTIONS and key not in ("models", "proxy"):
            raise ConfigError(
                path, key, f"unknown section (known: {', '.join([*_SECTIONS, 'models', 'proxy'])})"
            )
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        table = data.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(path, name, "must be a table")
        sections[name] = _build(cls, table, name, path)
    models = _models(data.get("models", {}), path)
    proxy = None
    if "proxy" in data:
        if not isinstance(data["proxy"], dict):
            raise ConfigError(path, "proxy", "must be a table")
        proxy = _build(ProxyConfig, data["proxy"], "proxy", path)
    cfg = Config(path=path, models=models, proxy=proxy, **sections)
    _semantic_checks(cfg, check_python)
    _proxy_checks(cfg)
    return cfg


def _build(cls: type, table: Mapping[str, Any], section: str, path: Path) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in table:
        if key not in fields:
            raise ConfigError(path, f"{section}.{key}", f"unknown key (known: {', '.join(fields)})")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{section}.{name}"
        if name not in table:
            if f.metadata.get("required"):
                raise ConfigError(path, key, "required key is missing")
            continue
        if cls is RemediesConfig and name == "ladder":
            values[name] = _ladder(table[name], key, path)
            continue
        values[name] = _check_type(table[name], f, key, path)
    return cls(**values)


def _type_name(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}.get(
        type(v), type(v).__name__
    )


def _check_type(value: Any, f: dataclasses.Field[Any], key: str, path: Path) -> Any:
    ann = str(f.type)
    want: str
    if ann.startswith("list[str]"):
        want = "array of strings"
        ok = isinstance(value, list) and all(isinstance(x, str) for x in value)
    elif ann.startswith("dict[str, str]"):
        want = "table of strings"
        ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    elif ann.startswith("bool"):
        want, ok = "boolean", isinstance(value, bool)
    elif ann.startswith("int"):
        want, ok = "integer", isinstance(value, int) and not isinstance(value, bool)
    elif ann.startswith("float"):
        want = "number"
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif ann.startswith("str"):
        want, ok = "string", isinstance(value, str)
    else:  # pragma: no cover - a new field type without a checker is a programming error
        raise AssertionError(f"no type check for {ann}")
    if not ok:
        raise ConfigError(path, key, f"expected {want}, got {_type_name(value)} {value!r}")
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if lo is not None and value < lo or hi is not None and value > hi:
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ConfigError(path, key, f"{value} is out of range (must be {rng})")
    if want == "string" and not value.strip():
        raise ConfigError(path, key, "must not be empty")
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(path, key, f"{value!r} is not one of {', '.join(map(repr, choices))}")
    return value


def _str_list(v: Any, key: str, path: Path) -> list[str]:
    if not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
        raise ConfigError(path, key, f"expected array of strings, got {_type_name(v)}")
    return list(v)


def _str_table(v: Any, key: str, path: Path) -> dict[str, str]:
    if not (isinstance(v, dict) and all(isinstance(x, str) for x in v.values())):
        raise ConfigError(path, key, "expected a table of strings")
    return dict(v)


def _ladder(v: Any, key: str, path: Path) -> tuple[Remedy, ...]:
    if not isinstance(v, list):
        raise ConfigError(path, key, f"expected array of tables, got {_type_name(v)}")
    out = []
    for i, item in enumerate(v):
        k = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(path, k, "expected a table with name, args, env")
        extra = set(item) - {"name", "args", "env"}
        if extra:
            raise ConfigError(path, f"{k}.{sorted(extra)[0]}", "unknown key (known: name, args, env)")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(path, f"{k}.name", "required string")
        out.append(
            Remedy(
                name,
                _str_list(item.get("args", []), f"{k}.args", path),
                _str_table(item.get("env", {}), f"{k}.env", path),
            )
        )
    return tuple(out)


def _models(v: Any, path: Path) -> dict[str, ModelConfig]:
    if not isinstance(v, dict):
        raise ConfigError(path, "models", "must be a table of [models.NAME] tables")
    out = {}
    for name, t in v.items():
        key = f"models.{name}"
        if not isinstance(t, dict):
            raise ConfigError(path, key, "must be a table")
        extra = set(t) - {"model", "args", "env", "served_model_name"}
        if extra:
            raise ConfigError(
                path, f"{key}.{sorted(extra)[0]}", "unknown key (known: model, args, env, served_model_name)"
            )
        model = t.get("model")
        if not isinstance(model, str) or not model:
            raise ConfigError(path, f"{key}.model", "required string")
        smn = t.get("served_model_name")
        if smn is not None and not isinstance(smn, str):
            raise ConfigError(path, f"{key}.served_model_name", "expected string")
        out[name] = ModelConfig(
            name=name,
            model=model,
            args=_str_list(t.get("args", []), f"{key}.args", path),
            env=_str_table(t.get("env", {}), f"{key}.env", path),
            served_model_name=smn,
        )
    return out


_RESERVED_ARGS = {"--model", "--host", "--port"}


def _semantic_checks(cfg: Config, check_python: bool) -> None:
    p = cfg.path
    for a in cfg.vllm.args:
        if a.split("=", 1)[0] in _RESERVED_ARGS:
            raise ConfigError(
                p, "vllm.args", f"{a.split('=', 1)[0]} is set by vsup from vllm.model/host/port"
            )
    if check_python:
        py = Path(cfg.vllm.python)
        if not py.is_absolute():
            raise ConfigError(p, "vllm.python", f"must be an absolute path, got {cfg.vllm.python!r}")
        if not py.exists():
            raise ConfigError(p, "vllm.python", f"interpreter {py} does not exist")
        if not os.access(py, os.X_OK) or py.is_dir():
            raise ConfigError(p, "vllm.python", f"{py} is not an executable file")
    _check_paths(cfg, owners=check_python)
    import grp
    import pwd

    d = cfg.daemon
    for key, names, lookup in (
        ("admin_users", d.admin_users, pwd.getpwnam),
        ("read_users", d.read_users, pwd.getpwnam),
        ("admin_groups", d.admin_groups, grp.getgrnam),
        ("read_groups", d.read_groups, grp.getgrnam),
        ("socket_group", [d.socket_group] if d.socket_group else [], grp.getgrnam),
    ):
        for n in names:
            if n.isdigit():
                continue
            try:
                lookup(n)
            except KeyError:
                raise ConfigError(
                    p, f"daemon.{key}", f"no such {'group' if 'group' in key else 'user'}: {n!r}"
                ) from None
    if cfg.restart.backoff_max_s < cfg.restart.backoff_initial_s:
        raise ConfigError(p, "restart.backoff_max_s", "must be >= restart.backoff_initial_s")
    if cfg.daemon.metrics_port is not None and cfg.daemon.metrics_port == cfg.vllm.port:
        raise ConfigError(p, "daemon.metrics_port", "must differ from vllm.port")


def parse_listen(value: str, *, allow_zero: bool = False) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``name:PORT`` -> (host, port). ValueError says why."""
    host, sep, port_s = value.rpartition(":")
    if not sep or not host:
        raise ValueError("expected HOST:PORT (IPv4 literal, [IPv6] or a host name)")
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise ValueError("an IPv6 address must be written [ADDR]:PORT")
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("an IPv6 address must be written [ADDR]:PORT")
    if not port_s.isdigit() or not (0 if allow_zero else 1) <= int(port_s) <= 65535:
        raise ValueError(f"port {port_s!r} is not between 1 and 65535")
    return host, int(port_s)


def _proxy_checks(cfg: Config) -> None:
    if cfg.proxy is None:
        return
    try:
        _host, port = parse_listen(cfg.proxy.listen)
    except ValueError as e:
        raise ConfigError(cfg.path, "proxy.listen", f"{cfg.proxy.listen!r}: {e}") from None
    # vsup checks a port as free on every address, so a port is taken whatever the hosts.
    if port == cfg.vllm.port:
        raise ConfigError(cfg.path, "proxy.listen", f"port {port} is vllm.port (vLLM listens there)")
    if port == cfg.daemon.metrics_port:
        raise ConfigError(cfg.path, "proxy.listen", f"port {port} is daemon.metrics_port")
    _keepalive_check(cfg)
    if cfg.proxy.swap_on_request:
        # A request names its model by served name: each configured model needs one, and one
        # name must mean one model.
        named = [("vllm", cfg.vllm.served_model_name)] + [
            (f"models.{k}", m.served_model_name) for k, m in cfg.models.items()
        ]
        seen: dict[str, str] = {}
        for key, served in named:
            if not served:
                raise ConfigError(cfg.path, f"{key}.served_model_name", "required with proxy.swap_on_request")
            if served in seen and not _same_model(cfg, seen[served], key):
                raise ConfigError(
                    cfg.path,
                    f"{key}.served_model_name",
                    f"{served!r} is also {seen[served]}'s (proxy.swap_on_request needs one name per model)",
                )
            seen.setdefault(served, key)


def _keepalive_check(cfg: Config) -> None:
    """proxy.upstream_keepalive_s below vLLM's keep-alive, as this environment and [vllm].env
    (or a model's env) give it to vLLM."""
    if cfg.proxy is None:
        return
    envs = [("vllm.env", cfg.vllm.env)] + [(f"models.{k}.env", m.env) for k, m in cfg.models.items()]
    for key, env in [("the environment", dict(os.environ)), *envs]:
        raw = env.get("VLLM_HTTP_TIMEOUT_KEEP_ALIVE")
        if raw is None:
            continue
        try:
            server = int(raw)
        except ValueError:
            raise ConfigError(
                cfg.path, key, f"VLLM_HTTP_TIMEOUT_KEEP_ALIVE={raw!r}: vLLM reads it as whole seconds"
            ) from None
        if cfg.proxy.upstream_keepalive_s >= server:
            raise ConfigError(
                cfg.path,
                "proxy.upstream_keepalive_s",
                f"{cfg.proxy.upstream_keepalive_s:g} must be below VLLM_HTTP_TIMEOUT_KEEP_ALIVE={server} "
                f"({key}): vsup would send requests on connections vLLM is closing",
            )


def served_models(cfg: Config) -> dict[str, ModelConfig]:
    """Served name -> model, for swap_on_request: [vllm] and every [models.NAME]."""
    out: dict[str, ModelConfig] = {}
    for spec in [cfg.model_spec(), *cfg.models.values()]:
        if spec.served_model_name:
            out.setdefault(spec.served_model_name, spec)
    return out


def _same_model(cfg: Config, key_a: str, key_b: str) -> bool:
    """[vllm] repeated as a [models.NAME] (same path, same name) is one model, not two."""

    def model(key: str) -> str:
        return cfg.vllm.model if key == "vllm" else cfg.models[key.split(".", 1)[1]].model

    return model(key_a) == model(key_b)


def warnings(cfg: Config) -> list[str]:
    """Valid but probably unintended settings, one line each (check-config prints them)."""
    out = []
    if cfg.proxy is not None:
        import ipaddress

        host = cfg.vllm.host
        try:
            loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            out.append(
                f"{cfg.path}: vllm.host: {host!r} is not loopback: with [proxy], clients could bypass "
                "the proxy (and its hold, replay and truthful /health); use 127.0.0.1"
            )
        px = cfg.proxy
        if px.swap_on_request and px.hold_timeout_s < px.min_resident_s + cfg.timeouts.start_s:
            out.append(
                f"{cfg.path}: proxy.hold_timeout_s: {px.hold_timeout_s:g} s is less than min_resident_s + "
                f"timeouts.start_s ({px.min_resident_s + cfg.timeouts.start_s:g} s): a request for the "
                "other model may get 503 while it waits for its swap"
            )
    return out


def _check_paths(cfg: Config, *, owners: bool) -> None:
    """The directories whose contents vsup believes (issue 20). Always: absolute paths (a
    relative one means a different ledger for the daemon and for a `vsup cleanup` run from
    elsewhere). With `owners` (check-config and run): each directory owned by vsup's user (the
    one running this) or root, not writable by others (nor /tmp itself), and so every directory
    above it (sticky ones such as /tmp allowed); one that does not exist yet is judged by what
    is above it, and again once the daemon made it."""
    from .proctree import untrusted_dir

    p = cfg.path
    for key, value, directory in (
        ("daemon.state_dir", cfg.daemon.state_dir, Path(cfg.daemon.state_dir)),
        ("daemon.socket", cfg.daemon.socket, Path(cfg.daemon.socket).parent),
        ("vllm.log_file", cfg.vllm.log_file, Path(cfg.vllm.log_file).parent),
    ):
        if not Path(value).is_absolute():
            raise ConfigError(p, key, f"must be an absolute path, got {value!r}")
        if owners:
            why = untrusted_dir(directory)
            if why is not None and why != "does not exist":
                what = "" if key == "daemon.state_dir" else f"its directory {directory}: "
                raise ConfigError(p, key, f"not a directory vsup can trust: {what}{why}")


def tensor_parallel_size(args: list[str]) -> int:
    """The -tp/--tensor-parallel-size value in vLLM args (last one wins), 1 if absent."""
    tp = 1
    for i, a in enumerate(args):
        name, _, val = a.partition("=")
        if name in ("-tp", "--tensor-parallel-size", "--tensor_parallel_size"):
            if not val and i + 1 < len(args):
                val = args[i + 1]
            try:
                tp = int(val)
            except ValueError:
                pass
    return tp


def explain() -> str:
    """Every key with its default and meaning, for `vsup check-config --explain`."""
    lines = []
    for name, cls in _SECTIONS.items():
        lines.append(f"[{name}]")
        for f in dataclasses.fields(cls):
            if f.metadata.get("required"):
                dflt = "(required)"
            elif f.default is not dataclasses.MISSING:
                dflt = repr(f.default) if not isinstance(f.default, tuple) else "(see docs)"
            else:
                dflt = repr(f.default_factory())  # type: ignore[operator]  # _f gives each field one or the other
            lines.append(f"  {f.name} = {dflt}    # {f.metadata.get('doc', '')}")
    lines.append("[models.NAME]  model (required), args, env, served_model_name")
    lines.append("[proxy]  (optional: without it vsup runs no proxy)")
    for f in dataclasses.fields(ProxyConfig):
        dflt = "(required)" if f.metadata.get("required") else repr(f.default)
        lines.append(f"  {f.name} = {dflt}    # {f.metadata.get('doc', '')}")
    return "\n".join(lines)
