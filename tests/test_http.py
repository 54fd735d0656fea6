"""The relay's HTTP surface over real sockets.

/twiml, the /ws upgrade, /action, /status, /healthz and the messages API (Twilio docs: <Connect>
action).

Every webhook is signed exactly as Twilio signs it: over the *public* URL the relay is
configured with (``tests.support.PUBLIC_URL``), never over the 127.0.0.1 address the test
actually connects to. That is what proves the relay checks the configured URL (Twilio docs: webhook
security).
"""

from __future__ import annotations

import asyncio
import time
import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from relay_server.protocol import End, Outbound, Text, encode, encode_inbound
from relay_server.state import relay_state
from tests.support import (
    PUBLIC_URL,
    RelayServer,
    TwilioCaller,
    setup_message,
    sign,
    wait_until,
)

WS_PUBLIC = "wss://relay.example.test/ws"
ACTION_PUBLIC = PUBLIC_URL + "/action"
GREETING = "Hello! How can I help you today?"
RECONNECT_GREETING = "Sorry, we were cut off. Where were we?"
HANGUP_SORRY = "Sorry, something went wrong. Please call again."
CALL_SID = "CA" + "1" * 32
ACCOUNT_SID = "AC" + "0" * 32


# ------------------------------------------------------------------------------ helpers
def voice_params(call_sid: str = CALL_SID, **extra: str) -> dict[str, str]:
    """The standard Voice webhook params of an inbound call, as Twilio posts them."""
    params = {
        "AccountSid": ACCOUNT_SID,
        "ApiVersion": "2010-04-01",
        "CallSid": call_sid,
        "CallStatus": "ringing",
        "Called": "+15550100002",
        "CalledCity": "",
        "CalledCountry": "US",
        "CalledState": "CA",
        "CalledZip": "",
        "Caller": "+15550100001",
        "CallerCity": "SAN FRANCISCO",
        "CallerCountry": "US",
        "CallerState": "CA",
        "CallerZip": "94105",
        "Direction": "inbound",
        "From": "+15550100001",
        "FromCity": "SAN FRANCISCO",
        "FromCountry": "US",
        "FromState": "CA",
        "FromZip": "94105",
        "To": "+15550100002",
        "ToCity": "",
        "ToCountry": "US",
        "ToState": "CA",
        "ToZip": "",
    }
    params.update(extra)
    return params


def action_params(call_sid: str = CALL_SID, status: str = "completed", **extra: str) -> dict:
    """The ``<Connect action>`` callback body: the key set Twilio sends.

    See Twilio docs: <Connect> action.
    """
    call_status = "completed" if status == "completed" else "in-progress"
    return voice_params(
        call_sid,
        CallStatus=call_status,
        SessionId="VX" + call_sid[2:],
        SessionStatus=status,
        SessionDuration="8",
        **extra,
    )


async def post_signed(
    client: httpx.AsyncClient,
    relay: RelayServer,
    path: str,
    params: dict[str, str],
    *,
    signed: bool = True,
    signature: str | None = None,
) -> httpx.Response:
    """POST a form to the relay, signed over the public URL unless told otherwise."""
    headers = {}
    if signature is not None:
        headers["X-Twilio-Signature"] = signature
    elif signed:
        headers["X-Twilio-Signature"] = sign(PUBLIC_URL + path, params)
    return await client.post(relay.base_url + path, data=params, headers=headers)


def parse_twiml(response: httpx.Response) -> ET.Element:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/xml")
    root = ET.fromstring(response.text)
    assert root.tag == "Response"
    return root


def assert_relay_twiml(root: ET.Element, greeting: str, call_sid: str = CALL_SID) -> str:
    """Assert the TwiML is ``<Connect action method><ConversationRelay url welcomeGreeting …/>``.

    The TwiML is as Twilio documents it, the url being the public ``/ws`` with the call's one-time
    query; returns that query.
    """
    connect = root.find("Connect")
    assert connect is not None, ET.tostring(root)
    assert connect.attrib == {"action": ACTION_PUBLIC, "method": "POST"}
    relay_el = connect.find("ConversationRelay")
    assert relay_el is not None
    url = urlsplit(relay_el.get("url", ""))
    assert url._replace(query="").geturl() == WS_PUBLIC
    query = parse_qs(url.query)
    assert query["callSid"] == [call_sid]
    assert len(query["token"]) == 1
    assert relay_el.get("welcomeGreeting") == greeting
    assert relay_el.get("interruptible") == "any"
    assert relay_el.get("reportInputDuringAgentSpeech") == "any"
    assert relay_el.get("dtmfDetection") == "true"
    return url.query


def hangup_children(root: ET.Element) -> list[str]:
    return [child.tag for child in root]


def events_of(relay: RelayServer, kind: str, call_sid: str | None = None) -> list[Any]:
    return [
        e
        for e in list(relay.events)
        if e.kind == kind and (call_sid is None or e.call_sid == call_sid)
    ]


async def ws_refused(relay: RelayServer, headers: dict[str, str], url: str | None = None) -> int:
    """Try an upgrade; return the HTTP status of the refusal (fails if it was accepted)."""
    with pytest.raises(InvalidStatus) as info:
        ws = await websockets.connect(
            url or relay.ws_url, additional_headers=headers, open_timeout=5
        )
        await ws.close()
    return int(info.value.response.status_code)


async def fresh_query(relay: RelayServer, call_sid: str = CALL_SID) -> str:
    """The one-time query of a socket URL the relay's /twiml gives ``call_sid``."""
    return urlsplit(await relay.socket_url(call_sid)).query


def twiml_query(response: httpx.Response) -> str:
    """The query of the ``<ConversationRelay url>`` in a TwiML answer."""
    relay_el = parse_twiml(response).find("Connect/ConversationRelay")
    assert relay_el is not None, response.text
    return urlsplit(relay_el.attrib["url"]).query


def params_of(query: str) -> dict[str, str]:
    return dict(parse_qsl(query))


async def ws_accepted(relay: RelayServer, url: str, signature: str) -> None:
    """Upgrade with ``signature``, send setup, and check the relay registered the call."""
    ws = await websockets.connect(
        url, additional_headers={"X-Twilio-Signature": signature}, open_timeout=5
    )
    try:
        await ws.send(encode_inbound(setup_message(CALL_SID)))
        assert wait_until(lambda: relay.registry.get(CALL_SID) is not None, 3)
    finally:
        await ws.close()
    assert wait_until(lambda: len(relay.registry) == 0, 3)


async def drop(caller: TwilioCaller) -> None:
    """Drop the socket abruptly, without a close frame (close code 1006)."""
    caller.ws.transport.abort()
    await asyncio.sleep(0)


async def exchange(caller: TwilioCaller, said: str) -> str:
    await caller.prompt(said)
    return await caller.reply_text()


# ------------------------------------------------------------------------------ /twiml
async def test_twiml_post_refuses_unsigned_wrong_and_local_url_signatures(relay):
    params = voice_params()
    async with httpx.AsyncClient() as client:
        unsigned = await post_signed(client, relay, "/twiml", params, signed=False)
        wrong = await post_signed(client, relay, "/twiml", params, signature="bm90LWEtc2lnbmF0dXJl")
        local = await post_signed(
            client, relay, "/twiml", params, signature=sign(relay.base_url + "/twiml", params)
        )
        other_params = await post_signed(
            client, relay, "/twiml", params, signature=sign(PUBLIC_URL + "/twiml", {})
        )
    assert unsigned.status_code == 403
    assert wrong.status_code == 403
    assert local.status_code == 403  # signed over http://127.0.0.1: must not pass
    assert other_params.status_code == 403  # the form params are part of the signature


async def test_twiml_post_with_twilio_voice_params_renders_conversation_relay(relay):
    async with httpx.AsyncClient() as client:
        response = await post_signed(client, relay, "/twiml", voice_params())
    root = parse_twiml(response)
    assert_relay_twiml(root, GREETING)
    assert hangup_children(root) == ["Connect"]


async def test_twiml_get_is_signed_over_url_with_query(relay):
    query = f"CallSid={CALL_SID}&From=%2B15550100001&To=%2B15550100002&CallStatus=ringing"
    async with httpx.AsyncClient() as client:
        plain = await client.get(
            relay.base_url + "/twiml",
            headers={"X-Twilio-Signature": sign(PUBLIC_URL + "/twiml")},
        )
        with_query = await client.get(
            relay.base_url + "/twiml?" + query,
            headers={"X-Twilio-Signature": sign(PUBLIC_URL + "/twiml?" + query)},
        )
        tampered = await client.get(
            relay.base_url + "/twiml?" + query.replace("ringing", "in-progress"),
            headers={"X-Twilio-Signature": sign(PUBLIC_URL + "/twiml?" + query)},
        )
        query_ignored = await client.get(
            relay.base_url + "/twiml?" + query,
            headers={"X-Twilio-Signature": sign(PUBLIC_URL + "/twiml")},
        )
        unsigned = await client.get(relay.base_url + "/twiml")
        local = await client.get(
            relay.base_url + "/twiml",
            headers={"X-Twilio-Signature": sign(relay.base_url + "/twiml")},
        )
    # no CallSid (not a call): the plain /ws, which opens nothing
    relay_el = parse_twiml(plain).find("Connect/ConversationRelay")
    assert relay_el is not None and relay_el.get("url") == WS_PUBLIC
    assert_relay_twiml(parse_twiml(with_query), GREETING)
    assert tampered.status_code == 403
    assert query_ignored.status_code == 403
    assert unsigned.status_code == 403
    assert local.status_code == 403


@pytest.mark.parametrize(
    "overrides", [{"verify_signatures": False}, {"auth_token": None}], ids=["opt-out", "no-token"]
)
async def test_unsigned_requests_pass_without_verification(relay_factory, overrides):
    relay = relay_factory(**overrides)
    async with httpx.AsyncClient() as client:
        post = await post_signed(client, relay, "/twiml", voice_params(), signed=False)
        get = await client.get(relay.base_url + "/twiml?CallSid=" + CALL_SID)
        status = await post_signed(client, relay, "/status", voice_params(), signed=False)
    assert_relay_twiml(parse_twiml(post), GREETING)
    assert_relay_twiml(parse_twiml(get), GREETING)
    assert status.status_code == 204
    caller = await TwilioCaller(relay, token=None).connect()
    await caller.prompt("hello")
    assert await caller.reply_text() == "You said: hello"
    await caller.hangup()
    # the socket URL is still one per call, used once: without signatures too
    assert await ws_refused(relay, {}) == 403
    assert await ws_refused(relay, {}, relay.ws_url + "?" + (caller.query or "")) == 403


# ------------------------------------------------------------------------ WebSocket upgrade
async def test_websocket_upgrade_signed_over_public_wss_url_is_accepted(relay):
    query = await fresh_query(relay)
    caller = await TwilioCaller(relay).connect(
        query=query, signature=sign(WS_PUBLIC, params_of(query))
    )
    assert await exchange(caller, "hello") == "You said: hello"
    await caller.hangup()


async def test_websocket_upgrade_unsigned_or_wrong_is_refused_with_403(relay):
    query = await fresh_query(relay)  # a valid socket URL: the signature is what is refused
    url, params = relay.ws_url + "?" + query, params_of(query)
    assert await ws_refused(relay, {}, url) == 403
    assert await ws_refused(relay, {"X-Twilio-Signature": "bm90LWEtc2lnbmF0dXJl"}, url) == 403
    # over the address actually connected to, or over https:// instead of wss://
    assert await ws_refused(relay, {"X-Twilio-Signature": sign(relay.ws_url, params)}, url) == 403
    headers = {"X-Twilio-Signature": sign(PUBLIC_URL + "/ws", params)}
    assert await ws_refused(relay, headers, url) == 403
    # the auth token matters
    headers = {"X-Twilio-Signature": sign(WS_PUBLIC, params, token="other")}
    assert await ws_refused(relay, headers, url) == 403
    assert len(relay.registry) == 0
    # none of these used the URL up
    await ws_accepted(relay, url, sign(WS_PUBLIC, params))


async def test_websocket_query_string_tac_convention_is_accepted(relay):
    query = "a=b&" + await fresh_query(relay)
    await ws_accepted(relay, relay.ws_url + "?" + query, sign(WS_PUBLIC, params_of(query)))


async def test_websocket_query_string_embedded_in_url_is_accepted(relay):
    query = "a=b&" + await fresh_query(relay)
    await ws_accepted(relay, relay.ws_url + "?" + query, sign(WS_PUBLIC + "?" + query, {}))


async def test_websocket_query_string_must_match_the_signature(relay):
    query = await fresh_query(relay)
    headers = {"X-Twilio-Signature": sign(WS_PUBLIC, {"a": "b", **params_of(query)})}
    assert await ws_refused(relay, headers, relay.ws_url + "?a=c&" + query) == 403
    # a signature without the query does not cover a query added later
    headers = {"X-Twilio-Signature": sign(WS_PUBLIC)}
    assert await ws_refused(relay, headers, relay.ws_url + "?" + query) == 403


# ------------------------------------------------------------------- one-time socket URLs
def socket_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "relay_server.socket"]


async def test_replayed_handshake_is_refused(relay, caplog):
    first = await TwilioCaller(relay).connect()  # the URL from /twiml, signed as Twilio signs
    assert await exchange(first, "hello") == "You said: hello"
    headers = {"X-Twilio-Signature": sign(WS_PUBLIC, params_of(first.query or ""))}
    replay = relay.ws_url + "?" + (first.query or "")
    # the same handshake again, byte for byte: while the first socket is open, and after it
    assert await ws_refused(relay, headers, replay) == 403
    await first.hangup()
    assert wait_until(lambda: len(relay.registry) == 0)
    assert await ws_refused(relay, headers, replay) == 403
    warnings = socket_warnings(caplog)
    assert any("in use by an open socket" in w for w in warnings), warnings
    assert any("already used (a replayed handshake?)" in w for w in warnings), warnings
    assert len(relay.registry) == 0


async def test_socket_url_without_token_or_with_a_forged_one_is_refused(relay, caplog):
    # signed correctly over what is connected to: only the token is wrong
    for query in ("", f"callSid={CALL_SID}", f"callSid={CALL_SID}&token=1.abcdefgh.x"):
        url = relay.ws_url + ("?" + query if query else "")
        headers = {"X-Twilio-Signature": sign(WS_PUBLIC, params_of(query))}
        assert await ws_refused(relay, headers, url) == 403
    # a token minted for another call does not open this one
    other = params_of(await fresh_query(relay, "CA" + "2" * 32))
    forged = {"callSid": CALL_SID, "token": other["token"]}
    url = relay.ws_url + "?callSid=" + CALL_SID + "&token=" + other["token"]
    assert await ws_refused(relay, {"X-Twilio-Signature": sign(WS_PUBLIC, forged)}, url) == 403
    warnings = socket_warnings(caplog)
    assert any("no socket token in the URL" in w for w in warnings), warnings
    assert any("malformed socket token" in w for w in warnings), warnings
    assert any(f"bad socket token for call {CALL_SID}" in w for w in warnings), warnings


async def test_setup_for_another_call_closes_the_socket(relay, caplog):
    caller = await TwilioCaller(relay).connect(setup=False)
    await caller.send(setup_message("CA" + "2" * 32))
    with pytest.raises(websockets.ConnectionClosed) as info:
        await caller.recv()
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1008
    assert info.value.rcvd.reason == "setup callSid does not match the socket URL"
    assert relay.registry.get("CA" + "2" * 32) is None
    assert any(
        f"its setup is for call CA{'2' * 32} but the socket URL was minted for call {CALL_SID}" in w
        for w in socket_warnings(caplog)
    )
    # the URL is spent
    headers = {"X-Twilio-Signature": sign(WS_PUBLIC, params_of(caller.query or ""))}
    assert await ws_refused(relay, headers, relay.ws_url + "?" + (caller.query or "")) == 403


async def test_socket_url_expires(relay_factory, caplog):
    relay = relay_factory(socket_token_lifetime=1)
    query = await fresh_query(relay)
    expires = int(params_of(query)["token"].split(".")[0])
    # minted with a 1 s lifetime: wait until the wall clock has passed it (no event says so)
    while time.time() <= expires:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    headers = {"X-Twilio-Signature": sign(WS_PUBLIC, params_of(query))}
    assert await ws_refused(relay, headers, relay.ws_url + "?" + query) == 403
    assert any("expired" in w for w in socket_warnings(caplog))
    # a fresh URL from /twiml works (minted with the usual lifetime: a loaded machine may take
    # more than 1 s between /twiml and the upgrade)
    relay_state(relay.app).tokens.lifetime = 90
    caller = await TwilioCaller(relay).connect()
    assert await exchange(caller, "hello") == "You said: hello"
    await caller.hangup()


async def test_dropped_socket_may_reopen_its_url_until_the_session_ends(relay):
    """A dropped socket may reopen its URL (applicationReconnect) until the session ends.

    applicationReconnect (Twilio docs: ConversationRelay) reopens the same URL once the socket has
    dropped; after /action the session is over and only the new URL opens.
    """
    caller = await TwilioCaller(relay).connect()
    assert await exchange(caller, "hello") == "You said: hello"
    await drop(caller)
    assert wait_until(lambda: len(relay.registry) == 0)
    again = await TwilioCaller(relay).connect(query=caller.query)  # same URL, re-signed
    assert await exchange(again, "again") == "You said: again"
    await drop(again)
    assert wait_until(lambda: len(relay.registry) == 0)

    async with httpx.AsyncClient() as client:
        response = await post_signed(client, relay, "/action", failed_params())
    new_query = assert_relay_twiml(parse_twiml(response), RECONNECT_GREETING)
    assert params_of(new_query)["token"] != params_of(caller.query or "")["token"]
    headers = {"X-Twilio-Signature": sign(WS_PUBLIC, params_of(caller.query or ""))}
    assert await ws_refused(relay, headers, relay.ws_url + "?" + (caller.query or "")) == 403
    third = await TwilioCaller(relay).connect(query=new_query, call_status="IN_PROGRESS")
    assert await exchange(third, "third") == "You said: third"
    await third.hangup()  # a hang-up (1000) spends the URL: it does not reopen
    assert wait_until(lambda: len(relay.registry) == 0)
    headers = {"X-Twilio-Signature": sign(WS_PUBLIC, params_of(new_query))}
    assert await ws_refused(relay, headers, relay.ws_url + "?" + new_query) == 403


async def test_status_completed_spends_the_calls_socket_urls(relay):
    caller = await TwilioCaller(relay).connect()
    await drop(caller)
    assert wait_until(lambda: len(relay.registry) == 0)
    async with httpx.AsyncClient() as client:
        status = await post_signed(client, relay, "/status", voice_params(CallStatus="completed"))
    assert status.status_code == 204
    headers = {"X-Twilio-Signature": sign(WS_PUBLIC, params_of(caller.query or ""))}
    assert await ws_refused(relay, headers, relay.ws_url + "?" + (caller.query or "")) == 403


async def test_twiml_without_call_sid_names_the_plain_socket_url_that_opens_nothing(relay):
    params = voice_params()
    del params["CallSid"]
    async with httpx.AsyncClient() as client:
        response = await post_signed(client, relay, "/twiml", params)
    relay_el = parse_twiml(response).find("Connect/ConversationRelay")
    assert relay_el is not None and relay_el.get("url") == WS_PUBLIC  # as `crctl twiml render`
    assert await ws_refused(relay, {"X-Twilio-Signature": sign(WS_PUBLIC)}) == 403


# ---------------------------------------------------------------------------------- /action
async def test_action_completed_hangs_up_and_publishes_session_end(relay):
    async with httpx.AsyncClient() as client:
        response = await post_signed(client, relay, "/action", action_params(status="completed"))
    assert hangup_children(parse_twiml(response)) == ["Hangup"]
    (event,) = events_of(relay, "session.end", CALL_SID)
    assert event.data["status"] == "completed"
    assert event.data["handoff_data"] is None
    assert event.data["duration"] == "8"


async def test_action_handoff_dials_the_handoff_number(relay_factory):
    relay = relay_factory(handoff_number="+15550100999")
    handoff = '{"reasonCode":"live-agent-handoff","reason":"x"}'
    params = action_params(status="ended", HandoffData=handoff)
    async with httpx.AsyncClient() as client:
        response = await post_signed(client, relay, "/action", params)
    root = parse_twiml(response)
    dial = root.find("Dial")
    assert dial is not None, response.text
    assert dial.text == "+15550100999"
    assert hangup_children(root)[0] == "Dial"
    assert root.find("Say") is None
    (event,) = events_of(relay, "session.end", CALL_SID)
    assert event.data["status"] == "ended"
    assert event.data["handoff_data"] == handoff


async def test_action_handoff_without_number_apologises_and_hangs_up(relay):
    params = action_params(
        status="ended", HandoffData='{"reasonCode":"live-agent-handoff","reason":"x"}'
    )
    async with httpx.AsyncClient() as client:
        response = await post_signed(client, relay, "/action", params)
    root = parse_twiml(response)
    assert hangup_children(root) == ["Say", "Hangup"]
    assert root.find("Say").text  # type: ignore[union-attr]
    assert root.find("Dial") is None


async def test_action_ended_without_handoff_hangs_up(relay_factory):
    relay = relay_factory(handoff_number="+15550100999")
    async with httpx.AsyncClient() as client:
        response = await post_signed(client, relay, "/action", action_params(status="ended"))
    assert hangup_children(parse_twiml(response)) == ["Hangup"]
    (event,) = events_of(relay, "session.end", CALL_SID)
    assert event.data["status"] == "ended"
    assert event.data["handoff_data"] is None


@pytest.mark.parametrize(
    ("handoff", "children"),
    [
        ("please put me through to someone", ["Dial", "Hangup"]),  # free text: a request
        ('{"handoff": true}', ["Dial", "Hangup"]),
        ('["live-agent-handoff"]', ["Hangup"]),  # JSON, but not an object: no request
        ('{"reasonCode": "end-of-call"}', ["Hangup"]),
        ("[" * 5000 + "]" * 5000, ["Dial", "Hangup"]),  # too deep to decode: not a 500
    ],
)
async def test_action_reads_handoff_data_of_every_shape(relay_factory, handoff, children):
    relay = relay_factory(handoff_number="+15550100999")
    params = action_params(status="ended", HandoffData=handoff)
    async with httpx.AsyncClient() as client:
        response = await post_signed(client, relay, "/action", params)
    assert response.status_code == 200, response.text
    assert hangup_children(parse_twiml(response)) == children
    (event,) = events_of(relay, "session.end", CALL_SID)
    assert event.data["handoff_data"] == handoff  # published as sent, whatever its shape


async def test_action_refuses_unsigned_and_local_url(relay):
    params = action_params(status="completed")
    async with httpx.AsyncClient() as client:
        unsigned = await post_signed(client, relay, "/action", params, signed=False)
        local = await post_signed(
            client, relay, "/action", params, signature=sign(relay.base_url + "/action", params)
        )
    assert unsigned.status_code == 403
    assert local.status_code == 403
    assert events_of(relay, "session.end") == []


async def test_action_failed_for_unknown_call_hangs_up(relay):
    params = action_params(
        "CA" + "9" * 32, status="failed", ErrorCode="64105", ErrorMessage="Websocket ended"
    )
    async with httpx.AsyncClient() as client:
        response = await post_signed(client, relay, "/action", params)
    root = parse_twiml(response)
    assert hangup_children(root) == ["Say", "Hangup"]
    assert root.find("Connect") is None
    (event,) = events_of(relay, "session.end", "CA" + "9" * 32)
    assert (event.data["error_code"], event.data["error_message"]) == ("64105", "Websocket ended")


# ------------------------------------------------------------------------------- reconnect
def failed_params() -> dict[str, str]:
    return action_params(status="failed", ErrorCode="64105", ErrorMessage="Websocket ended")


def contents(messages: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(m["role"], m.get("content")) for m in messages]


async def test_failed_socket_reconnects_and_resumes_the_conversation(relay, fake_llm):
    caller = await TwilioCaller(relay).connect()
    assert await exchange(caller, "hello") == "You said: hello"
    await drop(caller)
    assert wait_until(lambda: len(relay.registry) == 0)

    async with httpx.AsyncClient() as client:
        response = await post_signed(client, relay, "/action", failed_params())
    query = assert_relay_twiml(parse_twiml(response), RECONNECT_GREETING)

    again = await TwilioCaller(relay).connect(
        query=query, call_status="IN_PROGRESS", session_id="VX" + "2" * 32
    )
    reply = await exchange(again, "again")
    await again.hangup()
    assert reply == "You said: again"
    sent = fake_llm.records[-1].body["messages"]
    assert len(fake_llm.records) == 2
    assert contents(sent)[1:] == [
        ("assistant", GREETING),
        ("user", "hello"),
        ("assistant", "You said: hello"),
        ("assistant", RECONNECT_GREETING),  # heard by the caller on the new socket
        ("user", "again"),
    ]
    assert wait_until(lambda: len(relay.registry) == 0)


async def test_reconnect_limit_then_hang_up(relay_factory, fake_llm):
    relay = relay_factory(max_reconnects=1)
    caller = await TwilioCaller(relay).connect()
    assert await exchange(caller, "hello") == "You said: hello"
    await drop(caller)
    assert wait_until(lambda: len(relay.registry) == 0)
    async with httpx.AsyncClient() as client:
        first = await post_signed(client, relay, "/action", failed_params())
        assert_relay_twiml(parse_twiml(first), RECONNECT_GREETING)

        again = await TwilioCaller(relay).connect(call_status="IN_PROGRESS")
        assert await exchange(again, "again") == "You said: again"
        await drop(again)
        assert wait_until(lambda: len(relay.registry) == 0)

        second = await post_signed(client, relay, "/action", failed_params())
    root = parse_twiml(second)
    assert hangup_children(root) == ["Say", "Hangup"]
    assert root.find("Say").text == HANGUP_SORRY  # type: ignore[union-attr]
    assert root.find("Connect") is None
    assert relay.registry.parked == 0  # the call is over: its history is not kept


async def test_status_completed_forgets_parked_history(relay):
    caller = await TwilioCaller(relay).connect()
    assert await exchange(caller, "hello") == "You said: hello"
    await drop(caller)
    assert wait_until(lambda: len(relay.registry) == 0)
    assert wait_until(lambda: relay.registry.parked == 1)
    async with httpx.AsyncClient() as client:
        status = await post_signed(
            client, relay, "/status", voice_params(CallStatus="completed", CallDuration="12")
        )
        assert status.status_code == 204
        assert relay.registry.parked == 0
        response = await post_signed(client, relay, "/action", failed_params())
    assert parse_twiml(response).find("Connect") is None


async def test_barge_in_on_reconnect_greeting_keeps_resumed_history(relay, fake_llm):
    """After a reconnect, the caller barges in on the reconnect greeting.

    Twilio reports the heard fragment of that greeting. The restored conversation must survive it.
    """
    caller = await TwilioCaller(relay).connect()
    assert await exchange(caller, "hello") == "You said: hello"
    await drop(caller)
    assert wait_until(lambda: len(relay.registry) == 0)
    async with httpx.AsyncClient() as client:
        response = await post_signed(client, relay, "/action", failed_params())
    assert_relay_twiml(parse_twiml(response), RECONNECT_GREETING)

    again = await TwilioCaller(relay).connect(call_status="IN_PROGRESS")
    await again.info("tokensPlayed", "Sorry, we were")
    await again.interrupt("Sorry, we were", 600)
    reply = await exchange(again, "again")
    await again.hangup()
    assert reply == "You said: again"
    sent = contents(fake_llm.records[-1].body["messages"])
    # The fragment belongs to the reconnect greeting: only that greeting is shortened, nothing
    # said before the drop may be cut or dropped because of it.
    assert sent[1:] == [
        ("assistant", GREETING),
        ("user", "hello"),
        ("assistant", "You said: hello"),
        ("assistant", "Sorry, we were"),
        ("user", "again"),
    ]


# ---------------------------------------------------------------------------------- /status
async def test_status_callback_returns_204_and_publishes(relay):
    params = voice_params(CallStatus="completed", CallDuration="42")
    async with httpx.AsyncClient() as client:
        unsigned = await post_signed(client, relay, "/status", params, signed=False)
        assert unsigned.status_code == 403
        assert events_of(relay, "call.status") == []
        response = await post_signed(client, relay, "/status", params)
    assert response.status_code == 204
    assert response.content == b""
    (event,) = events_of(relay, "call.status", CALL_SID)
    assert event.data == {"status": "completed", "duration": "42"}


# --------------------------------------------------------------------------------- /healthz
async def test_healthz_counts_live_sockets(relay):
    async with httpx.AsyncClient(base_url=relay.base_url) as client:

        async def calls() -> int:
            body = (await client.get("/healthz")).json()
            assert body["status"] == "ok"
            return int(body["calls"])

        assert await calls() == 0
        caller = await TwilioCaller(relay).connect()
        assert wait_until(lambda: len(relay.registry) == 1)
        assert await calls() == 1
        await caller.hangup()
        assert wait_until(lambda: len(relay.registry) == 0)
        assert await calls() == 0


# -------------------------------------------------------------------------- messages API
async def test_messages_api_disabled_without_api_token(relay):
    caller = await TwilioCaller(relay).connect()
    assert wait_until(lambda: relay.registry.get(CALL_SID) is not None)
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{relay.base_url}/calls/{CALL_SID}/messages",
            content=encode(Text(token="Hold on", last=True)),
            headers={"Authorization": "Bearer anything", **JSON},
        )
    assert response.status_code == 401
    assert "CRCTL_API_TOKEN" in response.json()["error"]
    assert await caller.quiet(0.2) == []
    await caller.hangup()


async def test_messages_api_auth_lookup_and_validation(relay_factory):
    relay = relay_factory(api_token="s3cret")
    caller = await TwilioCaller(relay).connect()
    assert wait_until(lambda: relay.registry.get(CALL_SID) is not None)
    url = f"{relay.base_url}/calls/{CALL_SID}/messages"
    good = {"Authorization": "Bearer s3cret", **JSON}
    text = encode(Text(token="Hold on", last=True))
    async with httpx.AsyncClient() as client:
        none = await client.post(url, content=text, headers=JSON)
        wrong = await client.post(
            url, content=text, headers={**JSON, "Authorization": "Bearer nope"}
        )
        basic = await client.post(
            url, content=text, headers={**JSON, "Authorization": "Basic czNjcmV0"}
        )
        unknown = await client.post(
            f"{relay.base_url}/calls/CA{'9' * 32}/messages", content=text, headers=good
        )
        # Raw on purpose: bodies the protocol's types refuse to build, which the API must refuse.
        not_json = await client.post(url, content=b"hold on", headers=good)
        bad_type = await client.post(url, json={"type": "shout", "token": "x"}, headers=good)
        bad_digits = await client.post(
            url, json={"type": "sendDigits", "digits": "12a"}, headers=good
        )
    for response in (none, wrong, basic):
        assert response.status_code == 401, response.text
        assert "error" in response.json()
    assert unknown.status_code == 404
    assert "CA" + "9" * 32 in unknown.json()["error"]
    for response in (not_json, bad_type, bad_digits):
        assert response.status_code == 400, response.text
        assert response.json()["error"]
    assert "digits" in bad_digits.json()["error"]
    assert await caller.quiet(0.2) == []  # nothing rejected reached the call
    await caller.hangup()


JSON = {"Content-Type": "application/json"}


async def push(relay: RelayServer, message: Outbound) -> httpx.Response:
    """POST a message into the live test call through the messages API."""
    async with httpx.AsyncClient() as client:
        return await client.post(
            f"{relay.base_url}/calls/{CALL_SID}/messages",
            content=encode(message),
            headers={"Authorization": "Bearer s3cret", **JSON},
        )


async def test_messages_api_text_reaches_the_caller(relay_factory):
    relay = relay_factory(api_token="s3cret")
    caller = await TwilioCaller(relay).connect()
    assert wait_until(lambda: relay.registry.get(CALL_SID) is not None)
    response = await push(relay, Text(token="Hold on", last=True))
    assert response.status_code == 202
    assert response.json() == {"sent": "text"}
    assert await caller.recv() == Text(token="Hold on", last=True)
    assert await caller.quiet(0.2) == []
    await caller.hangup()


async def test_messages_api_end_reaches_the_caller(relay_factory):
    relay = relay_factory(api_token="s3cret")
    caller = await TwilioCaller(relay).connect()
    assert wait_until(lambda: relay.registry.get(CALL_SID) is not None)
    response = await push(relay, End(handoff_data="{}"))
    assert response.status_code == 202
    assert await caller.recv() == End(handoff_data="{}")
    await caller.hangup()


async def test_messages_api_end_during_a_reply_cuts_it_first(relay_factory, fake_llm):
    from fakes.fake_llm import Script

    relay = relay_factory(api_token="s3cret")
    fake_llm.enqueue(Script(tokens=[f" w{i}" for i in range(40)], delay=0.03))
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("talk for a while")
    await caller.recv()
    response = await push(relay, End(handoff_data='{"reason":"supervisor"}'))
    assert response.status_code == 202
    frames = []
    while not frames or not isinstance(frames[-1], End):
        frames.append(await caller.recv())
    # the reply's talk cycle is closed before end, and nothing follows end
    assert frames[-2] == Text(token="", last=True)
    assert await caller.quiet(0.3) == []
    assert wait_until(lambda: fake_llm.records[0].client_disconnected)
    await caller.hangup()


async def test_action_failed_with_other_error_does_not_reconnect(relay, fake_llm):
    caller = await TwilioCaller(relay).connect()
    assert await exchange(caller, "hello") == "You said: hello"
    await drop(caller)
    assert wait_until(lambda: len(relay.registry) == 0)
    params = action_params(status="failed", ErrorCode="64101", ErrorMessage="Invalid parameter")
    async with httpx.AsyncClient() as client:
        response = await post_signed(client, relay, "/action", params)
    root = parse_twiml(response)
    assert root.find("Connect") is None  # reconnecting would fail the same way, in a loop
    assert hangup_children(root) == ["Say", "Hangup"]
