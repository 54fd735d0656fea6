"""The store's writer thread, signalled through one queue.

The relay's loop only puts events on the queue (a bus subscriber: well under a microsecond,
no lock, no disk). The thread takes the first event, gathers what follows for
``flush_interval`` seconds (one transaction per batch, not per event) and hands the batch to
``write``. A reader that must see everything queued so far puts a flush mark on the same
queue and waits for it: the queue's order guarantees every event before the mark is written.
When the queue stays empty for ``idle_every`` seconds the thread calls ``idle`` (the relay's
heartbeat).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from relay_server.events import CallEvent

log = logging.getLogger("relay_server.store")

#: How long :meth:`Writer.flush` and :meth:`Writer.stop` wait for the thread at most.
WAIT_SECONDS = 10.0


class _Mark:
    """A flush mark (``stop``: the last item the thread takes)."""

    def __init__(self, *, stop: bool = False) -> None:
        self.stop = stop
        self.done = threading.Event()


class Writer:
    """A thread that writes queued events in batches (module docstring)."""

    def __init__(
        self,
        write: Callable[[list[CallEvent]], None],
        idle: Callable[[], None],
        *,
        flush_interval: float,
        idle_every: float,
    ) -> None:
        self._write = write
        self._idle = idle
        self._flush_interval = flush_interval
        self._idle_every = idle_every
        self._queue: queue.SimpleQueue[CallEvent | _Mark] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="event-store", daemon=True)
        self._thread.start()

    def put(self, event: CallEvent) -> None:
        """Queue ``event`` (the hot path: no lock, no disk)."""
        self._queue.put(event)

    def flush(self) -> None:
        """Return once every event queued before this call is written."""
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            mark = _Mark()
            self._queue.put(mark)
            mark.done.wait(WAIT_SECONDS)

    def stop(self) -> None:
        """Write what is queued, then end the thread."""
        mark = _Mark(stop=True)
        self._queue.put(mark)
        self._thread.join(WAIT_SECONDS)
        if self._thread.is_alive():
            log.warning("event store: the writer did not finish within %.0f s", WAIT_SECONDS)

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self._idle_every)
            except queue.Empty:
                self._guarded(self._idle)
                continue
            batch, marks = self._gather(item)
            self._guarded(self._write, batch)
            for mark in marks:
                mark.done.set()
            if any(mark.stop for mark in marks):
                return

    def _gather(self, item: CallEvent | _Mark) -> tuple[list[CallEvent], list[_Mark]]:
        """The batch that starts with ``item``.

        It runs up to a mark (a reader waits, or the store closes), or holds what came within
        ``flush_interval``.
        """
        batch: list[CallEvent] = []
        deadline = time.monotonic() + self._flush_interval
        while not isinstance(item, _Mark):
            batch.append(item)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return batch, []
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                return batch, []
        return batch, [item]

    @staticmethod
    def _guarded(step: Callable[..., None], *args: object) -> None:
        try:
            step(*args)
        except Exception:  # never let the writer die: the next batch may work
            log.exception("event store: writing failed")
