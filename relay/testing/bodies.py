"""The canned successful bodies: chat completions and Responses API objects as JSON or as SSE streams,
realistic in shape and byte-for-byte deterministic, and ``_success``, which picks the one a request asks for."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import orjson

from relay.testing.canned import _cached, _Canned, _json_canned, _sse_canned

# Constant ids and timestamps keep bodies identical across runs and across the relay.
_CREATED = 1_700_000_000
_CHAT_ID = "chatcmpl-fakeB9MBs8CjcvOU2jLn4n570S5qMJKcT"
_RESPONSE_ID = "resp_fake67ccd2bed1ec8190b14f964abc0542670bb6a6b452"
_MESSAGE_ID = "msg_fake67ccd2bf17f0819081ff3bb2cf6508e60bb6a6b452"
_FINGERPRINT = "fp_fake0c7ffe"
_DEFAULT_MODEL = "gpt-4o-mini"
_PROMPT_TOKENS = 12
# ASCII without JSON escapes, so each character of content adds exactly one body byte.
_LOREM = "The quick brown fox jumps over the lazy dog while the relay forwards every byte. "

_DEFAULT_JSON_SIZE = 1024
_DEFAULT_EVENT_SIZE = 4  # roughly one token per delta, like a real stream


def _text(size: int) -> str:
    return (_LOREM * (size // len(_LOREM) + 1))[:size]


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _sized(build: Callable[[str], Any], size: int) -> Any:
    """Fill the content of ``build(text)`` so that its JSON is about ``size`` bytes."""
    overhead = len(orjson.dumps(build("")))
    return build(_text(max(0, size - overhead)))


def _chat_completion(model: str, text: str) -> dict[str, Any]:
    tokens = _tokens(text)
    return {
        "id": _CHAT_ID,
        "object": "chat.completion",
        "created": _CREATED,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": _PROMPT_TOKENS,
            "completion_tokens": tokens,
            "total_tokens": _PROMPT_TOKENS + tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": _FINGERPRINT,
    }


def _chat_chunk(model: str, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
    chunk = {
        "id": _CHAT_ID,
        "object": "chat.completion.chunk",
        "created": _CREATED,
        "model": model,
        "service_tier": "default",
        "system_fingerprint": _FINGERPRINT,
        "choices": choices,
        "usage": usage,
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _chat_stream(model: str, events: int, size: int, include_usage: bool) -> _Canned:
    text = _text(size)

    def event(first: bool, last: bool) -> bytes:
        # Every event carries the full payload, so one event can be made as large as asked.
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": "stop" if last else None}
        return _chat_chunk(model, [choice])

    middle = event(False, False)
    stream = [event(i == 0, i == events - 1) if i in (0, events - 1) else middle for i in range(events)]
    if include_usage:
        tokens = _tokens(text) * events
        usage = {"prompt_tokens": _PROMPT_TOKENS, "completion_tokens": tokens, "total_tokens": _PROMPT_TOKENS + tokens}
        stream.append(_chat_chunk(model, [], usage))
    stream.append(b"data: [DONE]\n\n")
    return _sse_canned(stream)


def _message(text: str, status: str) -> dict[str, Any]:
    return {
        "id": _MESSAGE_ID,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def _response(model: str, text: str | None) -> dict[str, Any]:
    """A Responses API object: completed when ``text`` is given, freshly created otherwise."""
    usage = None
    if text is not None:
        tokens = _tokens(text)
        usage = {
            "input_tokens": _PROMPT_TOKENS,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": _PROMPT_TOKENS + tokens,
        }
    return {
        "id": _RESPONSE_ID,
        "object": "response",
        "created_at": _CREATED,
        "status": "in_progress" if text is None else "completed",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": model,
        "output": [] if text is None else [_message(text, "completed")],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": {},
    }


def _responses_stream(model: str, deltas: int, size: int) -> _Canned:
    text = _text(size)
    full = text * deltas
    where = {"item_id": _MESSAGE_ID, "output_index": 0, "content_index": 0}
    empty_part = {"type": "output_text", "text": "", "annotations": []}
    payloads: list[dict[str, Any]] = [
        {"type": "response.created", "response": _response(model, None)},
        {"type": "response.in_progress", "response": _response(model, None)},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**_message("", "in_progress"), "content": []},
        },
        {"type": "response.content_part.added", **where, "part": empty_part},
        *({"type": "response.output_text.delta", **where, "delta": text, "logprobs": []} for _ in range(deltas)),
        {"type": "response.output_text.done", **where, "text": full, "logprobs": []},
        {"type": "response.content_part.done", **where, "part": {**empty_part, "text": full}},
        {"type": "response.output_item.done", "output_index": 0, "item": _message(full, "completed")},
        {"type": "response.completed", "response": _response(model, full)},
    ]
    events = [
        b"event: %b\ndata: %b\n\n" % (payload["type"].encode(), orjson.dumps({**payload, "sequence_number": number}))
        for number, payload in enumerate(payloads)
    ]
    return _sse_canned(events)


def _success(path: str, body: dict[str, Any], events: int, size: int | None, gzipped: bool) -> _Canned:
    model = body.get("model")
    if not isinstance(model, str):
        model = _DEFAULT_MODEL
    chat = path.endswith("/chat/completions")
    if body.get("stream") is not True:
        build = _chat_completion if chat else _response
        size = _DEFAULT_JSON_SIZE if size is None else size
        return _cached(
            ("json", chat, model, size, gzipped),
            lambda: _json_canned(200, _sized(functools.partial(build, model), size), gzipped),
        )
    size = _DEFAULT_EVENT_SIZE if size is None else size
    if not chat:
        return _cached(("responses-sse", model, events, size), lambda: _responses_stream(model, events, size))
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return _cached(
        ("chat-sse", model, events, size, include_usage), lambda: _chat_stream(model, events, size, include_usage)
    )
