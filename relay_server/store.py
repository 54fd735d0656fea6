"""The event store: every call event in SQLite (stdlib ``sqlite3``), and the live feed of them.

:meth:`EventStore.append` is a bus subscriber on the relay's event loop, so it only queues the
event (a deque append, about a microsecond). A writer thread wakes at most every
``flush_interval`` seconds (50 ms), encodes the batch (msgspec), inserts it in one transaction
(WAL journal, ``synchronous=NORMAL``: a commit does not wait for the disk) and hands the stored
rows, now with their ids, back to the loop for the live ``/events`` streams. The relay's hot path
never waits for the disk, and the per-token path publishes nothing.

Row ids come from SQLite (``AUTOINCREMENT``: never reused, also after pruning), so they keep
growing across relay restarts and a client resumes a stream with ``after=<last id>``. Several
relays may share one file (SQLite locks it); each streams live only the events it stored.

A ``calls`` table keeps one row per call (from, to, started, ended, status, turns), updated by
the writer in the same transaction. Old events are pruned by age and by row count.

Bounds (what one client or one call may cost):

* a live ``/events`` stream may have at most :data:`STREAM_BUDGET` bytes (1 MiB) waiting for a
  client that does not read; beyond that its stream is ended (the client resumes from the store
  with ``after=`` / ``Last-Event-ID``, so it loses nothing);
* a partial transcript (``caller.speech`` with ``last`` false) is stored with at most
  :data:`PARTIAL_MAX_CHARS` characters, its end (the newest words); the final one is kept whole.

A ``relays`` table has a row per relay process that writes the file (host, pid, started, a
heartbeat every :data:`HEARTBEAT_SECONDS`). At start, calls still open whose relay is gone
(stopped, its process dead on this host, or no heartbeat for :data:`GONE_AFTER_SECONDS`) get
the final status ``lost`` and a ``call.lost`` event saying when that relay was last seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import sqlite3
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec

from relay_server import events as ev
from relay_server.errors import ConfigError

log = logging.getLogger("relay_server.store")

#: (id, ts, call_sid, kind, data as JSON text)
Row = tuple[int, float, str, str, str]
#: What the live streams get: (id, call_sid, the event as an SSE message)
Live = tuple[int, str, bytes]

#: Rows kept by a store that is not on disk.
MEMORY_MAX_ROWS = 20_000
_PRUNE_EVERY_SECONDS = 300.0
#: Bytes a live stream may hold for a client that does not read before it is ended.
STREAM_BUDGET = 1 << 20
#: Characters of a partial transcript that are stored (the end of it).
PARTIAL_MAX_CHARS = 1024
#: How often a relay's writer says it is alive, and after how long without that it is gone.
HEARTBEAT_SECONDS = 10.0
GONE_AFTER_SECONDS = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    call_sid TEXT NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_call ON events (call_sid, id);
CREATE INDEX IF NOT EXISTS events_by_ts ON events (ts);
CREATE TABLE IF NOT EXISTS calls (
    sid TEXT PRIMARY KEY,
    from_number TEXT,
    to_number TEXT,
    custom_parameters TEXT,
    started REAL NOT NULL,
    ended REAL,
    last_ts REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'live',
    turns INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    handoff TEXT
);
CREATE INDEX IF NOT EXISTS calls_by_started ON calls (started);
CREATE TABLE IF NOT EXISTS relays (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started REAL NOT NULL,
    last_seen REAL NOT NULL,
    stopped REAL
);
"""

_encoder = msgspec.json.Encoder()


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
        flush_interval: float = 0.05,
        readonly: bool = False,
    ) -> None:
        self.path = str(path) if path not in (None, "") else ":memory:"
        self.memory = self.path == ":memory:"
        self.keep_days = keep_days
        self.max_rows = min(max_rows, MEMORY_MAX_ROWS) if self.memory else max_rows
        self.flush_interval = flush_interval
        self.readonly = readonly
        #: The id of the last event this store wrote or found at start.
        self.last_id = 0
        #: This relay process in the ``relays`` table (a writer only).
        self.relay_id = uuid.uuid4().hex[:16]
        #: Bytes a live stream may hold for a client that does not read (:data:`STREAM_BUDGET`).
        self.stream_budget = STREAM_BUDGET
        self._beat_at = time.monotonic()
        self._con = self._open()
        self._lock = threading.Lock()  # the connection is shared by the writer and readers
        self._pending: deque[ev.CallEvent] = deque()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._closed = False
        self._listeners: list[Callable[[list[Live]], None]] = []
        self._streams: set[asyncio.Queue[list[Live] | None]] = set()
        #: The relay is stopping: streams end, and new ones end at once.
        self.ending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._written_since_prune = 0
        self._pruned_at = time.monotonic()
        self._thread: threading.Thread | None = None
        if not readonly:
            self.prune()
            self._close_lost_calls()
            self._thread = threading.Thread(target=self._run, name="event-store", daemon=True)
            self._thread.start()

    def _open(self) -> sqlite3.Connection:
        try:
            if self.readonly:
                if not self.memory and not Path(self.path).is_file():
                    raise ConfigError(f"no events database at {self.path}")
                uri = "file::memory:" if self.memory else Path(self.path).resolve().as_uri()
                con = sqlite3.connect(
                    uri + "?mode=rw", uri=True, isolation_level=None, check_same_thread=False
                )
            else:
                if not self.memory:
                    _create_private(Path(self.path))
                con = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            con.execute("PRAGMA busy_timeout = 5000")
            if not self.readonly:
                con.execute("PRAGMA journal_mode = WAL")
                con.execute("PRAGMA synchronous = NORMAL")
                con.executescript(_SCHEMA)
                if "relay" not in {row[1] for row in con.execute("PRAGMA table_info(calls)")}:
                    con.execute("ALTER TABLE calls ADD COLUMN relay TEXT")
                # A write at start: a file SQLite can only read (file mode, read-only mount)
                # would otherwise be accepted here and every event lost later.
                now = time.time()
                con.execute(
                    "INSERT INTO relays (id, host, pid, started, last_seen) VALUES (?, ?, ?, ?, ?)",
                    (self.relay_id, socket.gethostname(), os.getpid(), now, now),
                )
            newest = _newest(con)
        except sqlite3.Error as exc:
            if "readonly" in str(exc) or "read-only" in str(exc):
                raise ConfigError(
                    f"events database {self.path} is read-only ({exc}): make it and its folder "
                    f"writable, or pick another file with --events-db ('' keeps events in "
                    f"memory only)"
                ) from exc
            raise ConfigError(f"events database {self.path}: {exc}") from exc
        except OSError as exc:
            raise ConfigError(f"events database {self.path}: {exc.strerror or exc}") from exc
        self.last_id = newest
        return con

    # ------------------------------------------------------------------ writing (hot path)
    def append(self, event: ev.CallEvent) -> None:
        """Bus subscriber: queue ``event``; the writer thread stores it within
        ``flush_interval``. Never touches the disk."""
        if self._closed:
            return
        self._pending.append(event)
        if not self._wake.is_set():
            self._wake.set()

    def _run(self) -> None:
        while True:
            if not self._wake.wait(HEARTBEAT_SECONDS):
                self._heartbeat()
                continue
            if not self._closing.is_set():
                self._closing.wait(self.flush_interval)  # gather a batch
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # never let the writer die: the next batch may work
                log.exception("event store: writing failed")
            if self._closing.is_set() and not self._pending:
                return

    def flush(self) -> None:
        """Write every queued event now (the writer thread does this on its own)."""
        with self._lock:
            batch: list[ev.CallEvent] = []
            with contextlib.suppress(IndexError):
                while True:
                    batch.append(self._pending.popleft())
            if batch:
                rows = self._write(batch)
                if rows:
                    self._deliver(rows)
            if not self.readonly and time.monotonic() - self._beat_at >= HEARTBEAT_SECONDS:
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
        """Say this relay is alive (or, ``stopped``, that it stopped cleanly)."""
        self._beat_at = time.monotonic()
        now = time.time()
        try:
            self._con.execute(
                "UPDATE relays SET last_seen = ?, stopped = ? WHERE id = ?",
                (now, now if stopped else None, self.relay_id),
            )
        except sqlite3.Error as exc:
            log.warning("event store %s: heartbeat failed: %s", self.path, exc)

    def _close_lost_calls(self) -> None:
        """Give the calls left open by relays that are gone the status ``lost`` (with a
        ``call.lost`` event), so a crash does not leave them "live" forever."""
        now = time.time()
        host = socket.gethostname()
        with self._lock:
            try:
                relays = {
                    rid: (rhost, int(pid), float(seen), stopped)
                    for rid, rhost, pid, seen, stopped in self._con.execute(
                        "SELECT id, host, pid, last_seen, stopped FROM relays"
                    )
                }
                open_calls = self._con.execute(
                    "SELECT sid, last_ts, relay FROM calls WHERE status = 'live' AND ended IS NULL"
                ).fetchall()
            except sqlite3.Error as exc:
                log.warning("event store %s: cannot look for lost calls: %s", self.path, exc)
                return
            lost: list[ev.CallEvent] = []
            for sid, last_ts, rid in open_calls:
                relay = relays.get(rid) if rid else None
                if rid == self.relay_id:
                    continue
                if relay is None:  # a row from a relay older than the heartbeat
                    seen, why = float(last_ts), "no relay has written it since"
                    if now - seen < GONE_AFTER_SECONDS:
                        continue
                else:
                    rhost, pid, seen, stopped = relay
                    if stopped is not None:
                        why = f"relay pid {pid} on {rhost} stopped"
                    elif rhost == host and not _alive(pid):
                        why = f"relay pid {pid} on {rhost} is gone"
                    elif now - seen >= GONE_AFTER_SECONDS:
                        why = f"relay pid {pid} on {rhost} stopped answering"
                    else:
                        continue  # its relay is still running
                    seen = max(seen, float(last_ts))
                lost.append(
                    ev.CallEvent(ev.CALL_LOST, sid, {"last_seen": seen, "reason": why}, now)
                )
            if lost:
                self._write(lost)
                log.warning(
                    "event store %s: %d call(s) left open by a relay that is gone are now 'lost'",
                    self.path,
                    len(lost),
                )
            with contextlib.suppress(sqlite3.Error):
                self._con.execute(
                    "DELETE FROM relays WHERE id != ? AND last_seen < ? AND NOT EXISTS "
                    "(SELECT 1 FROM calls WHERE calls.relay = relays.id AND status = 'live')",
                    (self.relay_id, now - GONE_AFTER_SECONDS),
                )

    def _write(self, batch: list[ev.CallEvent]) -> list[Row]:
        con = self._con
        rows: list[Row] = []
        try:
            con.execute("BEGIN IMMEDIATE")
            for event in batch:
                data = _dumps(_bounded(event))
                cursor = con.execute(
                    "INSERT INTO events (ts, call_sid, kind, data) VALUES (?, ?, ?, ?)",
                    (event.ts, event.call_sid, event.kind, data),
                )
                rows.append(
                    (int(cursor.lastrowid or 0), event.ts, event.call_sid, event.kind, data)
                )
                if event.call_sid:
                    _track_call(con, event, self.relay_id)
            con.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                con.execute("ROLLBACK")
            log.warning("event store %s: %d events lost: %s", self.path, len(batch), exc)
            return []
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
            con.execute(
                "DELETE FROM calls WHERE last_ts < ? OR NOT EXISTS "
                "(SELECT 1 FROM events WHERE events.call_sid = calls.sid)",
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
        self._closing.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        if not self.readonly:
            with contextlib.suppress(Exception):
                self.flush()
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
        where: list[str] = []
        args: list[Any] = []
        if after_id is not None:
            where.append("id > ?")
            args.append(after_id)
        if since is not None:
            where.append("ts >= ?")
            args.append(since)
        if call_sid:
            where.append("call_sid = ?")
            args.append(call_sid)
        sql = "SELECT id, ts, call_sid, kind, data FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id LIMIT ?"
        args.append(max(0, limit))
        if not self.readonly:
            self.flush()
        with self._lock:
            return [
                (int(r[0]), float(r[1]), str(r[2]), str(r[3]), str(r[4]))
                for r in self._con.execute(sql, args)
            ]

    def max_id(self) -> int:
        """The newest stored row id (0 when empty)."""
        if not self.readonly:
            self.flush()
        with self._lock:
            return _newest(self._con)

    def query(
        self,
        since: float | None = None,
        call_sid: str | None = None,
        after_id: int | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        """Stored events as dicts (``id``, ``ts``, ``call_sid``, ``kind``, ``data``), oldest
        first, with the filters of :meth:`select`."""
        return [_event(row) for row in self.select(since, call_sid, after_id, limit)]

    def calls(self, limit: int = 50) -> list[dict[str, Any]]:
        """One row per call, newest first: call_sid, from, to, started, ended, status, turns…"""
        if not self.readonly:
            self.flush()
        with self._lock:
            cursor = self._con.execute(
                f"SELECT {_CALL_COLUMNS} FROM calls ORDER BY started DESC LIMIT ?", (limit,)
            )
            return [_call(row) for row in cursor]

    def call(self, sid: str, limit: int = 10_000) -> dict[str, Any] | None:
        """One call (as in :meth:`calls`) with its ``events``; ``sid`` may be a unique
        prefix of at least 6 characters. ``None`` if there is no such call."""
        if not self.readonly:
            self.flush()
        with self._lock:
            found = self._con.execute(
                f"SELECT {_CALL_COLUMNS} FROM calls WHERE sid = ?", (sid,)
            ).fetchall()
            if not found and len(sid) >= 6:
                pattern = sid.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                found = self._con.execute(
                    f"SELECT {_CALL_COLUMNS} FROM calls WHERE sid LIKE ? ESCAPE '\\' LIMIT 2",
                    (pattern + "%",),
                ).fetchall()
        if len(found) != 1:
            return None
        call = _call(found[0])
        call["events"] = self.query(call_sid=call["call_sid"], limit=limit)
        return call

    # --------------------------------------------------------------------------- live
    def listen(self, callback: Callable[[list[Live]], None]) -> Callable[[], None]:
        """Call ``callback(rows)`` on the running event loop with each batch of events this
        store writes from now on. Returns a function that stops it."""
        self._loop = asyncio.get_running_loop()
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)

    def _deliver(self, rows: list[Row]) -> None:
        loop = self._loop
        if not self._listeners or loop is None:
            return
        live = [(row[0], row[2], _sse(row)) for row in rows]
        with contextlib.suppress(RuntimeError):  # the loop has closed
            loop.call_soon_threadsafe(self._fan_out, live)

    def _fan_out(self, live: list[Live]) -> None:
        for callback in list(self._listeners):
            try:
                callback(live)
            except Exception:
                log.exception("event store: a live listener failed")

    def end_streams(self) -> None:
        """End every open :meth:`stream`, and any opened later (the relay is stopping: a
        client that reconnects at once must not hold the shutdown). Call on the event loop."""
        self.ending = True
        for queue in list(self._streams):
            _end(queue)

    async def stream(
        self,
        *,
        since: float | None = None,
        call_sid: str | None = None,
        after: int | None = None,
        heartbeat: float = 15.0,
        page: int = 500,
    ) -> AsyncIterator[bytes]:
        """Server-Sent Events: the stored backlog (``since`` / ``after``), then live events.

        Each message's ``id:`` is the event's row id, so a client resumes with ``after``.
        Without ``since`` and ``after`` only live events come. A comment every ``heartbeat``
        seconds keeps proxies and the client's read timeout content. A client too slow to take
        its events is cut off once more than :attr:`stream_budget` bytes wait for it: its
        stream ends after the last event it was sent, and it resumes from the store with
        ``after`` (``crctl tail`` does), losing nothing.
        """
        queue: asyncio.Queue[list[Live] | None] = asyncio.Queue(maxsize=1000)
        waiting = 0  # bytes queued for this client
        cut = False
        sent_id = after or 0

        def on_rows(rows: list[Live]) -> None:
            nonlocal waiting, cut
            if cut:
                return
            if call_sid is not None:
                rows = [row for row in rows if row[1] == call_sid]
                if not rows:
                    return
            size = sum(len(row[2]) for row in rows)
            # A client that keeps up (nothing waiting) always takes the next batch.
            if queue.full() or (not queue.empty() and waiting + size > self.stream_budget):
                cut = True
                _end(queue)
                log.warning(
                    "events: a /events client fell %d KiB behind, its stream is ended "
                    "(it resumes with after=%d)",
                    (waiting + size) >> 10,
                    sent_id,
                )
                return
            waiting += size
            queue.put_nowait(rows)

        stop = self.listen(on_rows)
        self._streams.add(queue)
        try:
            if self.ending:
                return
            yield b"retry: 1000\n\n"
            floor = self.last_id  # live rows up to here were stored before this stream
            if since is not None or after is not None:
                # An ``after`` beyond the newest row comes from another (or a reset) database.
                cursor = None if after is None else min(after, await asyncio.to_thread(self.max_id))
                sent = False
                while True:
                    rows = await asyncio.to_thread(self.select, since, call_sid, cursor, page)
                    if rows:
                        sent = True
                        cursor = sent_id = rows[-1][0]
                        yield b"".join(_sse(row) for row in rows)
                    if len(rows) < page:
                        break
                floor = cursor if sent and cursor is not None else min(after or 0, floor)
            sent_id = floor
            yield f"id: {floor}\n\n".encode()  # where to resume if nothing else comes
            while True:
                try:
                    batch = await asyncio.wait_for(queue.get(), heartbeat)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                if batch is None:
                    return
                waiting -= sum(len(row[2]) for row in batch)
                chunk = b"".join(message for row_id, _, message in batch if row_id > floor)
                if chunk:
                    sent_id = batch[-1][0]
                    yield chunk
        finally:
            stop()
            self._streams.discard(queue)


# ---------------------------------------------------------------------------- helpers
_CALL_COLUMNS = (
    "sid, from_number, to_number, custom_parameters, started, ended, status, turns, errors, handoff"
)


def _call(row: tuple[Any, ...]) -> dict[str, Any]:
    sid, from_, to, params, started, ended, status, turns, errors, handoff = row
    return {
        "call_sid": sid,
        "from": from_,
        "to": to,
        "custom_parameters": json.loads(params) if params else {},
        "started": started,
        "ended": ended,
        "status": status,
        "turns": turns,
        "errors": errors,
        "handoff": handoff,
    }


def _track_call(con: sqlite3.Connection, event: ev.CallEvent, relay: str) -> None:
    """Keep the ``calls`` row of ``event``'s call up to date (in the writer's transaction);
    ``relay`` (the writer's relay id) serves the call from now on."""
    sid, ts, data, kind = event.call_sid, event.ts, event.data, event.kind
    if kind == ev.CALL_LOST:
        con.execute(
            "UPDATE calls SET status = 'lost', ended = ? WHERE sid = ? AND status = 'live'",
            (data.get("last_seen") or ts, sid),
        )
        return
    con.execute(
        "INSERT INTO calls (sid, started, last_ts, relay) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (sid) DO UPDATE SET last_ts = excluded.last_ts, relay = excluded.relay",
        (sid, ts, ts, relay),
    )
    if kind == ev.CALL_STARTED:
        con.execute(
            "UPDATE calls SET from_number = coalesce(?, from_number), "
            "to_number = coalesce(?, to_number), custom_parameters = ?, status = 'live', "
            "ended = NULL WHERE sid = ?",
            (
                data.get("from") or None,
                data.get("to") or None,
                _dumps(data.get("custom_parameters") or {}),
                sid,
            ),
        )
    elif kind == ev.AGENT_REPLY:
        con.execute("UPDATE calls SET turns = turns + 1 WHERE sid = ?", (sid,))
    elif kind in (ev.ERROR, ev.LLM_FAULT):
        con.execute("UPDATE calls SET errors = errors + 1 WHERE sid = ?", (sid,))
    elif kind == ev.SOCKET_CLOSED:
        con.execute(
            "UPDATE calls SET ended = ?, status = CASE status WHEN 'live' THEN 'hung up' "
            "ELSE status END WHERE sid = ?",
            (ts, sid),
        )
    elif kind == ev.SESSION_END:
        status = str(data.get("status") or "ended")
        if data.get("error_code"):
            status += f" ({data['error_code']})"
        con.execute(
            "UPDATE calls SET ended = ?, status = ?, handoff = coalesce(?, handoff) WHERE sid = ?",
            (ts, status, data.get("handoff_data") or None, sid),
        )
    elif kind == ev.CALL_STATUS and data.get("status") in ev.CALL_OVER:
        # The session's own status (ended, failed…) says more than the call's final one.
        con.execute(
            "UPDATE calls SET ended = max(coalesce(ended, 0), ?), status = CASE WHEN status "
            "IN ('live', 'hung up') THEN ? ELSE status END WHERE sid = ?",
            (ts, data["status"], sid),
        )


def _bounded(event: ev.CallEvent) -> dict[str, Any]:
    """The data of ``event`` as stored: a partial transcript keeps its last
    :data:`PARTIAL_MAX_CHARS` characters (``chars``: how long it was)."""
    data = event.data
    if event.kind == ev.CALLER_SPEECH and not data.get("last", True):
        text = data.get("text")
        if isinstance(text, str) and len(text) > PARTIAL_MAX_CHARS:
            return {**data, "text": "…" + text[1 - PARTIAL_MAX_CHARS :], "chars": len(text)}
    return data


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, owned by someone else
    return True


def _newest(con: sqlite3.Connection) -> int:
    """The newest row id ever given (AUTOINCREMENT remembers it after pruning)."""
    row = con.execute(
        "SELECT max(coalesce((SELECT max(id) FROM events), 0), coalesce((SELECT seq FROM "
        "sqlite_sequence WHERE name = 'events'), 0))"
    ).fetchone()
    return int(row[0] or 0)


def _dumps(data: Any) -> str:
    """JSON text of event data; anything JSON cannot hold becomes its ``str()``."""
    try:
        return _encoder.encode(data).decode()
    except (TypeError, ValueError, msgspec.EncodeError):
        return json.dumps(data, default=str)


def _event(row: Row) -> dict[str, Any]:
    return {
        "id": row[0],
        "ts": row[1],
        "call_sid": row[2],
        "kind": row[3],
        "data": json.loads(row[4]),
    }


def _sse(row: Row) -> bytes:
    body = _encoder.encode(
        {
            "id": row[0],
            "ts": row[1],
            "call_sid": row[2],
            "kind": row[3],
            "data": msgspec.Raw(row[4].encode()),
        }
    )
    return b"id: %d\ndata: %s\n\n" % (row[0], body)


def _end(queue: asyncio.Queue[list[Live] | None]) -> None:
    """End a stream after what it has sent: what it had not sent is in the store, and
    dropping only part of it would leave a gap before the client's ``Last-Event-ID``."""
    with contextlib.suppress(asyncio.QueueEmpty):
        while True:
            queue.get_nowait()
    queue.put_nowait(None)


def _create_private(path: Path) -> None:
    """Create the database file readable by its owner only (it holds call transcripts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


# ---------------------------------------------------------------------------- since=
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(value: str | None, now: float | None = None) -> float | None:
    """``since=`` as a Unix time: ``600`` (seconds ago), ``10m`` / ``2h`` / ``30s`` / ``1d``,
    a Unix timestamp, or an ISO 8601 time (without a zone: local time). Raises ValueError."""
    if value is None or not value.strip():
        return None
    now = time.time() if now is None else now
    text = value.strip()
    match = _DURATION.match(text)
    if match:
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        if number < 0:
            raise ValueError(f"since: must not be negative, got {value!r}")
        return number if number >= 1e9 else now - number
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"since: expected seconds (600), a duration (30s, 10m, 2h, 1d) or an ISO time "
            f"(2026-11-21T14:00), got {value!r}"
        ) from None
    return moment.timestamp()  # a naive time is taken as local time
