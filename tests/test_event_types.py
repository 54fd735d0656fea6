"""Typed call events: one Struct per kind, and the store's writer, signalled through one queue.

Each kind is encoded once for SQLite and SSE, decoded once in the CLI, and rendered by kind. In
process.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from pathlib import Path

import msgspec
from rich.console import Console

from crctl.console import CallLog
from relay_server import events as ev
from relay_server.store import EventStore

CA1 = "CA" + "1" * 32

#: One event of every kind, as the relay's call sites publish them (kind, data).
PUBLISHED: list[tuple[str, dict[str, object]]] = [
    (
        ev.CALL_STARTED,
        {
            "from": "+15550100001",
            "to": "+15550100002",
            "direction": "inbound",
            "custom_parameters": {"customerId": "42"},
            "session_id": "VX1",
            "resumed": False,
        },
    ),
    (ev.CALLER_SPEECH, {"text": "where is my order", "last": True}),
    (
        ev.AGENT_REPLY,
        {"text": "Shipped.", "first_token_ms": 12.5, "duration_ms": 80.0, "cancelled": False},
    ),
    (ev.AGENT_PUSHED, {"type": "text", "text": "Hold on", "last": True}),
    (ev.AGENT_PUSHED, {"type": "play", "text": "https://example.com/a.mp3"}),
    (ev.BARGE_IN, {"heard": "Your order", "duration_ms": 640}),
    (ev.DTMF, {"digit": "5"}),
    (ev.TOOL_CALL, {"name": "lookup", "arguments": '{"id": 1}', "result": "found"}),
    (ev.LANGUAGE, {"tts": "es-ES", "transcription": None}),
    (ev.ERROR, {"source": "agent", "message": "turn failed: boom"}),
    (ev.BAD_FRAME, {"reason": "not JSON"}),
    (ev.SOCKET_CLOSED, {"code": 1000}),
    (
        ev.SESSION_END,
        {
            "status": "completed",
            "handoff_data": None,
            "error_code": None,
            "error_message": None,
            "duration": "8",
        },
    ),
    (ev.CALL_STATUS, {"status": "completed", "duration": "9"}),
    (ev.CALL_LOST, {"last_seen": 1.5, "reason": "relay pid 7 on h is gone"}),
]


def test_every_kind_keeps_its_data_as_published_and_round_trips_through_the_wire():
    """The data stored and served is exactly what the call site published.

    No key is added, none lost, and one decode of the ``/events`` JSON gives the same typed event
    back.
    """
    for kind, data in PUBLISHED:
        event = ev.build(kind, CA1, data, 1234.5)
        assert type(event) is ev.KINDS[kind], kind
        assert event.kind == kind and event.call_sid == CA1 and event.ts == 1234.5
        assert event.data == data, kind
        stored = ev.encode_data(event)
        assert json.loads(stored) == data, kind
        message = {"id": 7, "ts": 1234.5, "call_sid": CA1, "kind": kind, "data": data}
        assert ev.decode(json.dumps(message)) == event, kind
        assert ev.from_wire(message) == event, kind


def test_emit_and_publish_are_the_same_event():
    bus = ev.EventBus()
    got: list[ev.CallEvent] = []
    bus.subscribe(got.append)
    bus.emit(ev.Dtmf(call_sid=CA1, ts=1.0, digit="#"))
    bus.publish(ev.DTMF, CA1, digit="#")
    assert got[0] == msgspec.structs.replace(got[1], ts=1.0)
    assert isinstance(got[1], ev.Dtmf) and got[1].digit == "#"


def test_the_llm_fault_kind_is_its_own_field_not_the_tag():
    """``llm.fault`` carries a ``kind`` of its own in its data (connection, timeout…).

    It is ``fault`` in Python, ``kind`` on the wire, and never confused with the event's kind.
    """
    bus = ev.EventBus()
    got: list[ev.CallEvent] = []
    bus.subscribe(got.append)
    bus.emit(ev.LlmFault(call_sid=CA1, fault="timeout", detail="no token in 30 s"))
    (fault,) = got
    assert fault.kind == "llm.fault" and isinstance(fault, ev.LlmFault)
    assert fault.data["kind"] == "timeout" and "--llm-timeout" in fault.data["fix"]
    wire = {"kind": "llm.fault", "call_sid": CA1, "ts": 2.0, "data": fault.data}
    back = ev.decode(json.dumps(wire))
    assert isinstance(back, ev.LlmFault) and back.fault == "timeout"


def test_twilio_errors_get_their_words_and_agent_errors_stay_as_they_were():
    bus = ev.EventBus()
    got: list[ev.CallEvent] = []
    bus.subscribe(got.append)
    bus.emit(ev.Error(call_sid=CA1, source="twilio", message="…", code=64107))
    bus.emit(ev.Error(call_sid=CA1, source="agent", message="turn failed"))
    assert got[0].data["title"] == "Invalid message received"
    assert got[1].data == {"source": "agent", "message": "turn failed"}  # no code: no words


def test_an_unknown_kind_or_misfit_data_is_kept_as_it_came(caplog):
    caplog.set_level(logging.WARNING, "relay_server.events")
    newer = ev.decode(json.dumps({"kind": "sip.refer", "call_sid": CA1, "data": {"to": "x"}}))
    assert isinstance(newer, ev.Other) and newer.kind == "sip.refer"
    assert newer.data == {"to": "x"}
    misfit = ev.build(ev.DTMF, CA1, {"digit": 5})  # a publisher's bug: kept, and said
    assert isinstance(misfit, ev.Other) and misfit.kind == "dtmf" and misfit.data == {"digit": 5}
    assert "does not fit" in caplog.text
    assert ev.decode("not json") is None


def test_the_call_log_renders_typed_events_by_kind():
    out = io.StringIO()
    log = CallLog(Console(file=out, width=120, color_system=None))
    log.add(ev.CallStarted(call_sid=CA1, from_="+1555", to="+1666", resumed=True))
    log.add(ev.LlmFault(call_sid=CA1, fault="connection", detail="connection refused to h:1"))
    log.add(ev.AgentReply(call_sid=CA1, text="old", ttft_ms=12.0))  # a row from before
    log.add(ev.Other(call_sid=CA1, name="sip.refer", fields={"to": "x"}))
    text = " ".join(out.getvalue().split())
    assert "+1555 → +1666" in text and "(reconnected)" in text
    assert "LLM unreachable: connection refused to h:1" in text
    assert "first token 12 ms" in text
    assert 'sip.refer {"to": "x"}' in text


async def test_a_reader_sees_everything_queued_before_it_without_waiting_for_the_batch(
    tmp_path: Path,
):
    """The writer gathers a batch for ``flush_interval``; a reader's flush mark is written at once.

    The mark travels the same queue, so it is also written in order (here the interval is an hour).
    """
    store = EventStore(tmp_path / "events.sqlite3", flush_interval=3600)
    try:
        for digit in "123":
            store.append(ev.Dtmf(call_sid=CA1, digit=digit))
        rows = await asyncio.to_thread(store.query, call_sid=CA1)
        assert [row["data"]["digit"] for row in rows] == ["1", "2", "3"]
        store.append(ev.Dtmf(call_sid=CA1, digit="4"))
        assert store.max_id() == rows[-1]["id"] + 1
    finally:
        store.close()
    reopened = EventStore(tmp_path / "events.sqlite3", readonly=True)
    try:
        assert len(reopened.query(call_sid=CA1)) == 4  # close wrote what was queued
    finally:
        reopened.close()


def test_a_busy_writer_gathers_for_longer_and_a_quiet_one_goes_back():
    """A busy writer gathers for busy_interval; a quiet or a watched one does not.

    Busy: BUSY_EVENTS_PER_SECOND and more. Watched: someone follows the live feed.
    """
    import threading

    from relay_server.store.writer import BUSY_EVENTS_PER_SECOND, Writer

    batches: list[int] = []
    written = threading.Semaphore(0)

    def write(batch: list[ev.CallEvent]) -> None:
        batches.append(len(batch))
        written.release()

    writer = Writer(write, lambda: None, flush_interval=0.2, idle_every=60, busy_interval=1.0)
    try:
        assert writer.interval == 0.2
        burst = int(BUSY_EVENTS_PER_SECOND * 0.2) + 1  # more than a quiet batch carries
        for digit in range(burst):
            writer.put(ev.Dtmf(call_sid=CA1, digit=str(digit % 10)))
        assert written.acquire(timeout=10)
        assert batches == [burst] and writer.interval == 1.0
        writer.put(ev.Dtmf(call_sid=CA1, digit="1"))  # one event in a busy interval: quiet again
        assert written.acquire(timeout=10)
        assert batches == [burst, 1] and writer.interval == 0.2
    finally:
        writer.stop()
    batches.clear()
    written = threading.Semaphore(0)  # (the stop above wrote an empty batch)
    watching = threading.Event()
    watching.set()
    watched = Writer(
        write, lambda: None, flush_interval=0.2, idle_every=60, busy_interval=1.0,
        watched=watching.is_set,
    )  # fmt: skip
    try:  # someone follows the live feed: the batches stay short, busy or not
        for digit in range(burst):
            watched.put(ev.Dtmf(call_sid=CA1, digit=str(digit % 10)))
        assert written.acquire(timeout=10)
        assert batches == [burst] and watched.interval == 0.2
    finally:
        watched.stop()


def test_the_sse_message_carries_the_stored_bytes(tmp_path: Path):
    """Encoded once: the SSE ``data`` embeds the stored JSON text as it is."""
    from relay_server.store.live import sse

    store = EventStore(tmp_path / "events.sqlite3")
    try:
        store.append(ev.ToolCall(call_sid=CA1, name="f", arguments="{}", result={"a": [1, 2]}))
        (row,) = store.select(call_sid=CA1)
    finally:
        store.close()
    message = sse(row)
    assert row[4].encode() in message
    body = json.loads(message.split(b"data: ", 1)[1])
    assert body == {
        "id": row[0],
        "ts": row[1],
        "call_sid": CA1,
        "kind": "tool.call",
        "data": {"name": "f", "arguments": "{}", "result": {"a": [1, 2]}},
    }
