"""Token usage read from the end of a body (relay.usage): both APIs, JSON and SSE, split chunks, and
bodies that have none or a broken one."""

from __future__ import annotations

import orjson
import pytest

from relay.usage import tokens_in


def Tokens(prompt: int, completion: int, cached: int, reasoning: int) -> tuple[int, int, int, int]:
    return prompt, completion, cached, reasoning

CHAT_USAGE = {
    "prompt_tokens": 12,
    "completion_tokens": 30,
    "total_tokens": 42,
    "prompt_tokens_details": {"cached_tokens": 8, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 5, "audio_tokens": 0},
}
RESPONSES_USAGE = {
    "input_tokens": 100,
    "input_tokens_details": {"cached_tokens": 64},
    "output_tokens": 20,
    "output_tokens_details": {"reasoning_tokens": 16},
    "total_tokens": 120,
}


def test_chat_completion_json() -> None:
    body = orjson.dumps({"id": "x", "choices": [{"message": {"content": 'the "usage": {} word'}}], "usage": CHAT_USAGE})
    assert tokens_in(b"", body) == Tokens(12, 30, 8, 5)


def test_responses_object_with_fields_after_usage() -> None:
    body = orjson.dumps({"id": "resp", "output": [], "usage": RESPONSES_USAGE, "user": None, "metadata": {"k": "v" * 500}})
    assert tokens_in(b"", body) == Tokens(100, 20, 64, 16)


def test_chat_stream_usage_chunk_before_done() -> None:
    usage_chunk = b"data: " + orjson.dumps({"choices": [], "usage": CHAT_USAGE}) + b"\n\n"
    assert tokens_in(b'data: {"choices":[{"delta":{}}],"usage":null}\n\n' + usage_chunk, b"data: [DONE]\n\n") == Tokens(12, 30, 8, 5)
    assert tokens_in(usage_chunk, b"data: [DONE]\n\n") == Tokens(12, 30, 8, 5)


def test_responses_stream_completed_event_split_across_chunks() -> None:
    event = b"event: response.completed\ndata: " + orjson.dumps(
        {"type": "response.completed", "response": {"output": [{"text": "y" * 50_000}], "usage": RESPONSES_USAGE}}
    ) + b"\n\n"
    for cut in (len(event) - 5, len(event) - 60, len(event) - 200):
        assert tokens_in(event[:cut], event[cut:]) == Tokens(100, 20, 64, 16), cut


def test_the_last_usage_counts_not_the_null_ones_before_it() -> None:
    created = b'event: response.created\ndata: {"response":{"usage":null}}\n\n'
    completed = b"event: response.completed\ndata: " + orjson.dumps({"response": {"usage": RESPONSES_USAGE}}) + b"\n\n"
    assert tokens_in(created, completed) == Tokens(100, 20, 64, 16)
    assert tokens_in(completed, created) is None  # the last one says null


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b'{"usage": null}',
        b'{"usage": {"prompt_tokens": "many"}}',
        b'\x1f\x8b\x08\x00compressed',
        b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2',  # cut off
    ],
)
def test_no_usage_or_an_unreadable_one_counts_nothing(body: bytes) -> None:
    assert tokens_in(b"", body) is None


def test_details_may_be_missing_or_null() -> None:
    assert tokens_in(b"", b'{"usage":{"prompt_tokens":3,"completion_tokens":4,"prompt_tokens_details":null}}') == Tokens(3, 4, 0, 0)


def test_pretty_printed_usage_as_openai_sends_it() -> None:
    body = orjson.dumps({"id": "x", "usage": CHAT_USAGE, "service_tier": "default"}, option=orjson.OPT_INDENT_2)
    assert tokens_in(b"", body) == Tokens(12, 30, 8, 5)


def test_a_usage_with_deeper_details_still_counts() -> None:
    body = b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2, "x": {"deep": {"deeper": 1}}}, "user": null}'
    assert tokens_in(b"", body) == Tokens(1, 2, 0, 0)
