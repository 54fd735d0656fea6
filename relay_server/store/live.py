"""The live feed: stored events as Server-Sent Events, the backlog first, then as they come.

The writer hands each batch it stored, with row ids, to the event loop; every open ``/events``
stream takes the rows it wants. A client that does not read is held to a byte budget
(:data:`STREAM_BUDGET`, 1 MiB), not to a count of batches: beyond it its stream ends after
the last event it was sent, and the client resumes from the store with ``after=`` /
``Last-Event-ID`` (``crctl tail`` does), losing nothing. Several relays may share one file;
each streams live only the events it stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import msgspec

from relay_server.store.schema import Row

log = logging.getLogger("relay_server.store")

#: What the live streams get: (id, call_sid, the event as an SSE message)
Live = tuple[int, str, bytes]
#: Bytes a live stream may hold for a client that does not read before it is ended.
STREAM_BUDGET = 1 << 20

_encoder = msgspec.json.Encoder()


class Backlog(Protocol):
    """What a stream reads before it goes live: the store's rows."""

    last_id: int
    stream_budget: int

    def select(
        self, since: float | None, call_sid: str | None, after_id: int | None, limit: int
    ) -> list[Row]:
        """Stored rows, oldest first."""
        ...

    def max_id(self) -> int:
        """The newest stored row id."""
        ...


def sse(row: Row) -> bytes:
    """One stored row as an SSE message: the data's stored JSON goes in as it is."""
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


class LiveFeed:
    """Hands the rows the writer stored to the ``/events`` streams on the event loop."""

    def __init__(self, store: Backlog) -> None:
        self._store = store
        self._listeners: list[Callable[[list[Live]], None]] = []
        self._streams: set[asyncio.Queue[list[Live] | None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        #: The relay is stopping: streams end, and new ones end at once.
        self.ending = False

    def watched(self) -> bool:
        """Whether anyone follows the feed now (the writer then keeps its batches short)."""
        return bool(self._listeners)

    def listen(self, callback: Callable[[list[Live]], None]) -> Callable[[], None]:
        """Call ``callback(rows)`` on the event loop with each batch the store writes from now on.

        Returns a function that stops it.
        """
        self._loop = asyncio.get_running_loop()
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)

    def deliver(self, rows: list[Row]) -> None:
        """Hand rows just stored to the listeners (called by the writer thread)."""
        loop = self._loop
        if not self._listeners or loop is None:
            return
        live = [(row[0], row[2], sse(row)) for row in rows]
        with contextlib.suppress(RuntimeError):  # the loop has closed
            loop.call_soon_threadsafe(self._fan_out, live)

    def _fan_out(self, live: list[Live]) -> None:
        for callback in list(self._listeners):
            try:
                callback(live)
            except Exception:
                log.exception("event store: a live listener failed")

    def end_streams(self) -> None:
        """End every open stream, and any opened later; call on the event loop.

        The relay is stopping: a client that reconnects at once must not hold the shutdown.
        """
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
        its events is cut off once more than the store's ``stream_budget`` bytes wait for it:
        its stream ends after the last event it was sent, and it resumes from the store with
        ``after``, losing nothing.
        """
        store = self._store
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
            if queue.full() or (not queue.empty() and waiting + size > store.stream_budget):
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
            floor = store.last_id  # live rows up to here were stored before this stream
            if since is not None or after is not None:
                # An ``after`` beyond the newest row comes from another (or a reset) database.
                cursor = (
                    None if after is None else min(after, await asyncio.to_thread(store.max_id))
                )
                sent = False
                while True:
                    rows = await asyncio.to_thread(store.select, since, call_sid, cursor, page)
                    if rows:
                        sent = True
                        cursor = sent_id = rows[-1][0]
                        yield b"".join(sse(row) for row in rows)
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


def _end(queue: asyncio.Queue[list[Live] | None]) -> None:
    """End a stream after what it has sent.

    What it had not sent is in the store, and dropping only part of it would leave a gap
    before the client's ``Last-Event-ID``.
    """
    with contextlib.suppress(asyncio.QueueEmpty):
        while True:
            queue.get_nowait()
    queue.put_nowait(None)
