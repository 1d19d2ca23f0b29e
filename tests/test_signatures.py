"""Tests for vsup.signatures: the catalog loads, validates and matches the right lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from vsup.logparse import parse_line
from vsup.signatures import FAILURE_KINDS, KINDS, Catalog, CatalogError, default_catalog

DATA = Path(__file__).parent / "data"
SEED = DATA / "synthetic" / "seed_0.6.3.log"


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load()


def match(catalog: Catalog, raw: str):
    return catalog.match(parse_line(raw))


def test_packaged_catalog_covers_the_issue_kinds(catalog):
    """The packaged catalog has signatures for every kind issue 5 names."""
    required = {
        "ready",
        "shm_stall",
        "engine_dead",
        "worker_died",
        "startup_failed",
        "oom",
        "nccl_error",
        "leaked_resources",
        "shutdown",
        "serving",
        "progress",
        "custom_allreduce",
    }
    assert required <= catalog.kinds() <= KINDS


def test_every_signature_has_meaning_versions_and_examples(catalog):
    """Each entry documents what it means and the versions it was seen in."""
    for sig in catalog.signatures:
        assert sig.meaning and sig.versions and sig.examples, sig.id
        if sig.kind in FAILURE_KINDS:
            assert sig.action, f"{sig.id}: a failure signature needs advice"


def test_every_example_is_matched_by_its_own_signature(catalog):
    """Each example line parses and is matched by exactly the signature that lists it."""
    for sig in catalog.signatures:
        for ex in sig.examples:
            got = match(catalog, ex)
            assert got is not None and got.sig.id == sig.id, (sig.id, ex)


def test_default_catalog_is_cached():
    """default_catalog() loads the packaged file once."""
    assert default_catalog() is default_catalog()


@pytest.mark.parametrize(
    "raw,sig_id",
    [
        (
            "\x1b[1;36m(VllmWorkerProcess pid=1064554)\x1b[0;0m WARNING 03-12 06:01:57 shm_broadcast.py:396] "
            "No available block found in 60 second. ",
            "shm_stall_v0",
        ),
        (
            "(EngineCore pid=2025) INFO 08-13 11:27:02 [shm_broadcast.py:802] No available shared memory broadcast "
            "block found in 60 seconds. This typically happens when some processes are hanging",
            "shm_stall",
        ),
        ("ERROR 03-12 06:01:27 client.py:250] RuntimeError: Engine loop has died", "engine_loop_died"),
        (
            "CRITICAL 03-12 06:01:36 launcher.py:99] MQLLMEngine is already dead, terminating server process",
            "engine_already_dead",
        ),
        (
            "(EngineCore pid=1) ERROR 11-24 03:52:10 [multiproc_executor.py:316] Worker proc VllmWorker-1 died "
            "unexpectedly (exit code: -9), shutting down executor.",
            "worker_proc_died",
        ),
        (
            "(APIServer pid=1) WARNING 11-24 03:55:01 [core_client.py:818] [shutdown] MPClient: engine core exited "
            "unexpectedly; starting cleanup",
            "engine_core_proc_died",
        ),
        ("INFO:     Application startup complete.", "uvicorn_startup_complete"),
        ("RuntimeError: NCCL error: unhandled system error", "nccl_error"),
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB", "cuda_oom"),
    ],
)
def test_known_lines_match_expected_signature(catalog, raw, sig_id):
    """Lines quoted in vllm-internals.md and the seed match the specific signature."""
    got = match(catalog, raw)
    assert got is not None and got.sig.id == sig_id


def test_v1_stats_line_exposes_numbers(catalog):
    """A 0.32 stats line gives running, waiting and throughputs as numbers."""
    got = match(
        catalog,
        "(APIServer pid=7868) INFO 11-25 12:43:17 [loggers.py:335] Engine 000: Avg prompt "
        "throughput: 1.4 tokens/s, Avg generation throughput: 0.8 tokens/s, Running: 3 reqs, "
        "Waiting: 2 reqs, CPU KV cache usage: 12.5%, Prefix cache hit rate: 0.0%",
    )
    assert got is not None and got.sig.kind == "progress"
    g = got.groups
    assert (
        g["running"],
        g["waiting"],
        g["generation_throughput"],
        g["prompt_throughput"],
        g["kv_cache_usage"],
    ) == (3, 2, 0.8, 1.4, 12.5)


def test_v0_stats_line_maps_pending_to_waiting(catalog):
    """The 0.6.x stats line's Pending count is exposed as waiting, Swapped as swapped."""
    got = match(
        catalog,
        "INFO 03-12 06:00:56 metrics.py:349] Avg prompt throughput: 0.0 tokens/s, Avg generation "
        "throughput: 7.5 tokens/s, Running: 1 reqs, Swapped: 0 reqs, Pending: 4 reqs, GPU KV cache "
        "usage: 3.0%, CPU KV cache usage: 0.0%.",
    )
    assert got is not None
    assert (
        got.groups["running"],
        got.groups["waiting"],
        got.groups["swapped"],
        got.groups["generation_throughput"],
    ) == (1, 4, 0, 7.5)


def test_033_stats_line_with_optional_fields(catalog):
    """0.33's optional Deferred/Preemptions parts do not break the numbers."""
    got = match(
        catalog,
        "(APIServer pid=1) INFO 11-24 10:00:00 [loggers.py:300] Engine 000: Avg prompt throughput: "
        "0.0 tokens/s, Avg generation throughput: 0.0 tokens/s, Running: 5 reqs, Waiting: 0 reqs, "
        "Deferred: 1 reqs, Preemptions: 2, GPU KV cache usage: 90.0%",
    )
    assert got is not None
    assert (got.groups["running"], got.groups["preemptions"], got.groups["kv_cache_usage"]) == (5, 2, 90.0)


def test_tp_size_from_config_dump(catalog):
    """The config dump exposes tensor_parallel_size and the version."""
    got = match(
        catalog,
        "INFO 03-12 05:59:30 llm_engine.py:237] Initializing an LLM engine (v0.6.3.post1) with "
        "config: model='/m', tensor_parallel_size=2, pipeline_parallel_size=1",
    )
    assert got is not None and got.groups["tp"] == 2 and got.groups["version"] == "0.6.3.post1"


def test_numeric_groups_are_numbers(catalog):
    """Groups with a purely numeric pattern (status, exit code) are ints; others stay text."""
    acc = match(catalog, 'INFO:     1.2.3.4:5 - "POST /v1/completions HTTP/1.1" 500 Internal Server Error')
    assert acc.groups == {"client": "1.2.3.4:5", "method": "POST", "path": "/v1/completions", "status": 500}
    died = match(
        catalog,
        "(EngineCore pid=1) ERROR 11-24 03:52:10 [multiproc_executor.py:316] Worker proc "
        "VllmWorker-1 died unexpectedly (exit code: -9), shutting down executor.",
    )
    assert died.groups["exit_code"] == -9 and died.groups["worker"] == "VllmWorker-1"


def test_request_ids_stay_strings(catalog):
    """Group names ending in 'id' are never converted to numbers."""
    got = match(catalog, "INFO 03-12 06:00:56 engine.py:290] Added request 12345.")
    assert got is not None and got.groups["request_id"] == "12345"


@pytest.mark.parametrize(
    "raw",
    [
        "(EngineCore pid=1) INFO 11-25 12:42:42 [default_loader.py:501] Loading weights took 0.00 seconds",
        "(Worker pid=8422) WARNING 11-25 12:42:41 [cpu_worker.py:114] libtcmalloc is not found in LD_PRELOAD.",
        "Triton is installed, but doesn't include CPU backend. Disabling Triton.",
        "",
        "nanobind: leaked 4 instances!",
    ],
)
def test_ordinary_lines_match_nothing(catalog, raw):
    """Noise from a real 0.32 start-up is not a signature."""
    assert match(catalog, raw) is None


def test_failure_text_in_info_line_is_not_a_failure(catalog):
    """Failure signatures skip INFO lines (a user's prompt echo must not read as a crash)."""
    assert (
        match(catalog, "INFO 03-12 06:00:56 logger.py:37] Received request x: prompt: 'CUDA out of memory'")
        is not None
    )  # it is a serving line...
    got = match(catalog, "INFO 03-12 06:00:56 api.py:1] user says CUDA out of memory")
    assert got is None  # ...and free text at INFO is not an OOM


def test_glued_warning_after_other_output_is_found(catalog):
    """A resource_tracker warning glued to the end of another line still matches (seen in 0.32)."""
    raw = (
        "See https://nanobind.readthedocs.io/en/latest/refleaks.html/root/.pyenv/versions/3.11.7/lib/python3.11/"
        "multiprocessing/resource_tracker.py:254: UserWarning: resource_tracker: There appear to be 2 leaked "
        "semaphore objects to clean up at shutdown"
    )
    got = match(catalog, raw)
    assert got is not None and got.sig.kind == "leaked_resources" and got.groups["count"] == 2


def test_seed_log_signatures(catalog):
    """The seed incident yields serving, progress, engine death, stall, shutdown and leak signatures."""
    ids = [m.sig.id for m in (match(catalog, x) for x in SEED.read_text(encoding="utf-8").splitlines()) if m]
    for expected in (
        "request_received",
        "stats",
        "engine_loop_died",
        "engine_already_dead",
        "access_log",
        "uvicorn_shutdown",
        "shm_stall_v0",
        "leaked_semaphores",
    ):
        assert expected in ids


def test_real_clean_capture_has_no_failure(catalog):
    """A clean 0.32 start/request/stop capture shows ready, serving, progress, shutdown and no failure."""
    path = DATA / "logs" / "clean_start_stop.log"
    kinds = {
        m.sig.kind
        for m in (match(catalog, x) for x in path.read_text(encoding="utf-8", errors="replace").splitlines())
        if m
    }
    assert {"ready", "serving", "progress", "shutdown", "starting"} <= kinds
    assert not kinds & FAILURE_KINDS


# ---------------------------------------------------------------------- invalid catalogs

GOOD = """schema = 1
[[signature]]
id = "a"
kind = "ready"
keys = ["up"]
pattern = "up"
versions = "all"
meaning = "m"
action = ""
examples = ["INFO:     up"]
line_kinds = ["uvicorn"]
"""


def test_minimal_catalog_from_file(tmp_path):
    """A small valid catalog file loads from a path."""
    p = tmp_path / "c.toml"
    p.write_text(GOOD)
    cat = Catalog.load(p)
    assert len(cat) == 1 and cat["a"].kind == "ready"


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda s: s.replace('kind = "ready"', 'kind = "exploded"'), "unknown kind 'exploded'"),
        (lambda s: s.replace('pattern = "up"', 'pattern = "(up"'), "bad pattern"),
        (lambda s: s.replace('keys = ["up"]', "keys = []"), "keys must be"),
        (lambda s: s.replace('meaning = "m"\n', ""), "missing meaning"),
        (
            lambda s: s.replace('examples = ["INFO:     up"]', 'examples = ["INFO:     down"]'),
            "example is matched by no signature",
        ),
        (lambda s: s + s.split("schema = 1\n")[1], "duplicate id 'a'"),
        (lambda s: s.replace("schema = 1", "schema = 2"), "schema = 1"),
        (
            lambda s: s.replace('versions = "all"', 'versions = "all"\ncolour = "red"'),
            "unknown keys ['colour']",
        ),
        (lambda s: s + "[[signature", "not valid TOML"),
        (
            lambda s: s.replace('line_kinds = ["uvicorn"]', 'line_kinds = ["uvicorn"]\nlevels = ["LOUD"]'),
            "levels must be",
        ),
    ],
)
def test_invalid_catalog_gives_clear_error(tmp_path, mutate, needle):
    """Each kind of mistake raises CatalogError naming the problem (and the entry)."""
    p = tmp_path / "c.toml"
    p.write_text(mutate(GOOD))
    with pytest.raises(CatalogError) as ei:
        Catalog.load(p)
    assert needle in str(ei.value)
    assert str(p) in str(ei.value)


def test_shadowed_example_names_the_shadowing_signature():
    """An example caught by an earlier signature names that signature."""
    second = GOOD.split("schema = 1\n")[1].replace('id = "a"', 'id = "b"')
    with pytest.raises(CatalogError, match="signature 'b': example is matched by signature 'a'"):
        Catalog.from_toml(GOOD + second)


def test_missing_file_gives_clear_error(tmp_path):
    """An unreadable catalog path raises CatalogError, not OSError."""
    with pytest.raises(CatalogError, match="cannot read"):
        Catalog.load(tmp_path / "nope.toml")
