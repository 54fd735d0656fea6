"""Answering machine detection on a real relay with the default (LLM) agent and the fake LLM.

Twilio posts its asynchronous AMD result to ``/amd`` (signed); the call's agent sees it
(``CallSession.answered_by``, ``on_answered_by``), a ``call.answered`` event is published, and
the default agent leaves the configured message on a machine, then ends the call; a person
gets the conversation (and the template's greeting, which Twilio speaks from the TwiML).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from relay_server import events as ev
from relay_server.protocol import End, Text
from relay_server.routing import ANSWERED_PARAMETER
from tests.support import AUTH_TOKEN, PUBLIC_URL, RelayServer, TwilioCaller, sign, wait_until

CA = "CA" + "a" * 32
MESSAGE = "Hi, this is the clinic: your appointment is tomorrow at nine. Goodbye!"


async def post_amd(relay: RelayServer, answered_by: str, *, signed: bool = True) -> int:
    form = {
        "CallSid": CA,
        "AccountSid": "AC" + "0" * 32,
        "AnsweredBy": answered_by,
        "MachineDetectionDuration": "2400",
    }
    headers = {"X-Twilio-Signature": sign(PUBLIC_URL + "/amd", form, AUTH_TOKEN)} if signed else {}
    async with httpx.AsyncClient(trust_env=False) as client:
        response = await client.post(relay.base_url + "/amd", data=form, headers=headers)
    return response.status_code


def answered_events(relay: RelayServer) -> list[ev.CallAnswered]:
    return [e for e in list(relay.events) if isinstance(e, ev.CallAnswered)]


@pytest.fixture
def amd_relay(relay_factory: Callable[..., RelayServer]) -> RelayServer:
    return relay_factory(agent_machine_message=MESSAGE, welcome_greeting="Hello from the clinic!")


async def test_a_person_gets_the_greeting_and_the_conversation(
    amd_relay: RelayServer, fake_llm: Any
) -> None:
    caller = await TwilioCaller(amd_relay, call_sid=CA).connect()
    assert await post_amd(amd_relay, "human") == 204
    assert await caller.quiet(0.3) == []  # nothing said over the person
    session = amd_relay.call_on_loop(lambda: amd_relay.registry.get(CA))
    assert session.answered_by == "human"
    await caller.prompt("Hello?")
    assert await caller.reply_text(timeout=10)  # the LLM answers, as on any call
    assert len(fake_llm.records) == 1
    (event,) = answered_events(amd_relay)
    assert (event.answered_by, event.detection_ms) == ("human", "2400")
    await caller.hangup()
    # the greeting a person hears is the TwiML's, spoken by Twilio when the call connects
    async with httpx.AsyncClient(trust_env=False) as client:
        form = {"CallSid": CA}
        headers = {"X-Twilio-Signature": sign(PUBLIC_URL + "/twiml", form, AUTH_TOKEN)}
        twiml = await client.post(amd_relay.base_url + "/twiml", data=form, headers=headers)
    relay_noun = ET.fromstring(twiml.text).find("Connect/ConversationRelay")
    assert relay_noun is not None
    assert relay_noun.attrib["welcomeGreeting"] == "Hello from the clinic!"


@pytest.mark.parametrize("result", ["machine_end_beep", "machine_end_silence", "machine_end_other"])
async def test_a_machine_gets_the_message_then_the_call_ends(
    amd_relay: RelayServer, fake_llm: Any, result: str
) -> None:
    caller = await TwilioCaller(amd_relay, call_sid=CA).connect()
    assert await post_amd(amd_relay, result) == 204
    frames = await caller.recv_turn(timeout=5)
    assert "".join(f.token for f in frames if isinstance(f, Text)) == MESSAGE
    assert isinstance(await caller.recv(timeout=5), End)
    assert fake_llm.records == []  # no LLM turn for a machine
    await caller.prompt("Please leave a message after the tone.")
    assert await caller.quiet(0.3) == []  # the call is over: nothing more is said
    assert [e.answered_by for e in answered_events(amd_relay)] == [result]
    await caller.hangup()


async def test_a_machine_still_greeting_or_a_fax_is_hung_up_on(amd_relay: RelayServer) -> None:
    for result in ("machine_start", "fax"):
        caller = await TwilioCaller(amd_relay, call_sid=CA).connect()
        assert await post_amd(amd_relay, result) == 204
        assert isinstance(await caller.recv(timeout=5), End)  # no words lost over a greeting
        await caller.hangup()
        assert wait_until(lambda: amd_relay.registry.get(CA) is None)


async def test_without_a_message_a_machine_is_hung_up_on(
    relay_factory: Callable[..., RelayServer],
) -> None:
    relay = relay_factory()
    caller = await TwilioCaller(relay, call_sid=CA).connect()
    assert await post_amd(relay, "machine_end_beep") == 204
    assert isinstance(await caller.recv(timeout=5), End)
    await caller.hangup()


async def test_a_result_before_the_socket_is_given_to_the_agent_at_setup(
    amd_relay: RelayServer,
) -> None:
    assert await post_amd(amd_relay, "machine_end_beep") == 204
    caller = await TwilioCaller(amd_relay, call_sid=CA).connect()
    frames = await caller.recv_turn(timeout=5)
    assert "".join(f.token for f in frames if isinstance(f, Text)) == MESSAGE
    assert isinstance(await caller.recv(timeout=5), End)
    await caller.hangup()


async def test_an_unsigned_result_is_refused(amd_relay: RelayServer) -> None:
    caller = await TwilioCaller(amd_relay, call_sid=CA).connect()
    assert await post_amd(amd_relay, "machine_end_beep", signed=False) == 403
    assert await caller.quiet(0.3) == []
    assert answered_events(amd_relay) == []
    await caller.hangup()


def test_the_live_log_says_who_answered() -> None:
    import io

    from rich.console import Console

    from crctl.console import CallLog

    buffer = io.StringIO()
    log = CallLog(Console(file=buffer, width=200, color_system=None))
    log.add(ev.CallAnswered(call_sid=CA, answered_by="machine_end_beep", detection_ms="2400"))
    log.add(ev.CallAnswered(call_sid=CA, answered_by="human"))
    text = buffer.getvalue()
    assert "answered by machine_end_beep (detected in 2400 ms)" in text
    assert "answered by a person" in text


def test_the_event_round_trips_through_the_wire() -> None:
    import json

    data = {"answered_by": "machine_end_beep", "detection_ms": "2400"}
    event = ev.build(ev.CALL_ANSWERED, CA, data, 12.5)
    assert isinstance(event, ev.CallAnswered) and event.data == data
    message = {"id": 1, "ts": 12.5, "call_sid": CA, "kind": ev.CALL_ANSWERED, "data": data}
    assert ev.decode(json.dumps(message)) == event


async def test_a_synchronous_result_reaches_the_agent_through_the_twiml(
    amd_relay: RelayServer, fake_llm: Any
) -> None:
    # MachineDetection without AsyncAmd: Twilio fetches /twiml after deciding, with AnsweredBy
    form = {"CallSid": CA, "AnsweredBy": "machine_end_beep", "MachineDetectionDuration": "3100"}
    headers = {"X-Twilio-Signature": sign(PUBLIC_URL + "/twiml", form, AUTH_TOKEN)}
    async with httpx.AsyncClient(trust_env=False) as client:
        twiml = await client.post(amd_relay.base_url + "/twiml", data=form, headers=headers)
    relay_noun = ET.fromstring(twiml.text).find("Connect/ConversationRelay")
    assert relay_noun is not None
    params = {p.attrib["name"]: p.attrib["value"] for p in relay_noun.iter("Parameter")}
    assert params == {ANSWERED_PARAMETER: "machine_end_beep"}
    (event,) = answered_events(amd_relay)
    assert (event.answered_by, event.detection_ms) == ("machine_end_beep", "3100")
    # the setup carries the TwiML's parameters, as Twilio sends them
    caller = await TwilioCaller(amd_relay, call_sid=CA).connect(custom_parameters=params)
    frames = await caller.recv_turn(timeout=5)
    assert "".join(f.token for f in frames if isinstance(f, Text)) == MESSAGE
    assert isinstance(await caller.recv(timeout=5), End)
    assert fake_llm.records == []
    await caller.hangup()


async def test_a_person_answering_a_synchronous_detection_is_talked_to(
    amd_relay: RelayServer, fake_llm: Any
) -> None:
    caller = await TwilioCaller(amd_relay, call_sid=CA).connect(
        custom_parameters={ANSWERED_PARAMETER: "human"}
    )
    await caller.prompt("Hello?")
    assert await caller.reply_text(timeout=10)
    session = amd_relay.call_on_loop(lambda: amd_relay.registry.get(CA))
    assert session.answered_by == "human"
    await caller.hangup()


def test_results_whose_socket_never_opens_are_not_kept_for_ever(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # an /amd for a call that was over (or never connected here) before its socket opened
    from relay_server import calls

    now = [1000.0]
    monkeypatch.setattr(calls.time, "monotonic", lambda: now[0])
    registry = calls.CallRegistry(ttl=120.0)
    registry.answered_early("CA1", "machine_end_beep")
    now[0] += 121.0
    registry.answered_early("CA2", "human")  # each new result sweeps the stale ones
    assert registry._early_answers.keys() == {"CA2"}
    assert registry.early_answer("CA1") is None
    assert registry.early_answer("CA2") == "human"
    assert registry.early_answer("CA2") is None  # taken once
    registry.answered_early("CA3", "fax")
    now[0] += 121.0
    assert registry.early_answer("CA3") is None  # stale when its socket finally opens
