"""Reading the events database: stored rows and calls (the caller holds the store's lock)."""

from __future__ import annotations

import sqlite3
from typing import Any

from relay_server.store.schema import CALL_COLUMNS, Row, call_range, call_row


def select(
    con: sqlite3.Connection,
    since: float | None,
    call_sid: str | None,
    after_id: int | None,
    limit: int,
) -> list[Row]:
    """Stored rows, oldest first: ``ts >= since``, of ``call_sid``, ``id > after_id``.

    A call's rows are looked for in its id range only (:func:`call_range`).
    """
    where: list[str] = []
    args: list[Any] = []
    if after_id is not None:
        where.append("id > ?")
        args.append(after_id)
    span = call_range(con, call_sid) if call_sid else None
    if span is not None:
        where.append("id BETWEEN ? AND ?")
        args.extend(span)
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
    return [
        (int(r[0]), float(r[1]), str(r[2]), str(r[3]), str(r[4])) for r in con.execute(sql, args)
    ]


def calls(con: sqlite3.Connection, limit: int) -> list[dict[str, Any]]:
    """One row per call, newest first."""
    cursor = con.execute(
        f"SELECT {CALL_COLUMNS} FROM calls ORDER BY started DESC LIMIT ?", (limit,)
    )
    return [call_row(row) for row in cursor]


def find_call(con: sqlite3.Connection, sid: str) -> dict[str, Any] | None:
    """The call ``sid`` or, for 6 characters or more, the one call whose SID starts so."""
    found = con.execute(f"SELECT {CALL_COLUMNS} FROM calls WHERE sid = ?", (sid,)).fetchall()
    if not found and len(sid) >= 6:
        pattern = sid.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        found = con.execute(
            f"SELECT {CALL_COLUMNS} FROM calls WHERE sid LIKE ? ESCAPE '\\' LIMIT 2",
            (pattern + "%",),
        ).fetchall()
    return call_row(found[0]) if len(found) == 1 else None
