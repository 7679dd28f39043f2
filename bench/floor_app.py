"""The floor of the server side: a raw ASGI app under uvicorn, run with the same flags as `relay serve`.

It reads the request body and answers a canned 1 KB JSON, and does nothing else: its CPU per request is
what uvicorn + httptools + uvloop cost before the relay does any work of its own. The benchmark pins it
to the relay's core, like the relay.

`python -m bench.floor_app --port 8001`
"""

from __future__ import annotations

import argparse

import orjson
import uvicorn
from starlette.types import Receive, Scope, Send

from relay.cli import SERVER_OPTIONS

_SIZE = 1024


def _canned_body() -> bytes:
    payload = {
        "id": "chatcmpl-floor",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "bench-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "stop"}],
    }
    overhead = len(orjson.dumps(payload))
    payload["choices"][0]["message"]["content"] = "x" * max(0, _SIZE - overhead)  # type: ignore[index]
    return orjson.dumps(payload)


BODY = _canned_body()
_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())],
}
_BODY = {"type": "http.response.body", "body": BODY, "more_body": False}


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    more = True
    while more:  # the relay must read the whole body too, so the floor does
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        more = message.get("more_body", False)
    await send(_START)
    await send(_BODY)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor_app", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    # The relay's own server options, so the two differ only in the app.
    uvicorn.run("bench.floor_app:app", host="127.0.0.1", port=args.port, workers=1, log_level="info", **SERVER_OPTIONS)


if __name__ == "__main__":
    main()
