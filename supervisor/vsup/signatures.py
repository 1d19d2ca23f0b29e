"""The signature catalog: which vLLM log lines matter, what they mean, what to do.

The catalog is data (`signatures.toml` in this package) so that a new vLLM wording is a TOML edit
with an example line, not a code change. `Catalog.load()` validates the whole file up front and
fails with a message naming the entry: a broken catalog must stop the daemon at start-up, not
silently stop matching in production.

Matching is on the hot path (the daemon runs `parse_line` + `Catalog.match` on every tailed line,
and `vsup diagnose` on million-line logs), and almost every line matches nothing. So each signature
carries literal `keys`; a line's message is searched with a signature's regex only when it contains
one of that signature's keys (`str.__contains__` is a C loop, ~30 ns on a typical line). Rejected
alternatives, measured on typical 100-char messages with ~50 keys: one combined alternation regex of
all patterns or all keys (sre tries every alternative at every position: 2-7 us per non-matching
line), and a trie-shaped key regex (still ~3.5 us). Signatures are also bucketed by the line kind
they apply to, so uvicorn access lines (the most common line of a busy server) see ~6 keys.

The loader checks every example line of every signature: it must parse and be matched by *that*
signature through the same prefilter, which catches a key that is not in the pattern's text and an
earlier signature that shadows a later one.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from os import PathLike
from typing import Any

from vsup.logparse import LogLine, parse_line

__all__ = [
    "KINDS",
    "FAILURE_KINDS",
    "STACK_CATEGORIES",
    "Signature",
    "StackSignature",
    "Match",
    "Catalog",
    "CatalogError",
    "default_catalog",
]

# Kinds the daemon and `vsup diagnose` understand. The first nine are the issue's; the rest:
#   serving          the server answered/accepted requests (access log, "Received request"): it was up
#   progress         the periodic stats line, with numbers (running, waiting, throughput)
#   custom_allreduce custom all-reduce / P2P set-up lines: context for TP>1 hang advice
#   starting         start-up progress and the config dump (version, model, TP size)
#   nccl_warning     NCCL WARN lines: context, fatal only if an error follows
KINDS = frozenset(
    {
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
        "starting",
        "nccl_warning",
    }
)
# Kinds that mean the server failed (issue 5: startup_failed before it was up, else engine_dead).
FAILURE_KINDS = frozenset({"startup_failed", "oom", "nccl_error", "engine_dead", "worker_died"})
LINE_KINDS = frozenset({"vllm", "uvicorn", "traceback", "warning", "other"})
_DEFAULT_LINE_KINDS = frozenset({"vllm", "traceback", "warning", "other"})
# Level buckets. "none" is a line without a level (raw traceback lines, tqdm, anything unparsed).
LEVELS = frozenset({"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "none"})
_LEVEL_ALIASES = {"WARN": "WARNING", "FATAL": "CRITICAL", "TRACE": "DEBUG", None: "none"}
# vLLM reports failures with logger.error/exception/fatal/warning or prints them raw (tracebacks);
# no failure string of 0.6.3-0.33 is logged at INFO or DEBUG except where a signature says so
# (`levels`). Skipping failure signatures on INFO/DEBUG lines keeps the busiest lines cheap.
_FAILURE_LEVELS = frozenset({"WARNING", "ERROR", "CRITICAL", "none"})
_REQUIRED = ("id", "kind", "pattern", "keys", "versions", "meaning", "action", "examples")
_OPTIONAL = ("fields", "line_kinds", "levels", "generic", "suspect_collectives")
# A named group (or a field's group) whose whole sub-pattern is one of these holds a number and is
# converted (int or float) in Match.groups; every other group stays a string (request ids that
# happen to be digits included). Decided once per signature at load time, so a match costs one
# int()/float() per numeric group instead of a type guess per value.
# Stack signatures ([[stack]] entries) classify where one thread of a tree's process waits, from
# its frames (`func (file:line)`, innermost first; py-spy prints `Class.method`, faulthandler only
# `method`, so patterns allow both). Categories, which `vsup diagnose` reasons with:
#   collective     inside a TP collective: it waits for every peer rank to join
#   waits_workers  the engine core waits for the workers' replies (an RPC over the shm queue)
#   idle           waits for work (an idle engine core, worker or resource tracker)
#   event_loop     an asyncio/uvloop event loop (the API server's main thread)
STACK_CATEGORIES = frozenset({"collective", "waits_workers", "idle", "event_loop"})
_STACK_REQUIRED = ("id", "category", "pattern", "versions", "meaning", "examples")
_INT_BODIES = frozenset({r"\d+", r"-?\d+", r"\d{3}", r"\d{1,10}"})
_FLOAT_BODIES = frozenset({r"[\d.]+", r"-?[\d.]+", r"\d+\.\d+"})
_NAMED_GROUP = re.compile(r"\(\?P<(\w+)>([^()]*)\)")


class CatalogError(ValueError):
    """The catalog file is unreadable or an entry is invalid (the message names the entry)."""


@dataclass(frozen=True, slots=True)
class Signature:
    id: str
    kind: str
    pattern: str
    keys: tuple[str, ...]
    versions: str
    meaning: str
    action: str
    line_kinds: frozenset[str]
    levels: frozenset[str]
    examples: tuple[str, ...]
    regex: re.Pattern[str] = field(repr=False, compare=False)
    fields: tuple[tuple[str, re.Pattern[str], type | None], ...] = field(
        default=(), repr=False, compare=False
    )
    numeric: tuple[tuple[str, type], ...] = field(default=(), repr=False, compare=False)
    generic: bool = False  # a consequence reported after the real failure; never the root cause
    suspect_collectives: bool = False  # typical of a hung/broken TP collective (custom AR, NCCL P2P)


@dataclass(frozen=True, slots=True)
class StackSignature:
    """Where a thread waits, recognised from its frames (see STACK_CATEGORIES)."""

    id: str
    category: str
    pattern: str
    versions: str
    meaning: str
    examples: tuple[str, ...]
    regex: re.Pattern[str] = field(repr=False, compare=False)


@dataclass(slots=True)  # not frozen: one is built per matching line and frozen init costs 0.4 us
class Match:
    """A line matched by a signature. `groups`: the pattern's named groups and `fields` that matched
    (absent when they did not participate); a group whose pattern is purely numeric (``\\d+``,
    ``-?\\d+``, ``[\\d.]+``) is an int or float, any other a string."""

    sig: Signature
    line: LogLine
    groups: dict[str, Any]


def _numeric(body: str) -> type | None:
    if body in _INT_BODIES:
        return int
    if body in _FLOAT_BODIES:
        return float
    return None


def _to_number(conv: type, value: str) -> Any:
    try:
        return conv(value)
    except ValueError:  # "[\\d.]+" also matches "1.2.3": keep the text
        return value


class Catalog:
    """An ordered, validated set of signatures. Build with `Catalog.load()`."""

    __slots__ = ("signatures", "stacks", "_by_id", "_buckets")

    def __init__(
        self,
        signatures: list[Signature] | tuple[Signature, ...],
        stacks: list[StackSignature] | tuple[StackSignature, ...] = (),
    ) -> None:
        self.signatures: tuple[Signature, ...] = tuple(signatures)
        self.stacks: tuple[StackSignature, ...] = tuple(stacks)
        self._by_id = {s.id: s for s in self.signatures}
        # Per (line kind, level): the distinct keys (the gate: one C-level substring search each,
        # and a non-matching line, the common case, stops there) and the (key, signature) pairs in
        # catalog order, so the first hit is the highest-priority signature.
        self._buckets: dict[
            tuple[str, str | None], tuple[tuple[str, ...], tuple[tuple[str, Signature], ...]]
        ] = {}
        for lk in LINE_KINDS:
            for lv in LEVELS:
                pairs = tuple(
                    (k, s) for s in self.signatures if lk in s.line_kinds and lv in s.levels for k in s.keys
                )
                gate = tuple(dict.fromkeys(k for k, _ in pairs))
                bucket = (gate, pairs)
                self._buckets[(lk, None if lv == "none" else lv)] = bucket
        for alias, lv in _LEVEL_ALIASES.items():
            if alias is not None:
                for lk in LINE_KINDS:
                    self._buckets[(lk, alias)] = self._buckets[(lk, lv)]

    def __len__(self) -> int:
        return len(self.signatures)

    def __getitem__(self, sig_id: str) -> Signature:
        return self._by_id[sig_id]

    def kinds(self) -> frozenset[str]:
        return frozenset(s.kind for s in self.signatures)

    def match(self, line: LogLine) -> Match | None:
        """The first signature (catalog order) matching `line.message`, or None."""
        bucket = self._buckets.get((line.kind, line.level))
        if bucket is None:
            return None
        msg = line.message
        for key in bucket[0]:
            if key in msg:
                break
        else:
            return None
        for key, sig in bucket[1]:
            if key in msg:
                m = sig.regex.search(msg)
                if m is not None:
                    return self._make(sig, line, m)
        return None

    def match_stack(self, frames: list[str] | tuple[str, ...]) -> tuple[StackSignature, int] | None:
        """The first stack signature (catalog order) that matches any of `frames` (innermost
        first), with the index of the innermost frame it matched; None if none does."""
        for sig in self.stacks:
            for i, f in enumerate(frames):
                if sig.regex.search(f):
                    return sig, i
        return None

    @staticmethod
    def _make(sig: Signature, line: LogLine, m: re.Match[str]) -> Match:
        groups = {k: v for k, v in m.groupdict().items() if v is not None}
        for name, conv in sig.numeric:
            v = groups.get(name)
            if v is not None:
                groups[name] = _to_number(conv, v)
        for name, rx, fconv in sig.fields:
            f = rx.search(line.message)
            if f is not None:
                groups[name] = f.group(1) if fconv is None else _to_number(fconv, f.group(1))
        return Match(sig, line, groups)

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str | PathLike[str] | None = None) -> Catalog:
        """Load and validate a catalog; `path=None` is the packaged signatures.toml.

        Raises CatalogError with the file and the entry's id/index in the message.
        """
        where = str(path) if path is not None else "vsup/signatures.toml (packaged)"
        try:
            if path is None:
                text = resources.files("vsup").joinpath("signatures.toml").read_text(encoding="utf-8")
            else:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise CatalogError(f"{where}: cannot read signature catalog: {e}") from e
        return cls.from_toml(text, where=where)

    @classmethod
    def from_toml(cls, text: str, *, where: str = "<string>") -> Catalog:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise CatalogError(f"{where}: not valid TOML: {e}") from e
        if data.get("schema") != 1:
            raise CatalogError(f"{where}: expected `schema = 1` at the top, got {data.get('schema')!r}")
        entries = data.get("signature")
        if not isinstance(entries, list) or not entries:
            raise CatalogError(f"{where}: no [[signature]] entries")
        unknown_top = set(data) - {"schema", "signature", "stack"}
        if unknown_top:
            raise CatalogError(f"{where}: unknown top-level keys {sorted(unknown_top)}")
        sigs: list[Signature] = []
        seen: set[str] = set()
        for i, entry in enumerate(entries):
            sig = _build(entry, f"{where}: signature #{i + 1}")
            if sig.id in seen:
                raise CatalogError(f"{where}: signature #{i + 1}: duplicate id {sig.id!r}")
            seen.add(sig.id)
            sigs.append(sig)
        stacks: list[StackSignature] = []
        raw_stacks = data.get("stack", [])
        if not isinstance(raw_stacks, list):
            raise CatalogError(f"{where}: stack must be an array of tables ([[stack]])")
        for i, entry in enumerate(raw_stacks):
            st = _build_stack(entry, f"{where}: stack #{i + 1}")
            if st.id in seen:
                raise CatalogError(f"{where}: stack #{i + 1}: duplicate id {st.id!r}")
            seen.add(st.id)
            stacks.append(st)
        catalog = cls(sigs, stacks)
        catalog._check_examples(where)
        return catalog

    def _check_examples(self, where: str) -> None:
        for st in self.stacks:
            # An example is one thread's frames, innermost first, one per line.
            for ex in st.examples:
                got = self.match_stack(ex.splitlines())
                if got is None or got[0] is not st:
                    other = f"stack signature {got[0].id!r}" if got else "no stack signature"
                    raise CatalogError(
                        f"{where}: stack {st.id!r}: example is matched by {other}: {ex[:200]!r}"
                    )
        for sig in self.signatures:
            for ex in sig.examples:
                line = parse_line(ex)
                hit = self.match(line)
                if hit is None or hit.sig is not sig:
                    other = f"signature {hit.sig.id!r}" if hit else "no signature"
                    raise CatalogError(
                        f"{where}: signature {sig.id!r}: example is matched by {other} "
                        f"(line kind {line.kind!r}, message {line.message[:120]!r}): {ex[:200]!r}"
                    )


def _build_stack(entry: Any, ctx: str) -> StackSignature:
    if not isinstance(entry, dict):
        raise CatalogError(f"{ctx}: not a table")
    if isinstance(entry.get("id"), str):
        ctx = f"{ctx} ({entry['id']!r})"
    missing = [k for k in _STACK_REQUIRED if k not in entry]
    if missing:
        raise CatalogError(f"{ctx}: missing {', '.join(missing)}")
    unknown = set(entry) - set(_STACK_REQUIRED)
    if unknown:
        raise CatalogError(f"{ctx}: unknown keys {sorted(unknown)}")
    for k in ("id", "category", "pattern", "versions", "meaning"):
        if not isinstance(entry[k], str):
            raise CatalogError(f"{ctx}: {k} must be a string")
    if not re.fullmatch(r"[a-z0-9_]+", entry["id"]):
        raise CatalogError(f"{ctx}: id must be lower_snake_case")
    if entry["category"] not in STACK_CATEGORIES:
        raise CatalogError(
            f"{ctx}: unknown category {entry['category']!r} (known: {', '.join(sorted(STACK_CATEGORIES))})"
        )
    examples = entry["examples"]
    if not isinstance(examples, list) or not examples or not all(isinstance(x, str) and x for x in examples):
        raise CatalogError(f"{ctx}: examples must be a non-empty list of frame lines")
    try:
        regex = re.compile(entry["pattern"])
    except re.error as e:
        raise CatalogError(f"{ctx}: bad pattern: {e}") from e
    return StackSignature(
        id=entry["id"],
        category=entry["category"],
        pattern=entry["pattern"],
        versions=entry["versions"],
        meaning=entry["meaning"],
        examples=tuple(examples),
        regex=regex,
    )


def _build(entry: Any, ctx: str) -> Signature:
    if not isinstance(entry, dict):
        raise CatalogError(f"{ctx}: not a table")
    sid = entry.get("id")
    if isinstance(sid, str):
        ctx = f"{ctx} ({sid!r})"
    missing = [k for k in _REQUIRED if k not in entry]
    if missing:
        raise CatalogError(f"{ctx}: missing {', '.join(missing)}")
    unknown = set(entry) - set(_REQUIRED) - set(_OPTIONAL)
    if unknown:
        raise CatalogError(f"{ctx}: unknown keys {sorted(unknown)}")
    for k in ("id", "kind", "pattern", "versions", "meaning", "action"):
        if not isinstance(entry[k], str):
            raise CatalogError(f"{ctx}: {k} must be a string")
    if not re.fullmatch(r"[a-z0-9_]+", entry["id"]):
        raise CatalogError(f"{ctx}: id must be lower_snake_case")
    if entry["kind"] not in KINDS:
        raise CatalogError(f"{ctx}: unknown kind {entry['kind']!r} (known: {', '.join(sorted(KINDS))})")
    keys = entry["keys"]
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k for k in keys):
        raise CatalogError(f"{ctx}: keys must be a non-empty list of non-empty strings")
    examples = entry["examples"]
    if not isinstance(examples, list) or not examples or not all(isinstance(x, str) for x in examples):
        raise CatalogError(f"{ctx}: examples must be a non-empty list of strings")
    try:
        regex = re.compile(entry["pattern"])
    except re.error as e:
        raise CatalogError(f"{ctx}: bad pattern: {e}") from e
    fields: list[tuple[str, re.Pattern[str], type | None]] = []
    raw_fields = entry.get("fields", {})
    if not isinstance(raw_fields, dict):
        raise CatalogError(f"{ctx}: fields must be a table of name = regex")
    for name, pat in raw_fields.items():
        if not isinstance(pat, str):
            raise CatalogError(f"{ctx}: field {name!r} must be a regex string")
        try:
            frx = re.compile(pat)
        except re.error as e:
            raise CatalogError(f"{ctx}: bad regex for field {name!r}: {e}") from e
        if frx.groups != 1:
            raise CatalogError(f"{ctx}: field {name!r} regex must have exactly one group")
        body = re.search(r"(?<!\\)\((?!\?)([^()]*)\)", pat)
        fields.append((name, frx, _numeric(body.group(1)) if body else None))
    numeric = tuple(
        (name, conv)
        for name, body in _NAMED_GROUP.findall(entry["pattern"])
        if (conv := _numeric(body)) is not None
    )
    line_kinds = entry.get("line_kinds", sorted(_DEFAULT_LINE_KINDS))
    if not isinstance(line_kinds, list) or not set(line_kinds) <= LINE_KINDS or not line_kinds:
        raise CatalogError(f"{ctx}: line_kinds must be a non-empty subset of {sorted(LINE_KINDS)}")
    default_levels = _FAILURE_LEVELS if entry["kind"] in FAILURE_KINDS else LEVELS
    for flag in ("generic", "suspect_collectives"):
        if not isinstance(entry.get(flag, False), bool):
            raise CatalogError(f"{ctx}: {flag} must be true or false")
    levels = entry.get("levels", sorted(default_levels))
    if not isinstance(levels, list) or not set(levels) <= LEVELS or not levels:
        raise CatalogError(f"{ctx}: levels must be a non-empty subset of {sorted(LEVELS)}")
    return Signature(
        id=entry["id"],
        kind=entry["kind"],
        pattern=entry["pattern"],
        keys=tuple(keys),
        versions=entry["versions"],
        meaning=entry["meaning"],
        action=entry["action"],
        line_kinds=frozenset(line_kinds),
        levels=frozenset(levels),
        examples=tuple(examples),
        regex=regex,
        fields=tuple(fields),
        numeric=numeric,
        generic=entry.get("generic", False),
        suspect_collectives=entry.get("suspect_collectives", False),
    )


_default: Catalog | None = None


def default_catalog() -> Catalog:
    """The packaged catalog, loaded once per process."""
    global _default
    if _default is None:
        _default = Catalog.load()
    return _default
