"""The event store's batch write: one insert for a batch's events, one upsert per call.

The ids handed to the live feed must be the stored ones, and a batch mixing calls and event
kinds must leave each call's row as event-by-event writing did (issue 11 batched them).
"""

from __future__ import annotations

from pathlib import Path

from relay_server import events as ev
from relay_server.store import EventStore

CA1, CA2 = "CA" + "1" * 32, "CA" + "2" * 32


def test_a_mixed_batch_keeps_ids_order_and_each_calls_row(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "events.sqlite3", flush_interval=3600)
    try:
        delivered: list[int] = []
        # what the live feed gets from the writer: the ids it numbered
        store.feed.deliver = lambda rows: delivered.extend(r[0] for r in rows)  # type: ignore[method-assign]
        batch: list[ev.CallEvent] = [
            ev.CallStarted(call_sid=CA1, from_="+15550001", to="+15550002", ts=100.0),
            ev.CallerSpeech(call_sid=CA1, text="hello", last=True, ts=101.0),
            ev.CallStarted(call_sid=CA2, from_="+15550003", to="+15550002", ts=101.5),
            ev.AgentReply(call_sid=CA1, text="Hi.", ts=102.0),
            ev.LlmFault(call_sid=CA2, fault="timeout", detail="no token for 1 s", ts=103.0),
            ev.AgentReply(call_sid=CA2, text="Sorry.", ts=103.5),
            ev.AgentReply(call_sid=CA1, text="Bye.", ts=104.0),
            ev.SocketClosed(call_sid=CA1, code=1000, ts=105.0),
        ]
        store._store_batch(batch)  # the writer's step, on this thread
        store._store_batch([ev.AgentReply(call_sid=CA2, text="Again.", ts=106.0)])
        rows = store.query(limit=100)
        assert [row["id"] for row in rows] == delivered  # the ids sent live are the stored ones
        assert delivered == list(range(delivered[0], delivered[0] + 9))
        assert [row["kind"] for row in rows] == [e.kind for e in batch] + ["agent.reply"]
        calls = {c["call_sid"]: c for c in store.calls()}
        one, two = calls[CA1], calls[CA2]
        assert (one["turns"], one["errors"], one["status"]) == (2, 0, "hung up")
        assert (one["started"], one["ended"], one["from"]) == (100.0, 105.0, "+15550001")
        assert (two["turns"], two["errors"], two["status"]) == (2, 1, "live")
        assert (two["started"], two["ended"]) == (101.5, None)
    finally:
        store.close()


# ----------------------------------------------------------------- a call's events by id range


def _interleaved(
    store: EventStore, calls: list[str], turns: int, *, start: bool = True
) -> dict[str, list[str]]:
    """Turns of ``calls`` written interleaved, a batch per round; each call's texts in order."""
    said: dict[str, list[str]] = {sid: [] for sid in calls}
    for sid in calls if start else ():
        store._store_batch([ev.CallStarted(call_sid=sid, from_="+15550001", to="+15550002")])
    for turn in range(turns):
        batch: list[ev.CallEvent] = []
        for sid in calls:
            text = f"{sid[-4:]} turn {turn}"
            said[sid].append(text)
            batch.append(ev.CallerSpeech(call_sid=sid, text=text, last=True))
        store._store_batch(batch)
    return said


def test_a_calls_events_are_found_by_its_id_range_with_no_index_per_call(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "events.sqlite3", flush_interval=3600)
    calls = [f"CA{i:032x}" for i in range(5)]
    try:
        said = _interleaved(store, calls, turns=4)
        store._store_batch([ev.SocketClosed(call_sid=calls[2], code=1000)])
        _interleaved(store, calls[3:], turns=2, start=False)  # the others go on after calls[2]
        for sid in calls[:3]:
            found = store.call(sid)
            assert found is not None
            kinds = [e["kind"] for e in found["events"]]
            texts = [e["data"]["text"] for e in found["events"] if e["kind"] == "caller.speech"]
            assert texts == said[sid]  # all of them, in order, none of another call
            assert kinds[0] == "call.started"
        assert [e["kind"] for e in store.query(call_sid=calls[2], limit=100)][-1] == "socket.closed"
        assert {e["call_sid"] for e in store.query(call_sid=calls[4], limit=100)} == {calls[4]}
        assert len(store.query(call_sid=calls[4], limit=100)) == 1 + 4 + 2
        first, last = store._con.execute(
            "SELECT first_id, last_id FROM calls WHERE sid = ?", (calls[2],)
        ).fetchone()
        ids = [e["id"] for e in store.query(call_sid=calls[2], limit=100)]
        assert (first, last) == (ids[0], ids[-1])
        indexes = {r[0] for r in store._con.execute("SELECT name FROM sqlite_master")}
        assert "events_by_call" not in indexes
        assert store.query(call_sid="CA" + "9" * 32) == []  # no row, no events: nothing scanned
    finally:
        store.close()


def _old_file(path: Path, sids: list[str]) -> None:
    """A database as relays before the id ranges made it: a (call_sid, id) index, no ranges."""
    import sqlite3
    import time

    now = time.time() - 60

    con = sqlite3.connect(path, isolation_level=None)
    con.executescript(
        """
        CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL,
            call_sid TEXT NOT NULL, kind TEXT NOT NULL, data TEXT NOT NULL);
        CREATE INDEX events_by_call ON events (call_sid, id);
        CREATE INDEX events_by_ts ON events (ts);
        CREATE TABLE calls (sid TEXT PRIMARY KEY, from_number TEXT, to_number TEXT,
            custom_parameters TEXT, started REAL NOT NULL, ended REAL, last_ts REAL NOT NULL,
            status TEXT NOT NULL DEFAULT 'live', turns INTEGER NOT NULL DEFAULT 0,
            errors INTEGER NOT NULL DEFAULT 0, handoff TEXT, relay TEXT);
        CREATE TABLE relays (id TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL,
            started REAL NOT NULL, last_seen REAL NOT NULL, stopped REAL);
        """
    )
    for turn in range(3):
        for sid in sids:
            con.execute(
                "INSERT INTO events (ts, call_sid, kind, data) VALUES (?, ?, 'caller.speech', ?)",
                (now + turn, sid, f'{{"text": "old {turn}", "last": true}}'),
            )
    for sid in sids:
        con.execute(
            "INSERT INTO calls (sid, started, last_ts, status, ended) "
            "VALUES (?, ?, ?, 'hung up', ?)",
            (sid, now, now + 2, now + 3),
        )
    con.close()


def test_a_file_from_an_older_relay_gets_its_ranges_and_loses_the_per_call_index(
    tmp_path: Path,
) -> None:
    path = tmp_path / "events.sqlite3"
    sids = [CA1, CA2]
    _old_file(path, sids)
    reader = EventStore(path, readonly=True)  # the CLI reading it before any new relay ran
    try:
        assert [e["data"]["text"] for e in reader.query(call_sid=CA1)] == [
            "old 0",
            "old 1",
            "old 2",
        ]
    finally:
        reader.close()
    store = EventStore(path, flush_interval=3600)
    try:
        indexes = {r[0] for r in store._con.execute("SELECT name FROM sqlite_master")}
        assert "events_by_call" not in indexes
        store._store_batch([ev.CallerSpeech(call_sid=CA2, text="new", last=True)])
        for sid, texts in (
            (CA1, ["old 0", "old 1", "old 2"]),
            (CA2, ["old 0", "old 1", "old 2", "new"]),
        ):
            found = store.call(sid)
            assert found is not None
            assert [e["data"]["text"] for e in found["events"]] == texts
    finally:
        store.close()


def test_a_call_left_open_by_a_gone_relay_shows_its_call_lost_event(tmp_path: Path) -> None:
    path = tmp_path / "events.sqlite3"
    first = EventStore(path, flush_interval=3600)
    first._store_batch([ev.CallStarted(call_sid=CA1, from_="+15550001", to="+15550002")])
    # the relay dies: its writer is never stopped, and its heartbeat says it stopped answering
    first._con.execute("UPDATE relays SET last_seen = last_seen - 3600")
    first._closed = True
    second = EventStore(path, flush_interval=3600)  # another relay starts on the same file
    second._store_batch([ev.CallStarted(call_sid=CA2, from_="+15550003", to="+15550002")])
    try:
        found = second.call(CA1)
        assert found is not None
        assert found["status"] == "lost"
        assert [e["kind"] for e in found["events"]] == ["call.started", "call.lost"]
    finally:
        second.close()


def test_a_call_whose_events_were_all_pruned_loses_its_row(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "events.sqlite3", max_rows=100, flush_interval=3600)
    try:
        store._store_batch([ev.CallStarted(call_sid=CA1, from_="+15550001", to="+15550002")])
        store._store_batch([ev.Dtmf(call_sid=CA2, digit=str(i % 10)) for i in range(150)])
        store.prune()  # CA1's only event is beyond the newest 100 rows, though it is recent
        assert [c["call_sid"] for c in store.calls()] == [CA2]
        assert store.call(CA1) is None
    finally:
        store.close()
