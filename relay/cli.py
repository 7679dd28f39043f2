"""`relay serve`: validate the configuration, then run the app under uvicorn with the relay's flags.
`relay nemo-gym install DIR`: the relay as NeMo Gym's model server relay_model (relay.gym_install)."""

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

from relay.config import (
    BIND_HOST_ENV,
    CONFIG_ENV,
    DEFAULT_CONFIG,
    ENV_FILE_ENV,
    LOCAL_UPSTREAM_ENV,
    SERVER_ENV,
    ConfigError,
    Settings,
    load_settings,
)
from relay.logs import uvicorn_log_config
from relay.protocol import HEAD_TIMEOUT_ENV, MAX_HEAD_BYTES_ENV

LOG_LEVELS = ["critical", "error", "warning", "info", "debug"]
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
    serve.add_argument(
        "--config", action="append", help="YAML config file; several merge in order, as Gym's +config_paths "
        f"(default: ${CONFIG_ENV}, paths separated by {os.pathsep!r}, else {DEFAULT_CONFIG})",
    )  # fmt: skip
    serve.add_argument("--server", help="the NeMo Gym model server block to serve (default: the only openai_model-like one)")
    serve.add_argument("--env-file", help=f"YAML file for ${{name}} values (default: ./env.yaml, or ${ENV_FILE_ENV})")
    serve.add_argument("--host", help="bind address (default: the config's host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: the config's port, 8000; 0 picks a free one)")
    serve.add_argument("--workers", type=int, help="processes (default: the config's num_workers, 1); max_concurrent_requests is per process")
    serve.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    serve.add_argument("--local", action="store_true", help="relay to a bundled fake OpenAI upstream (no key, no network)")
    gym = commands.add_parser("nemo-gym", help="NeMo Gym: install the relay as the model server relay_model")
    gym_commands = gym.add_subparsers(dest="gym_command", required=True)
    install_parser = gym_commands.add_parser("install", help="write responses_api_models/relay_model/ into a Gym root")
    install_parser.add_argument("root", help="where ng_run finds servers: the directory it runs in, Gym's install root or checkout")
    install_parser.add_argument("--requirement", help="the requirements.txt line that installs the relay (default: this relay's source)")
    args = parser.parse_args(argv)
    if args.command == "nemo-gym":
        _install(args)
    elif args.local:
        from relay.local import fake_upstream  # the test double only loads when asked for

        with fake_upstream(args.port or 8000) as base_url:
            os.environ[LOCAL_UPSTREAM_ENV] = base_url
            serve_relay(args)
    else:
        serve_relay(args)


def serve_relay(args: argparse.Namespace) -> None:
    # Workers are separate processes that build the app from the environment, so the choices travel there.
    if args.config:
        os.environ[CONFIG_ENV] = os.pathsep.join(args.config)
    if args.server:
        os.environ[SERVER_ENV] = args.server
    if args.env_file:
        os.environ[ENV_FILE_ENV] = args.env_file
    if args.host:
        os.environ[BIND_HOST_ENV] = args.host
    settings = settings_or_exit()
    port = settings.port if args.port is None else args.port
    run(settings, args.host or settings.host, port, args.workers or settings.num_workers or 1, args.log_level)


def settings_or_exit() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        print(f"relay: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def run(settings: Settings, host: str, port: int, workers: int, log_level: str) -> None:
    """uvicorn with the relay's flags, serving `relay.app:app` (each worker builds it from the environment)."""
    os.environ[HEAD_TIMEOUT_ENV] = str(settings.request_head_timeout)
    os.environ[MAX_HEAD_BYTES_ENV] = str(settings.max_header_bytes)
    # uvicorn re-raises the SIGTERM or SIGINT it handled once the graceful shutdown is done; this handler
    # turns that into a clean exit 0 instead of death by signal (which supervisors report as a failure)
    # or a KeyboardInterrupt traceback (ng_run stops its servers with SIGINT).
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_cleanly)
    with _metrics_directory(workers):
        uvicorn.run(
            "relay.app:app",
            host=host,
            port=port,
            workers=workers,
            log_level=log_level,
            log_config=uvicorn_log_config(log_level),
            # On SIGTERM: stop accepting, let in-flight requests and streams finish for this long, then
            # cancel the rest (their clients see a cut connection) and close the upstream connections.
            timeout_graceful_shutdown=settings.shutdown_grace_seconds,
            **SERVER_OPTIONS,
        )


def _install(args: argparse.Namespace) -> None:
    from relay.gym_install import InstallError, install  # only for this command

    try:
        written = install(args.root, args.requirement)
    except InstallError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    for path in written:
        print(f"wrote {path}")
    print("in ng_run's +config_paths, use responses_api_models/relay_model/configs/relay_model.yaml for openai_model's config")


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
