"""Call events: published by a real call, stored in SQLite, served as SSE and JSON.

They are still there after a relay restart. Real sockets on 127.0.0.1, the fake LLM over real HTTP.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from crctl.settings import ensure_api_token, load_settings, read_api_token
from relay_server import events as ev
from relay_server.errors import ConfigError
from relay_server.events import EventBus, explain
from relay_server.protocol import Text, encode
from relay_server.store import EventStore, parse_since
from tests.events_support import (
    PART1,
    PART2,
    TOKEN,
    call_part1,
    call_part2,
    client,
    collect,
    echo_call,
    post_signed,
)
from tests.support import TwilioCaller

#: The longest any wait here may take before the test gives up (a hang, not a speed).
PATIENCE = 30.0

CA1, CA2, CA3 = ("CA" + d * 32 for d in "123")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "events.sqlite3"


# -------------------------------------------------------------- a real call, end to end
async def test_a_call_is_stored_and_streamed_backlog_then_live(relay_factory, fake_llm, db):
    relay = relay_factory(api_token=TOKEN, events_db=str(db))
    caller = await call_part1(relay, fake_llm, CA1)
    async with client(relay) as http:
        # The first half of the call is stored: a stream asked for the last 10 minutes gets it
        # as its backlog, then the second half live, in order.
        connected = asyncio.Event()
        stream = asyncio.create_task(
            collect(
                http,
                {"since": "10m"},
                lambda got: got[-1]["kind"] == "call.status",
                started=connected,
            )
        )
        await connected.wait()
        await asyncio.sleep(0.1)  # the backlog has been sent before the call goes on
        await call_part2(relay, caller)
        events = await stream

        kinds = [e["kind"] for e in events]
        assert kinds == PART1 + PART2
        ids = [e["id"] for e in events]
        assert ids == sorted(set(ids)), "ids strictly increase"
        assert [e["sse_id"] for e in events] == [str(i) for i in ids]
        assert {e["call_sid"] for e in events} == {CA1}
        assert all(json.loads(json.dumps(e)) == e for e in events)  # plain JSON all through

        by_kind: dict[str, list[dict]] = {}
        for event in events:
            by_kind.setdefault(event["kind"], []).append(event["data"])
        started = by_kind["call.started"][0]
        assert started["from"] == "+15550100001" and started["to"] == "+15550100002"
        assert started["custom_parameters"] == {"customerId": "42"}
        assert [(s["text"], s["last"]) for s in by_kind["caller.speech"]] == [
            ("where is", False),
            ("where is my order", True),
        ]
        assert by_kind["language"][0] == {"tts": "es-ES", "transcription": "es-ES"}
        assert by_kind["tool.call"][0]["name"] == "switch_language"
        assert by_kind["tool.call"][0]["result"] == "switched to es-ES"
        reply = by_kind["agent.reply"][0]
        assert reply["text"] == "Your order has shipped."
        assert reply["first_token_ms"] >= 40  # the fake LLM waited 50 ms before the first token
        assert reply["duration_ms"] >= reply["first_token_ms"]
        assert by_kind["barge_in"][0] == {"heard": "Your order", "duration_ms": 640}
        assert by_kind["dtmf"][0] == {"digit": "5"}
        error = by_kind["error"][0]
        assert error["code"] == 64107 and error["source"] == "twilio"
        assert error["explanation"].startswith(
            "Twilio rejected a frame the relay sent (invalid message)"
        )
        assert "sendDigits" in error["fix"]
        assert by_kind["socket.closed"][0] == {"code": 1000}
        assert by_kind["session.end"][0]["status"] == "completed"
        assert by_kind["call.status"][0] == {"status": "completed", "duration": "9"}

        # One row per call, and the call with its events.
        calls = (await http.get("/calls")).json()["calls"]
        assert [c["call_sid"] for c in calls] == [CA1]
        row = calls[0]
        assert (row["from"], row["to"], row["status"]) == (
            "+15550100001",
            "+15550100002",
            "completed",
        )
        assert (row["turns"], row["errors"]) == (2, 1)
        assert row["ended"] >= row["started"]
        one = (await http.get(f"/calls/{CA1}")).json()
        assert [e["kind"] for e in one["events"]] == kinds
        assert (await http.get(f"/calls/{CA1[:10]}")).json()["call_sid"] == CA1  # a unique prefix
        missing = await http.get("/calls/CA" + "9" * 32)
        assert missing.status_code == 404


async def test_filters_call_and_after_and_live_only(relay_factory, db):
    relay = relay_factory(api_token=TOKEN, events_db=str(db))
    await echo_call(relay, CA1)
    await echo_call(relay, CA2)
    async with client(relay) as http:
        everything = await collect(http, {"since": "1h"}, lambda got: len(got) == 10)
        assert [e["call_sid"] for e in everything] == [CA1] * 5 + [CA2] * 5

        only_2 = await collect(http, {"since": "1h", "call": CA2}, lambda got: len(got) == 5)
        assert [e["id"] for e in only_2] == [e["id"] for e in everything[5:]]

        cut = everything[7]["id"]  # CA2's agent.reply
        after = await collect(http, {"after": str(cut)}, lambda got: len(got) == 2)
        assert [e["id"] for e in after] == [e["id"] for e in everything[8:]]

        # Live only (no since/after): nothing old, then only CA3's events while CA1 calls too.
        connected = asyncio.Event()
        live = asyncio.create_task(
            collect(
                http,
                {"call": CA3},
                lambda got: got[-1]["kind"] == "socket.closed",
                started=connected,
            )
        )
        await connected.wait()
        await asyncio.sleep(0.1)
        await echo_call(relay, "CA" + "4" * 32)
        await echo_call(relay, CA3)
        got = await live
        assert {e["call_sid"] for e in got} == {CA3}
        assert got[0]["kind"] == "call.started"
        assert min(e["id"] for e in got) > everything[-1]["id"]

        bad = await http.get("/events", params={"since": "yesterday"})
        assert bad.status_code == 400
        assert "since" in bad.json()["error"] and "\n" not in bad.json()["error"]


async def test_the_call_log_requires_the_api_token(relay_factory, db):
    relay = relay_factory(api_token=TOKEN, events_db=str(db))
    caller = await TwilioCaller(relay, call_sid=CA1).connect()
    async with client(relay, token=None) as anonymous, client(relay, "wrong") as wrong:
        for path in ("/events", "/calls", f"/calls/{CA1}"):
            missing = await anonymous.get(path)
            assert missing.status_code == 401, path
            assert missing.json() == {
                "error": "unauthorized: send the relay's API token as "
                "'Authorization: Bearer <token>'"
            }
            assert missing.headers["www-authenticate"] == "Bearer"
            bad = await wrong.get(path)
            assert (bad.status_code, bad.json()) == (
                401,
                {"error": "unauthorized: wrong API token"},
            )
    async with client(relay) as http:
        # The messages API still works next to GET /calls/{sid}.
        pushed = await http.post(
            f"/calls/{CA1}/messages",
            content=encode(Text(token="Hi.", last=True)),
            headers={"Content-Type": "application/json"},
        )
        assert pushed.status_code == 202
        assert await caller.recv() == Text(token="Hi.", last=True)
    await caller.hangup()

    open_relay = relay_factory(events_db="")  # no token configured at all
    async with client(open_relay) as http:
        refused = await http.get("/events")
    assert refused.status_code == 401
    assert "CRCTL_API_TOKEN" in refused.json()["error"]


async def test_events_still_there_after_a_relay_restart(relay_factory, fake_llm, db):
    first = relay_factory(api_token=TOKEN, events_db=str(db))
    await echo_call(first, CA1, "remember this")
    first.stop()

    second = relay_factory(api_token=TOKEN, events_db=str(db))
    async with client(second) as http:
        call = (await http.get(f"/calls/{CA1}")).json()
        assert [e["kind"] for e in call["events"]] == [
            "call.started",
            "caller.speech",
            "agent.reply",
            "turn.timeline",
            "socket.closed",
        ]
        assert call["events"][2]["data"]["text"] == "You said: remember this"
        assert call["events"][2]["data"]["llm"]["outcome"] == "completed"
        assert call["status"] == "hung up"
        old = await collect(http, {"since": "1h"}, lambda got: len(got) == 5)
        assert [e["call_sid"] for e in old] == [CA1] * 5
        await echo_call(second, CA2)
        new = await collect(
            http, {"after": str(old[-1]["id"])}, lambda got: got[-1]["kind"] == "socket.closed"
        )
        assert {e["call_sid"] for e in new} == {CA2}
        assert new[0]["id"] > old[-1]["id"]  # ids keep growing across restarts
        assert [c["call_sid"] for c in (await http.get("/calls")).json()["calls"]] == [CA2, CA1]


async def test_stopping_the_relay_ends_open_streams_at_once(relay_factory, db, caplog):
    relay = relay_factory(api_token=TOKEN, events_db=str(db))
    async with client(relay) as http:
        connected = asyncio.Event()
        stream = asyncio.create_task(collect(http, {}, lambda got: False, started=connected))
        await connected.wait()
        with caplog.at_level(logging.ERROR, logger="uvicorn.error"):
            await asyncio.to_thread(relay.stop)
        # The relay ended the stream itself: uvicorn did not have to wait out its graceful
        # timeout and cancel it (it says so in its log when it does).
        exceeded = [r for r in caplog.records if "graceful shutdown exceeded" in r.getMessage()]
        assert exceeded == []
        assert await asyncio.wait_for(stream, PATIENCE) == []  # it ended, without an error


async def test_session_end_with_an_error_code_is_explained(relay_factory, db):
    relay = relay_factory(api_token=TOKEN, events_db=str(db))
    params = {"CallSid": CA1, "SessionStatus": "failed", "ErrorCode": "64102"}
    await post_signed(relay, "/action", params)
    async with client(relay) as http:
        call = (await http.get(f"/calls/{CA1}")).json()
    (end,) = call["events"]
    assert end["data"]["title"] == "Unable to connect to WebSocket URL"
    assert "--public-url" in end["data"]["fix"]
    assert call["status"] == "failed (64102)"


# ---------------------------------------------------------------------- error codes
def test_every_documented_code_is_explained_with_a_fix():
    for code in (64101, 64102, 64104, 64105, 64106, 64107, 64108, 64109, 64111, 64112, 64114):
        words = explain(code)
        assert words["title"] and words["explanation"].endswith(".") and words["fix"], code
    assert explain("64107")["title"] == "Invalid message received"
    assert "twilio.com/docs/api/errors/64199" in explain(64199)["fix"]
    assert explain(None) == {} and explain("x") == {}


def test_the_bus_explains_error_bearing_events_whoever_publishes_them():
    bus, got = EventBus(), []
    bus.subscribe(got.append)
    bus.publish(ev.ERROR, CA1, source="twilio", message="…", code=64105)
    bus.publish(ev.ERROR, CA1, source="agent", message="turn failed")
    bus.publish(ev.LLM_FAULT, CA1, kind="rate_limit", detail="429")
    assert got[0].data["title"] == "WebSocket ended"
    assert "explanation" not in got[1].data
    assert "429" in got[2].data["fix"] and got[2].data["explanation"]


# --------------------------------------------------------------------------- the store
def _publish(store: EventStore, kind: str, sid: str, ts: float | None = None, **data) -> None:
    store.append(ev.build(kind, sid, data, ts))


def test_store_query_calls_and_prefix(db):
    store = EventStore(db)
    try:
        t0 = time.time() - 100
        _publish(store, ev.CALL_STARTED, CA1, t0, **{"from": "+1555", "to": "+1666"})
        _publish(store, ev.AGENT_REPLY, CA1, t0 + 1, text="hi", ttft_ms=1.0, duration_ms=2.0)
        _publish(store, ev.CALL_STARTED, CA2, t0 + 50, **{"from": "+1777", "to": "+1666"})
        _publish(store, ev.BAD_FRAME, "", t0 + 51, reason="not JSON")
        # A value JSON cannot hold (a tool's odd result) is stored as its str().
        store.append(
            ev.ToolCall(call_sid=CA2, ts=t0 + 60, name="f", arguments="{}", result=object())
        )
        rows = store.query()
        assert [r["kind"] for r in rows] == [
            "call.started",
            "agent.reply",
            "call.started",
            "frame.bad",
            "tool.call",
        ]
        assert rows[4]["data"]["result"].startswith("<object object")
        assert [r["call_sid"] for r in store.query(call_sid=CA2)] == [CA2, CA2]
        assert [r["id"] for r in store.query(since=t0 + 50)] == [r["id"] for r in rows[2:]]
        assert [r["id"] for r in store.query(after_id=rows[3]["id"])] == [rows[4]["id"]]
        assert len(store.query(limit=2)) == 2
        calls = store.calls()
        assert [(c["call_sid"], c["from"], c["turns"]) for c in calls] == [
            (CA2, "+1777", 0),
            (CA1, "+1555", 1),
        ]
        assert store.call(CA1[:8])["call_sid"] == CA1  # a unique prefix
        assert store.call("CA") is None  # too short to guess
        _publish(store, ev.DTMF, CA1[:8] + "x" * 26, None, digit="1")
        assert store.call(CA1[:8]) is None  # no longer unique
        assert store.call(CA1)["call_sid"] == CA1
    finally:
        store.close()
    reader = EventStore(db, readonly=True)  # the CLI's view, the relay stopped
    try:
        assert len(reader.query()) == 6
    finally:
        reader.close()


def test_store_prunes_by_rows_and_age(db):
    store = EventStore(db, max_rows=100, keep_days=1)
    try:
        old = time.time() - 3 * 86400
        for i in range(10):
            _publish(store, ev.DTMF, CA1, old + i, digit="1")
        for i in range(150):
            _publish(store, ev.DTMF, CA2, None, digit=str(i % 10))
        store.flush()
        store.prune()
        rows = store.query(limit=1000)
        assert len(rows) == 100
        assert {r["call_sid"] for r in rows} == {CA2}  # the old call went, with its calls row
        assert [c["call_sid"] for c in store.calls()] == [CA2]
        newest = store.last_id
    finally:
        store.close()
    again = EventStore(db)
    try:
        _publish(again, ev.DTMF, CA2, None, digit="2")
        assert again.query(after_id=newest)[0]["id"] == newest + 1  # ids never reused
    finally:
        again.close()


def test_the_store_writes_in_its_own_thread_never_on_the_publishers(db):
    """bus.publish with the store subscribed only queues: every write runs on its thread.

    (What that costs the relay's loop per event is a benchmark's figure, bench/, not a test's.)
    """
    store = EventStore(db)
    writers: set[str] = set()
    write = store._write

    def recorded(batch: list[ev.CallEvent]) -> list[Any]:
        writers.add(threading.current_thread().name)
        return write(batch)

    store._write = recorded  # type: ignore[method-assign]
    bus = EventBus()
    bus.subscribe(store.append)
    n = 20_000
    try:
        for i in range(n):
            bus.publish(ev.CALLER_SPEECH, CA1, text=f"words {i}", last=True)
        store.flush()  # returns once the writer has stored all of them
    finally:
        store.close()
    assert writers == {"event-store"}
    assert store.last_id == n


def test_store_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no events database at"):
        EventStore(tmp_path / "missing.sqlite3", readonly=True)
    (tmp_path / "garbage.sqlite3").write_bytes(b"not a database" * 100)
    with pytest.raises(ConfigError, match=r"garbage\.sqlite3"):
        EventStore(tmp_path / "garbage.sqlite3")


def test_database_file_is_private(db):
    EventStore(db).close()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


# ---------------------------------------------------------------------------- since=
@pytest.mark.parametrize(
    ("text", "ago"),
    [("30s", 30), ("10m", 600), ("2h", 7200), ("1d", 86400), ("600", 600), ("1.5m", 90)],
)
def test_since_as_a_duration(text, ago):
    assert parse_since(text, now=1_800_000_000) == 1_800_000_000 - ago


def test_since_as_timestamp_or_iso():
    assert parse_since("1700000000") == 1_700_000_000
    assert parse_since("2026-11-21T14:00:00Z") == 1795269600
    assert parse_since("2026-11-21T15:00:00+01:00") == 1795269600
    assert parse_since(None) is None and parse_since("") is None
    for bad in ("yesterday", "10 minutes", "-5"):
        with pytest.raises(ValueError, match="since"):
            parse_since(bad)


# ---------------------------------------------------------------------- settings, token
def test_events_db_setting_and_state_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("CRCTL_EVENTS_DB", "CRCTL_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CRCTL_STATE_DIR", str(tmp_path / "state"))
    assert load_settings().relay_config().events_db == str(tmp_path / "state" / "events.sqlite3")
    assert load_settings(events_db="").relay_config().events_db is None  # memory only
    monkeypatch.setenv("CRCTL_EVENTS_DB", str(tmp_path / "x.db"))
    config = load_settings(events_keep_days=2).relay_config()
    assert (config.events_db, config.events_keep_days) == (str(tmp_path / "x.db"), 2)


def test_api_token_file_is_private_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("CRCTL_STATE_DIR", str(tmp_path / "state"))
    token = ensure_api_token()
    path = tmp_path / "state" / "api-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(token) >= 32 and read_api_token() == token
    assert ensure_api_token() == token  # a restarted relay keeps the token tail knows
    os.chmod(path, 0o644)
    assert ensure_api_token() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".api-token-")]
