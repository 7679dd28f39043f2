"""Local mode for `make run` without env.yaml: the bundled fake OpenAI upstream (bench/upstream.py)
answers in place of OpenAI, so a newcomer can try the relay with no credentials and no network."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

from relay import cli

BANNER = """\
relay: LOCAL MODE - no env.yaml in {cwd}.
  A fake OpenAI upstream answers on {upstream} (canned chat and responses answers, SSE too).
  Try:  curl -s http://127.0.0.1:{port}/v1/chat/completions -H 'Content-Type: application/json' \\
          -d '{{"messages": [{{"role": "user", "content": "hi"}}]}}'
  To relay to OpenAI instead: cp env.example.yaml env.yaml, fill in your key and model, run `make run` again.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="conf/openai_model.yaml")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()

    upstream_port = _free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "bench.upstream", "--port", str(upstream_port)])
    try:
        _wait_listening(upstream_port, upstream)
        base_url = f"http://127.0.0.1:{upstream_port}/v1"
        os.environ.update(
            POLICY_BASE_URL=base_url, POLICY_API_KEY="sk-local-mode", POLICY_MODEL_NAME="local-fake-model"
        )
        print(BANNER.format(cwd=os.getcwd(), upstream=base_url, port=args.port), flush=True)
        # relay serve ends a SIGTERM with SystemExit, so this `finally` stops the fake upstream too.
        cli.main(["serve", "--config", args.config, "--port", str(args.port)])
    finally:
        upstream.terminate()
        upstream.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"relay: the local fake upstream exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("relay: the local fake upstream did not start listening in time")


if __name__ == "__main__":
    main()
