"""Remove user content (prompts, token ids, messages, outputs) from vLLM log text.

The seed incident's log holds a user's whole prompt (`Received request ...: prompt: '...'`), and
vsup copies log lines into incident bundles, `status` and `vsup diagnose` output. Everything vsup
writes or prints from a vLLM log goes through `redact()` first.

What counts as user content, wherever it appears as ``key: value`` / ``key=value`` /
``'key': value`` / ``"key": value`` and the value is a quoted string or a bracketed list/object:

* ``prompt`` (0.6.x ``Received request X: prompt: '...'``, 0.32 DEBUG ``Request X details:``),
* ``prompt_token_ids``, ``output_token_ids``, ``new_token_ids``, ``token_ids`` (not
  ``stop_token_ids``: those are sampling parameters the operator set),
* ``messages``, ``content``, ``input``, ``text`` (request JSON bodies, chat messages),
* ``output`` (``Generated response X: output: '...'``).

The value, quotes or brackets included, becomes ``<redacted N chars>``; the key and the rest of the
line (request id, params, finish reason) stay readable. Values that are neither quoted nor bracketed
(``prompt: None``, ``prompt_token_ids_len=5``) are left alone.

The invariant is "no user text survives", so every parse failure errs toward redacting more: an
unterminated string or unbalanced bracket (a line cut by the tailer's length cap or by vLLM's
``--max-log-len``) is redacted to the end of its line. Scanning never crosses a newline, because
vLLM writes these values with repr()/JSON, which escape newlines; a raw newline means the value was
cut. Lines without any trigger word return unchanged after a few substring tests (the fast path).

A command line's secrets (`--api-key X`) are another kind: `hide_flag_values` replaces them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

__all__ = ["hide_flag_values", "redact"]

# Cheap gate: a sensitive key is one of these words directly followed by one of these characters
# (vLLM writes repr()/JSON/f-strings: no space before the colon). "prompt" alone is in every stats
# line ("Avg prompt throughput"), so the word test is followed by the four suffix tests.
_WORDS = ("prompt", "token_ids", "messages", "content", "output", "input", "text")
_GATE = tuple((w, tuple(w + c for c in ":='\"")) for w in _WORDS)

# Candidate keys; a literal-led alternation, so sre skips quickly to the next p/t/m/c/o/i.
# _accept_key then checks the boundary before the key and the value after it.
_KEY = re.compile(
    r"""(prompt|messages|content|output|input|text|(?:prompt_|output_|new_)?token_ids)(['"]?)[:=][ \t]*"""
)
# A complete single-line string literal (repr or JSON): escapes are skipped, newline never inside.
_STR = {
    "'": re.compile(r"'(?:[^'\\\n]|\\.)*'"),
    '"': re.compile(r'"(?:[^"\\\n]|\\.)*"'),
}
# Token-id lists are the common bracketed value: numbers only, no nesting.
_NUMLIST = re.compile(r"\[[\d,\s]*\]")
# Tokens inside a bracketed value: brackets, whole strings (or an unterminated quote), other runs.
_TOKEN = re.compile(r"""[\[\]{}()]|'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*"|['"]|[^\[\]{}()'"\n]+|\n""")
_OPEN = {"[": "]", "{": "}", "(": ")"}


def redact(text: str) -> str:
    """`text` with prompts, token ids, messages and outputs replaced by ``<redacted N chars>``."""
    if not _gate(text):
        return text
    out: list[str] = []
    pos = 0
    search_from = 0
    while True:
        m = _KEY.search(text, search_from)
        if m is None:
            break
        if not _accept_key(text, m):
            search_from = m.start() + 1
            continue
        start = m.end()
        end = _value_end(text, start)
        out.append(text[pos:start])
        out.append(f"<redacted {end - start} chars>")
        pos = search_from = end
    if not out:
        return text
    out.append(text[pos:])
    return "".join(out)


def _gate(text: str) -> bool:
    for word, keyed in _GATE:
        if word in text:
            for k in keyed:
                if k in text:
                    return True
    return False


def _accept_key(text: str, m: re.Match[str]) -> bool:
    """A whole key (not 'stop_token_ids', not 'x.prompt'), quotes paired, a quoted/bracketed value next."""
    b = m.start()
    if b > 0:
        prev = text[b - 1]
        if prev.isalnum() or prev in "_.":
            return False
        quote = m.group(2)
        if quote and prev != quote:
            return False
    elif m.group(2):
        return False
    e = m.end()
    return e < len(text) and text[e] in "'\"[{"


def _line_end(text: str, i: int) -> int:
    nl = text.find("\n", i)
    return len(text) if nl < 0 else nl


def _value_end(text: str, i: int) -> int:
    """End index of the quoted or bracketed value starting at text[i]; the line's end if it is cut."""
    c = text[i]
    if c in _STR:
        m = _STR[c].match(text, i)
        return m.end() if m is not None else _line_end(text, i)
    m = _NUMLIST.match(text, i)
    if m is not None:
        return m.end()
    stack: list[str] = []
    for tok in _TOKEN.finditer(text, i):
        t = tok.group()
        if t in _OPEN:
            stack.append(_OPEN[t])
        elif t in ("]", "}", ")"):
            if not stack or stack[-1] != t:
                break  # mismatched: cannot trust the structure
            stack.pop()
            if not stack:
                return tok.end()
        elif t in ("'", '"', "\n"):
            break  # unterminated string inside, or the line ended inside the value
    return _line_end(text, i)


def hide_flag_values(argv: Iterable[str], secret: Callable[[str], bool], mark: str) -> list[str]:
    """`argv` with the value of every flag `secret` names (`--flag X` or `--flag=X`) as `mark`."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(mark)
            hide_next = False
            continue
        flag, eq, _ = arg.partition("=")
        if secret(flag):
            if eq:
                out.append(f"{flag}={mark}")
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(arg)
    return out
