"""One frozen Settings; flags and FLOWSESSION_* environment variables fill it (flags win)."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

DEFAULT_ENVIRONMENTS = ("live", "staging")


@dataclass(frozen=True)
class Settings:
    db_path: str = "./flowsession.db"
    environments: frozenset[str] = field(default_factory=lambda: frozenset(DEFAULT_ENVIRONMENTS))
    # FULL: an answered write survives a power cut. NORMAL trades that for speed (survives a crash only).
    synchronous: str = "FULL"
    watch_queue: int = 1000
    watch_heartbeat: float = 30.0
    # Seconds one write to a watch stream may stay blocked (its client not reading) before the stream is
    # cut with WATCHER_TOO_SLOW: each such stream holds the event it is sending, serialized.
    watch_write_timeout: float = 10.0
    max_watchers: int = 20_000
    # Streams replaying their backlog at once; beyond it opens are shed with UNAVAILABLE + RetryInfo.
    max_opening_watchers: int = 256
    event_retention: timedelta = timedelta(days=7)
    # How often the change feed looks for commits by other processes on the same file.
    feed_poll: float = 0.02
    read_threads: int = 4
    # Seconds in-flight calls get to finish on SIGTERM before they are cancelled.
    shutdown_grace: float = 10.0
    # Seconds with no new call (each is answered SHUTTING_DOWN meanwhile) before gRPC itself stops, which
    # cancels the calls still queued inside it; under load they can arrive a few hundred ms late.
    shutdown_drain: float = 0.2
