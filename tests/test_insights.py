"""``crctl calls show CA… --insights``: Twilio's Voice Insights events beside the relay's view.

A real relay holds a real call (stored in its events database); the fake Twilio API serves the
call's Insights events over real HTTP, reached through ``CRCTL_TWILIO_API_URL`` as the SDK's
requests to insights.twilio.com are redirected; every Insights request a test makes is replayed
against Prism serving Twilio's ``twilio_insights_v1.json`` contract.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from crctl.cli import app as cli
from crctl.insights import arrange, fields_of, load_insights
from fakes.fake_twilio import FakeTwilio, RecordedRequest
from fakes.prism import INSIGHTS_SPEC, Prism
from relay_server.store import EventStore
from tests.events_support import TOKEN, echo_call

CA = "CA" + "3" * 32
UNKNOWN = "CA" + "4" * 32
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("twilio_env")


# ------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def insights_prism() -> Iterator[Prism]:
    with Prism(INSIGHTS_SPEC) as server:
        yield server


def insights_requests(fake: FakeTwilio) -> list[RecordedRequest]:
    return [r for r in list(fake.requests) if r.path.startswith("/v1/")]


@pytest.fixture
def insights_contract(fake_twilio: FakeTwilio, insights_prism: Prism) -> Iterator[None]:
    """At teardown: every Insights request the test made conforms to Twilio's contract."""
    yield
    made = insights_requests(fake_twilio)
    problems = insights_prism.validate(made)
    if problems:
        pytest.fail("Voice Insights contract violations:\n  " + "\n  ".join(problems))


@pytest.fixture
async def stored(relay_factory: Any, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """A real call through a real relay, stored in a database: (its path, the call's row)."""
    db = tmp_path / "events.sqlite3"
    relay = relay_factory(api_token=TOKEN, events_db=str(db))
    await echo_call(relay, CA, "where is my order")
    relay.stop()
    store = EventStore(db, readonly=True)
    try:
        call = store.call(CA)
    finally:
        store.close()
    assert call is not None and call["started"] and call["ended"]
    return db, call


def iso(unix: float) -> str:
    """Twilio's timestamp form: ``2025-06-01T10:00:01.250Z``."""
    moment = datetime.fromtimestamp(unix, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def seed_conversation(fake: FakeTwilio, call_sid: str, started: float) -> None:
    """A turn as ConversationRelay reports it, seeded out of order (Twilio's order is unknown)."""

    def event(name: str, at: float, seq: int, **payload: Any) -> dict[str, Any]:
        data = {"session_id": "session-1", "sequence_number": seq, **payload}
        return {
            "name": name,
            "timestamp": iso(started + at),
            "group": "conversation_relay",
            "conversation_relay_data": data,
        }

    fake.add_insights_events(
        call_sid,
        event("start_of_agent_speech", 2.050, 6),
        event("start_of_customer_speech", 1.000, 1),
        event("stt_latency", 1.700, 3, latency_ms=230),
        event("end_of_customer_speech", 1.500, 2),
        event("prompt_sent", 1.730, 4),
        event("first_token_received", 1.810, 5),
        event("final_token_received", 1.900, 7, total_tokens=4, total_words=4),
    )


def show(db: Path, *extra: str) -> Any:
    result = runner.invoke(cli, ["calls", "show", CA, "--db", str(db), "--insights", *extra])
    assert "Traceback" not in result.output, result.output
    return result


ORDER = [
    "start_of_customer_speech",
    "end_of_customer_speech",
    "stt_latency",
    "prompt_sent",
    "first_token_received",
    "final_token_received",
    "start_of_agent_speech",
]


# ------------------------------------------------------------------------ the CLI
@pytest.mark.usefixtures("insights_contract")
async def test_events_are_shown_in_order_after_the_relays_view(
    stored: tuple[Path, dict[str, Any]], fake_twilio: FakeTwilio
) -> None:
    db, call = stored
    seed_conversation(fake_twilio, CA, call["started"])
    result = await asyncio.to_thread(show, db)
    assert result.exit_code == 0, result.output
    out = result.output
    relay_part = out.index("where is my order")  # the relay's transcript comes first
    header = out.index("Twilio Voice Insights")
    assert relay_part < header and CA in out[header:]
    lines = [line.strip() for line in out[header:].splitlines()[1:] if line.strip()]
    assert [line.split()[1] for line in lines] == ORDER
    # time from the call's start as the relay recorded it (Twilio's timestamps are to the ms)
    offsets = [float(line.split()[0].rstrip("s")) for line in lines]
    assert offsets == pytest.approx([1.0, 1.5, 1.7, 1.73, 1.81, 1.9, 2.05], abs=0.0011)
    assert lines[2].split()[1:] == ["stt_latency", "latency_ms=230"]
    assert "total_tokens=4 total_words=4" in lines[5]
    assert "session_id" not in out and "sequence_number" not in out  # noise left out
    (request,) = insights_requests(fake_twilio)
    assert request.method == "GET" and request.path == f"/v1/Voice/{CA}/Events"
    assert request.query == {"PageSize": "1000"}


@pytest.mark.usefixtures("insights_contract")
async def test_json_puts_the_events_under_insights(
    stored: tuple[Path, dict[str, Any]], fake_twilio: FakeTwilio
) -> None:
    db, call = stored
    seed_conversation(fake_twilio, CA, call["started"])
    result = await asyncio.to_thread(show, db, "--json")
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["call_sid"] == CA and body["events"][0]["kind"] == "call.started"
    insights = body["insights"]
    assert insights["note"] is None and insights["error"] is None
    assert [e["name"] for e in insights["events"]] == ORDER
    stt = insights["events"][2]
    assert stt["offset_ms"] == pytest.approx(1700, abs=1.1)
    assert stt["fields"] == {"latency_ms": 230}
    assert stt["group"] == "conversation_relay" and stt["level"] == "INFO"
    assert stt["timestamp"].endswith("Z")


@pytest.mark.usefixtures("insights_contract")
async def test_a_404_is_one_line_saying_to_turn_on_advanced_features(
    stored: tuple[Path, dict[str, Any]], fake_twilio: FakeTwilio
) -> None:
    db, _ = stored  # the fake never heard of the call: 404 20404
    result = await asyncio.to_thread(show, db)
    assert result.exit_code == 0, result.output
    assert "where is my order" in result.output  # the relay's part still prints
    (line,) = [line for line in result.output.splitlines() if "Voice Insights" in line]
    assert f"Twilio has no Voice Insights for {CA}" in line
    assert "Advanced Features" in line and "try again in a minute" in line  # it just ended
    assert [r.status for r in insights_requests(fake_twilio)] == [404]


@pytest.mark.usefixtures("insights_contract")
async def test_no_events_yet_for_a_call_that_just_ended(
    stored: tuple[Path, dict[str, Any]], fake_twilio: FakeTwilio
) -> None:
    db, _ = stored
    fake_twilio.add_insights_events(CA)  # known, not processed yet
    result = await asyncio.to_thread(show, db)
    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.output.splitlines() if "Voice Insights" in line]
    assert f"no Voice Insights events for {CA} yet" in line and "try again in a minute" in line
    as_json = await asyncio.to_thread(show, db, "--json")
    assert json.loads(as_json.stdout)["insights"] == {
        "events": [],
        "note": line.strip(),
        "error": None,
    }


@pytest.mark.usefixtures("insights_contract")
async def test_a_twilio_500_is_one_error_line_after_the_relays_part(
    stored: tuple[Path, dict[str, Any]], fake_twilio: FakeTwilio
) -> None:
    db, call = stored
    seed_conversation(fake_twilio, CA, call["started"])
    fake_twilio.fail_next("GET", "/Events", 500, 20500, "Internal Server Error")
    result = await asyncio.to_thread(show, db)
    assert result.exit_code == 1
    assert "where is my order" in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: reading Voice Insights events for {CA} failed: Twilio error 20500: "
        "Internal Server Error"
    ]
    fake_twilio.fail_next("GET", "/Events", 500, 20500, "Internal Server Error")
    as_json = await asyncio.to_thread(show, db, "--json")
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout)["insights"]["error"] == errors[0].removeprefix("error: ")


async def test_missing_credentials_are_the_usual_credentials_line(
    stored: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    db, _ = stored
    monkeypatch.delenv("TWILIO_ACCOUNT_SID")
    monkeypatch.delenv("TWILIO_AUTH_TOKEN")
    result = await asyncio.to_thread(show, db)
    assert result.exit_code == 2  # configuration: fix it, then run again
    assert "where is my order" in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: no Twilio credentials: set")


async def test_network_failure_is_one_line(
    stored: tuple[Path, dict[str, Any]], fake_twilio: FakeTwilio
) -> None:
    db, _ = stored
    fake_twilio.down()
    try:
        result = await asyncio.to_thread(show, db)
    finally:
        fake_twilio.up()
    assert result.exit_code == 1
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert f"cannot reach Twilio at {fake_twilio.base_url}" in line


# ------------------------------------------------------------------------ the fake, the contract
def test_the_fake_pages_like_twilio_and_prism_holds_the_sdk_to_the_contract(
    fake_twilio: FakeTwilio, insights_prism: Prism
) -> None:
    from crctl.insights import fetch_events

    fake_twilio.add_insights_events(
        CA, *({"name": f"e{i}", "timestamp": iso(1_700_000_000 + i)} for i in range(3))
    )
    # the SDK follows meta.next_page_url (absolute, on insights.twilio.com) through the redirect
    events = fetch_events(CA, page_size=2)
    assert [e["name"] for e in events] == ["e0", "e1", "e2"]
    assert [r.raw_query for r in insights_requests(fake_twilio)] == [
        "PageSize=2",
        "PageSize=2&Page=1&PageToken=PT1",
    ]
    page = json.loads(_get(fake_twilio, f"/v1/Voice/{CA}/Events?PageSize=2&Page=0").decode())
    assert [e["name"] for e in page["events"]] == ["e0", "e1"]
    assert page["meta"]["key"] == "events" and page["meta"]["previous_page_url"] is None
    assert page["meta"]["next_page_url"].startswith(f"https://insights.twilio.com/v1/Voice/{CA}/")
    assert insights_prism.validate(insights_requests(fake_twilio)) == []
    # the check is not vacuous: a malformed sid and an unknown parameter are reported
    bad = RecordedRequest(
        "GET", "/v1/Voice/CAnope/Events", {"Limit": "5"}, {}, {}, raw_query="Limit=5"
    )
    bad.headers = dict(insights_requests(fake_twilio)[0].headers)
    problems = insights_prism.validate([bad])
    assert any("'Limit' is not in the contract" in p for p in problems), problems
    assert any("callsid" in p.lower() for p in problems), problems


def _get(fake: FakeTwilio, target: str) -> bytes:
    import base64
    import urllib.request

    auth = base64.b64encode(f"{fake.account_sid}:{fake.auth_token}".encode()).decode()
    request = urllib.request.Request(
        fake.base_url + target, headers={"Authorization": f"Basic {auth}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # loopback only
        body: bytes = response.read()
        return body


def test_unknown_calls_are_404_in_twilios_error_format(fake_twilio: FakeTwilio) -> None:
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as caught:
        _get(fake_twilio, f"/v1/Voice/{UNKNOWN}/Events")
    assert caught.value.code == 404
    assert json.loads(caught.value.read())["code"] == 20404


# ------------------------------------------------------------------------ shaping
def test_no_events_long_after_the_call_points_at_advanced_features(
    fake_twilio: FakeTwilio,
) -> None:
    fake_twilio.add_insights_events(CA)
    call = {"call_sid": CA, "started": time.time() - 900, "ended": time.time() - 600}
    result = load_insights(call)
    assert result.events == [] and result.error is None
    assert result.note is not None and "Advanced Features" in result.note
    assert "yet" not in result.note and call["insights"]["note"] == result.note


def test_payload_is_read_wherever_the_event_carries_it() -> None:
    as_string = {
        "name": "interrupt",
        "conversation_relay_data": '{"type": "customer", "sequence_number": 9}',
    }
    at_top = {"name": "tts_latency", "latency_ms": 80, "level": "INFO"}
    in_edge = {"name": "dtmf", "carrier_edge": {"digit": "5", "metadata": {"region": "us1"}}}
    failed = {"name": "error", "level": "ERROR", "conversation_relay_data": "not json"}
    assert fields_of(as_string) == {"type": "customer"}
    assert fields_of(at_top) == {"latency_ms": 80}
    assert fields_of(in_edge) == {"digit": "5"}
    assert fields_of(failed) == {"data": "not json", "level": "ERROR"}


def test_arrange_orders_by_time_then_sequence_and_untimed_last() -> None:
    events = [
        {
            "name": "b",
            "timestamp": "2025-06-01T10:00:01.000Z",
            "conversation_relay_data": {"sequence_number": 2},
        },
        {"name": "late", "timestamp": None},
        {
            "name": "a",
            "timestamp": "2025-06-01T10:00:01.000Z",
            "conversation_relay_data": {"sequence_number": 1},
        },
        {"name": "first", "timestamp": "2025-06-01T10:00:00.500Z"},
    ]
    arranged = arrange(events)  # no relay start: offsets from the first event
    assert [e["name"] for e in arranged] == ["first", "a", "b", "late"]
    assert [e["offset_ms"] for e in arranged] == [0.0, 500.0, 500.0, None]
