"""The store's writer thread, signalled through one queue.

The relay's loop only puts events on the queue (a bus subscriber: well under a microsecond,
no lock, no disk, and no wake-up of the thread). The thread takes the first event, sleeps for
``flush_interval`` seconds, then takes everything queued meanwhile (one transaction per batch,
not per event) and hands the batch to ``write``. Waiting on the queue for each event instead
woke the thread once per event, and every wake-up is a hand-over of the GIL. A reader that must
see everything queued so far puts a flush mark on the same queue, cuts the sleep short and
waits for the mark: the queue's order guarantees every event before the mark is written.
When the queue stays empty for ``idle_every`` seconds the thread calls ``idle`` (the relay's
heartbeat).

A busy relay gathers for longer: once a batch came at :data:`BUSY_EVENTS_PER_SECOND` or more
(about 25 caller turns a second, some 100 live calls), the next one gathers for
``busy_interval`` instead, until the rate falls below it again. Each commit has a fixed cost
(the transaction, the pages it rewrites in the WAL, a wake-up of the relay's loop for the live
feed, the GIL handed to this thread and back), and at 200 calls on one core committing every
250 ms instead of every second cost 0.03x of a bare relay's CPU per token (bench/together.py).
While someone follows the live feed (``crctl tail``, ``/events``) batches stay
``flush_interval`` long, so what they watch is never more than that late (and a client that
stops reading is still measured against its byte budget batch by batch); a quiet relay keeps
``flush_interval`` too.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from relay_server.events import CallEvent

log = logging.getLogger("relay_server.store")

#: How long :meth:`Writer.flush` and :meth:`Writer.stop` wait for the thread at most.
WAIT_SECONDS = 10.0
#: From this many events a second, the writer gathers for ``busy_interval`` (module docstring).
BUSY_EVENTS_PER_SECOND = 100.0


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
        busy_interval: float | None = None,
        watched: Callable[[], bool] | None = None,
    ) -> None:
        self._write = write
        self._idle = idle
        self._flush_interval = flush_interval
        self._busy_interval = max(flush_interval, busy_interval or flush_interval)
        #: Whether someone follows the live feed (then batches stay ``flush_interval`` long).
        self._watched = watched or (lambda: False)
        #: How long the next batch gathers: ``flush_interval``, or ``busy_interval`` when busy.
        self.interval = flush_interval
        self._idle_every = idle_every
        self._queue: queue.SimpleQueue[CallEvent | _Mark] = queue.SimpleQueue()
        #: Set by a flush or stop: the thread's sleep ends at once.
        self._urgent = threading.Event()
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
            self._urgent.set()
            mark.done.wait(WAIT_SECONDS)

    def stop(self) -> None:
        """Write what is queued, then end the thread."""
        mark = _Mark(stop=True)
        self._queue.put(mark)
        self._urgent.set()
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
        """The batch that starts with ``item``: what else is queued after ``flush_interval``.

        The sleep ends early when a reader waits (a flush mark) or the store closes.
        """
        batch: list[CallEvent] = []
        marks: list[_Mark] = []
        gathered = self.interval
        if isinstance(item, _Mark):
            marks.append(item)
        else:
            batch.append(item)
            if self._urgent.wait(gathered):
                gathered = 0.0  # cut short by a reader: the rate is not known
        self._urgent.clear()
        get = self._queue.get_nowait
        while True:  # a mark's events are all before it: writing past it is still in order
            try:
                item = get()
            except queue.Empty:
                if gathered and not marks:
                    busy = len(batch) >= BUSY_EVENTS_PER_SECOND * gathered
                    if busy and not self._watched():
                        self.interval = self._busy_interval
                    else:
                        self.interval = self._flush_interval
                return batch, marks
            if isinstance(item, _Mark):
                marks.append(item)
            else:
                batch.append(item)

    @staticmethod
    def _guarded(step: Callable[..., None], *args: object) -> None:
        try:
            step(*args)
        except Exception:  # never let the writer die: the next batch may work
            log.exception("event store: writing failed")
