"""The event store: every call event in SQLite (stdlib ``sqlite3``), its queries, its bounds.

:meth:`EventStore.append` is a bus subscriber on the relay's event loop, so it only queues the
event for the writer thread (:mod:`~relay_server.store.writer`), which stores each batch in one
transaction with its call tracking (:mod:`~relay_server.store.tracking`) and hands the stored
rows, now with their ids, to the live feed (:mod:`~relay_server.store.live`). The relay's hot
path never waits for the disk, and the per-token path publishes nothing.

Each event's data is encoded once (:func:`relay_server.events.encode_data`): those bytes are
the stored ``data`` and the ``data`` of its ``/events`` message. Old events are pruned by age
and by row count; a partial transcript is stored with at most
:data:`~relay_server.store.tracking.PARTIAL_MAX_CHARS` characters, its end.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from relay_server import events as ev
from relay_server.store import queries, tracking
from relay_server.store.live import STREAM_BUDGET, Live, LiveFeed
from relay_server.store.schema import Row, connect, event_row, newest
from relay_server.store.writer import Writer

log = logging.getLogger("relay_server.store")

#: Rows kept by a store that is not on disk.
MEMORY_MAX_ROWS = 20_000
_PRUNE_EVERY_SECONDS = 300.0


#: How long the writer gathers events before one transaction stores them. Every commit writes
#: each page it touched into the WAL again: at 200 calls, committing every 50 ms put the relay
#: at 1.25x a bare relay's CPU per token, every 250 ms at 1.19-1.22x (1.16x with no store;
#: bench/together.py).
#: Readers of the store (``/calls``, a resumed ``/events``) flush first and never wait for it;
#: the live feed (``crctl tail``) shows events up to this much later than they happen.
FLUSH_SECONDS = 0.25
#: How long it gathers on a busy relay (:data:`~relay_server.store.writer.BUSY_EVENTS_PER_SECOND`
#: and more) that no one tails: at 200 calls, 1.20-1.21x instead of 1.23-1.24x with 250 ms
#: (bench/together.py).
BUSY_FLUSH_SECONDS = 1.0


class EventStore:
    """Call events in SQLite at ``path`` (``None`` or ``":memory:"``: in memory only).

    ``keep_days`` and ``max_rows`` bound the file: older or surplus events are deleted (at
    start, then every few minutes). ``readonly`` opens an existing file to read it (the CLI,
    while the relay may be running or not): no writer, no pruning, and an error if it is missing.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        keep_days: float = 30.0,
        max_rows: int = 500_000,
        flush_interval: float = FLUSH_SECONDS,
        busy_interval: float = BUSY_FLUSH_SECONDS,
        readonly: bool = False,
    ) -> None:
        self.path = str(path) if path not in (None, "") else ":memory:"
        self.memory = self.path == ":memory:"
        self.keep_days = keep_days
        self.max_rows = min(max_rows, MEMORY_MAX_ROWS) if self.memory else max_rows
        self.flush_interval = flush_interval
        self.readonly = readonly
        #: This relay process in the ``relays`` table (a writer only).
        self.relay_id = uuid.uuid4().hex[:16]
        #: Bytes a live stream may hold for a client that does not read (:data:`STREAM_BUDGET`).
        self.stream_budget = STREAM_BUDGET
        self._con = connect(
            self.path, memory=self.memory, readonly=readonly, relay_id=self.relay_id
        )
        #: The id of the last event this store wrote or found at start.
        self.last_id = newest(self._con)
        self._lock = threading.Lock()  # the connection is shared by the writer and readers
        self._closed = False
        self._beat_at = time.monotonic()
        self._written_since_prune = 0
        self._pruned_at = time.monotonic()
        self.feed = LiveFeed(self)
        self._writer: Writer | None = None
        if not readonly:
            self.prune()
            self._close_lost_calls()
            self._writer = Writer(
                self._store_batch,
                self._heartbeat,
                flush_interval=flush_interval,
                idle_every=tracking.HEARTBEAT_SECONDS,
                busy_interval=busy_interval,
                watched=self.feed.watched,
            )

    # ------------------------------------------------------------------ writing (hot path)
    def append(self, event: ev.CallEvent) -> None:
        """Bus subscriber: queue ``event``; the writer thread stores it within ``flush_interval``.

        Never touches the disk.
        """
        if self._writer is not None and not self._closed:
            self._writer.put(event)

    def flush(self) -> None:
        """Return once every event queued so far is stored (the writer stores them anyway)."""
        if self._writer is not None:
            self._writer.flush()

    def _store_batch(self, batch: list[ev.CallEvent]) -> None:
        """The writer's step: store ``batch``, hand it to the live feed, keep the file bounded."""
        with self._lock:
            if batch:
                rows = self._write(batch)
                if rows:
                    self.feed.deliver(rows)
            if time.monotonic() - self._beat_at >= tracking.HEARTBEAT_SECONDS:
                self._heartbeat_locked()
            if self._written_since_prune >= max(100, self.max_rows // 20) or (
                time.monotonic() - self._pruned_at > _PRUNE_EVERY_SECONDS
            ):
                self._prune_locked()

    def _heartbeat(self) -> None:
        with self._lock:
            if not self._closed:
                self._heartbeat_locked()

    def _heartbeat_locked(self, stopped: bool = False) -> None:
        self._beat_at = time.monotonic()
        try:
            tracking.heartbeat(self._con, self.relay_id, stopped=stopped)
        except sqlite3.Error as exc:
            log.warning("event store %s: heartbeat failed: %s", self.path, exc)

    def _close_lost_calls(self) -> None:
        """Give the calls left open by relays that are gone the status ``lost``."""
        with self._lock:
            try:
                lost = tracking.lost_calls(self._con, self.relay_id)
            except sqlite3.Error as exc:
                log.warning("event store %s: cannot look for lost calls: %s", self.path, exc)
                return
            if lost:
                self._write(list(lost))
                log.warning(
                    "event store %s: %d call(s) left open by a relay that is gone are now 'lost'",
                    self.path,
                    len(lost),
                )

    def _write(self, batch: list[ev.CallEvent]) -> list[Row]:
        """Store ``batch`` in one transaction: one statement for its events, one for its calls.

        The events' ids are known without a query per row: the transaction holds the write
        lock, so AUTOINCREMENT numbers them on from the table's sequence, in order (checked
        after the insert; if anything else numbered them, they are read back).
        """
        con = self._con
        events = [tracking.bounded(event) for event in batch]
        params = [
            (event.ts, event.call_sid, event.kind, ev.encode_data(event).decode())
            for event in events
        ]
        try:
            con.execute("BEGIN IMMEDIATE")
            before = _sequence(con)
            con.executemany(
                "INSERT INTO events (ts, call_sid, kind, data) VALUES (?, ?, ?, ?)", params
            )
            after = _sequence(con)
            if after - before == len(params):
                ids = list(range(before + 1, after + 1))
            else:  # not numbered on from the sequence: ask (never seen; cheap insurance)
                found = con.execute(
                    "SELECT id FROM events ORDER BY id DESC LIMIT ?", (len(params),)
                ).fetchall()
                ids = sorted(row[0] for row in found)
            tracking.track_calls(con, events, ids, self.relay_id)
            con.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                con.execute("ROLLBACK")
            log.warning("event store %s: %d events lost: %s", self.path, len(batch), exc)
            return []
        rows: list[Row] = [(i, *p) for i, p in zip(ids, params, strict=True)]
        self.last_id = rows[-1][0]
        self._written_since_prune += len(rows)
        return rows

    def prune(self) -> None:
        """Delete events older than ``keep_days`` and beyond the newest ``max_rows``."""
        with self._lock:
            self._prune_locked()

    def _prune_locked(self) -> None:
        self._written_since_prune = 0
        self._pruned_at = time.monotonic()
        cutoff = time.time() - self.keep_days * 86400
        con = self._con
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute("DELETE FROM events WHERE ts < ?", (cutoff,))
            con.execute(
                "DELETE FROM events WHERE id <= "
                "(SELECT id FROM events ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (self.max_rows,),
            )
            # A call whose last event is older than the oldest one kept has none left (a row
            # with no range, from an older relay sharing the file, goes by its age only).
            con.execute(
                "DELETE FROM calls WHERE last_ts < ? OR (last_id IS NOT NULL AND last_id < "
                "coalesce((SELECT min(id) FROM events), 1 << 62))",
                (cutoff,),
            )
            con.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                con.execute("ROLLBACK")
            log.warning("event store %s: pruning failed: %s", self.path, exc)

    def close(self) -> None:
        """Store what is queued and stop the writer (live streams end first, on the loop)."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.stop()
        with self._lock:
            if not self.readonly:
                self._heartbeat_locked(stopped=True)
            self._con.close()

    # ------------------------------------------------------------------------- reading
    def select(
        self,
        since: float | None = None,
        call_sid: str | None = None,
        after_id: int | None = None,
        limit: int = 1000,
    ) -> list[Row]:
        """Stored rows, oldest first: ``ts >= since``, of ``call_sid``, ``id > after_id``."""
        self.flush()
        with self._lock:
            return queries.select(self._con, since, call_sid, after_id, limit)

    def max_id(self) -> int:
        """The newest stored row id (0 when empty)."""
        self.flush()
        with self._lock:
            return newest(self._con)

    def query(
        self,
        since: float | None = None,
        call_sid: str | None = None,
        after_id: int | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        """Stored events as dicts (``id``, ``ts``, ``call_sid``, ``kind``, ``data``), oldest first.

        With the filters of :meth:`select`.
        """
        return [event_row(row) for row in self.select(since, call_sid, after_id, limit)]

    def calls(self, limit: int = 50) -> list[dict[str, Any]]:
        """One row per call, newest first (call_sid, from, to, started, ended, status, turns…)."""
        self.flush()
        with self._lock:
            return queries.calls(self._con, limit)

    def call(self, sid: str, limit: int = 10_000) -> dict[str, Any] | None:
        """One call (as in :meth:`calls`) with its ``events``; ``None`` if there is no such call.

        ``sid`` may be a unique prefix of at least 6 characters.
        """
        self.flush()
        with self._lock:
            call = queries.find_call(self._con, sid)
        if call is not None:
            call["events"] = self.query(call_sid=call["call_sid"], limit=limit)
        return call

    # --------------------------------------------------------------------------- live
    @property
    def ending(self) -> bool:
        """The relay is stopping: streams end, and new ones end at once."""
        return self.feed.ending

    def listen(self, callback: Callable[[list[Live]], None]) -> Callable[[], None]:
        """Call ``callback(rows)`` on the running loop with each batch stored from now on."""
        return self.feed.listen(callback)

    def end_streams(self) -> None:
        """End every open :meth:`stream`, and any opened later. Call on the event loop."""
        self.feed.end_streams()

    def stream(
        self,
        *,
        since: float | None = None,
        call_sid: str | None = None,
        after: int | None = None,
        heartbeat: float = 15.0,
        page: int = 500,
    ) -> AsyncIterator[bytes]:
        """Server-Sent Events: the stored backlog, then live events (:meth:`LiveFeed.stream`)."""
        return self.feed.stream(
            since=since, call_sid=call_sid, after=after, heartbeat=heartbeat, page=page
        )


def _sequence(con: sqlite3.Connection) -> int:
    """The last id AUTOINCREMENT gave out in ``events`` (0 before the first)."""
    row = con.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
    return int(row[0]) if row else 0
