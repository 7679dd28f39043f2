"""Local mode, `relay serve --local` (what `make run` does without env.yaml): the bundled fake OpenAI
upstream (relay.testing) answers in place of OpenAI, so a newcomer can try the relay with no credentials
and no network.

The fake upstream runs as its own process on a free port of 127.0.0.1, which it picks itself and reports
on its first line of output; `fake_upstream` starts it, waits for that line, and stops it by PID on exit.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

BANNER = """\
relay: LOCAL MODE - no env.yaml in {cwd}.
  A fake OpenAI upstream answers on {upstream} (canned chat and responses answers, SSE too).
  Try:  curl -s http://127.0.0.1:{port}/v1/chat/completions -H 'Content-Type: application/json' \\
          -d '{{"messages": [{{"role": "user", "content": "hi"}}]}}'
  To relay to OpenAI instead: cp env.example.yaml env.yaml, fill in your key and model, then `make run`.
"""

START_TIMEOUT = 10.0  # seconds for the fake upstream to say where it listens
STOP_TIMEOUT = 10.0  # seconds for it to stop after SIGTERM before it is killed
_LISTENING = re.compile(r"fake upstream listening on (http://\S+)")


@contextmanager
def fake_upstream(relay_port: int) -> Iterator[str]:
    """Run the fake upstream for as long as the block runs; yield its base URL (http://127.0.0.1:PORT/v1).

    `relay_port` is only for the banner's example request. A fake upstream that exits or stays silent
    ends the relay with SystemExit and one line saying so."""
    command = [sys.executable, "-m", "relay.testing", "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        base_url = _wait_listening(process)
        print(BANNER.format(cwd=os.getcwd(), upstream=base_url, port=relay_port), flush=True)
        yield base_url
    finally:
        _stop(process)


def _wait_listening(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    # readline() blocks with no timeout of its own; a daemon thread lets the wait be bounded.
    reader = threading.Thread(target=_first_line, args=(process.stdout, lines), name="local-upstream", daemon=True)
    reader.start()
    try:
        line = lines.get(timeout=START_TIMEOUT)
    except queue.Empty:
        message = f"relay: the local fake upstream did not say where it listens within {START_TIMEOUT:g} s"
        raise SystemExit(message) from None
    found = _LISTENING.search(line)
    if found is None:
        if process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=1)  # an empty line is end of output: the process is on its way out
        if process.returncode is not None:
            raise SystemExit(f"relay: the local fake upstream exited with {process.returncode}")
        raise SystemExit(f"relay: the local fake upstream said {line.strip()!r} instead of where it listens")
    return found.group(1)


def _first_line(stream: IO[str], lines: queue.Queue[str]) -> None:
    try:
        lines.put(stream.readline())
    except (OSError, ValueError):  # the pipe closed under us: same as end of output
        lines.put("")


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()
