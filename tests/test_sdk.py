"""The official openai SDK as the client: what it parses through the relay equals what it parses straight
from the upstream, and the upstream sees the relay's model, key and extra_body, never the client's."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, Literal

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from relay.testing import Recorded, UpstreamThread
from tests.clients import header_values, requests_seen
from tests.servers import API_KEY, MODEL, RelayServer

Api = Literal["chat", "responses"]
Mode = Literal["sync", "async"]

CLIENT_KEY = "sk-client-KEY-must-never-reach-upstream"
CLIENT_MODEL = "gpt-client-choice"
TIMEOUT = 15.0
PROMPT = "Say hi \u2603"
MESSAGES = [{"role": "user", "content": PROMPT}]

# The relay's extra_body defaults for the merge tests: keys the client sets, nulls, and leaves alone.
DEFAULTS: dict[str, Any] = {
    "temperature": 0.5,
    "metadata": {"team": "cfg", "run": "cfg"},
    "seed": 7,
    "top_p": 0.25,
    "user": "cfg-user",
}


def _sync(base_url: str) -> OpenAI:
    # max_retries=0: a relay failure must surface as the first error, not be papered over by a retry.
    return OpenAI(base_url=base_url, api_key=CLIENT_KEY, max_retries=0, timeout=TIMEOUT)


def _async(base_url: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=base_url, api_key=CLIENT_KEY, max_retries=0, timeout=TIMEOUT)


def _arguments(api: Api, model: Any, stream: bool, extra: dict[str, Any]) -> dict[str, Any]:
    payload = {"messages": MESSAGES} if api == "chat" else {"input": PROMPT}
    return {"model": model, "stream": stream, **payload, **extra}


def ask(
    base_url: str, api: Api, *, stream: bool = False, mode: Mode = "sync", model: Any = CLIENT_MODEL, **extra: Any
) -> list[dict[str, Any]]:
    """One SDK call; the parsed result (every event when streaming) as plain dicts, for equality."""
    arguments = _arguments(api, model, stream, extra)
    if mode == "sync":
        with _sync(base_url) as client:
            create: Callable[..., Any] = client.chat.completions.create if api == "chat" else client.responses.create
            result = create(**arguments)
            return [event.model_dump() for event in result] if stream else [result.model_dump()]

    async def run() -> list[dict[str, Any]]:
        async with _async(base_url) as client:
            create = client.chat.completions.create if api == "chat" else client.responses.create
            result = await create(**arguments)
            if stream:
                return [event.model_dump() async for event in result]
            return [result.model_dump()]

    return asyncio.run(run())




def assert_relay_credentials(request: Recorded) -> None:
    assert header_values(request, "authorization") == [f"Bearer {API_KEY}"]
    assert not any(CLIENT_KEY in value for _, value in request.headers)


def get_json(url: str) -> tuple[int, str | None, Any]:
    """GET without the SDK, so status, content type and body shape are seen exactly as sent."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return response.status, response.headers["content-type"], json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["content-type"], json.loads(error.read())


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("api", ["chat", "responses"])
def test_sdk_parses_the_same_through_relay_as_direct(
    relay: RelayServer, upstream: UpstreamThread, api: Api, stream: bool, mode: Mode
) -> None:
    through_relay = ask(relay.api_url, api, stream=stream, mode=mode, model=CLIENT_MODEL)
    # Direct with the configured model: the fake upstream echoes the model, so only a relay that set it
    # can produce equal objects.
    direct = ask(upstream.base_url, api, stream=stream, mode=mode, model=MODEL)

    assert through_relay == direct
    assert len(through_relay) > (5 if stream else 0)
    relayed, sent_direct = requests_seen(upstream, 2)
    assert relayed.path == sent_direct.path == f"/v1/{'chat/completions' if api == 'chat' else 'responses'}"
    # The body the upstream got equals what the client would have sent with the configured model.
    assert relayed.json() == sent_direct.json()
    assert relayed.json()["model"] == MODEL
    assert_relay_credentials(relayed)


@pytest.mark.parametrize(
    ("api", "model"),
    [
        ("chat", "gpt-4o"),
        ("chat", ""),
        ("chat", MODEL.upper()),
        ("chat", openai.omit),
        ("responses", "o3"),
        ("responses", openai.omit),
    ],
    ids=["chat-other", "chat-empty", "chat-case", "chat-absent", "responses-other", "responses-absent"],
)
def test_upstream_sees_configured_model_whatever_client_sent(
    relay: RelayServer, upstream: UpstreamThread, api: Api, model: Any
) -> None:
    [result] = ask(relay.api_url, api, model=model)

    [seen] = requests_seen(upstream, 1)
    assert seen.json()["model"] == MODEL
    assert result["model"] == MODEL


def test_non_string_model_from_client_is_replaced(relay: RelayServer, upstream: UpstreamThread) -> None:
    ask(relay.api_url, "chat", extra_body={"model": {"not": "a string"}})

    [seen] = requests_seen(upstream, 1)
    assert seen.json()["model"] == MODEL


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_extra_body_defaults_merge_shallowly_request_wins(
    relay_factory: Callable[..., RelayServer], upstream: UpstreamThread, api: Api
) -> None:
    relay = relay_factory(extra_body=DEFAULTS)
    client_fields: dict[str, Any] = {"temperature": 0.1, "metadata": {"team": "client"}, "extra_body": {"seed": None}}

    ask(relay.api_url, api, **client_fields)
    ask(upstream.base_url, api, **client_fields)

    relayed, sent_direct = requests_seen(upstream, 2)
    body = relayed.json()
    assert body == {**DEFAULTS, **sent_direct.json(), "model": MODEL}
    assert body["temperature"] == 0.1  # the request wins
    assert body["metadata"] == {"team": "client"}  # a nested object replaces the default whole
    assert body["seed"] is None  # an explicit null counts as set
    assert (body["top_p"], body["user"]) == (0.25, "cfg-user")  # absent keys get the defaults
    assert_relay_credentials(relayed)


def test_extra_body_defaults_for_one_endpoint_only(relay_factory: Callable[..., RelayServer], upstream: UpstreamThread) -> None:
    extra_body = {
        "temperature": 0.5,
        "chat_completions": {"chat_template_kwargs": {"enable_thinking": False}, "temperature": 0.2},
        "responses": {"max_output_tokens": 64},
    }
    relay = relay_factory(extra_body=extra_body)
    ask(relay.api_url, "chat")
    ask(relay.api_url, "responses")
    chat, responses = (seen.json() for seen in requests_seen(upstream, 2))
    assert chat["chat_template_kwargs"] == {"enable_thinking": False} and chat["temperature"] == 0.2  # its block wins
    assert "max_output_tokens" not in chat and "chat_completions" not in chat and "responses" not in chat
    assert responses["max_output_tokens"] == 64 and responses["temperature"] == 0.5
    assert "chat_template_kwargs" not in responses and "responses" not in responses


def test_extra_body_defaults_reach_streams_too(
    relay_factory: Callable[..., RelayServer], upstream: UpstreamThread
) -> None:
    relay = relay_factory(extra_body=DEFAULTS)

    events = ask(relay.api_url, "chat", stream=True, mode="async")

    [seen] = requests_seen(upstream, 1)
    assert seen.json() == {**DEFAULTS, "messages": MESSAGES, "stream": True, "model": MODEL}
    assert events and all(event["model"] == MODEL for event in events)


def test_client_organization_and_project_are_not_forwarded(relay: RelayServer, upstream: UpstreamThread) -> None:
    client = OpenAI(base_url=relay.api_url, api_key=CLIENT_KEY, organization="org-client", project="proj-client",
                    max_retries=0, timeout=TIMEOUT)
    with client:
        client.chat.completions.create(model=CLIENT_MODEL, messages=MESSAGES)

    [seen] = requests_seen(upstream, 1)
    assert header_values(seen, "openai-organization") == []
    assert header_values(seen, "openai-project") == []
    assert_relay_credentials(seen)


def test_sdk_lists_and_retrieves_the_configured_model(relay: RelayServer, upstream: UpstreamThread) -> None:
    expected = {"id": MODEL, "object": "model", "created": 0, "owned_by": "relay"}
    with _sync(relay.api_url) as client:
        # exclude_unset: newer SDKs declare optional fields (shutdown_date) that the relay does not send.
        listed = [model.model_dump(exclude_unset=True) for model in client.models.list()]
        retrieved = client.models.retrieve(MODEL).model_dump(exclude_unset=True)

    assert listed == [expected]
    assert retrieved == expected
    requests_seen(upstream, 0)  # answered by the relay itself


def test_models_endpoints_raw(relay: RelayServer, upstream: UpstreamThread) -> None:
    model = {"id": MODEL, "object": "model", "created": 0, "owned_by": "relay"}

    assert get_json(f"{relay.api_url}/models") == (200, "application/json", {"object": "list", "data": [model]})
    assert get_json(f"{relay.api_url}/models/{MODEL}") == (200, "application/json", model)
    requests_seen(upstream, 0)


@pytest.mark.parametrize("unknown", ["gpt-4o", "org/fine-tuned:model", MODEL + "-x"])
def test_unknown_model_is_404_in_openai_error_shape(relay: RelayServer, upstream: UpstreamThread, unknown: str) -> None:
    status, content_type, body = get_json(f"{relay.api_url}/models/{unknown}")
    assert (status, content_type) == (404, "application/json")
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "model_not_found"
    assert body["error"]["type"] == "invalid_request_error"
    assert unknown in body["error"]["message"]

    # The SDK raises its typed error for it, as it would against OpenAI.
    with _sync(relay.api_url) as client, pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve(unknown)
    assert raised.value.status_code == 404
    assert raised.value.code == "model_not_found"
    requests_seen(upstream, 0)


@pytest.mark.parametrize("path", ["/", "/health", "/healthz", "/livez", "/readyz"])
def test_health_paths(relay: RelayServer, upstream: UpstreamThread, path: str) -> None:
    assert get_json(relay.url + path) == (200, "application/json", {"status": "ok"})
    requests_seen(upstream, 0)
