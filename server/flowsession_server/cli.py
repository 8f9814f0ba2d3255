"""`flowsession serve`: flags, with FLOWSESSION_* environment variables as defaults."""
from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from dataclasses import replace
from datetime import timedelta

from .api.app import build_server
from .config import DEFAULT_ENVIRONMENTS, Settings

DEFAULT_ADDRESS = "127.0.0.1:50051"


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="flowsession", description="Run identity-verification flow sessions over gRPC.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the gRPC API")
    serve.add_argument("--address", default=env("FLOWSESSION_ADDRESS", DEFAULT_ADDRESS), help="HOST:PORT; port 0 picks a free one")
    serve.add_argument("--db", default=env("FLOWSESSION_DB", Settings.db_path), help="SQLite database file")
    serve.add_argument(
        "--environments",
        default=env("FLOWSESSION_ENVIRONMENTS", ",".join(DEFAULT_ENVIRONMENTS)),
        help="comma-separated environment names",
    )
    serve.add_argument(
        "--synchronous",
        choices=("FULL", "NORMAL"),
        default=env("FLOWSESSION_SYNCHRONOUS", Settings.synchronous),
        help="SQLite synchronous mode; FULL survives a power cut",
    )
    serve.add_argument(
        "--watch-queue",
        type=int,
        default=int(env("FLOWSESSION_WATCH_QUEUE", Settings.watch_queue)),
        help="events buffered per watch stream before a slow client is cut off with WATCHER_TOO_SLOW",
    )
    serve.add_argument(
        "--watch-heartbeat",
        type=float,
        default=float(env("FLOWSESSION_WATCH_HEARTBEAT", Settings.watch_heartbeat)),
        help="seconds of idleness after which a watch stream gets a heartbeat",
    )
    serve.add_argument(
        "--max-watchers",
        type=int,
        default=int(env("FLOWSESSION_MAX_WATCHERS", Settings.max_watchers)),
        help="open watch streams per process; more get RESOURCE_EXHAUSTED (TOO_MANY_WATCHERS)",
    )
    serve.add_argument(
        "--event-retention",
        type=float,
        default=float(env("FLOWSESSION_EVENT_RETENTION", Settings.event_retention.total_seconds())),
        help="seconds of event history kept (events of RUNNING sessions are always kept)",
    )
    serve.add_argument(
        "--feed-poll",
        type=float,
        default=float(env("FLOWSESSION_FEED_POLL", Settings.feed_poll)),
        help="seconds between looks for commits by other processes on the same database",
    )
    serve.add_argument("--log-level", default=env("FLOWSESSION_LOG_LEVEL", "INFO"))
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    environments = frozenset(e.strip() for e in args.environments.split(",") if e.strip())
    if not environments:
        raise SystemExit("--environments needs at least one name")
    if args.synchronous not in ("FULL", "NORMAL"):  # argparse does not check env-var defaults
        raise SystemExit(f"--synchronous must be FULL or NORMAL, not {args.synchronous!r}")
    for flag, value, low in (
        ("--watch-queue", args.watch_queue, 1),
        ("--max-watchers", args.max_watchers, 1),
        ("--watch-heartbeat", args.watch_heartbeat, 0.01),
        ("--event-retention", args.event_retention, 1),
        ("--feed-poll", args.feed_poll, 0.001),
    ):
        if value < low:
            raise SystemExit(f"{flag} must be at least {low}")
    return replace(
        Settings(),
        db_path=args.db,
        environments=environments,
        synchronous=args.synchronous,
        watch_queue=args.watch_queue,
        watch_heartbeat=args.watch_heartbeat,
        max_watchers=args.max_watchers,
        event_retention=timedelta(seconds=args.event_retention),
        feed_poll=args.feed_poll,
    )


def tune_gc() -> None:
    """Thousands of open streams make a full collection scan everything (pauses of hundreds of ms seen
    in the bench). Freeze what start-up built (modules, servicers) so no collection scans it again, and
    let full collections wait for 100x more young collections than the default; the young generations
    keep their defaults, so their pauses stay short."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, 1000)


async def serve(settings: Settings, address: str) -> None:
    server, port = await build_server(settings, address)
    tune_gc()
    host = address.rsplit(":", 1)[0]
    print(f"listening on {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logging.getLogger(__name__).info("shutting down")
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_from(args)
    asyncio.run(serve(settings, args.address))
    return 0


if __name__ == "__main__":
    sys.exit(main())
