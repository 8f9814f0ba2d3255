"""`flowsession serve`: flags, with FLOWSESSION_* environment variables as defaults."""
from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import math
import os
import signal
import sqlite3
import sys
from dataclasses import replace
from datetime import timedelta

from .api.app import CannotListen, build_server
from .config import DEFAULT_ENVIRONMENTS, Settings
from .store.schema import SchemaError

DEFAULT_ADDRESS = "127.0.0.1:50051"

# (flag, type, default, minimum, maximum, help); each also reads FLOWSESSION_<FLAG_NAME> as its default.
NUMERIC_FLAGS: tuple[tuple[str, type, float, float, float, str], ...] = (
    ("--watch-queue", int, Settings.watch_queue, 1, 1_000_000,
     "events buffered per watch stream before a slow client is cut off with WATCHER_TOO_SLOW"),
    ("--watch-heartbeat", float, Settings.watch_heartbeat, 0.01, 86_400, "seconds of idleness after which a watch stream gets a heartbeat"),
    ("--watch-write-timeout", float, Settings.watch_write_timeout, 0.1, 3600,
     "seconds a write to a watch stream may stay blocked by a client not reading before it is cut with WATCHER_TOO_SLOW"),
    ("--max-watchers", int, Settings.max_watchers, 1, 1_000_000, "open watch streams per process; more get RESOURCE_EXHAUSTED (TOO_MANY_WATCHERS)"),
    ("--max-opening-watchers", int, Settings.max_opening_watchers, 1, 1_000_000,
     "watch streams replaying their backlog at once; more opens get UNAVAILABLE (SERVER_BUSY) with RetryInfo"),
    ("--event-retention", float, Settings.event_retention.total_seconds(), 1, 3650 * 86_400,
     "seconds of event history kept (events of RUNNING sessions are always kept)"),
    ("--feed-poll", float, Settings.feed_poll, 0.001, 60, "seconds between looks for commits by other processes on the same database"),
    ("--read-threads", int, Settings.read_threads, 1, 64, "pooled read connections, each on its own thread"),
    ("--shutdown-grace", float, Settings.shutdown_grace, 0, 3600, "seconds in-flight calls get to finish on SIGTERM before they are cancelled"),
    ("--shutdown-drain", float, Settings.shutdown_drain, 0, 60,
     "seconds without a new call (each answered SHUTTING_DOWN) before a stopping server lets gRPC stop; at most 2 s and half the grace"),
)  # fmt: skip
LOG_LEVELS = tuple(logging.getLevelNamesMapping())
DEFAULT_LOG_LEVEL = "INFO"  # DEBUG, INFO, WARNING/WARN, ERROR, CRITICAL/FATAL, NOTSET


def _dest(flag: str) -> str:
    """``--watch-queue`` -> ``watch_queue``: argparse's attribute, and (upper-cased) the variable's suffix."""
    return flag.removeprefix("--").replace("-", "_")


def _variable(flag: str) -> str:
    return "FLOWSESSION_" + _dest(flag).upper()


def _from_env(flag: str, kind: type, default: float) -> float:
    """The value of a flag not given: its variable's, else the default. Read only then, so a bad variable
    does not stop a start whose flag overrides it."""
    variable = _variable(flag)
    text = os.environ.get(variable)
    if text is None:
        return kind(default)
    try:
        return kind(text)
    except ValueError:
        kind_name = "an integer" if kind is int else "a number"
        raise SystemExit(f"{flag} (from {variable}) must be {kind_name}, not {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="flowsession", description="Run identity-verification flow sessions over gRPC.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the gRPC API")
    serve.add_argument("--address", default=env("FLOWSESSION_ADDRESS", DEFAULT_ADDRESS), help="HOST:PORT; port 0 picks a free one")
    serve.add_argument("--db", default=env("FLOWSESSION_DB", Settings.db_path), help="SQLite database file")
    # No argparse defaults for the checked text flags: settings_from reads the variable of one not given,
    # so that its message can name the variable.
    serve.add_argument("--environments", help=f"comma-separated environment names (default {','.join(DEFAULT_ENVIRONMENTS)})")
    serve.add_argument(
        "--synchronous", choices=("FULL", "NORMAL"), help=f"SQLite synchronous mode; FULL survives a power cut (default {Settings.synchronous})"
    )
    for flag, kind, default, minimum, maximum, text in NUMERIC_FLAGS:
        serve.add_argument(flag, type=kind, help=f"{text} ({minimum} to {maximum:,}; default {default:g}, or {_variable(flag)})")
    serve.add_argument("--log-level", help=f"{', '.join(LOG_LEVELS)} (default {DEFAULT_LOG_LEVEL})")
    return parser


def _text_flag(args: argparse.Namespace, flag: str, default: str) -> tuple[str, str]:
    """A text flag's value and how a message names it: the flag, else its variable, else the default."""
    value = getattr(args, _dest(flag))
    if value is not None:
        return value, flag
    variable = _variable(flag)
    if variable in os.environ:
        return os.environ[variable], f"{flag} (from {variable})"
    return default, flag


def log_level(args: argparse.Namespace) -> str:
    level, source = _text_flag(args, "--log-level", DEFAULT_LOG_LEVEL)
    if level.upper() not in LOG_LEVELS:
        raise SystemExit(f"{source} must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
    return level.upper()


def settings_from(args: argparse.Namespace) -> Settings:
    """The checked settings; a bad value stops the start with a message naming the flag."""
    listed, source = _text_flag(args, "--environments", ",".join(DEFAULT_ENVIRONMENTS))
    environments = frozenset(e.strip() for e in listed.split(",") if e.strip())
    if not environments:
        raise SystemExit(f"{source} needs at least one name")
    synchronous, source = _text_flag(args, "--synchronous", Settings.synchronous)
    if synchronous not in ("FULL", "NORMAL"):  # argparse checks the flag, not the variable
        raise SystemExit(f"{source} must be FULL or NORMAL, not {synchronous!r}")
    log_level(args)
    numbers: dict[str, float] = {}  # Settings fields are named as the flags' attributes
    for flag, kind, default, minimum, maximum, _text in NUMERIC_FLAGS:  # argparse does not check ranges
        value = getattr(args, _dest(flag))
        source = flag
        if value is None:
            value = _from_env(flag, kind, default)
            if _variable(flag) in os.environ:
                source = f"{flag} (from {_variable(flag)})"
        numbers[_dest(flag)] = value
        if not (math.isfinite(value) and minimum <= value <= maximum):  # NaN compares false to both
            raise SystemExit(f"{source} must be from {minimum} to {maximum:,}, not {value}")
    return replace(
        Settings(),
        db_path=args.db,
        environments=environments,
        synchronous=synchronous,
        **{**numbers, "event_retention": timedelta(seconds=numbers["event_retention"])},
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


class CannotStart(Exception):
    """The start failed for a reason the operator can act on; main prints it, without a traceback."""


def _database_problem(path: str, exc: BaseException) -> str:
    where = os.path.abspath(path)
    folder = os.path.dirname(where)
    if not os.path.isdir(folder):
        why = f"its directory {folder} does not exist"
    elif os.path.isdir(where):
        why = "it is a directory"
    else:
        why = str(exc)
    return f"cannot use the database {where}: {why}"


async def serve(settings: Settings, address: str) -> None:
    # The handlers come first: a SIGTERM sent as soon as "listening on" is out (or during start-up)
    # must stop the server gracefully, not kill it with the signal's default action.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        server, port = await build_server(settings, address)
    except CannotListen as exc:
        raise CannotStart(str(exc)) from exc
    except (sqlite3.Error, OSError, SchemaError) as exc:
        raise CannotStart(_database_problem(settings.db_path, exc)) from exc
    tune_gc()
    host = address.rsplit(":", 1)[0]
    print(f"listening on {host}:{port}", flush=True)
    await stop.wait()
    logging.getLogger(__name__).info("shutting down")
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = settings_from(args)
    logging.basicConfig(level=log_level(args), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(settings, args.address))
    except CannotStart as exc:
        print(f"flowsession: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
