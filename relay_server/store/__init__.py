"""The event store: call events in SQLite, and the live feed of them.

One idea per module:

* :mod:`~relay_server.store.schema`: the tables, opening the file, the shape of rows;
* :mod:`~relay_server.store.database`: :class:`EventStore`, writing and reading;
* :mod:`~relay_server.store.writer`: the writer thread, signalled through one queue;
* :mod:`~relay_server.store.tracking`: a row per call, and the calls a gone relay left open;
* :mod:`~relay_server.store.queries`: reading stored events and calls;
* :mod:`~relay_server.store.live`: ``/events`` as Server-Sent Events, with a byte budget;
* :mod:`~relay_server.store.since`: ``since=`` as a Unix time.

Bounds (what one client or one call may cost): a live ``/events`` stream may have at most
:data:`STREAM_BUDGET` bytes (1 MiB) waiting for a client that does not read, beyond which its
stream ends (the client resumes with ``after=`` and loses nothing); a partial transcript is
stored with at most :data:`PARTIAL_MAX_CHARS` characters, its end.
"""

from __future__ import annotations

from relay_server.store.database import MEMORY_MAX_ROWS, EventStore
from relay_server.store.live import STREAM_BUDGET, Live, LiveFeed
from relay_server.store.schema import Row
from relay_server.store.since import parse_since
from relay_server.store.tracking import GONE_AFTER_SECONDS, HEARTBEAT_SECONDS, PARTIAL_MAX_CHARS

__all__ = [
    "GONE_AFTER_SECONDS",
    "HEARTBEAT_SECONDS",
    "MEMORY_MAX_ROWS",
    "PARTIAL_MAX_CHARS",
    "STREAM_BUDGET",
    "EventStore",
    "Live",
    "LiveFeed",
    "Row",
    "parse_since",
]
