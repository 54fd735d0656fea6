"""Every replica's call events in one Redis stream, ``crctl:events``; ``/events`` over it.

Each replica's bus feeds :meth:`SharedEvents.append` (a deque append: the call path never
waits for Redis). A task writes what gathered every :data:`FLUSH_SECONDS` in one pipeline:
an ``XADD crctl:events MAXLEN ~ <events_max_rows>`` per event, whose fields are the event's
time, call, kind and its data encoded once (the bytes ``/events`` serves as they are), then
each call's summary row (:mod:`~relay_server.cluster.callrows`). Every few minutes
``XTRIM MINID ~`` drops what is older than ``events_keep_days``. While Redis is away the
events wait (at most :data:`PENDING_MAX`, the oldest dropped beyond) and are written when it
is back; the fault is logged once. The local SQLite store is written as without Redis.

``/events`` ids are the stream ids as integers (:func:`event_id`: ``ms * 10**6 + seq``), so
``crctl tail`` resumes with ``after=`` / ``Last-Event-ID`` on any replica, unchanged. A
stream pulls from Redis only as fast as its client reads, so a slow client costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from relay_server import events as ev
from relay_server.cluster import Cluster, ClusterUnavailable, Outage, stop
from relay_server.cluster.callrows import CallRows
from relay_server.store.tracking import bounded

log = logging.getLogger("relay_server.cluster")

#: The stream of every replica's events.
STREAM = Cluster.key("events")
#: How long events gather before one pipeline writes them.
FLUSH_SECONDS = 0.25
#: Events kept for Redis while it is away; beyond, the oldest are dropped (and counted).
PENDING_MAX = 20_000
#: Most events written in one pipeline.
BATCH_MAX = 2_000
#: Seconds between two trims by age.
TRIM_EVERY = 300.0
_SEQ = 1_000_000
_encoder = msgspec.json.Encoder()


def event_id(stream_id: bytes | str) -> int:
    """A stream id (``<ms>-<seq>``) as the integer ``/events`` gives as the event's id."""
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    ms, _, seq = text.partition("-")
    return int(ms) * _SEQ + int(seq or 0)


def stream_id(event: int) -> str:
    """The stream id of an ``/events`` id (:func:`event_id`'s inverse)."""
    return f"{event // _SEQ}-{event % _SEQ}"


def message(entry_id: bytes, fields: dict[bytes, bytes]) -> bytes:
    """One stream entry as an SSE message, shaped as the SQLite store's (data as stored)."""
    number = event_id(entry_id)
    body = _encoder.encode(
        {
            "id": number,
            "ts": float(fields[b"ts"]),
            "call_sid": fields[b"sid"].decode(),
            "kind": fields[b"kind"].decode(),
            "data": msgspec.Raw(fields[b"data"]),
        }
    )
    return b"id: %d\ndata: %s\n\n" % (number, body)


class SharedEvents:
    """This replica's writer into the shared stream, and its readers of it."""

    def __init__(self, cluster: Cluster, *, keep_days: float, max_rows: int) -> None:
        self.cluster = cluster
        self.keep_days = keep_days
        self.max_rows = max(1000, max_rows)
        self.flush_interval = FLUSH_SECONDS
        self.rows = CallRows(cluster, keep_days=keep_days, max_calls=max(1000, max_rows // 50))
        #: The relay is stopping: streams end, and new ones are refused.
        self.ending = False
        self._pending: deque[ev.CallEvent] = deque()
        self._dropped = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.outage = Outage(
            cluster, "events", f"calls go on, their events wait here (at most {PENDING_MAX})"
        )
        self._trimmed_at = 0.0

    # ------------------------------------------------------------------ writing
    def append(self, event: ev.CallEvent) -> None:
        """Bus subscriber: queue ``event`` for the writer task (no Redis on the call path)."""
        pending = self._pending
        pending.append(event)
        if len(pending) > PENDING_MAX:
            pending.popleft()
            self._dropped += 1
        if self._wake is not None and not self._wake.is_set():
            self._wake.set()

    def start(self) -> None:
        """Start the writer task (in the serving loop)."""
        if self._task is None:
            self._wake = asyncio.Event()
            self._wake.set()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="events")

    async def aclose(self) -> None:
        """Write what is queued (if Redis answers), then stop."""
        self.ending = True
        await stop(self._task)
        self._task = None
        if self._pending:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._flush(), 5.0)

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.flush_interval)
            self._wake.clear()
            try:
                await self._flush()
                await self._trim()
                self._report(None)
            except Exception as exc:
                self._report(exc)
                await asyncio.sleep(1.0)
                self._wake.set()  # try again: the events wait in the queue

    async def _flush(self) -> None:
        while self._pending:
            count = min(len(self._pending), BATCH_MAX)
            batch = [self._pending.popleft() for _ in range(count)]
            try:
                await self.rows.write(STREAM, self.max_rows, [bounded(e) for e in batch])
            except BaseException:
                self._pending.extendleft(reversed(batch))  # in order, before newer ones
                while len(self._pending) > PENDING_MAX:
                    self._pending.popleft()
                    self._dropped += 1
                raise

    async def _trim(self) -> None:
        now = time.time()
        if now - self._trimmed_at < TRIM_EVERY:
            return
        self._trimmed_at = now
        cutoff = now - self.keep_days * 86400
        await self.cluster.redis.xtrim(STREAM, minid=f"{int(cutoff * 1000)}-0", approximate=True)
        await self.rows.trim(cutoff)

    def _report(self, exc: BaseException | None) -> None:
        """Log a fault once per outage, and the recovery with what was lost meanwhile."""
        if exc is not None:
            self.outage.failed(exc)
            return
        lost = f"; {self._dropped} events did not fit the queue meanwhile" if self._dropped else ""
        if self.outage.answered(lost):
            self._dropped = 0

    # ------------------------------------------------------------------ reading
    async def cursor(self, since: float | None, after: int | None) -> tuple[str, bool]:
        """Where a stream starts: (stream id, whether the id itself is included).

        Without ``since`` and ``after``: after the newest entry (only live events).

        Raises:
            ClusterUnavailable: Redis did not answer.
        """
        if after is not None:
            return stream_id(after), False
        if since is not None:
            return f"{max(0, int(since * 1000))}-0", True
        try:
            newest = await self.cluster.redis.xrevrange(STREAM, count=1)
        except Exception as exc:
            raise ClusterUnavailable(self.cluster.url, exc) from exc
        return (newest[0][0].decode() if newest else "0-0"), False

    async def stream(
        self,
        start: tuple[str, bool],
        *,
        since: float | None = None,
        call_sid: str | None = None,
        heartbeat: float = 15.0,
        page: int = 500,
    ) -> AsyncIterator[bytes]:
        """Server-Sent Events from ``start`` (:meth:`cursor`): the backlog, then live events.

        A Redis fault ends the stream (logged once); the client resumes with ``after=``.
        """
        redis = self.cluster.redis
        cursor, inclusive = start
        yield b"retry: 1000\n\nid: %d\n\n" % event_id(cursor)  # where to resume from
        quiet_since = time.monotonic()
        try:
            while not self.ending:
                if inclusive:  # the backlog from ``since``: XRANGE includes its start
                    entries = await redis.xrange(STREAM, min=cursor, count=page)
                    inclusive = False
                else:
                    found = await redis.xread({STREAM: cursor}, count=page, block=1000)
                    entries = found[0][1] if found else []
                chunk = []
                for entry_id, fields in entries:
                    cursor = entry_id.decode()
                    if call_sid and fields[b"sid"].decode() != call_sid:
                        continue
                    if since is not None and float(fields[b"ts"]) < since:
                        continue
                    chunk.append(message(entry_id, fields))
                if chunk:
                    quiet_since = time.monotonic()
                    yield b"".join(chunk)
                elif time.monotonic() - quiet_since >= heartbeat:
                    quiet_since = time.monotonic()
                    yield f": keep-alive\nid: {event_id(cursor)}\n\n".encode()
        except Exception as exc:
            self._report(exc)

    # ------------------------------------------------------------------ calls
    async def calls(self, limit: int) -> list[dict[str, Any]]:
        """The latest calls of every replica, newest first.

        Raises:
            ClusterUnavailable: Redis did not answer.
        """
        try:
            return await self.rows.latest(limit)
        except Exception as exc:
            raise ClusterUnavailable(self.cluster.url, exc) from exc

    async def call(self, sid: str, limit: int = 10_000) -> dict[str, Any] | None:
        """One call (``sid`` or a unique prefix of 6+ characters) with its events.

        Raises:
            ClusterUnavailable: Redis did not answer.
        """
        try:
            found = await self.rows.find(sid)
            if found is None:
                return None
            row, first, last = found
            row["events"] = await self._events_of(row["call_sid"], first, last, limit)
            return row
        except Exception as exc:
            raise ClusterUnavailable(self.cluster.url, exc) from exc

    async def _events_of(self, sid: str, first: str, last: str, limit: int) -> list[Any]:
        """The call's events: the stream between its first and last entry, filtered."""
        events: list[Any] = []
        cursor, inclusive = first, True
        while len(events) < limit:
            entries = await self.cluster.redis.xrange(
                STREAM, min=cursor if inclusive else f"({cursor}", max=last, count=1000
            )
            inclusive = False
            for entry_id, fields in entries:
                if fields[b"sid"].decode() == sid:
                    events.append(
                        {
                            "id": event_id(entry_id),
                            "ts": float(fields[b"ts"]),
                            "call_sid": sid,
                            "kind": fields[b"kind"].decode(),
                            "data": msgspec.json.decode(fields[b"data"]),
                        }
                    )
            if len(entries) < 1000:
                break
            cursor = entries[-1][0].decode()
        return events[:limit]
