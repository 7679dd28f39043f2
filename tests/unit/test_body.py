"""The body patch, as a pure function: the model, the extra_body defaults and the optional rewrites."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import orjson
import pytest

from relay.body import InvalidBody, Rules, patch
from relay.patcher import Helper, Patcher


def body_of(raw: bytes, rules: Rules) -> bytes:
    return patch(raw, rules)[0]


MODEL = "configured-model"
RULES = Rules(MODEL)


def patched(raw: bytes | str, extra_body: dict | None = None) -> dict:
    data = raw.encode() if isinstance(raw, str) else raw
    return json.loads(body_of(data, Rules(MODEL, extra_body or {})))


def test_model_is_overwritten_or_added() -> None:
    assert patched('{"model": "client-model", "messages": []}') == {"model": MODEL, "messages": []}
    assert patched('{"messages": []}')["model"] == MODEL


def test_extra_body_fills_only_absent_keys_shallowly() -> None:
    defaults = {"temperature": 0.7, "metadata": {"a": 1, "b": 2}, "top_p": 0.9}
    body = patched('{"temperature": 0.1, "metadata": {"c": 3}, "seed": null}', defaults | {"seed": 42})
    assert body["temperature"] == 0.1  # the request wins
    assert body["metadata"] == {"c": 3}  # a nested object replaces the default whole
    assert body["seed"] is None  # an explicit null counts as set
    assert body["top_p"] == 0.9  # absent: the default is added


def test_everything_else_is_kept_unknown_fields_included() -> None:
    raw = {"messages": [{"role": "user", "content": "héllo \u2603 \"q\""}], "x_unknown": {"deep": [1, 2.5, True]}}
    body = patched(orjson.dumps(raw))
    assert {k: v for k, v in body.items() if k != "model"} == raw


@pytest.mark.parametrize(
    "literal",
    ["123456789012345678901234567890", "18446744073709551616", "-9223372036854775809", "18446744073709551615"],
)
def test_integers_beyond_64_bits_stay_exact(literal: str) -> None:
    out = body_of(f'{{"seed": {literal}, "note": "e+ in a string"}}'.encode(), RULES)
    assert json.loads(out)["seed"] == int(literal)
    assert literal.encode() in out


def test_lone_surrogate_escape_survives() -> None:
    out = body_of(b'{"content": "\\ud800 x"}', RULES)
    assert json.loads(out)["content"] == "\ud800 x"


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"", "not valid JSON"),
        (b"{nope", "not valid JSON"),
        (b"[1, 2]", "an array"),
        (b'"text"', "a string"),
        (b"3", "a number"),
        (b"null", "null"),
        (b'{"x": NaN}', "not valid JSON"),
        (b'{"x": 1e400}', "out of range"),
        (b'{"x": "\xff"}', "not valid JSON"),
    ],
)
def test_invalid_bodies_are_rejected_with_a_reason(raw: bytes, fragment: str) -> None:
    with pytest.raises(InvalidBody, match=fragment):
        body_of(raw, RULES)


@pytest.mark.parametrize("depth", [300, 1000, 100_000])
def test_deep_nesting_is_patched_or_rejected_never_an_exception(depth: int) -> None:
    # orjson writes at most 254 levels and reads at most 1024; past that the exact path takes over, and
    # past Python's recursion limit the body is refused as a 400, not a 500.
    raw = b'{"tools":' + b"[" * depth + b"]" * depth + b"}"
    try:
        assert json.loads(body_of(raw, RULES))["model"] == MODEL
    except InvalidBody as exc:
        assert "nested too deeply" in str(exc)
        assert depth >= 1000


def test_patcher_recovers_when_its_helper_process_dies(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> list[dict]:
        helper = Helper()
        patcher = Patcher(Rules(MODEL, {"seed": 1}), 1, helper)
        try:
            assert patcher.is_big(b"{}") and not Patcher(RULES, None, helper).is_big(b"{}")
            first, _ = await patcher.patch_in_helper(b'{"a": 1}')
            assert helper._pool is not None
            for process in list(helper._pool._processes.values()):  # the helper dies (OOM killer, say)
                os.kill(process.pid, signal.SIGKILL)
                process.join(10)
            second, _ = await patcher.patch_in_helper(b'{"a": 2}')
            third, _ = await patcher.patch_in_helper(b'{"a": 3}')  # and a new helper takes over
            return [json.loads(body) for body in (first, second, third)]
        finally:
            helper.close()

    assert asyncio.run(scenario()) == [{"a": a, "model": MODEL, "seed": 1} for a in (1, 2, 3)]
    assert any("patch helper process died" in record.getMessage() for record in caplog.records)


def test_reasoning_items_leave_the_input_only_when_asked() -> None:
    raw = b'{"input": [{"type": "reasoning", "id": "rs_1"}, {"type": "message", "role": "user"}, "text"]}'
    kept = json.loads(body_of(raw, RULES))["input"]
    dropped = json.loads(body_of(raw, Rules(MODEL, drop_reasoning_items=True)))["input"]
    assert [item if isinstance(item, str) else item["type"] for item in kept] == ["reasoning", "message", "text"]
    assert dropped == [{"type": "message", "role": "user"}, "text"]
    assert json.loads(body_of(b'{"input": "hi"}', Rules(MODEL, drop_reasoning_items=True)))["input"] == "hi"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"stream": True}, {"include_usage": True}),
        ({"stream": True, "stream_options": {"include_usage": False}}, {"include_usage": False}),  # the client's word
        ({"stream": True, "stream_options": {"include_obfuscation": False}}, {"include_obfuscation": False, "include_usage": True}),
        ({"stream": False}, None),
        ({}, None),
    ],
)
def test_stream_usage_is_asked_for_unless_the_client_said(body: dict, expected: dict | None) -> None:
    patched_body = json.loads(body_of(orjson.dumps(body), Rules(MODEL, stream_usage=True)))
    assert patched_body.get("stream_options") == expected
    assert "stream_options" not in json.loads(body_of(orjson.dumps({"stream": True}), RULES))


def test_the_prompt_cache_key_comes_back_only_when_asked() -> None:
    raw = b'{"prompt_cache_key": "conv-17", "input": "hi"}'
    assert patch(raw, Rules(MODEL, cache_key=True)) == (body_of(raw, RULES), "conv-17")
    assert patch(raw, RULES)[1] is None
    assert patch(b'{"prompt_cache_key": 17}', Rules(MODEL, cache_key=True))[1] is None
    assert patch(b'{"prompt_cache_key": "k", "seed": 123456789012345678901234567890}', Rules(MODEL, cache_key=True))[1] == "k"
