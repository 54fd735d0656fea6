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
