"""WatchSessions: every matching event in commit order, resumable by cursor with no gap and no duplicate."""
from __future__ import annotations

import queue
import random
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2

from flowsession.client import FlowsessionError, connect
from flowsession.v1 import session_pb2, session_service_pb2 as spb
from flowsession_server.api import streams as streams_module
from flowsession_server.clock import FakeClock, SystemClock

from ..support import (
    TIMEOUT,
    Gate,
    ServerProcess,
    ServerThread,
    current_cursor,
    expect_error,
    new_session,
    published_flow,
    report,
    settings_for,
    wait_until,
    watcher_count,
)

ST = session_pb2


class Collector:
    """Reads one WatchSessions stream on a thread; the test takes what arrived with deadlines."""

    def __init__(self, client, **request):
        self.stream = client.sessions.WatchSessions(spb.WatchSessionsRequest(environment="live", **request), timeout=60)
        self.items: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for response in self.stream:
                self.items.put(response)
        except grpc.RpcError as err:
            self.items.put(err)

    def take(self, n: int) -> list:
        out = []
        for _ in range(n):
            item = self.items.get(timeout=TIMEOUT)
            if isinstance(item, Exception):
                raise item
            out.append(item)
        return out

    def events(self, n: int) -> list:
        return [r.event for r in self.take(n)]

    def events_and_heartbeats(self, n: int) -> tuple[list, list[tuple[int, str]]]:
        """The next ``n`` events, and the heartbeats among them as (events before it, its cursor)."""
        events: list = []
        beats: list[tuple[int, str]] = []
        deadline = time.monotonic() + TIMEOUT
        while len(events) < n:
            assert time.monotonic() < deadline, f"{len(events)} of {n} events arrived"
            (item,) = self.take(1)
            if item.HasField("event"):
                events.append(item.event)
            else:
                beats.append((len(events), item.heartbeat.cursor))
        return events, beats

    def close(self) -> None:
        self.stream.cancel()


def test_from_now_streams_matching_events_in_commit_order(server, client):
    flow_a = published_flow(client)
    flow_b = published_flow(client)
    before = new_session(client, flow_a).session.session_id  # created before the watch: not replayed
    everything = Collector(client)
    only_b = Collector(client, flow_id=flow_b)
    completed = Collector(client, statuses=[ST.SESSION_STATUS_COMPLETED])
    try:
        wait_until(lambda: watcher_count(server) == 3)  # "now" has begun for all three
        report(client, before, "document", "ok")
        assert everything.events(1)[0].session.session_id == before
        a = new_session(client, flow_a).session.session_id
        b = new_session(client, flow_b).session.session_id
        report(client, a, "document", "bad")  # completes a, REJECTED
        report(client, b, "document", "ok")
        got = everything.events(4)
        assert [(e.session.session_id, e.version) for e in got] == [(a, 1), (b, 1), (a, 2), (b, 2)]
        assert [e.cursor for e in got] == sorted(e.cursor for e in got)
        assert [(e.session.session_id, e.version) for e in only_b.events(2)] == [(b, 1), (b, 2)]
        done = completed.events(1)[0]
        assert (done.session.session_id, done.session.outcome) == (a, 2)
        staging = new_session(client, published_flow(client, environment="staging"), environment="staging")
        assert staging.session.environment == "staging"
        report(client, b, "liveness", "ok")
        nxt = everything.events(1)[0]  # the staging session never shows up in a live watch
        assert (nxt.session.session_id, nxt.version) == (b, 3)
    finally:
        everything.close()
        only_b.close()
        completed.close()


def test_an_event_fanned_out_to_many_streams_is_converted_and_serialized_once(server, client, monkeypatch):
    """Every stream gets the same bytes: serializing a session with a 200 KB input took about 0.5 ms, once
    per stream, so 100 watchers of an environment cost 50 ms of the event loop per such event."""
    serialized: list[int] = []
    convert_event = streams_module.convert.event_response

    class Counted:
        def __init__(self, message):
            self._message = message

        def SerializeToString(self) -> bytes:
            serialized.append(self._message.event.version)
            return self._message.SerializeToString()

    monkeypatch.setattr(streams_module.convert, "event_response", lambda *args: Counted(convert_event(*args)))
    flow = published_flow(client)
    big = struct_pb2.Struct()
    big.update({f"k{i}": "x" * 100 for i in range(500)})
    session = new_session(client, flow, input=big).session
    watchers = [Collector(client) for _ in range(3)]
    try:
        wait_until(lambda: watcher_count(server) == 3)
        report(client, session.session_id, "document", "ok")
        for watcher in watchers:
            (event,) = watcher.events(1)
            assert (event.session.session_id, event.version, event.session.input) == (session.session_id, 2, big)
        assert serialized == [2]
    finally:
        for watcher in watchers:
            watcher.close()


def test_include_current_sends_each_running_session_first(client):
    flow_id = published_flow(client)
    running = [new_session(client, flow_id).session.session_id for _ in range(3)]
    report(client, running[0], "document", "ok")
    ended = new_session(client, flow_id).session.session_id
    report(client, ended, "document", "bad")
    watch = Collector(client, include_current=True)
    try:
        current = watch.events(3)
        assert sorted((e.session.session_id, e.version) for e in current) == sorted(
            [(running[0], 2), (running[1], 1), (running[2], 1)]
        )
        report(client, running[1], "document", "ok")
        live = watch.events(1)[0]
        assert (live.session.session_id, live.version) == (running[1], 2)
    finally:
        watch.close()


def test_resume_after_a_cursor_has_no_gap_and_no_duplicate(client):
    flow_id = published_flow(client)
    sid = new_session(client, flow_id).session.session_id
    first = current_cursor(client, sid)
    report(client, sid, "document", "ok")
    report(client, sid, "liveness", "retry")
    resumed = Collector(client, after_cursor=first)
    try:
        assert [e.version for e in resumed.events(2)] == [2, 3]
        report(client, sid, "liveness", "ok")
        assert [e.version for e in resumed.events(1)] == [4]
    finally:
        resumed.close()


def test_cursor_errors(client):
    watch = lambda request, timeout: next(iter(client.sessions.WatchSessions(request, timeout=timeout)))  # noqa: E731
    flow_id = published_flow(client)
    new_session(client, flow_id)
    expect_error(watch, spb.WatchSessionsRequest(environment="live", after_cursor="nonsense"), grpc.StatusCode.INVALID_ARGUMENT, fields=("after_cursor",))
    err = expect_error(
        watch, spb.WatchSessionsRequest(environment="live", after_cursor="0123456789abcdef-0000000000000001"),
        grpc.StatusCode.OUT_OF_RANGE, "CURSOR_EXPIRED",
    )
    assert err.metadata["oldest_cursor"]
    # Positions past SQLite's integers are ahead of the log, not an INTERNAL error.
    epoch = err.metadata["oldest_cursor"].split("-")[0]
    for huge in (f"{epoch}-ffffffffffffffff", f"{epoch}-8000000000000000-00000000", f"{'0' * 16}-ffffffffffffffff"):
        expect_error(watch, spb.WatchSessionsRequest(environment="live", after_cursor=huge), grpc.StatusCode.OUT_OF_RANGE, "CURSOR_EXPIRED")
    expect_error(watch, spb.WatchSessionsRequest(environment="nowhere"), grpc.StatusCode.INVALID_ARGUMENT, fields=("environment",))
    expect_error(watch, spb.WatchSessionsRequest(environment="live", statuses=[42]), grpc.StatusCode.INVALID_ARGUMENT, prefix_fields=("statuses",))


def test_every_event_arrives_once_per_watcher_under_concurrent_writers_and_random_resumes(server, client):
    flow_id = published_flow(client)
    rng = random.Random(7)
    seed = new_session(client, flow_id).session.session_id
    origin = current_cursor(client, seed)
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            sid = new_session(client, flow_id).session.session_id
            report(client, sid, "document", "ok")
            for _ in range(rng.randrange(3)):
                report(client, sid, "liveness", "retry")
            report(client, sid, "liveness", rng.choice(["ok", "bad"]))

    def watcher(seed_value: int) -> list:
        local = random.Random(seed_value)
        seen, cursor = [], origin
        while len(seen) < 120:
            stream = client.sessions.WatchSessions(
                spb.WatchSessionsRequest(environment="live", after_cursor=cursor), timeout=TIMEOUT
            )
            for response in stream:
                seen.append(response.event)
                cursor = response.event.cursor
                if local.random() < 0.05 or len(seen) >= 120:
                    stream.cancel()  # a disconnect at a random point; resume from the last cursor
                    break
        return seen

    with ThreadPoolExecutor(max_workers=6) as pool:
        writers = [pool.submit(writer) for _ in range(2)]
        watchers = [pool.submit(watcher, i) for i in range(4)]
        results = [w.result(timeout=60) for w in watchers]
        stop.set()
        for w in writers:
            w.result(timeout=TIMEOUT)
    # The log itself, read from the store: every watcher got exactly its beginning, in order.
    logged = [(e.session_id, e.version) for e in server.call(server.server.store.log_after(0, 1_000_000))[1]]
    log_keys = logged[logged.index((seed, 1)) + 1 :]  # the origin every watcher resumed after
    assert len(log_keys) >= 120
    for seen in results:
        keys = [(e.session.session_id, e.version) for e in seen]
        assert keys == log_keys[: len(keys)], "a gap, a duplicate or another order than the log's"
        cursors = [e.cursor for e in seen]
        assert cursors == sorted(cursors), "cursors out of commit order"


@pytest.mark.parametrize("mode", ["include_current", "after_cursor"])
def test_live_events_that_overflow_while_catching_up_are_read_from_the_log(tmp_path, mode):
    # Queue of 2: the 5 sessions created while the watcher reads its backlog overflow its buffer. They
    # must come from the log, and live delivery must go on afterwards (it once stopped for good).
    server = ServerThread(settings_for(tmp_path, watch_queue=2, watch_heartbeat=0.2))
    try:
        with connect(server.address) as client:
            flow_id = published_flow(client)
            running = [new_session(client, flow_id).session for _ in range(3)]
            report(client, running[0].session_id, "document", "ok")
            origin = current_cursor(client, running[0].session_id)
            gate = Gate(server, "current_events" if mode == "include_current" else "environment_events")
            request = {"include_current": True} if mode == "include_current" else {"after_cursor": origin}
            watch = Collector(client, **request)
            try:
                assert gate.entered.wait(TIMEOUT)
                created = [new_session(client, flow_id).session.session_id for _ in range(5)]
                gate.open()
                backlog = 3 if mode == "include_current" else 0  # one event per RUNNING session first
                events, beats = watch.events_and_heartbeats(backlog + 5)
                assert [e.session.session_id for e in events[backlog:]] == created
                later = new_session(client, flow_id).session.session_id
                more, more_beats = watch.events_and_heartbeats(1)
                assert more[0].session.session_id == later
                # A heartbeat after k events claims no cursor of an event still to come.
                events += more
                beats += [(k + backlog + 5, cursor) for k, cursor in more_beats]
                assert all(e.cursor > cursor for k, cursor in beats for e in events[k:] if cursor), beats
            finally:
                watch.close()
    finally:
        server.stop()


def test_a_heartbeat_due_while_an_event_waits_claims_only_what_was_sent(server, client, monkeypatch):
    # The race a timer cannot be trusted to produce: the heartbeat interval ends just as an event is
    # buffered. The heartbeat must claim the last cursor sent, not the hub's newer high water (the stream
    # would then skip the buffered event as already covered).
    race = threading.Event()
    original = streams_module.Streams._next

    async def next_or_timeout(self, watcher):
        if watcher.key == "live" and race.is_set():  # the WatchSessions stream's next wait, once
            race.clear()
            while watcher.idle:  # wait for an event, then answer "idle for the whole interval"
                await watcher.wait_pending()
            return None
        return await original(self, watcher)

    monkeypatch.setattr(streams_module.Streams, "_next", next_or_timeout)
    flow_id = published_flow(client)
    seed = new_session(client, flow_id).session.session_id
    watch = Collector(client, after_cursor=current_cursor(client, seed))
    try:
        new_session(client, flow_id)
        (a,) = watch.events(1)
        # The stream may be in its next wait already (then B ends it, and C meets the race) or not yet
        # (then B meets the race): either way one heartbeat comes among B and C.
        race.set()
        new_session(client, flow_id)
        new_session(client, flow_id)
        events, beats = watch.events_and_heartbeats(2)
        assert len(beats) == 1, beats
        ((before, cursor),) = beats
        received = [a, *events]
        assert cursor == received[before].cursor  # the last event sent before it, nothing newer
        assert all(e.cursor > cursor for e in events[before:]), (cursor, [e.cursor for e in events])
    finally:
        watch.close()


def test_heartbeats_on_idle_streams(tmp_path):
    server = ServerThread(settings_for(tmp_path, watch_heartbeat=0.2))
    try:
        with connect(server.address) as client:
            flow_id = published_flow(client)
            sid = new_session(client, flow_id).session.session_id
            many = Collector(client, after_cursor=current_cursor(client, sid))
            report(client, sid, "document", "ok")
            event = many.events(1)[0]
            beat = many.take(1)[0]
            assert not beat.HasField("event") and beat.heartbeat.cursor == event.cursor
            many.close()
            one = client.sessions.WatchSession(spb.WatchSessionRequest(environment="live", session_id=sid), timeout=TIMEOUT)
            assert next(one).event.version == 2
            beat = next(one)
            assert not beat.HasField("event") and beat.heartbeat.version == 2
            one.cancel()
    finally:
        server.stop()


def test_a_heartbeat_before_anything_was_committed_names_a_cursor_to_resume_from(tmp_path):
    """On a new database the heartbeat's cursor was empty, and an empty after_cursor means "from now":
    a client that stored it and reconnected missed what was committed while it was away."""
    server = ServerThread(settings_for(tmp_path, watch_heartbeat=0.2))
    try:
        with connect(server.address) as client:
            first = Collector(client)
            beat = first.take(1)[0]
            assert not beat.HasField("event") and beat.heartbeat.cursor
            first.close()
            flow_id = published_flow(client)
            sid = new_session(client, flow_id).session.session_id
            resumed = Collector(client, after_cursor=beat.heartbeat.cursor)
            (created,) = resumed.events(1)
            assert (created.session.session_id, created.version) == (sid, 1)
            resumed.close()
    finally:
        server.stop()


def test_a_watcher_that_stops_reading_is_cut_off_and_holds_no_memory(tmp_path):
    server = ServerThread(settings_for(tmp_path, watch_queue=20))
    try:
        with connect(server.address) as client:
            flow_id = published_flow(client)
            sid = new_session(client, flow_id).session.session_id
            report(client, sid, "document", "ok")
            # Large events fill the transport's buffers quickly, so the server-side queue overflows.
            payload = struct_pb2.Struct()
            payload.update({"blob": "x" * 60_000})
            stalled = client.sessions.WatchSessions(spb.WatchSessionsRequest(environment="live"), timeout=60)
            healthy = Collector(client)
            wait_until(lambda: watcher_count(server) == 2)  # both registered: they miss nothing
            first = new_session(client, flow_id, input=payload).session.session_id
            assert next(stalled).event.session.session_id == first  # live; now it stops reading
            assert healthy.events(1)[0].session.session_id == first
            writes = 0
            cut = None
            most_pending = 0
            while cut is None and writes < 400:
                new_session(client, flow_id, input=payload)
                writes += 1
                # The healthy watcher keeps up the whole time: the stalled one slows nobody.
                assert healthy.events(1)[0].version == 1
                most_pending = max(most_pending, server.call(_most_pending(server)))
                if watcher_count(server) == 1:
                    cut = writes
            assert cut is not None, "the stalled watcher was never cut off"
            # Memory stays bounded: the server never held more than the queue size for it (the rest
            # waits in the transport's flow-control window, a fixed size too).
            assert 0 < most_pending <= 20
            received = 1
            try:
                for _ in stalled:
                    received += 1
                raise AssertionError("the stalled stream should end with an error")
            except grpc.RpcError as err:
                error = FlowsessionError.from_rpc_error(err)
            assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED and error.reason == "WATCHER_TOO_SLOW"
            assert error.metadata["last_cursor"]
            # It may resume from the last cursor the server says it delivered, and misses nothing.
            resumed = Collector(client, after_cursor=error.metadata["last_cursor"])
            assert len(resumed.events(writes + 1 - received)) == writes + 1 - received
            resumed.close()
            healthy.close()
    finally:
        server.stop()


def test_client_watch_sessions_rides_out_watcher_too_slow_without_gap_or_duplicate(tmp_path):
    server = ServerThread(settings_for(tmp_path, watch_queue=20))
    try:
        with connect(server.address) as client:
            flow_id = published_flow(client)
            seed = new_session(client, flow_id).session.session_id
            payload = struct_pb2.Struct()
            payload.update({"blob": "x" * 60_000})
            events = client.watch_sessions("live", after_cursor=current_cursor(client, seed), timeout=60)
            created = [new_session(client, flow_id).session.session_id]
            assert next(events).session.session_id == created[0]  # open and live; now it stops reading
            while watcher_count(server) == 1 and len(created) < 400:
                created.append(new_session(client, flow_id, input=payload).session.session_id)
            assert watcher_count(server) == 0, "the stalled watcher was never cut off"
            created.append(new_session(client, flow_id).session.session_id)  # committed while it is away
            got = [next(events).session.session_id for _ in created[1:]]
            assert got == created[1:]
            events.close()
    finally:
        server.stop()


def test_closing_a_client_watch_iterator_frees_its_stream(server, client):
    flow_id = published_flow(client)
    after = current_cursor(client, new_session(client, flow_id).session.session_id)
    new_session(client, flow_id)
    kept = client.watch_sessions("live", after_cursor=after, timeout=60)
    next(kept)
    for _event in client.watch_sessions("live", after_cursor=after, timeout=60):
        assert watcher_count(server) == 2
        break  # drops the loop's iterator: its stream ends, the kept one stays
    wait_until(lambda: watcher_count(server) == 1)
    kept.close()
    wait_until(lambda: watcher_count(server) == 0)



async def _most_pending(server):
    return max((w.pending for w in server.server.hub.watchers()), default=0)


def test_too_many_watchers_is_refused_with_retry_info(tmp_path):
    server = ServerThread(settings_for(tmp_path, max_watchers=2))
    try:
        with connect(server.address) as client:
            flow_id = published_flow(client)
            sid = new_session(client, flow_id).session.session_id
            open_streams = [
                client.sessions.WatchSession(spb.WatchSessionRequest(environment="live", session_id=sid), timeout=TIMEOUT)
                for _ in range(2)
            ]
            for s in open_streams:
                next(s)
            err = expect_error(
                lambda request, timeout: next(client.sessions.WatchSessions(request, timeout=timeout)),
                spb.WatchSessionsRequest(environment="live"),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "TOO_MANY_WATCHERS",
            )
            assert 1.0 <= err.retry_delay <= 5.0 and err.metadata["max_watchers"] == "2"
            for s in open_streams:
                s.cancel()
    finally:
        server.stop()


def test_retention_prunes_old_history_and_old_cursors_expire(tmp_path):
    clock = FakeClock(SystemClock().now())
    server = ServerThread(settings_for(tmp_path, event_retention=timedelta(days=7)), clock=clock)
    try:
        with connect(server.address) as client:
            flow_id = published_flow(client, timeout_s=30 * 86400)
            done = new_session(client, flow_id).session.session_id
            epoch = current_cursor(client, done).split("-")[0]
            report(client, done, "document", "bad")  # terminal
            running = new_session(client, flow_id).session.session_id
            report(client, running, "document", "ok")
            clock.advance(timedelta(days=8))
            removed = server.call(server.server.retention.prune())
            assert removed == 1  # only the ended session's older event; RUNNING history and latest events stay
            from_start = f"{epoch}-{0:016x}"  # the position before the first event
            err = expect_error(
                lambda request, timeout: next(client.sessions.WatchSessions(request, timeout=timeout)),
                spb.WatchSessionsRequest(environment="live", after_cursor=from_start),
                grpc.StatusCode.OUT_OF_RANGE,
                "CURSOR_EXPIRED",
            )
            # The running session's full history is still there to replay.
            history = client.sessions.WatchSession(
                spb.WatchSessionRequest(environment="live", session_id=running, after_version=1), timeout=TIMEOUT
            )
            assert next(history).event.version == 2
            history.cancel()
            # A session's latest event is kept too, so watching an ended session still works.
            assert [e.version for e in [r.event for r in client.sessions.WatchSession(
                spb.WatchSessionRequest(environment="live", session_id=done), timeout=TIMEOUT)]] == [2]
            assert len(err.metadata["oldest_cursor"].split("-")) == 3  # names the newest pruned event
            resumed = Collector(client, after_cursor=err.metadata["oldest_cursor"])
            got = resumed.events(3)
            assert [(e.session.session_id, e.version) for e in got] == [(done, 2), (running, 1), (running, 2)]
            resumed.close()
    finally:
        server.stop()


def test_events_pruned_while_a_resume_replays_the_log_end_it_with_cursor_expired(tmp_path, monkeypatch):
    monkeypatch.setattr(streams_module, "EVENT_PAGE", 2)  # a backlog of several pages without writing thousands
    clock = FakeClock(SystemClock().now())
    server = ServerThread(settings_for(tmp_path, event_retention=timedelta(days=7)), clock=clock)
    try:
        with connect(server.address) as client:
            flow_id = published_flow(client, timeout_s=30 * 86400)
            origin = current_cursor(client, new_session(client, flow_id).session.session_id)
            ended, created_at = [], []
            for _ in range(3):  # versions 1 of ended sessions: what retention may prune
                ended.append(new_session(client, flow_id).session.session_id)
                created_at.append(current_cursor(client, ended[-1]))
                report(client, ended[-1], "document", "bad")
            clock.advance(timedelta(days=8))
            gate = Gate(server, "environment_events", passing=1)  # the second page's read waits
            watch = Collector(client, after_cursor=origin)
            try:
                first_page = watch.events(2)
                assert [(e.session.session_id, e.version) for e in first_page] == [(ended[0], 1), (ended[0], 2)]
                assert gate.entered.wait(TIMEOUT)
                # Prunes the version 1 events of the next pages (and the one already sent).
                assert server.call(server.server.retention.prune()) == 3
                gate.open()
                with pytest.raises(grpc.RpcError) as info:
                    watch.take(1)
                err = FlowsessionError.from_rpc_error(info.value)
                assert (err.code, err.reason) == (grpc.StatusCode.OUT_OF_RANGE, "CURSOR_EXPIRED"), err
                assert err.metadata["oldest_cursor"] == created_at[-1]  # the newest pruned event
            finally:
                watch.close()
    finally:
        server.stop()


def test_two_processes_on_one_file_see_each_others_changes_and_expire_once(tmp_path):
    db = tmp_path / "shared.db"
    a = ServerProcess(db)
    b = ServerProcess(db)
    try:
        with connect(a.address) as ca, connect(b.address) as cb:
            flow_id = published_flow(ca, timeout_s=1)
            # Both watches resume after a known event, so none misses what follows however late it opens.
            seed = new_session(ca, published_flow(ca)).session.session_id
            start = current_cursor(cb, seed)
            on_a = Collector(ca, after_cursor=start)
            on_b = Collector(cb, after_cursor=start)
            s1 = new_session(ca, flow_id).session.session_id
            s2 = new_session(cb, flow_id).session.session_id
            report(cb, s1, "document", "ok")
            report(ca, s2, "document", "ok")
            # Both sessions expire after 1 s; exactly one EXPIRED event each, whichever process does it.
            want = 6
            got_a = on_a.events(want)
            got_b = on_b.events(want)
            keys = lambda events: [(e.session.session_id, e.version, e.type) for e in events]  # noqa: E731
            assert keys(got_a) == keys(got_b)
            assert [e.cursor for e in got_a] == sorted(e.cursor for e in got_a)
            expired = [k for k in keys(got_a) if k[2] == ST.SESSION_EVENT_TYPE_EXPIRED]
            assert sorted(k[0] for k in expired) == sorted([s1, s2])
            on_a.close()
            on_b.close()
    finally:
        for p in (a, b):
            p.terminate()
            p.close()


def test_a_live_stream_whose_server_read_another_process_commits_only_after_retention_pruned_them_expires(tmp_path):
    """A process whose change feed fell behind another's commits by more than the retention period read
    the log with holes (retention, on either process, had deleted events it never published), and its
    live WatchSessions streams skipped them without a word."""
    clock = FakeClock(SystemClock().now())
    here = ServerThread(settings_for(tmp_path, feed_poll=3600.0), clock=clock)  # reads the log only when woken
    there = ServerThread(settings_for(tmp_path), clock=clock)
    try:
        with connect(here.address) as a, connect(there.address) as b:
            flow_id = published_flow(b, timeout_s=30 * 86400)
            live = Collector(a)
            wait_until(lambda: watcher_count(here) == 1)
            sid = new_session(b, flow_id).session.session_id
            report(b, sid, "document", "ok")
            report(b, sid, "liveness", "bad")  # REJECTED: versions 1 and 2 are prunable once old
            clock.advance(timedelta(days=8))
            assert there.call(there.server.retention.prune()) == 2
            new_session(a, published_flow(a))  # this process's own commit wakes its feed, which reads the log
            with pytest.raises(grpc.RpcError) as info:
                live.take(10)
            err = FlowsessionError.from_rpc_error(info.value)
            assert (err.code, err.reason) == (grpc.StatusCode.OUT_OF_RANGE, "CURSOR_EXPIRED")
            live.close()
            resumed = Collector(a, after_cursor=err.metadata["oldest_cursor"])  # what is left, from the loss on
            try:
                (first,) = resumed.events(1)
                assert (first.session.session_id, first.version) == (sid, 3)
            finally:
                resumed.close()
    finally:
        there.stop()
        here.stop()


def test_watch_sessions_resumes_across_a_restart(tmp_path):
    db = tmp_path / "flowsession.db"
    first = ServerProcess(db)
    try:
        with connect(first.address) as client:
            flow_id = published_flow(client)
            sid = new_session(client, flow_id).session.session_id
            cursor = current_cursor(client, sid)
            report(client, sid, "document", "ok")
            head = current_cursor(client, sid)
    finally:
        first.terminate()
        first.close()
    second = ServerProcess(db, "--watch-heartbeat", "0.2")
    try:
        with connect(second.address) as client:
            # A fresh process knows where "now" is: the current state and heartbeats start at the log's head.
            current = Collector(client, include_current=True)
            snapshot = current.events(1)[0]
            assert (snapshot.session.session_id, snapshot.version, snapshot.cursor) == (sid, 2, head)
            beat = current.take(1)[0]
            assert not beat.HasField("event") and beat.heartbeat.cursor == head
            current.close()
            report(client, sid, "liveness", "ok")
            resumed = Collector(client, after_cursor=cursor)
            assert [e.version for e in resumed.events(2)] == [2, 3]
            resumed.close()
    finally:
        second.terminate()
        second.close()


def _backup(source: Path, target: Path) -> None:
    """A consistent copy of a live database, as an operator's backup would be."""
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)


def test_a_cursor_from_before_a_restore_is_refused_once_the_restored_log_passes_it(tmp_path):
    db = tmp_path / "flowsession.db"
    server = ServerThread(settings_for(tmp_path))
    try:
        with connect(server.address) as client:
            flow_id = published_flow(client)
            kept = new_session(client, flow_id).session.session_id
            in_backup = current_cursor(client, kept)
            _backup(db, tmp_path / "backup.db")
            lost = [new_session(client, flow_id).session.session_id for _ in range(3)]
            seen_before_restore = current_cursor(client, lost[-1])  # a client stored this one
    finally:
        server.stop()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    (tmp_path / "backup.db").rename(db)
    server = ServerThread(settings_for(tmp_path))
    try:
        with connect(server.address) as client:
            resume = lambda cursor: Collector(client, after_cursor=cursor)  # noqa: E731
            # The restored log has not reached the cursor yet: ahead of this database.
            with pytest.raises(grpc.RpcError) as ahead:
                resume(seen_before_restore).take(1)
            assert FlowsessionError.from_rpc_error(ahead.value).reason == "CURSOR_EXPIRED"
            # New writes reuse the lost events' cursors. Resuming there would skip them: refused too.
            fresh = [new_session(client, flow_id).session.session_id for _ in range(5)]
            with pytest.raises(grpc.RpcError) as reused:
                resume(seen_before_restore).take(1)
            err = FlowsessionError.from_rpc_error(reused.value)
            assert (err.code, err.reason) == (grpc.StatusCode.OUT_OF_RANGE, "CURSOR_EXPIRED"), err
            assert "restored" in err.message
            # A cursor of an event the backup holds is still good, and replays the restored log after it.
            replay = resume(in_backup)
            assert [e.session.session_id for e in replay.events(5)] == fresh
            replay.close()
            assert kept and not set(lost) & set(fresh)
    finally:
        server.stop()


def test_cursors_issued_without_a_tag_still_resume(client):
    # Cursors issued before tags ("<epoch>-<16 hex>") name no event to check, and must keep working.
    flow_id = published_flow(client)
    sid = new_session(client, flow_id).session.session_id
    tagged = current_cursor(client, sid)
    epoch, position, tag = tagged.split("-")
    assert len(tag) == 8
    report(client, sid, "document", "ok")
    legacy = Collector(client, after_cursor=f"{epoch}-{position}")
    event = legacy.events(1)[0]
    assert (event.session.session_id, event.version) == (sid, 2)
    legacy.close()
    wrong = f"{epoch}-{position}-{int(tag, 16) ^ 1:08x}"
    with pytest.raises(grpc.RpcError) as info:
        Collector(client, after_cursor=wrong).take(1)
    assert FlowsessionError.from_rpc_error(info.value).reason == "CURSOR_EXPIRED"
