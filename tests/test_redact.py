"""Tests for vsup.redact: user content never survives, the rest stays readable."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from vsup.redact import redact

SEED = Path(__file__).parent / "data" / "synthetic" / "seed_0.6.3.log"
MARK = "S3CR3T"
PARAMS = "SamplingParams(n=1, temperature=0.7, stop=[], stop_token_ids=[], max_tokens=16)"


def test_seed_prompt_and_token_ids_are_removed():
    """The seed's Korean prompt and its token ids are gone; request id and params remain."""
    original = SEED.read_text(encoding="utf-8")
    out = redact(original)
    first = out.splitlines()[0]
    assert "chat-8eee432560b948a88f57fe4114e19ab8: prompt: <redacted " in first
    assert "params: SamplingParams(n=1, presence_penalty=0.0" in first
    assert "prompt_token_ids: <redacted " in first and "128000" not in first
    assert not any("\uac00" <= ch <= "\ud7a3" for ch in out)  # no Hangul syllable left


def test_lines_without_user_content_are_unchanged():
    """Every seed line but the request line comes back identical (same object for clean text)."""
    lines = SEED.read_text(encoding="utf-8").splitlines()[1:]
    for line in lines:
        assert redact(line) is line


def test_stats_line_is_not_touched():
    """'Avg prompt throughput' is not a prompt."""
    line = "INFO 03-12 06:00:56 metrics.py:349] Avg prompt throughput: 0.0 tokens/s, Running: 0 reqs"
    assert redact(line) is line


def test_escaped_quotes_and_newlines_inside_prompt():
    """An escaped quote does not end the prompt early."""
    line = f"Received request r1: prompt: 'a\\'{MARK}\\n\\'', params: {PARAMS}, prompt_token_ids: [1, 2]"
    out = redact(line)
    assert MARK not in out and out.endswith(f"params: {PARAMS}, prompt_token_ids: <redacted 6 chars>")


def test_double_quoted_repr_prompt():
    """repr() picks double quotes when the prompt has an apostrophe."""
    out = redact(f'Received request r1: prompt: "it\'s {MARK}", params: {PARAMS}')
    assert MARK not in out and f"params: {PARAMS}" in out


def test_unterminated_prompt_is_redacted_to_end_of_line_only():
    """A prompt cut by a length cap is redacted to its line's end, and the next line is kept."""
    out = redact(f"Received request r1: prompt: '{MARK} and more …[truncated 99 bytes]\nINFO:     next line")
    assert MARK not in out and out.endswith("\nINFO:     next line")


def test_json_body_messages_are_removed():
    """A request JSON body keeps model and max_tokens, loses messages."""
    body = {"model": "m", "messages": [{"role": "user", "content": f'[{MARK}] }} " ]'}], "max_tokens": 5}
    out = redact("Request chatcmpl-1 JSON body: " + json.dumps(body))
    assert MARK not in out and '"model": "m"' in out and '"max_tokens": 5' in out


def test_python_dict_content_is_removed():
    """A repr'd message dict loses its content value only."""
    out = redact(f"messages=[{{'role': 'user', 'content': '{MARK}'}}]")
    assert MARK not in out
    out2 = redact(f"{{'role': 'user', 'content': '{MARK}'}}")
    assert out2 == "{'role': 'user', 'content': <redacted 8 chars>}"


def test_generated_output_is_removed():
    """The generated text of 'Generated response' lines is user content too."""
    out = redact(f"Generated response chatcmpl-9: output: '{MARK}', finish_reason: stop")
    assert out == "Generated response chatcmpl-9: output: <redacted 8 chars>, finish_reason: stop"


def test_scheduler_dump_token_ids_removed_but_stop_ids_kept():
    """prompt_token_ids=[...] in a repr dump goes; stop_token_ids=[...] (operator settings) stays."""
    out = redact(
        "NewRequestData(req_id=a, prompt_token_ids=[11, 22, 33], stop_token_ids=[7], prompt_token_ids_len=3)"
    )
    assert (
        out
        == "NewRequestData(req_id=a, prompt_token_ids=<redacted 12 chars>, stop_token_ids=[7], prompt_token_ids_len=3)"
    )


def test_none_values_are_left_alone():
    """prompt: None is not content."""
    line = "Request x details: prompt: None, prompt_token_ids: None, prompt_embeds shape: None."
    assert redact(line) == line


secrets = st.text(min_size=0, max_size=40).map(lambda s: f"{MARK}{s}{MARK}{s[::-1]}{MARK}")


@settings(max_examples=400, deadline=None)
@given(secret=secrets, req=st.from_regex(r"[a-z]{3,8}-[0-9a-f]{8}", fullmatch=True))
def test_random_secret_in_received_request_never_survives(secret, req):
    """Whatever the prompt holds (quotes, backslashes, newlines, brackets), none of it survives."""
    line = f"INFO 03-12 06:00:54 logger.py:37] Received request {req}: prompt: {secret!r}, params: {PARAMS}, lora_request: None."
    out = redact(line)
    assert MARK not in out
    assert f"Received request {req}: prompt: <redacted " in out and f"params: {PARAMS}" in out


@settings(max_examples=300, deadline=None)
@given(secret=secrets, key=st.sampled_from(["prompt", "content", "input", "text", "output"]))
def test_random_secret_in_json_body_never_survives(secret, key):
    """A secret under any content key of a JSON request body is removed."""
    body = {"model": "m", "messages": [{"role": "user", key: secret}], key: secret}
    out = redact("Request r JSON body: " + json.dumps(body, ensure_ascii=False))
    assert MARK not in out and '"model": "m"' in out


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 200000), min_size=3, max_size=50))
def test_random_token_ids_never_survive(ids):
    """prompt_token_ids lists are removed whole."""
    out = redact(
        f"Received request r: prompt: 'x', params: {PARAMS}, prompt_token_ids: {ids}, lora_request: None."
    )
    assert str(ids)[1:-1] not in out and "lora_request: None." in out


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_never_raises(text):
    """redact accepts any text."""
    assert isinstance(redact(text), str)
