"""Call tracking: a ``calls`` row per call, and the calls a gone relay left open.

The writer keeps each call's row (from, to, started, ended, status, turns, errors, hand-off)
up to date in the same transaction as its events. A ``relays`` table has a row per relay
process that writes the file (host, pid, started, a heartbeat every
:data:`HEARTBEAT_SECONDS`). At start, calls still open whose relay is gone (stopped, its
process dead on this host, or no heartbeat for :data:`GONE_AFTER_SECONDS`) get the final
status ``lost`` and a ``call.lost`` event saying when that relay was last seen.
"""

from __future__ import annotations

import json
import logging
import socket
import sqlite3
import time
from typing import Any

import msgspec
import psutil

from relay_server import events as ev

log = logging.getLogger("relay_server.store")

#: How often a relay's writer says it is alive, and after how long without that it is gone.
HEARTBEAT_SECONDS = 10.0
GONE_AFTER_SECONDS = 60.0
#: Characters of a partial transcript that are stored (the end of it).
PARTIAL_MAX_CHARS = 1024


def track_calls(
    con: sqlite3.Connection, events: list[ev.CallEvent], ids: list[int], relay: str
) -> None:
    """Keep the ``calls`` rows of ``events`` (stored as ``ids``) up to date.

    In the writer's transaction. ``relay`` (the writer's relay id) serves those calls from now
    on. The common events (a prompt, a reply) only touch a call's last time, counters and id
    range: those are gathered into one upsert per call and batch. The rare ones (start, end,
    hang-up, status, lost) update the row one by one, in order, after it.
    """
    # sid -> [started, last_ts, turns, errors, first id, last id]
    seen: dict[str, list[Any]] = {}
    rare: list[tuple[ev.CallEvent, int]] = []
    for event, event_id in zip(events, ids, strict=True):
        sid = event.call_sid
        if not sid:
            continue
        if isinstance(event, ev.CallLost):
            rare.append((event, event_id))
            continue
        row = seen.get(sid)
        if row is None:
            row = seen[sid] = [event.ts, event.ts, 0, 0, event_id, event_id]
        row[1] = event.ts
        row[5] = event_id
        if isinstance(event, ev.AgentReply):
            row[2] += 1
        elif isinstance(event, ev.Error | ev.LlmFault):
            row[3] += 1
        elif isinstance(event, _RARE):
            rare.append((event, event_id))
    con.executemany(
        "INSERT INTO calls (sid, started, last_ts, relay, turns, errors, first_id, last_id) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (sid) DO UPDATE SET last_ts = excluded.last_ts, relay = excluded.relay, "
        "turns = turns + excluded.turns, errors = errors + excluded.errors, "
        "first_id = coalesce(first_id, excluded.first_id), last_id = excluded.last_id",
        [(sid, *row[:2], relay, *row[2:]) for sid, row in seen.items()],
    )
    for event, event_id in rare:
        _track_rare(con, event, event_id)


def _track_rare(con: sqlite3.Connection, event: ev.CallEvent, event_id: int) -> None:
    sid, ts = event.call_sid, event.ts
    match event:
        case ev.CallLost():
            # Its time is not the call's (it is written when the next relay starts), but the
            # call's events now end with it.
            con.execute(
                "UPDATE calls SET status = CASE status WHEN 'live' THEN 'lost' ELSE status END, "
                "ended = CASE status WHEN 'live' THEN ? ELSE ended END, "
                "first_id = coalesce(first_id, ?), last_id = ? WHERE sid = ?",
                (event.last_seen or ts, event_id, event_id, sid),
            )
        case ev.CallStarted():
            con.execute(
                "UPDATE calls SET from_number = coalesce(?, from_number), "
                "to_number = coalesce(?, to_number), custom_parameters = ?, status = 'live', "
                "ended = NULL WHERE sid = ?",
                (
                    event.from_ or None,
                    event.to or None,
                    json.dumps(event.custom_parameters or {}, default=str),
                    sid,
                ),
            )
        case ev.SocketClosed():
            con.execute(
                "UPDATE calls SET ended = ?, status = CASE status WHEN 'live' THEN 'hung up' "
                "ELSE status END WHERE sid = ?",
                (ts, sid),
            )
        case ev.SessionEnd():
            status = str(event.status or "ended")
            if event.error_code:
                status += f" ({event.error_code})"
            con.execute(
                "UPDATE calls SET ended = ?, status = ?, handoff = coalesce(?, handoff) "
                "WHERE sid = ?",
                (ts, status, event.handoff_data or None, sid),
            )
        case ev.CallStatus(status=status) if status in ev.CALL_OVER:
            # The session's own status (ended, failed…) says more than the call's final one.
            con.execute(
                "UPDATE calls SET ended = max(coalesce(ended, 0), ?), status = CASE WHEN status "
                "IN ('live', 'hung up') THEN ? ELSE status END WHERE sid = ?",
                (ts, status, sid),
            )


#: Events that change more of a call's row than its last time and counters.
_RARE = (ev.CallStarted, ev.SocketClosed, ev.SessionEnd, ev.CallStatus)


def bounded(event: ev.CallEvent) -> ev.CallEvent:
    """``event`` as stored: a partial transcript is cut to its end.

    It keeps its last :data:`PARTIAL_MAX_CHARS` characters (``chars``: how long it was).
    """
    if isinstance(event, ev.CallerSpeech) and not event.last:
        text = event.text
        if len(text) > PARTIAL_MAX_CHARS:
            return msgspec.structs.replace(
                event, text="…" + text[1 - PARTIAL_MAX_CHARS :], chars=len(text)
            )
    return event


def heartbeat(con: sqlite3.Connection, relay_id: str, *, stopped: bool = False) -> None:
    """Say relay ``relay_id`` is alive (or, ``stopped``, that it stopped cleanly)."""
    now = time.time()
    con.execute(
        "UPDATE relays SET last_seen = ?, stopped = ? WHERE id = ?",
        (now, now if stopped else None, relay_id),
    )


def lost_calls(con: sqlite3.Connection, relay_id: str) -> list[ev.CallLost]:
    """A ``call.lost`` event for each call left open by a relay that is gone.

    So a crash does not leave it "live" for ever. Relays gone long ago with no open call are
    forgotten.
    """
    now = time.time()
    host = socket.gethostname()
    relays = {
        rid: (rhost, int(pid), float(seen), stopped)
        for rid, rhost, pid, seen, stopped in con.execute(
            "SELECT id, host, pid, last_seen, stopped FROM relays"
        )
    }
    open_calls = con.execute(
        "SELECT sid, last_ts, relay FROM calls WHERE status = 'live' AND ended IS NULL"
    ).fetchall()
    lost: list[ev.CallLost] = []
    for sid, last_ts, rid in open_calls:
        relay = relays.get(rid) if rid else None
        if rid == relay_id:
            continue
        if relay is None:  # a row from a relay older than the heartbeat
            seen, why = float(last_ts), "no relay has written it since"
            if now - seen < GONE_AFTER_SECONDS:
                continue
        else:
            rhost, pid, seen, stopped = relay
            if stopped is not None:
                why = f"relay pid {pid} on {rhost} stopped"
            elif rhost == host and not psutil.pid_exists(pid):
                why = f"relay pid {pid} on {rhost} is gone"
            elif now - seen >= GONE_AFTER_SECONDS:
                why = f"relay pid {pid} on {rhost} stopped answering"
            else:
                continue  # its relay is still running
            seen = max(seen, float(last_ts))
        lost.append(ev.CallLost(call_sid=sid, ts=now, last_seen=seen, reason=why))
    try:
        con.execute(
            "DELETE FROM relays WHERE id != ? AND last_seen < ? AND NOT EXISTS "
            "(SELECT 1 FROM calls WHERE calls.relay = relays.id AND status = 'live')",
            (relay_id, now - GONE_AFTER_SECONDS),
        )
    except sqlite3.Error as exc:
        log.debug("event store: forgetting old relays failed: %s", exc)
    return lost
