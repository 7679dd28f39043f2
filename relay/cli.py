"""`relay serve`: validate the configuration, then run the app under uvicorn with the relay's flags."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import signal
import sys
import tempfile

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from relay.config import CONFIG_ENV, DEFAULT_CONFIG, ENV_FILE_ENV, ConfigError, load_settings
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
    args = parser.parse_args(argv)

    # Workers are separate processes that build the app from the environment, so the choices travel there.
    os.environ[CONFIG_ENV] = args.config
    if args.env_file:
        os.environ[ENV_FILE_ENV] = args.env_file
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"relay: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

    os.environ[HEAD_TIMEOUT_ENV] = str(settings.request_head_timeout)
    os.environ[MAX_HEAD_BYTES_ENV] = str(settings.max_header_bytes)
    if args.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Each worker writes its metrics to files here and /metrics adds them up (prometheus-client's
        # multiprocess mode); it must be set before any worker imports prometheus_client.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="relay-metrics-")

    # uvicorn re-raises the SIGTERM it handled once the graceful shutdown is done; this handler turns
    # that into a clean exit 0 instead of death by signal (which supervisors report as a failure).
    signal.signal(signal.SIGTERM, _exit_cleanly)
    uvicorn.run(
        "relay.app:app",
        host=args.host or settings.host,
        port=settings.port if args.port is None else args.port,
        workers=args.workers,
        log_level=args.log_level,
        log_config=_log_config(args.log_level),
        # On SIGTERM: stop accepting, let in-flight requests and streams finish for this long, then
        # cancel the rest (their clients see a cut connection) and close the upstream session.
        timeout_graceful_shutdown=settings.shutdown_grace_seconds,
        **SERVER_OPTIONS,
    )



def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _log_config(level: str) -> dict[str, object]:
    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["relay"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


if __name__ == "__main__":
    main()
