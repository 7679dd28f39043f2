"""relay.protocol.HeadWriter on its own, with a transport that records its calls: a response head leaves
in the same write as the first body chunk when that follows in the same event-loop step, and alone at
the end of the step when it does not. (Over real sockets, tests/test_fidelity.py checks that a head is
never held back behind a slow body.)"""

from __future__ import annotations

import asyncio

from relay.head_writer import HeadWriter

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n"


class RecordingTransport:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[bytes, ...]]] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.calls.append(("write", (data,)))

    def writelines(self, lines: tuple[bytes, ...]) -> None:
        self.calls.append(("writelines", tuple(lines)))

    def close(self) -> None:
        self.closing = True
        self.calls.append(("close", ()))

    def is_closing(self) -> bool:
        return self.closing


async def _writes(*steps: tuple[bytes, ...]) -> list[tuple[str, tuple[bytes, ...]]]:
    """Each step's writes happen in one event-loop step; the loop runs between steps."""
    transport = RecordingTransport()
    writer = HeadWriter(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
    for step in steps:
        for data in step:
            writer.write(data)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    return transport.calls


def test_head_and_body_of_one_step_leave_in_one_write() -> None:
    calls = asyncio.run(_writes((HEAD, b"body")))
    assert calls == [("writelines", (HEAD, b"body"))]


def test_head_alone_leaves_at_the_end_of_its_step_then_chunks_go_straight_through() -> None:
    calls = asyncio.run(_writes((HEAD,), (b"data: 1\n\n",), (b"data: 2\n\n",)))
    assert calls == [("write", (HEAD,)), ("write", (b"data: 1\n\n",)), ("write", (b"data: 2\n\n",))]


def test_close_sends_a_held_head_first() -> None:
    async def head_then_close() -> list[tuple[str, tuple[bytes, ...]]]:
        transport = RecordingTransport()
        writer = HeadWriter(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
        writer.write(HEAD)
        writer.close()
        await asyncio.sleep(0)  # the scheduled flush finds nothing left to send
        return transport.calls

    assert asyncio.run(head_then_close()) == [("write", (HEAD,)), ("close", ())]
