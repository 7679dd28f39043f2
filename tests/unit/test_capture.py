"""Capture of model calls in NeMo Gym's record format (relay.capture_record, relay.capture) and the
rollout prefix (relay.rollouts): records for JSON answers, both streams, errors, cut and oversized bodies;
the tee, which passes every message on unchanged; appends under flock."""

from __future__ import annotations

import asyncio
import gzip
import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from relay.capture import CALL_KEY, CaptureStore
from relay.capture_record import Seen, exchange
from relay.observe import RequestRecord
from relay.rollouts import split
from tests.capture_schema import check_record

RESPONSE = {"id": "resp_1", "object": "response", "status": "completed", "model": "m", "output": [], "usage": {"input_tokens": 3, "output_tokens": 2}}

LIMIT = 1024 * 1024


def record_of(call: Seen, limit: int = LIMIT) -> dict[str, Any]:
    return exchange(call, request_limit=limit, body_limit=limit)


def seen(**overrides: Any) -> Seen:
    values: dict[str, Any] = dict(
        model_call_id="0" * 32, dialect="responses", server="policy_model", started_at=1.0, completed_at=2.0,
        latency_ms=12.345, ttft_ms=3.21, request=b'{"input":"hi","model":"ignored"}', request_encoding=None,
        status=200, streaming=False, body=orjson.dumps(RESPONSE), body_encoding=None, truncated=False,
        finished=True, ended_by=None, session=None,
    )  # fmt: skip
    values.update(overrides)
    return Seen(**values)


def sse(*events: tuple[str | None, Any]) -> bytes:
    lines = []
    for name, payload in events:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        lines.append((f"event: {name}\n" if name else "") + f"data: {data}\n\n")
    return "".join(lines).encode()


def test_a_json_answer() -> None:
    record = check_record(record_of(seen(session="sess-1")))
    assert record["request"] == {"input": "hi", "model": "ignored"}  # the client's body, before the relay patched it
    assert record["response"] == RESPONSE and record["status_code"] == 200 and record["error_category"] is None
    assert record["model_ref"] == {"type": "responses_api_models", "name": "policy_model"}
    assert (record["latency_ms"], record["latency_ttft_ms"], record["client_session_id"]) == (12.35, 3.21, "sess-1")
    assert "response_raw" not in record and "request_raw" not in record


def test_an_upstream_error_keeps_its_body_as_text() -> None:
    body = b'{"error":{"message":"slow down","code":"rate_limit_exceeded"}}'
    record = check_record(record_of(seen(status=429, body=body)))
    assert record["response"] is None and record["response_raw"] == body.decode() and record["error_category"] == "rate_limit"
    assert record_of(seen(status=504, body=b"{}"))["error_category"] == "timeout"
    assert record_of(seen(status=502, body=b"{}"))["error_category"] == "upstream_error"


def test_a_responses_stream_is_its_final_response_object() -> None:
    body = sse(
        ("response.created", {"type": "response.created", "response": {**RESPONSE, "status": "in_progress"}}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "Hi"}),
        ("response.completed", {"type": "response.completed", "response": RESPONSE}),
    )
    record = check_record(record_of(seen(streaming=True, body=body)))
    assert record["response"] == RESPONSE and record["response_raw"] == body.decode() and record["error_category"] is None
    incomplete = sse(("response.incomplete", {"type": "response.incomplete", "response": {**RESPONSE, "status": "incomplete"}}))
    assert record_of(seen(streaming=True, body=incomplete))["error_category"] == "incomplete"
    cut = sse(("response.created", {"type": "response.created", "response": {**RESPONSE, "status": "in_progress"}}))
    cut_record = record_of(seen(streaming=True, body=cut))
    assert cut_record["error_category"] == "stream_truncated" and cut_record["response"]["status"] == "in_progress"


def test_a_chat_stream_is_assembled_into_a_chat_completion() -> None:
    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> tuple[None, dict[str, Any]]:
        return None, {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}

    body = sse(
        chunk({"role": "assistant", "content": "Hel"}),
        chunk({"content": "lo", "reasoning_content": "think"}),
        chunk({"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": '{"a"'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}, "tool_calls"),
        (None, {"id": "chatcmpl-1", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4}}),
        (None, "[DONE]"),
    )
    record = check_record(record_of(seen(dialect="chat", streaming=True, body=body)))
    response = record["response"]
    assert response["object"] == "chat.completion" and response["id"] == "chatcmpl-1" and response["usage"]["prompt_tokens"] == 5
    choice = response["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Hello"
    assert choice["message"]["reasoning_content"] == "think"
    assert choice["message"]["tool_calls"] == [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]
    assert record["error_category"] is None and record["response_raw"] == body.decode()
    without_done = body.replace(b"data: [DONE]\n\n", b"")
    assert record_of(seen(dialect="chat", streaming=True, body=without_done))["error_category"] == "stream_truncated"


def test_cut_oversized_and_unanswered_calls() -> None:
    cut = check_record(record_of(seen(finished=False, ended_by="cancelled", body=b'{"id": "re')))
    assert cut["response"] is None and cut["error_category"] == "cancelled" and cut["response_raw"] == '{"id": "re'
    big = check_record(record_of(seen(truncated=True, body=b'{"id": "resp_1", "output": [')))
    assert big["response"] is None and big["response_raw_truncated"] is True and big["error_category"] == "capture_truncated"
    unanswered = check_record(record_of(seen(status=None, body=b"", ended_by="cancelled", ttft_ms=None)))
    assert unanswered["status_code"] is None and unanswered["error_category"] == "cancelled"


def test_compressed_bodies_and_requests_that_are_not_json() -> None:
    record = check_record(record_of(seen(body=gzip.compress(orjson.dumps(RESPONSE)), body_encoding="gzip",
                                        request=gzip.compress(b'{"input":"hi"}'), request_encoding="gzip")))  # fmt: skip
    assert record["response"] == RESPONSE and record["request"] == {"input": "hi"}
    assert record_of(seen(body=b"\x00", body_encoding="br"))["error_category"] == "capture_parse_error"
    odd = check_record(record_of(seen(request=b"[1, 2]", server=None)))
    assert odd["request"] is None and odd["request_raw"] == "[1, 2]" and odd["model_ref"] is None


def test_compressed_bodies_are_read_back_only_to_their_limit() -> None:
    bomb = gzip.compress(b'{"input": "' + b"0" * (8 * LIMIT) + b'"}')  # 8 MiB from about 8 KB
    assert len(bomb) < LIMIT // 64
    record = check_record(record_of(seen(request=bomb, request_encoding="gzip", body=bomb, body_encoding="gzip")))
    assert record["request"] is None and "request_raw" not in record
    assert record["response"] is None and record["error_category"] == "capture_parse_error"
    whole = check_record(record_of(seen(request=bomb, request_encoding="gzip"), limit=16 * LIMIT))
    assert len(whole["request"]["input"]) == 8 * LIMIT


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/ng-rollout/0-0/v1/responses", ("0-0", "/v1/responses")),
        ("/ng-rollout/run.7_a-1/", ("run.7_a-1", "/")),
        ("/ng-rollout/r1/training-token-capture/v1/chat/completions", ("r1", "/v1/chat/completions")),
        ("/ng-rollout/r1/training-token-capture", ("r1", "/training-token-capture")),  # as Gym's pattern reads it
        ("/ng-rollout/r1", None),
        ("/ng-rollout//v1/responses", None),
        ("/ng-rollout/-r/v1/responses", None),
        ("/ng-rollout/a%2Fb/v1/responses", None),
        ("/ng-rollout/a b/v1/responses", None),
        ("/ng-rollout/" + "a" * 201 + "/v1/responses", None),
    ],
)
def test_rollout_prefixes(path: str, expected: tuple[str, str] | None) -> None:
    assert split(path) == expected


def test_the_tee_passes_every_message_and_writes_a_record(tmp_path: Path) -> None:
    sent: list[dict[str, Any]] = []
    body = orjson.dumps(RESPONSE)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope[CALL_KEY].record = RequestRecord("/v1/responses", 0.0)
        assert (await receive())["body"] == b'{"input":"hi"}'
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body[:10], "more_body": True})
        await send({"type": "http.response.body", "body": body[10:], "more_body": False})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b'{"input":"hi"}', "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def main() -> None:
        store = CaptureStore(str(tmp_path), "policy_model", max_bytes=1 << 20, max_request_bytes=1 << 20)
        scope = {"type": "http", "headers": [(b"x-session-id", b"s1")], "path": "/v1/responses"}
        await store.serve(app, scope, receive, send, "7-0", "responses")
        store.close()

    asyncio.run(main())
    assert [m.get("body") for m in sent] == [None, body[:10], body[10:]]
    lines = (tmp_path / "7-0.capture.jsonl").read_bytes().splitlines()
    record = check_record(orjson.loads(lines[0]))
    assert len(lines) == 1 and record["response"] == RESPONSE and record["client_session_id"] == "s1"


def test_a_failed_write_marks_the_rollout_incomplete(tmp_path: Path) -> None:
    store = CaptureStore(str(tmp_path / "gone"), None, max_bytes=1024, max_request_bytes=1024)
    store._write("r1", seen())  # the directory does not exist: the append fails
    assert not (tmp_path / "gone").exists()
    store = CaptureStore(str(tmp_path), None, max_bytes=1024, max_request_bytes=1024)
    (tmp_path / "r2.capture.jsonl").mkdir()  # a directory where the file should be
    store._write("r2", seen())
    assert (tmp_path / "r2.capture.incomplete").exists()
    store.close()
