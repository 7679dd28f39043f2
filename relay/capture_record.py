"""One model call as NeMo Gym's capture record (the line its `_CaptureMiddleware` appends to
`<dir>/<rollout_id>.capture.jsonl`, which its readers and `ng_collect_rollouts` read back).

Pure functions of what the relay saw: the client's request bytes, the served status and body bytes, and
how the call ended. Keys in Gym's order: model_call_id, dialect, model_ref, started_at, completed_at,
latency_ms, latency_ttft_ms, status_code, error_category, request, response, then only where they apply
client_session_id, request_raw, response_raw (and the relay's response_raw_truncated).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Any

import orjson

from relay.inflate import WINDOW_BITS, TooLarge, inflate

_EVENT_BREAK = re.compile(r"\r?\n\r?\n")
# Stream ends, per dialect: what the last event says about the call (None: it completed).
_RESPONSES_ENDS = {"response.completed": None, "response.incomplete": "incomplete", "response.failed": "upstream_error", "error": "upstream_error"}


@dataclass(slots=True)
class Seen:
    """What the relay saw of one call."""

    model_call_id: str
    dialect: str  # "responses" | "chat"
    server: str | None  # the model server's name, for model_ref
    started_at: float  # time.time()
    completed_at: float
    latency_ms: float
    ttft_ms: float | None
    request: bytes
    request_encoding: str | None
    status: int | None  # None: no answer was sent
    streaming: bool
    body: bytes
    body_encoding: str | None
    truncated: bool  # the body went past the capture cap; `body` is its beginning
    finished: bool  # the body's end was sent
    ended_by: str | None  # why it did not finish: cancelled (the client left), timeout, connection
    session: str | None  # the request's one x-session-id


def exchange(seen: Seen, request_limit: int, body_limit: int) -> dict[str, Any]:
    """The record; a compressed body is read back to at most its limit (a zip bomb stays a few bytes)."""
    request, request_raw = _request(seen, request_limit)
    response, response_raw, category = _response(seen, body_limit)
    record: dict[str, Any] = {
        "model_call_id": seen.model_call_id,
        "dialect": seen.dialect,
        "model_ref": {"type": "responses_api_models", "name": seen.server} if seen.server else None,
        "started_at": seen.started_at,
        "completed_at": seen.completed_at,
        "latency_ms": round(seen.latency_ms, 2),
        "latency_ttft_ms": None if seen.ttft_ms is None else round(seen.ttft_ms, 2),
        "status_code": seen.status,
        "error_category": category,
        "request": request,
        "response": response,
    }
    if seen.session is not None:
        record["client_session_id"] = seen.session
    if request_raw is not None:
        record["request_raw"] = request_raw
    if response_raw is not None:
        record["response_raw"] = response_raw
    if seen.truncated:
        record["response_raw_truncated"] = True
    return record


def status_category(status: int) -> str | None:
    """Gym's error_category of an HTTP status."""
    if status < 400:
        return None
    if status in (408, 504):
        return "timeout"
    if status == 429:
        return "rate_limit"
    if status in (401, 403):
        return "auth"
    if status == 404:
        return "not_found"
    return "client_error" if status < 500 else "upstream_error"


def _request(seen: Seen, limit: int) -> tuple[dict[str, Any] | None, str | None]:
    """The client's body as parsed JSON (before the relay set the model and defaults), else as text."""
    raw = _decoded(seen.request, seen.request_encoding, limit)
    if not raw:
        return None, None
    parsed = _json(raw)
    return (parsed, None) if isinstance(parsed, dict) else (None, raw.decode("utf-8", "replace"))


def _response(seen: Seen, limit: int) -> tuple[dict[str, Any] | None, str | None, str | None]:
    """The served response object (None for an error or a body the relay cannot read), the body as text
    where Gym keeps it (streams, errors, anything unparsed), and the call's error_category."""
    if seen.status is None:
        return None, None, seen.ended_by or "cancelled"
    category = status_category(seen.status)
    body = _decoded(seen.body, seen.body_encoding, limit, partial=seen.truncated or not seen.finished)
    if body is None:  # an encoding the relay cannot undo (br, zstd): the bytes mean nothing as text
        return None, None, category or "capture_parse_error"
    text = body.decode("utf-8", "replace") if body else None
    if not seen.finished:
        return None, text, category or seen.ended_by or "connection"
    if seen.truncated:
        return None, text, category or "capture_truncated"
    if category is not None:
        return None, text, category
    if seen.streaming:
        events = _events(text or "")
        response, ending = (_responses(events) if seen.dialect == "responses" else _chat(events))
        return response, text, ending
    parsed = _json(body) if body else None
    if isinstance(parsed, dict):
        return parsed, None, None
    return None, text, "capture_parse_error" if body else None


def _decoded(data: bytes, encoding: str | None, limit: int, partial: bool = False) -> bytes | None:
    """The body as the client or the upstream meant it; None when the relay cannot undo its encoding."""
    if not encoding or encoding == "identity" or not data:
        return data
    bits = WINDOW_BITS.get(encoding)
    if bits is None:
        return None
    try:
        return inflate(data, bits, limit, partial)
    except (zlib.error, TooLarge):
        return None


def _json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _events(text: str) -> list[tuple[str | None, Any]]:
    """An SSE body's events: (the `event:` name, the `data:` payload parsed, or "[DONE]")."""
    events = []
    for block in _EVENT_BREAK.split(text):
        name = None
        data = []
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        if not data:
            continue
        payload = "\n".join(data)
        events.append((name, payload if payload == "[DONE]" else _json(payload.encode())))
    return events


def _responses(events: list[tuple[str | None, Any]]) -> tuple[dict[str, Any] | None, str | None]:
    """A Responses stream: the response object its final event carries, and what that event says."""
    for name, payload in reversed(events):
        kind = payload.get("type") if isinstance(payload, dict) else None
        if name == "error" or kind == "error":
            return None, "upstream_error"
        if kind in _RESPONSES_ENDS:
            response = payload.get("response")
            return (response if isinstance(response, dict) else None), _RESPONSES_ENDS[kind]
    latest = next((p["response"] for _, p in reversed(events) if isinstance(p, dict) and isinstance(p.get("response"), dict)), None)
    return latest, "stream_truncated"


def _chat(events: list[tuple[str | None, Any]]) -> tuple[dict[str, Any] | None, str | None]:
    """A chat stream put back together as the chat.completion it streamed: each choice's content,
    reasoning, refusal and tool calls joined from their deltas; the id, model and usage of the chunks."""
    completion: dict[str, Any] = {"object": "chat.completion"}
    choices: dict[int, dict[str, Any]] = {}
    ending: str | None = "stream_truncated"
    for _, chunk in events:
        if chunk == "[DONE]":
            ending = None if ending == "stream_truncated" else ending
            continue
        if not isinstance(chunk, dict):
            continue
        if chunk.get("error") is not None:
            ending = "upstream_error"
        for key in ("id", "created", "model", "system_fingerprint", "service_tier", "usage"):
            if chunk.get(key) is not None:
                completion[key] = chunk[key]
        for delta_choice in chunk.get("choices") or ():
            if isinstance(delta_choice, dict):
                _add_delta(choices.setdefault(delta_choice.get("index", 0), _empty_choice(delta_choice.get("index", 0))), delta_choice)
    if not choices:
        return None, ending
    completion["choices"] = [_finished_choice(choices[index]) for index in sorted(choices)]
    return completion, ending


def _empty_choice(index: int) -> dict[str, Any]:
    return {"index": index, "role": "assistant", "content": [], "reasoning_content": [], "refusal": [], "tool_calls": {}, "finish_reason": None}


def _add_delta(choice: dict[str, Any], delta_choice: dict[str, Any]) -> None:
    delta = delta_choice.get("delta") or {}
    choice["role"] = delta.get("role") or choice["role"]
    for key in ("content", "refusal"):
        if isinstance(delta.get(key), str):
            choice[key].append(delta[key])
    reasoning = delta.get("reasoning_content") or delta.get("reasoning")  # vLLM and others name it either way
    if isinstance(reasoning, str):
        choice["reasoning_content"].append(reasoning)
    for call in delta.get("tool_calls") or ():
        if not isinstance(call, dict):
            continue
        slot = choice["tool_calls"].setdefault(call.get("index", 0), {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        slot["id"] = call.get("id") or slot["id"]
        function = call.get("function") or {}
        slot["function"]["name"] += function.get("name") or ""
        slot["function"]["arguments"] += function.get("arguments") or ""
    if delta_choice.get("finish_reason") is not None:
        choice["finish_reason"] = delta_choice["finish_reason"]


def _finished_choice(choice: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": choice["role"], "content": "".join(choice["content"]) or None}
    if choice["reasoning_content"]:
        message["reasoning_content"] = "".join(choice["reasoning_content"])
    if choice["refusal"]:
        message["refusal"] = "".join(choice["refusal"])
    if choice["tool_calls"]:
        message["tool_calls"] = [choice["tool_calls"][index] for index in sorted(choice["tool_calls"])]
    return {"index": choice["index"], "message": message, "finish_reason": choice["finish_reason"]}
