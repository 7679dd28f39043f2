"""Inbound auth: with relay_api_keys set, the API answers only clients that send one of those keys as a
Bearer token. A refused client gets OpenAI's 401 and the upstream hears nothing; an accepted one is relayed
with the configured key, never its own. Health checks stay open, /metrics too unless told otherwise, and the
client keys appear in no log.
"""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest

from relay.testing import UpstreamThread
from tests.clients import (
    CHAT,
    CHAT_BODY,
    RESPONSES,
    Reply,
    assert_chat_completion,
    assert_openai_error,
    bearer,
    get,
    header_values,
    post,
    requests_seen,
)
from tests.servers import API_KEY, PLAIN_UVICORN, RelayServer

RelayFactory = Callable[..., RelayServer]
# Distinctive, so a search of the log or of the upstream's headers cannot match anything else.
KEYS = ("relay-client-key-ALPHA-7f3a9c", "relay-client-key-BRAVO-52d1e8")
ENV_KEYS = ("relay-env-key-CHARLIE-0b6e44", "relay-env-key-DELTA-9c2f17")
WRONG = "relay-client-key-WRONG-000000"
HEALTH_PATHS = ("/", "/health", "/healthz", "/livez", "/readyz")


@pytest.fixture(scope="module")
def guarded(relay_factory: RelayFactory) -> RelayServer:
    return relay_factory(relay_api_keys=list(KEYS))


@pytest.fixture(scope="module")
def guarded_metrics(relay_factory: RelayFactory) -> RelayServer:
    """Also /metrics behind the keys; with a JSON access log and debug logging, so the log has every chance
    to show a key."""
    return relay_factory(
        relay_api_keys=list(KEYS), metrics_require_auth=True, access_log="json", args=("--log-level", "debug")
    )


def assert_refused(reply: Reply, upstream: UpstreamThread) -> None:
    assert_openai_error(reply, 401, "invalid_api_key")
    assert reply.header("www-authenticate") == "Bearer"
    assert upstream.upstream.requests == []


def assert_relayed_with_configured_key(upstream: UpstreamThread, client_key: str) -> None:
    (seen,) = requests_seen(upstream, 1)
    assert header_values(seen, "authorization") == [f"Bearer {API_KEY}"]
    assert all(client_key not in value for _, value in seen.headers)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer(WRONG),
        bearer(""),
        bearer(KEYS[0] + "x"),  # a prefix match is no match
        {"Authorization": KEYS[0]},  # no scheme
        {"Authorization": "Basic " + KEYS[0]},  # a right key under the wrong scheme
        {"Authorization": "Basic " + base64.b64encode(f"user:{KEYS[0]}".encode()).decode()},
    ],
    ids=["none", "wrong-key", "empty-bearer", "longer-key", "no-scheme", "basic-raw", "basic-encoded"],
)
@pytest.mark.parametrize("target", [CHAT, RESPONSES])
def test_missing_or_wrong_key_is_401(
    guarded: RelayServer, upstream: UpstreamThread, headers: dict[str, str], target: str
) -> None:
    assert_refused(post(guarded, CHAT_BODY, target, headers), upstream)


def test_models_need_a_key_too(guarded: RelayServer, upstream: UpstreamThread) -> None:
    assert_refused(get(guarded, "/v1/models"), upstream)
    assert get(guarded, "/v1/models", bearer(KEYS[0])).status == 200


@pytest.mark.parametrize("key", KEYS)
def test_each_configured_key_is_accepted_and_never_forwarded(
    guarded: RelayServer, upstream: UpstreamThread, key: str
) -> None:
    assert_chat_completion(post(guarded, headers=bearer(key)))
    assert_relayed_with_configured_key(upstream, key)


def test_scheme_is_case_insensitive(guarded: RelayServer, upstream: UpstreamThread) -> None:
    # RFC 9110 §11.1: the auth scheme is case-insensitive; the token is not.
    assert_chat_completion(post(guarded, headers={"Authorization": f"bearer {KEYS[1]}"}))
    assert_relayed_with_configured_key(upstream, KEYS[1])


@pytest.mark.parametrize("path", HEALTH_PATHS)
def test_health_paths_are_open(guarded_metrics: RelayServer, path: str) -> None:
    reply = get(guarded_metrics, path)
    assert reply.status == 200
    assert reply.json() == {"status": "ok"}


def test_health_paths_stay_open_under_a_root_path(relay_factory: RelayFactory, upstream: UpstreamThread) -> None:
    # uvicorn --root-path (a relay mounted below a prefix by a proxy in front) puts the root in `path`.
    mounted = relay_factory(relay_api_keys=list(KEYS), launcher=PLAIN_UVICORN, args=("--root-path", "/relay"))
    for path in HEALTH_PATHS:
        assert get(mounted, path).status == 200, path
    assert_refused(post(mounted, CHAT_BODY, CHAT), upstream)
    assert_chat_completion(post(mounted, CHAT_BODY, CHAT, bearer(KEYS[0])))


def test_metrics_are_open_by_default(guarded: RelayServer) -> None:
    reply = get(guarded, "/metrics")
    assert reply.status == 200
    assert b"relay_requests_total" in reply.body


def test_metrics_require_auth_when_configured(guarded_metrics: RelayServer, upstream: UpstreamThread) -> None:
    assert_refused(get(guarded_metrics, "/metrics"), upstream)
    assert_refused(get(guarded_metrics, "/metrics", bearer(WRONG)), upstream)
    reply = get(guarded_metrics, "/metrics", bearer(KEYS[1]))
    assert reply.status == 200
    assert b"relay_requests_total" in reply.body


def test_keys_from_an_environment_variable(relay_factory: RelayFactory, upstream: UpstreamThread) -> None:
    # A lone ${name} in the config takes a comma-separated list from the environment (spaces trimmed).
    server = relay_factory(relay_api_keys="${relay_keys}", env={"RELAY_KEYS": f"{ENV_KEYS[0]}, {ENV_KEYS[1]}"})
    for key in ENV_KEYS:
        upstream.upstream.reset()
        assert_chat_completion(post(server, headers=bearer(key)))
        assert_relayed_with_configured_key(upstream, key)
    upstream.upstream.reset()
    assert_refused(post(server, headers=bearer(KEYS[0])), upstream)
    assert_refused(post(server, headers=bearer(f"{ENV_KEYS[0]}, {ENV_KEYS[1]}")), upstream)


def test_client_keys_never_logged(guarded: RelayServer, guarded_metrics: RelayServer) -> None:
    for server in (guarded, guarded_metrics):
        for key in (*KEYS, WRONG):
            post(server, headers=bearer(key))
        get(server, "/metrics", bearer(KEYS[0]))
    # The relay did log these requests (the two accepted ones in the JSON access log), just not the keys.
    guarded_metrics.wait_for_log(r'"status":200', count=2)
    for server in (guarded, guarded_metrics):
        log = server.log()
        for secret in (*KEYS, WRONG, API_KEY):
            assert secret not in log
