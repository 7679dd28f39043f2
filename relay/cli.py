"""`relay serve`: validate the configuration, then run the app under uvicorn with the relay's flags."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from relay.config import BIND_HOST_ENV, CONFIG_ENV, DEFAULT_CONFIG, ENV_FILE_ENV, LOCAL_UPSTREAM_ENV, ConfigError, load_settings
from relay.logs import uvicorn_log_config
from relay.protocol import HEAD_TIMEOUT_ENV, MAX_HEAD_BYTES_ENV

# Longer than the idle time of common clients' pools (httpx, which the openai SDK uses, keeps 5 s), so
# the client, not the relay, closes an idle connection and never reuses one the relay just closed.
KEEP_ALIVE_SECONDS = 75

# How the relay runs under uvicorn (bench/floor_app.py runs the stack's floor with the same options).
SERVER_OPTIONS: dict[str, object] = dict(
    loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
    # uvicorn's httptools protocol plus a deadline and a size cap for each request's head.
    http="relay.protocol:GuardedHttpToolsProtocol",
    lifespan="on",
    ws="none",  # the relay serves no WebSocket; relay.protocol refuses Upgrade requests with 400
    access_log=False,
    # The upstream's own Server and Date headers pass through; uvicorn's would duplicate them.
    server_header=False,
    date_header=False,
    timeout_keep_alive=KEEP_ALIVE_SECONDS,
    proxy_headers=False,  # the relay does not use the client's address; X-Forwarded-* parsing is waste
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="relay", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the relay")
    serve.add_argument("--config", default=os.environ.get(CONFIG_ENV, DEFAULT_CONFIG), help="YAML config file")
    serve.add_argument("--env-file", help=f"YAML file for ${{name}} values (default: ./env.yaml, or ${ENV_FILE_ENV})")
    serve.add_argument("--host", help="bind address (default: the config's host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: the config's port, 8000; 0 picks a free one)")
    serve.add_argument("--workers", type=int, default=1, help="processes; max_concurrent_requests is per process")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--local", action="store_true", help="relay to a bundled fake OpenAI upstream (no key, no network)")
    args = parser.parse_args(argv)
    if args.local:
        from relay.local import fake_upstream  # the test double only loads when asked for

        with fake_upstream(args.port or 8000) as base_url:
            os.environ[LOCAL_UPSTREAM_ENV] = base_url
            serve_relay(args)
    else:
        serve_relay(args)


def serve_relay(args: argparse.Namespace) -> None:
    # Workers are separate processes that build the app from the environment, so the choices travel there.
    os.environ[CONFIG_ENV] = args.config
    if args.env_file:
        os.environ[ENV_FILE_ENV] = args.env_file
    if args.host:
        os.environ[BIND_HOST_ENV] = args.host
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"relay: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    os.environ[HEAD_TIMEOUT_ENV] = str(settings.request_head_timeout)
    os.environ[MAX_HEAD_BYTES_ENV] = str(settings.max_header_bytes)
    # uvicorn re-raises the SIGTERM it handled once the graceful shutdown is done; this handler turns
    # that into a clean exit 0 instead of death by signal (which supervisors report as a failure).
    signal.signal(signal.SIGTERM, _exit_cleanly)
    with _metrics_directory(args.workers):
        uvicorn.run(
            "relay.app:app",
            host=args.host or settings.host,
            port=settings.port if args.port is None else args.port,
            workers=args.workers,
            log_level=args.log_level,
            log_config=uvicorn_log_config(args.log_level),
            # On SIGTERM: stop accepting, let in-flight requests and streams finish for this long, then
            # cancel the rest (their clients see a cut connection) and close the upstream connections.
            timeout_graceful_shutdown=settings.shutdown_grace_seconds,
            **SERVER_OPTIONS,
        )


@contextmanager
def _metrics_directory(workers: int) -> Iterator[None]:
    """With several workers, each writes its metrics to files in one directory and /metrics adds them up
    (prometheus-client's multiprocess mode); it must exist before any worker imports prometheus_client,
    and it goes when the relay does. One the user set is the user's: it stays."""
    if workers <= 1 or "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        yield
        return
    directory = tempfile.mkdtemp(prefix="relay-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    try:
        yield
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    main()
