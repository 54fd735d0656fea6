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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
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
            newest = _newest(con)
        except sqlite3.Error as exc:
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
            self._wake.wait()
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
            if self._written_since_prune >= max(100, self.max_rows // 20) or (
                time.monotonic() - self._pruned_at > _PRUNE_EVERY_SECONDS
            ):
                self._prune_locked()

    def _write(self, batch: list[ev.CallEvent]) -> list[Row]:
        con = self._con
        rows: list[Row] = []
        try:
            con.execute("BEGIN IMMEDIATE")
            for event in batch:
                data = _dumps(event.data)
                cursor = con.execute(
                    "INSERT INTO events (ts, call_sid, kind, data) VALUES (?, ?, ?, ?)",
                    (event.ts, event.call_sid, event.kind, data),
                )
                rows.append(
                    (int(cursor.lastrowid or 0), event.ts, event.call_sid, event.kind, data)
                )
                if event.call_sid:
                    _track_call(con, event)
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
        seconds keeps proxies and the client's read timeout content; a client too slow to
        take its events is cut off (it resumes from the store with ``after``).
        """
        queue: asyncio.Queue[list[Live] | None] = asyncio.Queue(maxsize=1000)

        def on_rows(rows: list[Live]) -> None:
            try:
                queue.put_nowait(rows)
            except asyncio.QueueFull:
                _end(queue)

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
                        cursor = rows[-1][0]
                        yield b"".join(_sse(row) for row in rows)
                    if len(rows) < page:
                        break
                floor = cursor if sent and cursor is not None else min(after or 0, floor)
            yield f"id: {floor}\n\n".encode()  # where to resume if nothing else comes
            while True:
                try:
                    batch = await asyncio.wait_for(queue.get(), heartbeat)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                if batch is None:
                    return
                chunk = b"".join(
                    message
                    for row_id, sid, message in batch
                    if row_id > floor and (call_sid is None or sid == call_sid)
                )
                if chunk:
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


def _track_call(con: sqlite3.Connection, event: ev.CallEvent) -> None:
    """Keep the ``calls`` row of ``event``'s call up to date (in the writer's transaction)."""
    sid, ts, data, kind = event.call_sid, event.ts, event.data, event.kind
    con.execute(
        "INSERT INTO calls (sid, started, last_ts) VALUES (?, ?, ?) "
        "ON CONFLICT (sid) DO UPDATE SET last_ts = excluded.last_ts",
        (sid, ts, ts),
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
    while True:
        try:
            queue.put_nowait(None)
            return
        except asyncio.QueueFull:
            queue.get_nowait()  # the stream ends anyway: what it had not sent is in the store


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
