"""The private APIs the relay relies on, checked against the installed versions (relay.seams). A failure
here names the seam to mend before taking a new release of aiohttp, uvicorn or prometheus-client."""

from __future__ import annotations

import asyncio
import logging

import pytest
import uvicorn
from uvicorn.server import ServerState

from relay.client_connection import CLIENT_KEY
from relay.head_writer import HeadWriter
from relay.protocol import GuardedHttpToolsProtocol
from relay.seams import SEAMS, check, prometheus_internals, uvicorn_internals


@pytest.mark.parametrize("seam", SEAMS, ids=lambda seam: seam.__name__.rsplit(".", 1)[-1])
def test_installed_release_fits_the_seam(seam: object) -> None:
    assert seam.problems() == []  # type: ignore[attr-defined]


@pytest.mark.parametrize("seam", SEAMS, ids=lambda seam: seam.__name__.rsplit(".", 1)[-1])
def test_installed_release_is_the_tested_one(seam: object) -> None:
    # A newer release that still fits fails only here: move TESTED (and the pin) once the suite passes.
    assert seam.untested_version() is None  # type: ignore[attr-defined]


def test_start_up_check_passes() -> None:
    check()
    assert prometheus_internals.bulk_supported()


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closing = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def writelines(self, data: object) -> None:
        for chunk in data:  # type: ignore[attr-defined]
            self.write(chunk)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


def test_the_protocol_sees_uvicorns_request_state_as_the_seam_says() -> None:
    """Drives relay.protocol over a fake transport: uvicorn's attributes and cycle are where the uvicorn
    seam says, and the response goes out through the HeadWriter."""
    seen: dict[str, object] = {}

    async def app(scope: dict, receive: object, send: object) -> None:
        seen["client"] = scope.get(CLIENT_KEY)
        await send({"type": "http.response.start", "status": 204, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b""})  # type: ignore[operator]

    async def scenario() -> Transport:
        config = uvicorn.Config(app, lifespan="off", log_config=None)
        config.load()
        protocol = GuardedHttpToolsProtocol(config=config, server_state=ServerState(), app_state={})
        transport = Transport()
        protocol.connection_made(transport)
        protocol.data_received(b"POST /v1/x?q=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: b\r\nContent-Length: 2\r\n\r\n{}")
        assert protocol.url == b"/v1/x?q=1"
        assert protocol.headers == [(b"host", b"127.0.0.1"), (b"x-a", b"b"), (b"content-length", b"2")]
        assert protocol.scope["path"] == "/v1/x"
        assert uvicorn_internals.response_open(protocol.cycle)
        assert isinstance(protocol.cycle.transport, HeadWriter)
        for _ in range(20):
            await asyncio.sleep(0)
        assert not uvicorn_internals.response_open(protocol.cycle)
        protocol.connection_lost(None)
        return transport

    transport = asyncio.run(scenario())
    assert b"".join(transport.written).startswith(b"HTTP/1.1 204 ")
    assert seen["client"] is not None and seen["client"].body_complete  # type: ignore[attr-defined]


def test_only_deliberate_aborts_lose_uvicorns_unfinished_response_line() -> None:
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("relay-test-uvicorn-error")
    logger.addHandler(Keep())
    logger.addFilter(uvicorn_internals.deliberate_aborts)
    logger.propagate = False

    async def request(deliberate: bool) -> None:
        if deliberate:
            uvicorn_internals.deliberate_aborts.mark()
        logger.error(uvicorn_internals.UNFINISHED_RESPONSE)

    async def scenario() -> None:
        await asyncio.gather(asyncio.create_task(request(True)), asyncio.create_task(request(False)))

    asyncio.run(scenario())
    assert records == [uvicorn_internals.UNFINISHED_RESPONSE]  # the genuine one stays
