"""The fake upstream as a process: ``python -m relay.testing --host 127.0.0.1 --port 9000 [--record]``.

It prints ``fake upstream listening on http://HOST:PORT/v1`` (the bound port, also with ``--port 0``)
once it accepts connections, and stops on SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence

import relay.testing
from relay.testing.server import FakeUpstream, _loopback, _new_loop


async def _serve(host: str, port: int, record: bool, name: str) -> None:
    upstream = FakeUpstream(record, name)
    bound = await upstream.start(host, port)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    address = _loopback(host)
    url_host = f"[{address}]" if ":" in address else address
    print(f"fake upstream listening on http://{url_host}:{bound}/v1", flush=True)
    await stopping.wait()
    await upstream.stop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m relay.testing", description=relay.testing.__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9000, help="port to bind, 0 for any free one (default 9000)")
    parser.add_argument(
        "--record",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="keep every request in memory (off by default so memory stays flat under load)",
    )
    parser.add_argument("--name", default="", help="put into each x-request-id (req_NAME_N): which upstream answered")
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        runner.run(_serve(args.host, args.port, args.record, args.name))


if __name__ == "__main__":
    main()
