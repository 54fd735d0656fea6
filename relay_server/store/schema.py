"""The events database: its tables, opening it, and the shape of what it gives back.

Row ids come from SQLite (``AUTOINCREMENT``: never reused, also after pruning), so they keep
growing across relay restarts and a client resumes a stream with ``after=<last id>``. Several
relays may share one file (SQLite locks it; WAL journal, ``synchronous=NORMAL``: a commit does
not wait for the disk).

A call's events are found through its ``calls`` row: ``first_id`` and ``last_id`` bound the
ids of its events, and a query scans that range of the table (in id order) for the call's SID.
An index on ``(call_sid, id)`` would find them without the scan, but every event would then
change a page of that index picked by its call, a different page for each live call: at 200
calls, every commit rewrote some 80 such pages into the WAL, and that index alone cost 2 % of
the relay's CPU (bench/compare.py). Files made before this keep working: their index is read
once to fill the ranges, then dropped (:func:`_migrate`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

from relay_server.errors import ConfigError

#: (id, ts, call_sid, kind, data as JSON text)
Row = tuple[int, float, str, str, str]

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    call_sid TEXT NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL
);
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
    handoff TEXT,
    relay TEXT,
    first_id INTEGER,
    last_id INTEGER
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

CALL_COLUMNS = (
    "sid, from_number, to_number, custom_parameters, started, ended, status, turns, errors, handoff"
)


def connect(path: str, *, memory: bool, readonly: bool, relay_id: str) -> sqlite3.Connection:
    """Open the database at ``path``, to read an existing file or to write.

    ``readonly`` reads; otherwise the file is created (owner-only) with its tables, and relay
    ``relay_id`` is registered.

    Raises:
        ConfigError: the file is missing (``readonly``), read-only, or not a database.
    """
    try:
        if readonly:
            if not memory and not Path(path).is_file():
                raise ConfigError(f"no events database at {path}")
            uri = "file::memory:" if memory else Path(path).resolve().as_uri()
            con = sqlite3.connect(
                uri + "?mode=rw", uri=True, isolation_level=None, check_same_thread=False
            )
        else:
            if not memory:
                _create_private(Path(path))
            con = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        con.execute("PRAGMA busy_timeout = 5000")
        if not readonly:
            con.execute("PRAGMA journal_mode = WAL")
            con.execute("PRAGMA synchronous = NORMAL")
            con.executescript(SCHEMA)
            _migrate(con)
            # A write at start: a file SQLite can only read (file mode, read-only mount)
            # would otherwise be accepted here and every event lost later.
            now = time.time()
            con.execute(
                "INSERT INTO relays (id, host, pid, started, last_seen) VALUES (?, ?, ?, ?, ?)",
                (relay_id, socket.gethostname(), os.getpid(), now, now),
            )
        newest(con)  # a file that is not a database fails here, not at the first query
    except sqlite3.Error as exc:
        if "readonly" in str(exc) or "read-only" in str(exc):
            raise ConfigError(
                f"events database {path} is read-only ({exc}): make it and its folder "
                f"writable, or pick another file with --events-db ('' keeps events in "
                f"memory only)"
            ) from exc
        raise ConfigError(f"events database {path}: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"events database {path}: {exc.strerror or exc}") from exc
    return con


def _migrate(con: sqlite3.Connection) -> None:
    """Bring a file made by an older relay up to this schema (module docstring).

    Adds the ``calls`` columns it lacks; where the ``(call_sid, id)`` index of older relays is
    there (made by an older relay, maybe one still writing this file), each call's id range is
    read from it, then it is dropped. One transaction: another relay never sees half of it.
    """
    columns = {row[1] for row in con.execute("PRAGMA table_info(calls)")}
    indexed = con.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'events_by_call'"
    ).fetchone()
    if not indexed and {"relay", "first_id", "last_id"} <= columns:
        return
    con.execute("BEGIN IMMEDIATE")
    try:
        for column in ("relay TEXT", "first_id INTEGER", "last_id INTEGER"):
            if column.split()[0] not in columns:
                con.execute(f"ALTER TABLE calls ADD COLUMN {column}")
        if indexed:
            con.execute(
                "UPDATE calls SET first_id = (SELECT min(id) FROM events WHERE call_sid = sid), "
                "last_id = (SELECT max(id) FROM events WHERE call_sid = sid)"
            )
            con.execute("DROP INDEX events_by_call")
        con.execute("COMMIT")
    except sqlite3.Error:
        con.execute("ROLLBACK")
        raise


#: The id range of a call with no ``calls`` row: none of its events are stored.
NO_EVENTS = (1, 0)


def call_range(con: sqlite3.Connection, sid: str) -> tuple[int, int] | None:
    """The ids of call ``sid``'s first and last stored events; ``None``: not known.

    A call with no ``calls`` row has no stored events (the writer makes the row in the
    transaction of its first event, and pruning drops it with the last): :data:`NO_EVENTS`,
    an empty range, so a stream waiting for a call that has not started scans nothing.
    ``None`` in a file written by an older relay (read by the CLI), whose own index finds
    the events, and for a row an older relay sharing the file made without a range.
    """
    try:
        row = con.execute("SELECT first_id, last_id FROM calls WHERE sid = ?", (sid,)).fetchone()
    except sqlite3.OperationalError:  # no such column: an older file
        return None
    if row is None:
        return NO_EVENTS
    if row[0] is None or row[1] is None:
        return None
    return int(row[0]), int(row[1])


def newest(con: sqlite3.Connection) -> int:
    """The newest row id ever given (AUTOINCREMENT remembers it after pruning)."""
    row = con.execute(
        "SELECT max(coalesce((SELECT max(id) FROM events), 0), coalesce((SELECT seq FROM "
        "sqlite_sequence WHERE name = 'events'), 0))"
    ).fetchone()
    return int(row[0] or 0)


def call_row(row: tuple[Any, ...]) -> dict[str, Any]:
    """A ``calls`` row (:data:`CALL_COLUMNS`) as ``/calls`` serves it."""
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


def event_row(row: Row) -> dict[str, Any]:
    """A stored event as ``/calls/{sid}`` and ``crctl calls show --json`` give it."""
    return {
        "id": row[0],
        "ts": row[1],
        "call_sid": row[2],
        "kind": row[3],
        "data": json.loads(row[4]),
    }


def _create_private(path: Path) -> None:
    """Create the database file readable by its owner only (it holds call transcripts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
